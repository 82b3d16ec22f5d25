"""The command of ``scripts/bench_generate.py`` (:class:`GenerateBenchArguments`, :func:`bench_generate`): decoding with
FMT's multilevel cache against the same weights with dense attention, in one of three modes.

* decoding steps (default): ms per decoded token and cache bytes by context length, random caches of the right
  shape (``benchmarks.generate_steps.run_decode_benchmark``);
* throughput (``--batch_sizes``): tokens/s by batch size after a real prefill
  (``benchmarks.generate_steps.run_batch_benchmark``);
* real checkpoints (``--model_name_or_path``): ``model.generate`` on held-out prompts, each run in a fresh subprocess
  (``benchmarks.generate_checkpoints.run_checkpoint_benchmark``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fmt_hf.toolkit.arguments import parse_config_overrides
from fmt_hf.toolkit.data import build_corpus

from .generate_checkpoints import CHECKPOINT_DTYPES, format_checkpoint_table, run_checkpoint_benchmark
from .generate_steps import (
    byte_model_config,
    format_batch_table,
    format_decode_table,
    plot_decode,
    run_batch_benchmark,
    run_decode_benchmark,
    smollm2_shaped_config,
)

DECODE_OUT = "outputs/bench_generate.png"
CHECKPOINT_OUT = "outputs/bench_e2e.json"
BATCH_STEPS = 64
"""Decoding steps per timed throughput round: one whole fine block (m = 64), so that every row completes one."""


@dataclass
class GenerateBenchArguments:
    """The command line of ``scripts/bench_generate.py``; the mode is chosen by ``batch_sizes`` and
    ``model_name_or_path``."""

    lengths: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768, 65536 - 64], metadata={"help": "context lengths"}
    )
    steps: int = field(default=8, metadata={"help": "timed decoding steps per implementation and length"})
    max_position_embeddings: int = field(
        default=65536, metadata={"help": "the model's longest sequence (sets FMA's levels)"}
    )
    layers: int = field(default=30, metadata={"help": "decoder layers (SmolLM2-135M: 30)"})
    fma_options: str | None = field(
        default=None,
        metadata={
            "help": "FMA settings of the decoding-step model, comma-separated FMTConfig fields, e.g. the converted "
            "SmolLM2's `fma_block_size=256,fma_downsample=recursive,fma_sink_tokens=64,fma_refine_groups=4`"
        },
    )
    threads: list[int] | None = field(
        default=None,
        metadata={
            "help": "torch.set_num_threads, one row per count, interleaved (real-checkpoint mode: one count); unset: "
            "torch's default (one per core). On a busy machine fewer threads than cores decode faster: "
            "docs/benchmarks.md, 'Threads'"
        },
    )
    out: str = field(
        default=DECODE_OUT,
        metadata={
            "help": "plot path; <stem>.json beside it (real-checkpoint mode: <stem>.json and <stem>.md, default "
            f"{CHECKPOINT_OUT})"
        },
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})
    batch_sizes: list[int] | None = field(
        default=None, metadata={"help": "throughput mode: these batch sizes on the byte model after a real prefill"}
    )
    prompt_len: int = field(default=2048, metadata={"help": "throughput mode: prompt tokens per row"})
    repeats: int | None = field(
        default=None,
        metadata={
            "help": f"throughput mode: timed rounds of {BATCH_STEPS} steps (one fine block) per implementation and "
            "batch (default 5); real-checkpoint mode: runs per model and prompt length (default 1)"
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "real-checkpoint mode: an FMT checkpoint folder, generating under FMA with an FMTCache"},
    )
    dense_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "real-checkpoint mode: the dense model (e.g. the source Llama); default: the FMT weights under sdpa"
        },
    )
    prompt_lens: list[int] = field(
        default_factory=lambda: [8192, 32768], metadata={"help": "real-checkpoint mode: prompt lengths in tokens"}
    )
    new_tokens: int = field(default=16, metadata={"help": "real-checkpoint mode: tokens generated per run"})
    corpus: str = field(
        default="shakespeare", metadata={"help": "real-checkpoint mode: registry corpus of the prompts"}
    )
    split: str = field(default="test", metadata={"help": "real-checkpoint mode: split of held-out documents"})
    dtype: str = field(
        default="float32", metadata={"choices": CHECKPOINT_DTYPES, "help": "real-checkpoint mode: weights dtype"}
    )


def bench_generate(args: GenerateBenchArguments) -> None:
    """Run the mode ``args`` choose, print its table and write its result files."""
    if args.threads is not None and not all(count > 0 for count in args.threads):
        raise ValueError(f"--threads takes positive thread counts, got {args.threads}")
    if args.model_name_or_path:
        checkpoint_mode(args)
    elif args.batch_sizes:
        batch_mode(args)
    else:
        decode_mode(args)


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))


def decode_mode(args: GenerateBenchArguments) -> None:
    """Decoding steps on the SmolLM2-shaped model: a table, a log-log PNG at ``out`` and ``<out stem>.json``."""
    overrides = parse_config_overrides(args.fma_options)
    config = smollm2_shaped_config(args.max_position_embeddings, num_hidden_layers=args.layers, **overrides)
    rows, meta = run_decode_benchmark(
        args.lengths, args.steps, config, progress=not args.no_progress, threads=args.threads
    )
    print(format_decode_table(rows))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in meta["methods"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_decode(rows, args.out)
    json_path = Path(args.out).with_suffix(".json")
    _write_json(json_path, {"rows": rows, "meta": meta})
    print(f"\nwrote {args.out}, {json_path}")


def batch_mode(args: GenerateBenchArguments) -> None:
    """Throughput by batch size on the byte model: a table and ``<out stem>.json``."""
    repeats = args.repeats or 5
    rounds = repeats * len(args.threads or [None])  # every thread count decodes on from the same caches
    config = byte_model_config(args.prompt_len + BATCH_STEPS * rounds + 1)
    rows, meta = run_batch_benchmark(
        args.batch_sizes,
        args.prompt_len,
        BATCH_STEPS,
        repeats,
        config,
        progress=not args.no_progress,
        threads=args.threads,
    )
    print(format_batch_table(rows))
    print(f"\nother cores busy: {meta['other_cores']}")
    print("\n".join(f"{k}: {v}" for k, v in meta["methods"].items()))
    json_path = Path(args.out).with_suffix(".json")
    _write_json(json_path, {"rows": rows, "meta": meta})
    print(f"\nwrote {json_path}")


def checkpoint_mode(args: GenerateBenchArguments) -> None:
    """Generation from real prompts: prints a markdown table, writes ``<out stem>.json`` and ``.md`` (``out`` left at
    its default: :data:`CHECKPOINT_OUT`)."""
    if args.threads is not None and len(args.threads) != 1:
        raise ValueError(f"--threads: real-checkpoint mode takes one thread count, got {args.threads}")
    out = CHECKPOINT_OUT if args.out == DECODE_OUT else args.out
    texts = build_corpus(args.corpus)[args.split]["text"]
    rows, summary, meta = run_checkpoint_benchmark(
        args.model_name_or_path,
        args.prompt_lens,
        args.new_tokens,
        texts,
        args.dense_model_name_or_path,
        repeats=args.repeats or 1,
        dtype=args.dtype,
        threads=args.threads[0] if args.threads else None,
        progress=not args.no_progress,
    )
    meta["prompt"] = {"corpus": args.corpus, "split": args.split}
    table = format_checkpoint_table(summary)
    texts_out = "\n".join(
        f"{s['prompt_len']} tokens, {name}: {s[f'{name}_text']!r}" for s in summary for name in ("fmt", "dense")
    )
    print(f"{table}\n\n{texts_out}\n\n" + "\n".join(f"{k}: {v}" for k, v in meta["methods"].items()))
    json_path = Path(out).with_suffix(".json")
    _write_json(json_path, {"summary": summary, "rows": rows, "meta": meta})
    json_path.with_suffix(".md").write_text(f"{table}\n\n{texts_out}\n")
    print(f"\nwrote {json_path}, {json_path.with_suffix('.md')}")
