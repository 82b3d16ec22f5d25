"""The quality suite's report: markdown tables of its rows (:func:`format_report`) and the training and
extrapolation plots."""

from __future__ import annotations

import torch


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


REPORT_SECTIONS = ("lm", "probe", "extrapolation")


def format_report(rows: list[dict], sections: tuple[str, ...] = REPORT_SECTIONS) -> str:
    """Markdown tables of the rows: language modelling (``lm``: bpb, relative to dense, s/step, peak MiB), the
    ``probe`` and the ``extrapolation``; sections without rows are left out. A row with a reason or an error shows
    it instead of numbers."""
    latest = {row["name"]: row for row in rows}  # a rerun (after an error) replaces the earlier row
    rows = list(latest.values())
    # "vs dense": against the dense row of the same seed and step budget
    dense = {
        (row["seed"], len(row["train_bits"])): row["bpb"]
        for row in rows
        if row.get("attention") == "sdpa" and row.get("task") == "lm" and "bpb" in row
    }
    tables = []
    lm = [row for row in rows if row.get("task", "lm") == "lm"]
    if "lm" in sections and lm:
        out = [
            "| run | group | attention | bpb (test) | vs dense | s/step | peak MiB | params |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in lm:
            if "bpb" not in row:
                out.append(
                    f"| {row['name']} | {row['group']} | {row['attention']} | not run: "
                    f"{row.get('reason') or row.get('error')} | | | | |"
                )
                continue
            reference = dense.get((row["seed"], len(row["train_bits"])))
            relative = f"{100 * (row['bpb'] / reference - 1):+.1f}%" if reference else "—"
            out.append(
                f"| {row['name']} | {row['group']} | {row['attention']} | {_fmt(row['bpb'])} | {relative} | "
                f"{_fmt(row['s_per_step'], 2)} | {row['peak_bytes'] / 2**20:.0f} | {row['parameters']:,} |"
            )
        tables.append("\n".join(out))
    probe = [row for row in rows if row.get("task") == "probe"]
    if "probe" in sections and probe:
        out = ["| probe run | length | accuracy | s/step |", "|---|---|---|---|"]
        for row in probe:
            reason = row.get("reason") or row.get("error")
            value = _fmt(row["accuracy"]) if "accuracy" in row else f"not run: {reason}"
            out.append(f"| {row['name']} | {row.get('seq_len', '')} | {value} | {_fmt(row.get('s_per_step'), 2)} |")
        tables.append("\n".join(out))
    extrapolated = [row for row in rows if row.get("extrapolation")]
    if "extrapolation" in sections and extrapolated:
        contexts = [item["context"] for item in extrapolated[0]["extrapolation"]]
        out = ["| run | " + " | ".join(f"bpb @ {c}" for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for row in extrapolated:
            cells = [_fmt(item["bpb"]) if "bpb" in item else "capped" for item in row["extrapolation"]]
            out.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        tables.append("\n".join(out))
    return "\n\n".join(tables)


def plot_training(rows: list[dict], path: str, smooth: int = 10, group: str = "main") -> str:
    """Training bits per token against step (moving average over ``smooth`` steps) for the LM rows of ``group``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        if row.get("task") == "lm" and row.get("group") == group and "train_bits" in row:
            bits = torch.tensor(row["train_bits"])
            kernel = min(smooth, len(bits))
            smoothed = bits.unfold(0, kernel, 1).mean(1)
            ax.plot(range(kernel, len(bits) + 1), smoothed, label=f"{row['name']} ({row.get('bpb', 0):.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training bits per token ({smooth}-step mean)")
    ax.set_title("Same model, data and budget; legend: held-out bits per byte")
    return _save(fig, ax, path)


def plot_extrapolation(rows: list[dict], path: str) -> str:
    """Held-out bits per byte against the evaluation context for the rows with an extrapolation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        points = [(item["context"], item["bpb"]) for item in row.get("extrapolation") or [] if "bpb" in item]
        if points:
            ax.plot(*zip(*points), marker="o", label=row["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context (tokens); trained at the first")
    ax.set_ylabel("held-out bits per byte")
    return _save(fig, ax, path)


def _save(fig, ax, path: str) -> str:
    """Grid, legend, and the figure written to ``path`` (and closed)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
