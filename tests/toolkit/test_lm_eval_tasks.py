"""fmt_hf's lm-evaluation-harness tasks (fmt_hf/toolkit/lm_eval_tasks): an FMT checkpoint through lm-eval's `hf`
model type on held-out documents read from disk, and the multiple-choice questions those tasks are built from."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import fmt_hf
from fmt_hf import FMTConfig, FMTForCausalLM, byte_tokenizer

lm_eval = pytest.importorskip("lm_eval")


def tasks_module():
    """fmt_lm_eval.py, imported by path as lm-eval imports it (the task folder is not a Python package)."""
    path = Path(fmt_hf.LM_EVAL_TASKS) / "fmt_lm_eval.py"
    spec = importlib.util.spec_from_file_location("fmt_lm_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def document(work: int, lines: int = 60) -> str:
    """A synthetic work: numbered lines, each naming its work, so any piece of text can be traced to its place."""
    return "".join(f"Work {work} line {i:03d}: words of the play.\n" for i in range(lines))


@pytest.fixture
def held_out_file(tmp_path) -> str:
    """Three synthetic works as one JSON-lines file: the tasks' held-out `documents`."""
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": document(w)}) + "\n" for w in range(3)))
    return str(path)


def test_continuation_questions_ask_for_the_lines_that_follow(held_out_file):
    build = tasks_module().continuation_choices
    questions = build(documents=held_out_file, context_chars=300, continuation_chars=100, questions_per_document=5)[
        "test"
    ]
    texts = [document(w) for w in range(3)]
    assert len(questions) == 15 and set(questions["label"]) <= {0, 1, 2, 3}
    for question in questions:
        context, choices, label = question["context"], question["choices"], question["label"]
        assert len(context) == 300 and context.endswith("\n") and len(set(choices)) == 4
        source = next(t for t in texts if context in t)
        follows = [source[source.index(context) + len(context) :].startswith(choice) for choice in choices]
        assert follows == [i == label for i in range(4)]  # only the answer follows the passage
        assert all(choice.endswith("\n") and len(choice) <= 100 for choice in choices)  # whole lines
    again = build(documents=held_out_file, context_chars=300, continuation_chars=100, questions_per_document=5)["test"]
    assert again["choices"] == questions["choices"] and again["label"] == questions["label"]


def test_continuation_questions_need_long_enough_documents(held_out_file):
    with pytest.raises(ValueError, match="no held-out document has a line break after 5000 characters"):
        tasks_module().continuation_choices(documents=held_out_file, context_chars=5000)


def test_fmt_checkpoint_runs_through_lm_eval_hf_model(held_out_file, tmp_path):
    tokenizer = byte_tokenizer()
    config = FMTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        fma_block_size=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = FMTForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    short = tmp_path / "short.jsonl"  # one document shorter than the context: one window, checked by hand below
    short.write_text(json.dumps({"text": document(0, lines=5)}) + "\n")

    from lm_eval.tasks import TaskManager

    def run(task, **metadata):
        manager = TaskManager(include_path=fmt_hf.LM_EVAL_TASKS, include_defaults=False, metadata=metadata)
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={tmp_path / 'model'},trust_remote_code=True",
            tasks=[task],
            task_manager=manager,
            device="cpu",
            batch_size=4,
        )
        return output["results"][task]

    perplexity = run("fmt_heldout_perplexity", documents=str(short))
    # lm-eval's rolling log-likelihood of the document after the BOS token, as computed here.
    text = document(0, lines=5)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text).input_ids]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum()
    assert perplexity["bits_per_byte,none"] == pytest.approx(-logprobs.item() / math.log(2) / len(text), rel=1e-4)
    assert 7 < perplexity["bits_per_byte,none"] < 9  # an untrained byte model: about log2(259)

    choice = run(
        "fmt_heldout_continuation",
        documents=held_out_file,
        context_chars=120,
        continuation_chars=60,
        questions_per_document=2,
    )
    assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1
