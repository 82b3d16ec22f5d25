#!/usr/bin/env python
"""Check FMA's FlexAttention path on a GPU: exactness and fwd+bwd speed and memory against the gather path and
FlashAttention.

(a) exactness: the flex path in bf16 and float32 (and the gather path in bf16) on the device against the same
weights and inputs in float64 on the CPU, outputs and gradients; (b) causal forward+backward in bf16 at
n = 4K .. 128K (batch 1, 16 heads, d = 64): dense SDPA on the FlashAttention backend, FMA's gather path, FMA's
flex path (compiled; compile time reported separately), medians of interleaved repeats timed with CUDA events;
(c) peak memory per implementation and length. Rows that run out of memory, fail or would exceed the time budget
are recorded with the reason. Writes gpu_check.json and gpu_check.md under --out (default $OUT if set, else
outputs/), rewritten after every row. How each number is taken: benchmarks/gpu_check_measure.py.

GPU (a few minutes on an H200, most of it compiling):
    python scripts/check_gpu.py
CPU dry run (tiny, eager FlexAttention, forward only):
    python scripts/check_gpu.py --device cpu --lengths 256 512
"""

from transformers import HfArgumentParser

from benchmarks.gpu_check import GpuCheckArguments, check_gpu


def parse_args(argv: list[str] | None = None) -> tuple[GpuCheckArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(GpuCheckArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    """Run `benchmarks.gpu_check.check_gpu` on the command line (or `argv`); return its result."""
    return check_gpu(*parse_args(argv))


if __name__ == "__main__":
    main()
