"""scripts/train.py and fmt_hf.toolkit.training: CLM, MLM and classification runs, evaluation metrics, resume,
2-process DDP, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers.lm import (
    REPO,
    TINY_FMT,
    play_excerpts,
    script,
    train_argv,
    write_documents,
)
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, Trainer

pytestmark = pytest.mark.download  # registry corpora


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Eight real documents (split 6/1/1 by document) as a local dataset folder."""
    return write_documents(tmp_path_factory.mktemp("documents"), play_excerpts())


def train(argv):
    return script("train").main(argv)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def losses(output_dir):
    """{step: training loss} logged by the Trainer."""
    return {e["step"]: e["loss"] for e in read_json(output_dir / "trainer_state.json")["log_history"] if "loss" in e}


def test_clm_trains_evaluates_in_bits_per_byte_and_saves(documents, tmp_path):
    metrics = train(train_argv(tmp_path, documents, "--do_train", "--do_eval", "--max_steps", "3"))

    assert metrics["train_loss"] > 0 and read_json(tmp_path / "trainer_state.json")["global_step"] == 3
    # 16 blocks of 64 byte tokens, 63 predicted each; the byte tokenizer makes a predicted token one byte
    # (the end-of-text tokens between documents count none).
    assert metrics["eval_num_tokens"] == 16 * 63
    assert 16 * 63 - 2 <= metrics["eval_num_bytes"] <= 16 * 63
    assert metrics["eval_bits_per_token"] == pytest.approx(metrics["eval_nll_per_token"] / math.log(2))
    assert metrics["eval_bits_per_byte"] == pytest.approx(
        metrics["eval_nll_per_token"] * metrics["eval_num_tokens"] / math.log(2) / metrics["eval_num_bytes"]
    )
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_nll_per_token"]))
    # The summed NLL agrees with the Trainer's own mean loss (equal-size batches of equal-size blocks).
    assert metrics["eval_nll_per_token"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert 6 < metrics["eval_bits_per_byte"] < 8.5  # near uniform over 259 tokens after 3 steps

    saved = read_json(tmp_path / "eval_results.json")
    assert saved["eval_bits_per_byte"] == pytest.approx(metrics["eval_bits_per_byte"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modeling_fmt.py", "training_setup.json"):
        assert (tmp_path / name).is_file(), name
    setup = read_json(tmp_path / "training_setup.json")
    assert setup["model"]["task"] == "clm" and setup["data"]["seq_len"] == 64 and setup["training"]["world_size"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "FMTForCausalLM" and model.config.max_position_embeddings == 64
    assert model.config.hidden_size == 32 and model.config.vocab_size == 259


def test_mlm_trains_and_reports_perplexity(documents, tmp_path):
    metrics = train(train_argv(tmp_path, documents, "--task", "mlm", "--do_train", "--do_eval", "--max_steps", "3"))

    # About 15% of 16 x 64 tokens are masked and scored; bytes of masked tokens are not recorded.
    assert 50 < metrics["eval_num_tokens"] < 300
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_nll_per_token"]))
    assert "eval_bits_per_byte" not in metrics and metrics["eval_bits_per_token"] > 6
    model = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "FMTForMaskedLM" and not model.config.is_causal


def test_eval_only_from_a_checkpoint(documents, tmp_path):
    train(train_argv(tmp_path / "trained", documents, "--do_train", "--max_steps", "2"))
    metrics = train(
        train_argv(tmp_path / "evaluated", documents, "--do_eval", model_name_or_path=str(tmp_path / "trained"))
    )
    assert "train_loss" not in metrics and metrics["eval_bits_per_byte"] > 0


def test_train_only_downsamplers(documents, tmp_path):
    train(train_argv(tmp_path / "start", documents, "--do_train", "--max_steps", "1"))
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "start")
    train(
        train_argv(
            tmp_path / "uptrained",
            documents,
            "--do_train",
            "--max_steps",
            "2",
            "--train_only_downsamplers",
            model_name_or_path=str(tmp_path / "start"),
        )
    )
    uptrained = AutoModelForCausalLM.from_pretrained(tmp_path / "uptrained").state_dict()
    changed = {name for name, weight in start.state_dict().items() if not torch.equal(weight, uptrained[name])}
    downsamplers = {name for name in uptrained if "_downsample." in name}
    assert changed == downsamplers and downsamplers
    assert read_json(tmp_path / "uptrained" / "training_setup.json")["model"]["train_only_downsamplers"]
    with pytest.raises(ValueError, match="no FMA downsampler weights to train"):
        train(
            train_argv(
                tmp_path / "avgpool",
                documents,
                "--do_train",
                "--max_steps",
                "1",
                "--train_only_downsamplers",
                "--config_overrides",
                TINY_FMT + ",fma_downsample=avgpool",
            )
        )


def test_length_free_models_train_past_max_position_embeddings(documents, tmp_path):
    """A recursive FMT (such as a converted Llama) has no length cap, so it trains on blocks longer than its
    max_position_embeddings; a depthwise one refuses them (test_bad_input_fails_clearly)."""
    overrides = TINY_FMT + ",max_position_embeddings=32,fma_downsample=recursive"
    train(train_argv(tmp_path / "out", documents, "--do_train", "--max_steps", "1", "--config_overrides", overrides))
    assert read_json(tmp_path / "out" / "config.json")["max_position_embeddings"] == 32
    assert read_json(tmp_path / "out" / "trainer_state.json")["global_step"] == 1


def test_resume_continues_step_count_and_loss(documents, tmp_path, monkeypatch):
    train(train_argv(tmp_path / "straight", documents, "--do_train", "--max_steps", "4", "--save_steps", "2"))

    steps_run = []
    training_step = Trainer.training_step

    def counted_training_step(self, *args, **kwargs):
        steps_run.append(self.state.global_step + 1)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counted_training_step)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    train(
        train_argv(
            tmp_path / "resumed",
            documents,
            "--do_train",
            "--max_steps",
            "4",
            "--save_steps",
            "2",
            "--resume_from_checkpoint",
            str(checkpoint),
        )
    )

    assert steps_run == [3, 4]  # the resumed run trains the last two steps only
    assert read_json(tmp_path / "resumed" / "trainer_state.json")["global_step"] == 4
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):  # same weights, optimizer state, schedule and data order as the uninterrupted run
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)


