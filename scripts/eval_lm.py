#!/usr/bin/env python
"""Bits per byte and perplexity of a causal LM checkpoint over the whole documents of a split (strided windows).

Works with any causal checkpoint: an FMT trained by scripts/train.py, or a dense transformers model for
comparison. Examples:

    python scripts/eval_lm.py --model_name_or_path outputs/fmt-shakespeare --split test --context_length 1024
    python scripts/eval_lm.py --model_name_or_path path/to/llama --tokenizer_name bytes --stride 256

Prints the results as JSON; they are also saved (see --output_file) for the model card of push_to_hub.py.
"""

import json
import sys

from transformers import HfArgumentParser

from fmt_hf.toolkit.evaluation import EvalArguments, evaluate_lm
from fmt_hf.toolkit.training import CorpusArguments


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line (or `argv`), run `fmt_hf.toolkit.evaluation.evaluate_lm` and print its results."""
    parser = HfArgumentParser((EvalArguments, CorpusArguments))
    eval_args, corpus_args = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    results = evaluate_lm(eval_args, corpus_args)
    print(json.dumps(results, indent=2))
    if eval_args.output_file is not None:
        print(f"results saved to {eval_args.output_file}")
    return results


if __name__ == "__main__":
    main()
