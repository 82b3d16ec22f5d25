#!/usr/bin/env python
"""A short demonstration of Fast Multipole Attention (what `make demo` runs for now; ~2-3 minutes on 2 cores).

1. Exactness against dense attention (PyTorch SDPA): at n = 2m the partition is the whole causal triangle, so
   FMA equals dense attention to rounding; with identity pooling (avgpool, p = m) at n = 4m every coarse token
   is one fine token, so it is exact too. At longer n FMA approximates far keys by coarse summaries: the table
   gives its relative error at the untrained average init, beside local attention alone (FMA's level 0).
2. The speed/memory curve: FMA against dense SDPA over a few lengths (the engine of
   scripts/bench_attention.py, with fewer lengths and repeats), a table and a log-log plot.
"""

import argparse
import os
import sys

import torch
from tqdm.auto import tqdm

from benchmarks.attention import BenchConfig, dense_agreement, format_table, plot_results, run_benchmark, write_results

M = 64  # block size used throughout


def exactness_checks():
    """(label, kwargs for dense_agreement) -- every row is one FMA vs dense comparison."""
    checks = []
    for causal in (True, False):
        for dtype in (torch.float32, torch.float64):
            checks.append(("n = 2m equals dense", dict(n=2 * M, causal=causal, dtype=dtype, max_seq_len=4096)))
    for causal in (True, False):
        checks.append(
            (
                "identity pooling (avgpool, p = m)",
                dict(n=4 * M, causal=causal, dtype=torch.float64, downsample="avgpool", coarse_tokens=M),
            )
        )
    for n in (1024, 4096):
        for causal in (True, False):
            checks.append(
                ("approximation, average init", dict(n=n, causal=causal, dtype=torch.float32, local_baseline=True))
            )
    return checks


def run_exactness(progress=True):
    rows = []
    for label, kwargs in tqdm(exactness_checks(), desc="exactness", disable=not progress, dynamic_ncols=True):
        rows.append((label, dense_agreement(block_size=M, **kwargs)))
    lines = [
        f"{'check':<36} {'n':>5} {'mode':>6} {'dtype':>7} {'max|FMA-dense|':>15} {'rel err':>9} "
        f"{'local-only rel err':>18}"
    ]
    for label, r in rows:
        local = f"{r['local_rel']:.3f}" if "local_rel" in r else "-"
        lines.append(
            f"{label:<36} {r['n']:>5} {'causal' if r['causal'] else 'bidir':>6} {r['dtype']:>7} "
            f"{r['max_abs']:>15.2e} {r['rel']:>9.2e} {local:>18}"
        )
    lines.append(
        "rel err = ||FMA - dense||_F / ||dense||_F on random N(0,1) q, k, v (B=1, H=4, d=64, m=64, p=4 "
        "unless stated); local-only = dense attention restricted to FMA's level-0 keys (no far field)."
    )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="lengths of the speed/memory sweep"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed samples per implementation and length")
    p.add_argument(
        "--out",
        default="outputs/demo_attention.png",
        help="plot path; <stem>.csv and <stem>.json are written beside it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    progress = not args.no_progress

    print("== 1. Exactness against dense attention (SDPA)\n")
    print(run_exactness(progress))

    print("\n== 2. Speed and memory: FMA vs dense SDPA, causal\n")
    cfg = BenchConfig(repeats=args.repeats, budget_s=10.0)
    rows, meta = run_benchmark(
        args.lengths, ["causal"], ["fwd", "fwd+bwd"], cfg, matmul_repeats=3, progress=progress, desc="speed/memory"
    )
    print(format_table(rows, meta))
    png = plot_results(rows, args.out, title="FMA (m=64, p=4) vs dense SDPA, causal, float32 (demo)")
    csv_path, json_path = write_results(rows, meta, png)
    print("\nartifacts:")
    for path in (png, csv_path, json_path):
        print(f"  {os.path.abspath(path)}")
    print("full benchmark (1K..64K, causal and bidirectional): make bench  (scripts/bench_attention.py --help)")


if __name__ == "__main__":
    sys.exit(main())