def test_two_process_ddp_run_completes(documents, tmp_path):
    # `accelerate launch --cpu` starts one process whatever --num_processes says (accelerate 1.15); the
    # multi-process launcher plus the Trainer's --use_cpu gives DDP over gloo on one machine.
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(REPO / "scripts" / "train.py"),
        "--use_cpu",
        *train_argv(tmp_path, documents, "--do_train", "--do_eval", "--max_steps", "3"),
        "--max_eval_samples",
        "17",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on a 2-core machine
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert read_json(tmp_path / "training_setup.json")["training"]["world_size"] == 2
    assert read_json(tmp_path / "trainer_state.json")["global_step"] == 3
    # 17 blocks over 2 processes: the padding block the last batch repeats is not scored twice.
    assert read_json(tmp_path / "eval_results.json")["eval_num_tokens"] == 17 * 63
    AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "data, extra, message",
    [
        (None, ["--corpus", "enwik8"], "unknown corpus 'enwik8'; valid corpora: shakespeare, kjv"),
        (
            "documents",
            ["--config_overrides", TINY_FMT + ",max_position_embeddings=32"],
            "seq_len=64 exceeds the model's max_position_embeddings=32",
        ),
        ("blank_documents", [], "split 'train' has fewer than seq_len=64 tokens"),
        ("two_documents", [], "2 documents cannot fill train, validation"),
        ("documents", ["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
    ],
)
def test_bad_input_fails_clearly(documents, tmp_path, data, extra, message):
    folders = {
        None: None,  # the registry corpus named by --corpus
        "documents": documents,
        "blank_documents": write_documents(tmp_path / "blank", [""] * 8),  # documents without text: nothing to learn
        "two_documents": write_documents(tmp_path / "two", play_excerpts()[:2]),
    }
    with pytest.raises(ValueError, match=message):
        train(train_argv(tmp_path / "out", folders[data], "--do_train", "--max_steps", "1", *extra))


# ----------------------------------------------------------------------------- long-document classification


@pytest.fixture(scope="module")
def titled_plays(tmp_path_factory):
    """Three titled works (play openings) as a local dataset folder: the classes of --task classification."""
    folder = tmp_path_factory.mktemp("works")
    with open(folder / "works.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(play_excerpts()[:3]):
            f.write(json.dumps({"title": f"Play {i}", "text": text}) + "\n")
    return str(folder)


def classification_argv(output_dir, dataset, *extra, **kwargs):
    return train_argv(
        output_dir,
        dataset,
        "--task",
        "classification",
        "--regions_per_work",
        "5",
        "--validation_fraction",
        "0.2",
        "--test_fraction",
        "0.2",
        *extra,
        **kwargs,
    )


def test_classifier_from_scratch_trains_and_reports_accuracy(titled_plays, tmp_path):
    metrics = train(
        classification_argv(
            tmp_path,
            titled_plays,
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--max_steps",
            "3",
            "--config_overrides",
            TINY_FMT + ",is_causal=False",
        )
    )
    assert read_json(tmp_path / "trainer_state.json")["global_step"] == 3
    # 3 works x 1200-character held-out regions give 3 x 18 passages of 64 characters; --max_eval_samples keeps 16.
    assert metrics["eval_num_examples"] == metrics["test_num_examples"] == 16
    for split in ("eval", "test"):
        assert 0 <= metrics[f"{split}_accuracy"] <= 1 and metrics[f"{split}_loss"] > 0
    assert read_json(tmp_path / "test_results.json")["test_accuracy"] == metrics["test_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(model).__name__ == "FMTForSequenceClassification" and not model.config.is_causal
    assert model.config.id2label == {0: "Play 0", 1: "Play 1", 2: "Play 2"}
    assert read_json(tmp_path / "training_setup.json")["model"]["task"] == "classification"


@pytest.mark.parametrize("lm_task", ["clm", "mlm"])
def test_classifier_fine_tuned_from_a_language_model(documents, titled_plays, lm_task, tmp_path):
    train(train_argv(tmp_path / "lm", documents, "--task", lm_task, "--do_train", "--max_steps", "2"))
    metrics = train(
        classification_argv(
            tmp_path / "classifier",
            titled_plays,
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            model_name_or_path=str(tmp_path / "lm"),
        )
    )
    assert 0 <= metrics["eval_accuracy"] <= 1
    lm = (AutoModelForCausalLM if lm_task == "clm" else AutoModelForMaskedLM).from_pretrained(tmp_path / "lm")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    # The causal LM fine-tunes into a causal classifier (last-token pooling), the masked LM into a bidirectional one.
    assert classifier.config.is_causal == (lm_task == "clm") and classifier.config.num_labels == 3
    assert classifier.model.embed_tokens.weight.shape == lm.model.embed_tokens.weight.shape


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--works", "Play 1"], "a classifier needs at least two works, got 1"),
        (["--works", "Hamlet"], "no document title matches 'Hamlet'"),
        (["--passage_chars", "5000"], "no train passage of 5000 characters fits"),
        (
            ["--config_overrides", TINY_FMT + ",max_position_embeddings=32"],
            "seq_len=64 exceeds the model's max_position_embeddings=32",
        ),
    ],
)
def test_classification_bad_input_fails_clearly(titled_plays, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train(classification_argv(tmp_path, titled_plays, "--do_train", "--max_steps", "1", *extra))


def test_language_models_take_test_documents_from_eval_lm(documents, tmp_path):
    with pytest.raises(ValueError, match="--do_predict scores the test passages of --task classification"):
        train(train_argv(tmp_path, documents, "--do_predict"))
