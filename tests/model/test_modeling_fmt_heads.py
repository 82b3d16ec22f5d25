"""FMT's task heads: sequence classification (pooling of causal and bidirectional configs, with padding), token
classification and question answering, on the Auto classes and as Hub code; heads asked of configs they cannot
serve."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.models import MAX_LEN, random_ids, tiny_config, tiny_fmt, with_attn
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from fmt_hf import (
    FMTForCausalLM,
    FMTForMaskedLM,
    FMTForQuestionAnswering,
    FMTForSequenceClassification,
    FMTForTokenClassification,
)
from fmt_hf.model.configuration_fmt import FMT_AUTO_MAP

HEADS = [
    (FMTForSequenceClassification, AutoModelForSequenceClassification),
    (FMTForTokenClassification, AutoModelForTokenClassification),
    (FMTForQuestionAnswering, AutoModelForQuestionAnswering),
]


def head_output(model, ids, **kwargs):
    out = model(ids, **kwargs)
    return out.start_logits if hasattr(out, "start_logits") else out.logits


@pytest.mark.parametrize("model_class, auto_class", HEADS, ids=lambda c: c.__name__)
def test_auto_round_trip(model_class, auto_class, tmp_path):
    model = tiny_fmt(model_class, num_labels=3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == FMT_AUTO_MAP and config["architectures"] == [model_class.__name__]

    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is model_class and loaded.config._attn_implementation == "fma"
    ids = random_ids(2, 40)
    assert torch.equal(head_output(loaded, ids), head_output(model, ids))
    assert type(auto_class.from_config(tiny_config())) is model_class


@pytest.mark.parametrize("lm_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_language_model_checkpoint_becomes_a_classifier(lm_class, tmp_path):
    # The fine-tuning start: the stack's weights come from the LM, the head is new, the attention mode is kept.
    lm = tiny_fmt(lm_class)
    lm.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4, dtype=torch.float64)
    assert classifier.config.is_causal == (lm_class is FMTForCausalLM)
    assert classifier.score.weight.shape == (4, 32)
    ids = random_ids(2, 40)
    assert torch.equal(classifier.model(ids).last_hidden_state, lm.model(ids).last_hidden_state)


def padded(rows, lengths, side):
    """`rows` cut to `lengths` and padded with id 0 on `side`, with their attention mask."""
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[i, span], mask[i, span] = rows[i, :length], 1
    return ids, mask


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["fma", "sdpa"])
def test_sequence_classification_of_a_padded_batch_equals_rows_alone(is_causal, side, attn):
    model = tiny_fmt(FMTForSequenceClassification, is_causal=is_causal, num_labels=3)
    if attn != "fma":
        model = with_attn(model, attn)
    lengths = (MAX_LEN, 75, 37, 9)  # mixed numbers of FMA levels
    ids, mask = padded(random_ids(len(lengths), MAX_LEN), lengths, side)
    batched = model(ids, attention_mask=mask).logits
    # FMA aligns each row to its first real token; dense attention keeps left-padded rows at shifted positions,
    # which rotary embeddings see only through their float32 angles.
    atol = 1e-6 if (attn, side) == ("sdpa", "left") else 1e-10
    for row in range(len(lengths)):
        alone = model(ids[row : row + 1][mask[row : row + 1].bool()][None]).logits
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=atol)
    # Causal pooling finds the last real token by pad_token_id (as transformers does), and no token before it reads
    # right padding: such a batch needs no mask.
    if is_causal and side == "right":
        torch.testing.assert_close(model(ids).logits, batched, rtol=0, atol=1e-10)


def test_sequence_classification_pooling_follows_the_attention_mode():
    ids = random_ids(2, 40)
    causal = tiny_fmt(FMTForSequenceClassification, num_labels=3)
    hidden = causal.model(ids).last_hidden_state
    torch.testing.assert_close(causal(ids).logits, causal.score(hidden[:, -1]), rtol=0, atol=1e-12)

    bidirectional = tiny_fmt(FMTForSequenceClassification, is_causal=False, num_labels=3)
    hidden = bidirectional.model(ids).last_hidden_state
    torch.testing.assert_close(bidirectional(ids).logits, bidirectional.score(hidden.mean(1)), rtol=0, atol=1e-12)
    # Without an attention mask, pad tokens are left out of the mean.
    with_pad = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with_mask = bidirectional(with_pad, attention_mask=(with_pad != 0).long()).logits
    hidden = bidirectional.model(with_pad, attention_mask=(with_pad != 0).long()).last_hidden_state
    torch.testing.assert_close(with_mask, bidirectional.score(hidden[:, :40].mean(1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_sequence_classification_loss_and_problem_types(is_causal):
    model = tiny_fmt(FMTForSequenceClassification, dtype=torch.float32, is_causal=is_causal, num_labels=3)
    ids = random_ids(2, 40)
    out = model(ids, labels=torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0

    regression = tiny_fmt(FMTForSequenceClassification, dtype=torch.float32, is_causal=is_causal, num_labels=1)
    targets = torch.tensor([0.5, -1.0])
    out = regression(ids, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_token_classification_and_question_answering(is_causal):
    ids = random_ids(2, 40)
    tagger = tiny_fmt(FMTForTokenClassification, dtype=torch.float32, is_causal=is_causal, num_labels=5)
    labels = torch.randint(0, 5, (2, 40))
    labels[0, :3] = -100
    out = tagger(ids, labels=labels)
    assert out.logits.shape == (2, 40, 5) and out.loss > 0

    reader = tiny_fmt(FMTForQuestionAnswering, dtype=torch.float32, is_causal=is_causal)
    out = reader(ids, start_positions=torch.tensor([3, 7]), end_positions=torch.tensor([5, 30]))
    assert out.start_logits.shape == out.end_logits.shape == (2, 40) and out.loss > 0
    # A bidirectional reader's start logit at position 0 depends on the end of the context; a causal one's not.
    perturbed = ids.clone()
    perturbed[:, -1] = perturbed[:, -1] % 60 + 1
    moved = (reader(perturbed).start_logits[:, 0] - reader(ids).start_logits[:, 0]).abs().max()
    assert (moved > 0) != is_causal


@pytest.mark.parametrize(
    "model_class", [FMTForSequenceClassification, FMTForTokenClassification], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("num_labels", [0, -1])
def test_classifier_without_labels_is_refused(model_class, num_labels):
    with pytest.raises(ValueError, match=rf"{model_class.__name__} needs `num_labels` >= 1"):
        model_class(tiny_config(num_labels=num_labels))


def test_causal_classifier_without_pad_token_takes_single_sequences_only():
    model = tiny_fmt(FMTForSequenceClassification, pad_token_id=None, num_labels=2)
    assert model(random_ids(1, 20)).logits.shape == (1, 2)
    with pytest.raises(ValueError, match=r"finds by `pad_token_id`; the config has none.*Set `config.pad_token_id`"):
        model(random_ids(2, 20))
    # A bidirectional classifier pools by attention_mask and needs no pad token.
    bidirectional = tiny_fmt(FMTForSequenceClassification, pad_token_id=None, is_causal=False, num_labels=2)
    assert bidirectional(random_ids(2, 20)).logits.shape == (2, 2)


REMOTE_HEADS_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["fmt_hf"] = None  # the editable install stays importable under -I: block it

    import torch
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    from transformers import AutoModelForTokenClassification

    mlm_path, expected_path = sys.argv[1:3]
    expected = torch.load(expected_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(mlm_path, trust_remote_code=True, num_labels=3)
    assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
    assert not classifier.config.is_causal and classifier.config._attn_implementation == "fma"
    assert torch.equal(classifier.model(expected["ids"]).last_hidden_state, expected["hidden"])
    for auto_class in (AutoModelForTokenClassification, AutoModelForQuestionAnswering):
        head = auto_class.from_pretrained(mlm_path, trust_remote_code=True)
        assert type(head).__module__.startswith("transformers_modules"), type(head).__module__
    print("REMOTE_HEADS_OK")
    """
)


def test_heads_load_as_hub_code_without_fmt_hf(tmp_path):
    mlm = tiny_fmt(FMTForMaskedLM, dtype=torch.float32)
    mlm.save_pretrained(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", tmp_path / "hub")
    ids = random_ids(2, 40)
    with torch.no_grad():
        torch.save({"ids": ids, "hidden": mlm.model(ids).last_hidden_state}, tmp_path / "expected.pt")
    (tmp_path / "check.py").write_text(REMOTE_HEADS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "check.py"), str(tmp_path / "hub"), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REMOTE_HEADS_OK" in result.stdout, result.stdout + result.stderr
