#!/usr/bin/env python
"""Benchmark FastMultipoleAttention against dense PyTorch SDPA.

Times forward and forward+backward, causal and bidirectional, n = 1K .. 64K (batch 1, 8 heads, d = 64,
float32, m = 64, p = 4 by default), FMA and SDPA interleaved and repeated, medians; prints a table with the
SDPA/FMA ratio, peak memory of each and FMA's GFLOP/s against a matmul rate measured in the same run; writes
a log-log plot of time and memory against n plus the raw numbers (CSV and JSON beside the plot). How each
number is measured is printed under the table (see benchmarks/attention.py).

Quick run:  python scripts/bench_attention.py --lengths 1024 2048 --repeats 2
Downsamplers against each other (no dense run):
            python scripts/bench_attention.py --lengths 16384 --modes causal --passes fwd+bwd \
                --downsample depthwise --compare_downsample recursive --sdpa_max_n 0
Full run (default lengths, SDPA included) takes tens of minutes on 2 cores; --sdpa_max_n 16384 cuts it short.
"""

from transformers import HfArgumentParser

from benchmarks.attention import AttentionBenchArguments, bench_attention


def parse_args(argv: list[str] | None = None) -> tuple[AttentionBenchArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(AttentionBenchArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    """Run `benchmarks.attention.bench_attention` on the command line (or `argv`); return its rows and metadata."""
    return bench_attention(*parse_args(argv))


if __name__ == "__main__":
    main()
