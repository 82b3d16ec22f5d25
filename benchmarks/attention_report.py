"""The table, plot and result files of the attention sweep (``benchmarks.attention.run_benchmark``): what
``scripts/bench_attention.py`` and ``scripts/demo_attention.py`` print and write. The conventions behind each column
come with the sweep's metadata (``meta["methods"]``)."""

from __future__ import annotations

import csv
import json
import os
import statistics

from .measure import format_mib


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def format_table(rows: list[dict], meta: dict) -> str:
    """Plain-text table of the sweep plus the conventions behind each column."""
    compared = meta["config"]["compare_downsample"]  # per family: its time, its ratio to FMA, its memory
    header = [
        "n",
        "mode",
        "pass",
        "L",
        "FMA",
        "SDPA",
        "SDPA/FMA",
        "FMA MiB",
        "SDPA MiB",
        "FMA GF/s",
        "% matmul",
        "reps F/S",
        "others",
    ]
    for family in compared:
        header[-1:-1] = [f"FMA {family}", f"{family}/FMA", f"{family} MiB"]
    body = []
    for r in rows:
        extra = []
        for family in compared:
            impl = f"fma_{family}"
            extra += [
                _fmt_time(r[f"{impl}_median_s"]),
                f"{r[f'ratio_{impl}_over_fma']:.3f}",
                format_mib(r[f"{impl}_peak_bytes"]),
            ]
        body.append(
            [
                str(r["n"]),
                r["mode"],
                r["pass"],
                str(r["levels"]),
                _fmt_time(r["fma_median_s"]),
                _fmt_time(r["sdpa_median_s"]),
                "-" if r["ratio_sdpa_over_fma"] is None else f"{r['ratio_sdpa_over_fma']:.2f}x",
                format_mib(r["fma_peak_bytes"]),
                format_mib(r["sdpa_peak_bytes"]),
                f"{r['fma_gflops']:.3g}",
                f"{100 * r['fma_fraction_of_matmul']:.2g}%",
                f"{len(r['fma_times_s'])}/{len(r['sdpa_times_s'])}",
                *extra,
                _fmt_cores(r.get("other_cores")),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    cfg, mm, sysinfo, methods = meta["config"], meta["matmul"], meta["system"], meta["methods"]
    lines += [
        "",
        f"B={cfg['batch']} H={cfg['heads']} d={cfg['head_dim']} {cfg['dtype']}, m={cfg['block_size']} "
        f"p={cfg['coarse_tokens']} query_mode={cfg['query_mode']} downsample={cfg['downsample']}"
        + "".join(f" (and {family})" for family in compared)
        + "; "
        f"torch {sysinfo['torch']}, {sysinfo['threads']} threads, {sysinfo['cpu']}",
        f"matmul {mm['size']}^3 {mm['dtype']}: median {mm['gflops_median']:.1f} GFLOP/s "
        f"(before {statistics.median(mm['gflops_before']):.1f}, after {statistics.median(mm['gflops_after']):.1f})",
        f"time: {methods['time']}",
        f"others: cores kept busy by other processes during the cell (whole run: {_fmt_cores(sysinfo['other_cores'])}"
        f" of {sysinfo['cpus']}); well above 0 means a noisy neighbour and timings to distrust",
        f"memory (MiB): {methods['memory']}",
        f"FLOPs: {methods['flops']}",
    ]
    return "\n".join(lines)


def _fmt_cores(cores: float | None) -> str:
    return "?" if cores is None else f"{cores:.2f}"


def plot_results(rows: list[dict], path: str, title: str = "FMA vs dense SDPA") -> str:
    """Log-log time and peak memory against n, one line per (implementation, mode, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    # FMA layers with other downsamplers (compare_downsample) are the rows' "ratio_fma_<family>_over_fma" keys
    compared = [
        key[len("ratio_") : -len("_over_fma")] for key in (rows[0] if rows else {}) if key.startswith("ratio_fma_")
    ]
    styles = {
        "fma": ("C0", "FMA"),
        "sdpa": ("C3", "SDPA"),
        **{impl: (f"C{4 + i}", f"FMA {impl[4:]}") for i, impl in enumerate(compared)},
    }
    markers = {"causal": "o", "bidir": "s"}
    lines = {"fwd": "--", "fwd+bwd": "-"}
    series = sorted({(r["mode"], r["pass"]) for r in rows})
    for impl, (color, name) in styles.items():
        for mode, pass_ in series:
            pts = sorted(
                (r["n"], r[f"{impl}_median_s"], r[f"{impl}_peak_bytes"])
                for r in rows
                if r["mode"] == mode and r["pass"] == pass_ and r[f"{impl}_median_s"] is not None
            )
            if not pts:
                continue
            ns = [p[0] for p in pts]
            kw = dict(color=color, marker=markers[mode], linestyle=lines[pass_], label=f"{name} {mode} {pass_}")
            ax_t.plot(ns, [p[1] for p in pts], **kw)
            ax_m.plot(ns, [p[2] / 2**20 for p in pts], **kw)
    for ax, ylabel in ((ax_t, "median time per call (s)"), (ax_m, "peak allocator memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CSV_FIELDS = [
    "n",
    "mode",
    "pass",
    "levels",
    "fma_median_s",
    "sdpa_median_s",
    "ratio_sdpa_over_fma",
    "fma_peak_bytes",
    "sdpa_peak_bytes",
    "fma_flops",
    "fma_gflops",
    "fma_fraction_of_matmul",
    "sdpa_flops",
    "sdpa_gflops",
    "fma_times_s",
    "sdpa_times_s",
    "fma_warmup_counted",
    "sdpa_warmup_counted",
    "other_cores",
]


def write_results(rows: list[dict], meta: dict, png_path: str) -> tuple[str, str]:
    """Raw numbers beside the plot: ``<stem>.csv`` (one row per cell) and ``<stem>.json`` (rows + metadata)."""
    stem = os.path.splitext(png_path)[0]
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    csv_path, json_path = stem + ".csv", stem + ".json"
    compared = [f"fma_{family}" for family in meta["config"]["compare_downsample"]]
    fields = CSV_FIELDS + [f"{impl}_{what}" for impl in compared for what in ("median_s", "peak_bytes", "times_s")]
    fields += [f"ratio_{impl}_over_fma" for impl in compared]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (" ".join(f"{t:.6g}" for t in v) if isinstance(v, list) else v) for k, v in row.items()}
            )
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return csv_path, json_path
