"""fmt_hf.toolkit.records: the training-setup record reads back as the arguments it was written from; result rows
append and read back."""

import dataclasses
import json

from transformers import TrainingArguments

from fmt_hf.toolkit.arguments import DataArguments, ModelArguments
from fmt_hf.toolkit.records import write_training_setup


def test_training_setup_reads_back_as_the_arguments(tmp_path):
    model_args = ModelArguments(task="mlm", config_overrides="hidden_size=32")
    data_args = DataArguments(dataset_name="user/documents", seq_len=128)
    training_args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=5)
    write_training_setup(str(tmp_path / "setup.json"), model_args, data_args, training_args)

    setup = json.loads((tmp_path / "setup.json").read_text())
    assert ModelArguments(**setup["model"]) == model_args
    assert DataArguments(**setup["data"]) == data_args and DataArguments(**setup["data"]).data_id == "user/documents"
    assert setup["training"]["learning_rate"] == 1e-3 and setup["training"]["max_steps"] == 5
    assert setup["training"]["lr_scheduler_type"] == "linear" and setup["training"]["world_size"] == 1
    assert set(setup["data"]) == {f.name for f in dataclasses.fields(DataArguments)}


def test_result_rows_append_and_read_back(tmp_path):
    from fmt_hf.toolkit.records import append_rows, read_rows

    path = str(tmp_path / "new" / "rows.jsonl")
    assert read_rows(path) == []
    append_rows(path, [{"a": 1}])
    append_rows(path, [{"a": 2}, {"b": None}])
    assert read_rows(path) == [{"a": 1}, {"a": 2}, {"b": None}]
