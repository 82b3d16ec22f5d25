"""The summaries of a long-context run's ``samples.jsonl`` rows (:mod:`fmt_hf.toolkit.long_context_eval`): a markdown
table with 95% intervals and costs, and a length x depth heat map per system."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict

from .long_context import wilson_interval


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def results_table(rows: list[dict]) -> str:
    """A markdown table, one line per (task, length, system): samples, mean score with its 95% Wilson interval, the
    cache's key/value vectors per layer and KV head, and the medians of prefill seconds, decode ms/token and cache
    MiB; a length past a system's training length is marked with a dagger."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["task"], row["length"], row["system"])].append(row)
    lines = [
        "| task | length | system | n | score (95% CI) | cache vectors | prefill s | decode ms/token | cache MiB |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for (task, length, system), group in sorted(cells.items()):
        total = sum(r["score"] for r in group)
        low, high = wilson_interval(total, len(group))
        past = group[0]["training_length"] is not None and length > group[0]["training_length"]
        decode = _median([r["decode_ms_per_token"] for r in group])
        lines.append(
            f"| {task} | {length}{' †' if past else ''} | {system} | {len(group)} | {total / len(group):.2f} "
            f"({low:.2f}-{high:.2f}) | {_median([r['cache_vectors'] for r in group]):.0f} | "
            f"{_median([r['prefill_seconds'] for r in group]):.1f} | "
            f"{'-' if decode is None else f'{decode:.0f}'} | {_median([r['cache_mib'] for r in group]):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_heat_maps(rows: list[dict], output_dir: str) -> list[str]:
    """Per system, a PNG of mean score by length (columns) and depth (rows), one panel per task with a depth;
    returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for system in sorted({r["system"] for r in rows}):
        mine = [r for r in rows if r["system"] == system and r["depth"] is not None]
        tasks = sorted({r["task"] for r in mine})
        if not tasks:
            continue
        figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.2), squeeze=False)
        for axis, task in zip(axes[0], tasks):
            cells = defaultdict(list)
            for r in mine:
                if r["task"] == task:
                    cells[(r["depth"], r["length"])].append(r["score"])
            depths, lengths = sorted({d for d, _ in cells}), sorted({n for _, n in cells})
            grid = [[statistics.mean(cells.get((d, n), [float("nan")])) for n in lengths] for d in depths]
            image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            axis.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
            axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            axis.set_xlabel("prompt tokens")
            axis.set_ylabel("needle depth")
            axis.set_title(task)
        figure.colorbar(image, ax=axes[0].tolist(), label="score")
        figure.suptitle(system)
        path = os.path.join(output_dir, f"heatmap_{system}.png")
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


__all__ = ["plot_heat_maps", "results_table"]
