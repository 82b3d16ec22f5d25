#!/usr/bin/env python
"""Long-context capability suite: passkey, needle-in-a-haystack, variable tracking and word-frequency tasks
(fmt_hf.toolkit.long_context) for a causal LM, an FMT conversion of it and a StreamingLLM cache of FMT's size.

Every (system, prompt) answer is a line of OUTPUT_DIR/samples.jsonl; a rerun skips those already there. The run ends
with OUTPUT_DIR/results.md (score and 95% interval, cache vectors, prefill s, decode ms/token, cache MiB per task,
length and system) and a length x depth heat map per system (OUTPUT_DIR/heatmap_<system>.png). Engine:
fmt_hf/toolkit/long_context_eval.py. Examples:

    # SmolLM2-135M-Instruct (from its wheel), its FMT conversion (m = 256, p = 4, recursive, 64 sinks) and
    # StreamingLLM at FMT's cache size, on passkey and single-needle retrieval at 2K and 4K tokens
    python scripts/eval_long_context.py --tasks passkey niah_single --lengths 2048 4096 --num_samples 20

    # an uptrained FMT checkpoint beside them (any causal LM folder works as a further system)
    python scripts/eval_long_context.py --checkpoints outputs/smollm2-fmt-uptrained
"""

from transformers import HfArgumentParser

from fmt_hf.toolkit.arguments import LongContextArguments
from fmt_hf.toolkit.long_context_eval import run_long_context


def parse_args(argv: list[str] | None = None) -> tuple[LongContextArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(LongContextArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> str:
    """Run `fmt_hf.toolkit.long_context_eval.run_long_context` on the command line (or `argv`); return its table."""
    return run_long_context(*parse_args(argv))


if __name__ == "__main__":
    main()
