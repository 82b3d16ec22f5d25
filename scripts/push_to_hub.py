#!/usr/bin/env python
"""Publish an FMT checkpoint from scripts/train.py to the Hugging Face Hub with a model card.

The card is rendered from model_cards/template.md (architecture and FMA settings, training data and
procedure, evaluation results from train.py --do_eval and scripts/eval_lm.py, intended use and limitations, how to
load with and without fmt_hf). Examples:

    # write the repository folder only (no network)
    python scripts/push_to_hub.py --model_dir outputs/fmt-shakespeare --local_dir outputs/hub/fmt-shakespeare

    # create or update user/fmt-shakespeare on the Hub (after `hf auth login`)
    python scripts/push_to_hub.py --model_dir outputs/fmt-shakespeare --repo_id user/fmt-shakespeare
"""

from transformers import HfArgumentParser

from fmt_hf.toolkit.hub import PushArguments, push_to_hub


def parse_args(argv: list[str] | None = None) -> tuple[PushArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(PushArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    """Run `fmt_hf.toolkit.hub.push_to_hub` on the command line (or `argv`)."""
    (args,) = parse_args(argv)
    commit = push_to_hub(args)
    if args.local_dir is not None:
        print(f"repository folder written to {args.local_dir}")
    if commit is not None:
        print(f"pushed to {commit.commit_url}")


if __name__ == "__main__":
    main()
