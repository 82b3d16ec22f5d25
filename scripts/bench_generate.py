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

With --model_name_or_path: real checkpoints on real prompts (issue 11): an FMT checkpoint (FMA + FMTCache) against
--dense_model_name_or_path (or the same weights under sdpa + DynamicCache), model.generate after the first
--prompt-lens tokens of held-out documents, each model and length in a fresh subprocess; time to first token,
decoding tokens/s, cache bytes and peak resident memory:
            python scripts/bench_generate.py --model_name_or_path outputs/smollm2-fmt \
                --dense_model_name_or_path outputs/smollm2-dense --prompt-lens 8192 32768 --new-tokens 32 \
                --threads 2
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.generate import (
    DTYPES,
    byte_model_config,
    format_batch_table,
    format_checkpoint_table,
    format_decode_table,
    plot_decode,
    run_batch_benchmark,
    run_checkpoint_benchmark,
    run_decode_benchmark,
    smollm2_shaped_config,
)

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536 - 64]
CHECKPOINT_OUT = "outputs/bench_e2e.json"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="context lengths")
    p.add_argument("--steps", type=int, default=8, help="timed decoding steps per implementation and length")
    p.add_argument(
        "--max-position-embeddings", type=int, default=65536, help="the model's longest sequence (sets FMA's levels)"
    )
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch's default")
    p.add_argument(
        "--out",
        default="outputs/bench_generate.png",
        help="plot path; <stem>.json beside it (real-checkpoint mode: <stem>.json and <stem>.md, default "
        f"{CHECKPOINT_OUT})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="throughput mode: these batch sizes on the byte model after a real prefill",
    )
    p.add_argument("--prompt-len", type=int, default=2048, help="throughput mode: prompt tokens per row")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="throughput mode: timed rounds of 64 steps (one fine block) per implementation and batch "
        "(default 5); real-checkpoint mode: runs per model and prompt length (default 1)",
    )
    p.add_argument(
        "--model_name_or_path",
        default=None,
        help="real-checkpoint mode: an FMT checkpoint folder, generating under FMA with an FMTCache",
    )
    p.add_argument(
        "--dense_model_name_or_path",
        default=None,
        help="real-checkpoint mode: the dense model (e.g. the source Llama); default: the FMT weights under sdpa",
    )
    p.add_argument(
        "--prompt-lens",
        type=int,
        nargs="+",
        default=[8192, 32768],
        help="real-checkpoint mode: prompt lengths in tokens",
    )
    p.add_argument("--new-tokens", type=int, default=16, help="real-checkpoint mode: tokens generated per run")
    p.add_argument("--corpus", default="shakespeare", help="real-checkpoint mode: registry corpus of the prompts")
    p.add_argument("--split", default="test", help="real-checkpoint mode: split of held-out documents")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="real-checkpoint mode: weights dtype")
    args = p.parse_args(argv)
    if args.model_name_or_path:
        if args.out == p.get_default("out"):
            args.out = CHECKPOINT_OUT
        checkpoint_mode(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_sizes:
        repeats = args.repeats or 5
        config = byte_model_config(args.prompt_len + 64 * repeats + 1)
        rows, meta = run_batch_benchmark(
            args.batch_sizes, args.prompt_len, 64, repeats, config, progress=not args.no_progress
        )
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


def checkpoint_mode(args):
    """--model_name_or_path: generation from real prompts; prints a markdown table, writes <out stem>.json and .md."""
    from fmt_hf.toolkit.data import build_corpus

    texts = build_corpus(args.corpus)[args.split]["text"]
    rows, summary, meta = run_checkpoint_benchmark(
        args.model_name_or_path,
        args.prompt_lens,
        args.new_tokens,
        texts,
        args.dense_model_name_or_path,
        repeats=args.repeats or 1,
        dtype=args.dtype,
        threads=args.threads,
        progress=not args.no_progress,
    )
    meta["prompt"] = {"corpus": args.corpus, "split": args.split}
    table = format_checkpoint_table(summary)
    texts_out = "\n".join(
        f"{s['prompt_len']} tokens, {name}: {s[f'{name}_text']!r}" for s in summary for name in ("fmt", "dense")
    )
    print(f"{table}\n\n{texts_out}\n\n" + "\n".join(f"{k}: {v}" for k, v in meta["methods"].items()))
    json_path = Path(args.out).with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"summary": summary, "rows": rows, "meta": meta}, indent=2))
    json_path.with_suffix(".md").write_text(f"{table}\n\n{texts_out}\n")
    print(f"\nwrote {json_path}, {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
