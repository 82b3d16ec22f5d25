"""What runs record: beside the weights they write, for the model card to read back (:mod:`fmt_hf.toolkit.hub`), the
arguments of a training run (:data:`TRAINING_SETUP_NAME`) and the source of a conversion
(:data:`CONVERSION_RECORD_NAME`); and result files of one JSON row per line, appended as each row finishes so that
an interrupted run (the long-context suite, the benchmarks) resumes (:func:`read_rows`, :func:`append_rows`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .arguments import DataArguments, ModelArguments

TRAINING_SETUP_NAME = "training_setup.json"
"""File that :func:`fmt_hf.toolkit.training.train` writes next to the trained model: the model, data and main
training arguments of the run, read back by the model card (:mod:`fmt_hf.toolkit.hub`)."""

CONVERSION_RECORD_NAME = "conversion.json"
"""File that :func:`fmt_hf.toolkit.convert.convert_checkpoint` writes next to a converted model: what it was converted
from (the base model's Hub id, licence and chat template, the source files, the dtype and the FMA settings). Training
from such a checkpoint carries it into its own output folder, since the weights still descend from that base; the
model card reads it back for ``base_model`` and its licence (:mod:`fmt_hf.toolkit.hub`)."""

# TrainingArguments recorded in TRAINING_SETUP_NAME (with the number of processes) for the model card.
_RECORDED_TRAINING_ARGUMENTS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_steps",
    "num_train_epochs",
    "seed",
)


def write_training_setup(
    path: str, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    """Write the run's :data:`TRAINING_SETUP_NAME` record to ``path``."""
    all_training_args = training_args.to_dict()  # enums as their values: JSON-ready
    training = {name: all_training_args[name] for name in _RECORDED_TRAINING_ARGUMENTS}
    training["world_size"] = training_args.world_size
    setup = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "training": training}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(setup, f, indent=2)


def read_rows(path: str) -> list[dict]:
    """The rows of a results file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_rows(path: str, rows: Iterable[dict]) -> None:
    """Append ``rows`` to the results file ``path`` (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


__all__ = ["CONVERSION_RECORD_NAME", "TRAINING_SETUP_NAME", "append_rows", "read_rows", "write_training_setup"]
