#!/usr/bin/env python
"""A short demonstration of Fast Multipole Attention (~2-3 minutes on 2 cores; `make demo-attention`).

1. Exactness against dense attention (PyTorch SDPA): at n = 2m the partition is the whole causal triangle, so
   FMA equals dense attention to rounding; with identity pooling (avgpool, p = m) at n = 4m every coarse token
   is one fine token, so it is exact too. At longer n FMA approximates far keys by coarse summaries: the table
   gives its relative error at the untrained average init, beside local attention alone (FMA's level 0).
2. The speed/memory curve: FMA against dense SDPA over a few lengths (the engine of
   scripts/bench_attention.py, with fewer lengths and repeats), a table and a log-log plot.

Both are benchmarks/attention_demo.py's.
"""

from transformers import HfArgumentParser

from benchmarks.attention_demo import DemoAttentionArguments, demo_attention


def parse_args(argv: list[str] | None = None) -> tuple[DemoAttentionArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(DemoAttentionArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    """Run `benchmarks.attention_demo.demo_attention` on the command line (or `argv`)."""
    demo_attention(*parse_args(argv))


if __name__ == "__main__":
    main()
