#!/usr/bin/env python
"""Check FMA's FlexAttention path on a GPU (issue 12): exactness and fwd+bwd speed and memory against the gather path
and FlashAttention.

(a) exactness: the flex path in bf16 and float32 (and the gather path in bf16) on the device against the same
weights and inputs in float64 on the CPU, outputs and gradients; (b) causal forward+backward in bf16 at
n = 4K .. 128K (batch 1, 16 heads, d = 64): dense SDPA on the FlashAttention backend, FMA's gather path, FMA's
flex path (compiled; compile time reported separately), medians of interleaved repeats timed with CUDA events;
(c) peak memory per implementation and length. Rows that run out of memory, fail or would exceed the time budget
are recorded with the reason. Writes gpu_check.json and gpu_check.md under --out (default $OUT if set, else
outputs/), rewritten after every row. How each number is taken: scripts/benchmarks/gpu_check.py.

GPU (a few minutes on an H200, most of it compiling):
    PYTHONPATH=.:scripts python scripts/check_gpu.py
CPU dry run (tiny, eager FlexAttention, forward only):
    PYTHONPATH=.:scripts python scripts/check_gpu.py --device cpu --lengths 256 512
"""

import argparse
import os
import sys
import time

import torch

from benchmarks.attention import DTYPES
from benchmarks.gpu_check import IMPLEMENTATIONS, CheckConfig, format_markdown, run_check
from fmt_hf.model.fma_downsample import DOWNSAMPLE_MODES

CPU_EXACT_LENGTHS = (100, 333)


def parse_args(argv=None):
    defaults = CheckConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default=defaults.device, help="cuda, or cpu for a dry run")
    p.add_argument("--lengths", type=int, nargs="+", default=list(defaults.lengths), help="timed lengths n")
    p.add_argument(
        "--exact-lengths",
        type=int,
        nargs="*",
        default=None,
        help=f"lengths of the exactness check (default {list(defaults.exact_lengths)} on cuda, "
        f"{list(CPU_EXACT_LENGTHS)} elsewhere)",
    )
    p.add_argument(
        "--exact-dtypes",
        nargs="*",
        choices=list(DTYPES),
        default=list(defaults.exact_dtypes),
        help="dtypes of the flex path's exactness check",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default=defaults.dtype, help="timed dtype")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--heads", type=int, default=defaults.heads, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=defaults.head_dim, help="d")
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="FMA m")
    p.add_argument("--coarse-tokens", type=int, default=defaults.coarse_tokens, help="FMA p")
    p.add_argument("--downsample", choices=DOWNSAMPLE_MODES, default=defaults.downsample, help="FMA downsampler")
    p.add_argument(
        "--flex-kv-block",
        type=int,
        default=None,
        help="keys per KV block of the flex block mask (default: --block-size)",
    )
    p.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="timed samples per implementation (most)")
    p.add_argument(
        "--budget",
        type=float,
        default=defaults.budget_s,
        help="seconds per implementation and length: fewer samples, or a skip when one call would take longer",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs", help="folder for gpu_check.json/.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    exact_lengths = args.exact_lengths
    if exact_lengths is None:
        exact_lengths = CheckConfig().exact_lengths if args.device == "cuda" else CPU_EXACT_LENGTHS
    # Compiled FlexAttention specialises on dtype and on (static, then dynamic) shapes: the check needs a few
    # more graphs than dynamo's default limit allows before it would fall back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    cfg = CheckConfig(
        device=args.device,
        lengths=tuple(args.lengths),
        exact_lengths=tuple(exact_lengths),
        exact_dtypes=tuple(args.exact_dtypes),
        dtype=args.dtype,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        coarse_tokens=args.coarse_tokens,
        downsample=args.downsample,
        flex_kv_block=args.flex_kv_block,
        repeats=args.repeats,
        budget_s=args.budget,
        seed=args.seed,
        implementations=tuple(args.implementations),
    )
    start = time.perf_counter()

    def status(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    result = run_check(cfg, args.out, status)
    print(format_markdown(result))
    print(
        f"written to {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md ({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
