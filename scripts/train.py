#!/usr/bin/env python
"""Train or evaluate a causal (`--task clm`) or masked (`--task mlm`) FMT language model, or a long-document
classifier (`--task classification`), with the `Trainer`.

In the style of transformers' `run_clm.py`/`run_mlm.py`/`run_classification.py`: every `TrainingArguments` flag
works, plus the model and data arguments of `fmt_hf.toolkit.training`. Examples:

    # a small byte-level FMT from scratch on Shakespeare's plays, evaluated in bits per byte
    python scripts/train.py --output_dir outputs/fmt-shakespeare --do_train --do_eval \\
        --corpus shakespeare --seq_len 1024 \\
        --config_overrides "hidden_size=256,intermediate_size=768,num_hidden_layers=4,num_attention_heads=4" \\
        --max_steps 1000 --learning_rate 2e-3 --per_device_train_batch_size 8 --save_steps 200

    # which of Shakespeare's nine history plays a 4096-byte passage comes from: a bidirectional classifier from
    # scratch (mean-pooled), accuracy on passages from held-out regions of every play (--do_eval, --do_predict)
    python scripts/train.py --task classification --output_dir outputs/fmt-histories \\
        --do_train --do_eval --do_predict --works "^(Henry|Richard)" --seq_len 4096 \\
        --config_overrides "hidden_size=256,intermediate_size=768,num_hidden_layers=4,is_causal=False" \\
        --learning_rate 5e-4 --lr_scheduler_type constant_with_warmup --warmup_steps 10 --max_steps 2000

    # continue that run from a checkpoint (step count, optimizer and data order continue)
    python scripts/train.py ... --resume_from_checkpoint outputs/fmt-shakespeare/checkpoint-200

    # the same script in 2 processes on one machine's CPUs: DDP over gloo
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --use_cpu ...
    # ... and on GPUs or several nodes, by accelerate's options or config alone (DDP, FSDP, DeepSpeed)
    accelerate launch --num_processes 8 scripts/train.py ...

A single `.json` argument is read as the arguments file instead of the command line.
"""

import os
import sys

from transformers import HfArgumentParser, TrainingArguments

from fmt_hf.toolkit.training import DataArguments, ModelArguments, train


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the command line (or `argv`) and run `fmt_hf.toolkit.training.train`; return its metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return train(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
