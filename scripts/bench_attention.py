#!/usr/bin/env python
"""Benchmark FastMultipoleAttention against dense PyTorch SDPA (issue 2, Build point 4).

Times forward and forward+backward, causal and bidirectional, n = 1K .. 64K (batch 1, 8 heads, d = 64,
float32, m = 64, p = 4 by default), FMA and SDPA interleaved and repeated, medians; prints a table with the
SDPA/FMA ratio, peak memory of each and FMA's GFLOP/s against a matmul rate measured in the same run; writes
a log-log plot of time and memory against n plus the raw numbers (CSV and JSON beside the plot). How each
number is measured is printed under the table (see scripts/benchmarks/attention.py).

Quick run:  python scripts/bench_attention.py --lengths 1024 2048 --repeats 2
Downsamplers against each other (no dense run):
            python scripts/bench_attention.py --lengths 16384 --modes causal --passes fwd+bwd \
                --downsample depthwise --compare-downsample recursive --sdpa-max-n 0
Full run (default lengths, SDPA included) takes tens of minutes on 2 cores; --sdpa-max-n 16384 cuts it short.
"""

import argparse
import sys

import torch

from benchmarks.attention import (
    DTYPES,
    MODES,
    PASSES,
    BenchConfig,
    format_table,
    plot_results,
    run_benchmark,
    write_results,
)
from fmt_hf.model.fma_downsample import DOWNSAMPLE_MODES

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="sequence lengths n")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="attention modes")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="what one timed call does")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per implementation and cell (at most)")
    p.add_argument(
        "--min-repeats", type=int, default=1, help="samples always taken, even when one call exceeds --budget"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=30.0,
        help="seconds per implementation and cell after which repeating stops (once --min-repeats)",
    )
    p.add_argument("--sdpa-max-n", type=int, default=None, help="skip SDPA above this length; unset: never")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--heads", type=int, default=8, help="attention heads (K/V heads too)")
    p.add_argument("--head-dim", type=int, default=64, help="d")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="inputs and the matmul reference")
    p.add_argument("--block-size", type=int, default=64, help="FMA m")
    p.add_argument("--coarse-tokens", type=int, default=4, help="FMA p")
    p.add_argument("--query-mode", choices=["fine", "coarse"], default="fine", help="FMA query_mode")
    p.add_argument(
        "--downsample",
        choices=DOWNSAMPLE_MODES,
        default="depthwise",
        help="FMA downsample (learned ones at their average init)",
    )
    p.add_argument(
        "--compare-downsample",
        nargs="+",
        choices=DOWNSAMPLE_MODES,
        default=[],
        help="also time FMA with these downsamplers, interleaved with --downsample in every cell, and "
        "report their time relative to it (e.g. --downsample depthwise --compare-downsample "
        "recursive); --sdpa-max-n 0 leaves dense attention out",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch's default")
    p.add_argument("--matmul-size", type=int, default=2048, help="square matmul timed for the machine's rate")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs")
    p.add_argument(
        "--out",
        default="outputs/bench_attention.png",
        help="plot path; <stem>.csv and <stem>.json are written beside it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        block_size=args.block_size,
        coarse_tokens=args.coarse_tokens,
        query_mode=args.query_mode,
        downsample=args.downsample,
        compare_downsample=tuple(args.compare_downsample),
        repeats=args.repeats,
        min_repeats=args.min_repeats,
        budget_s=args.budget,
        sdpa_max_n=args.sdpa_max_n,
        seed=args.seed,
    )
    rows, meta = run_benchmark(
        args.lengths,
        args.modes,
        args.passes,
        cfg,
        matmul_size=args.matmul_size,
        progress=not args.no_progress,
        desc="bench_attention",
    )
    print(format_table(rows, meta))
    png = plot_results(
        rows,
        args.out,
        title=f"FMA (m={cfg.block_size}, p={cfg.coarse_tokens}, "
        f"{cfg.query_mode} queries) vs dense SDPA, {cfg.dtype}, "
        f"{meta['system']['threads']} threads",
    )
    csv_path, json_path = write_results(rows, meta, png)
    print(f"\nwrote {png}, {csv_path}, {json_path}")


if __name__ == "__main__":
    sys.exit(main())
