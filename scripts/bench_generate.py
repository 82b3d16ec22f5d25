#!/usr/bin/env python
"""Benchmark decoding with FMT's multilevel cache against the same weights with dense attention (issue 4).

For each context length: median milliseconds per decoded token and the bytes each cache holds, FMT (FMA +
FMTCache) against dense SDPA + transformers' DynamicCache, interleaved, on a model of SmolLM2-135M's shape with
random weights. Caches are random tensors of the right shape rather than prefills (a decoding step's cost does
not depend on the cached values); see scripts/benchmarks/generate.py. Writes a log-log PNG plus the raw numbers.

Quick run:  python scripts/bench_generate.py --lengths 1024 4096 --steps 4

With --batch-sizes: decoding throughput by batch size instead (issue 12), on the 4-layer, 256-wide byte model after
a real prefill of --prompt-len tokens per row; FMT and dense interleaved, medians over --repeats:
            python scripts/bench_generate.py --batch-sizes 1 8 64 --prompt-len 2048 --out outputs/bench_batch.png
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.generate import (byte_model_config, format_batch_table, format_decode_table, plot_decode,
                                 run_batch_benchmark, run_decode_benchmark, smollm2_shaped_config)

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536 - 64]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="context lengths")
    p.add_argument("--steps", type=int, default=8, help="timed decoding steps per implementation and length")
    p.add_argument("--max-position-embeddings", type=int, default=65536,
                   help="the model's longest sequence (sets FMA's levels)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch's default")
    p.add_argument("--out", default="outputs/bench_generate.png", help="plot path; <stem>.json beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="throughput mode: these batch sizes on the byte model after a real prefill")
    p.add_argument("--prompt-len", type=int, default=2048, help="throughput mode: prompt tokens per row")
    p.add_argument("--repeats", type=int, default=5,
                   help="throughput mode: timed rounds of 64 steps (one fine block) per implementation and batch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_sizes:
        config = byte_model_config(args.prompt_len + 64 * args.repeats + 1)
        rows, meta = run_batch_benchmark(args.batch_sizes, args.prompt_len, 64, args.repeats, config,
                                         progress=not args.no_progress)
        print(format_batch_table(rows))
        print(f"\nother cores busy: {meta['other_cores']}")
        print("\n".join(f"{k}: {v}" for k, v in meta["methods"].items()))
        json_path = Path(args.out).with_suffix(".json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
        print(f"\nwrote {json_path}")
        return
    config = smollm2_shaped_config(args.max_position_embeddings, num_hidden_layers=args.layers)
    rows, meta = run_decode_benchmark(args.lengths, args.steps, config, progress=not args.no_progress)
    print(format_decode_table(rows))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in meta["methods"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_decode(rows, args.out)
    json_path = Path(args.out).with_suffix(".json")
    json_path.write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))
    print(f"\nwrote {args.out}, {json_path}")


if __name__ == "__main__":
    sys.exit(main())
