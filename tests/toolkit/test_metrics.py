"""The metric modules (lm_bits, accuracy) ship inside the package, load offline with evaluate.load, and match hand
computations."""

import math
from pathlib import Path

import evaluate
import pytest
import torch
import torch.nn.functional as F

import fmt_hf
from fmt_hf.toolkit.metrics import ACCURACY, LM_BITS


@pytest.fixture(scope="module")
def metric() -> evaluate.EvaluationModule:
    return evaluate.load(LM_BITS)


@pytest.mark.parametrize("folder", [LM_BITS, ACCURACY])
def test_metric_module_ships_in_the_package(folder):
    folder = Path(folder)
    assert folder.parent.parent == Path(fmt_hf.__file__).parent / "toolkit"
    assert (folder / f"{folder.name}.py").is_file()  # what evaluate.load(folder) imports


def test_against_a_hand_computation(metric):
    # Three scored pieces of text: summed NLL in nats, predicted tokens, bytes they cover.
    nll, tokens, n_bytes = [120.5, 80.25, 10.0], [100, 60, 8], [130, 70, 12]
    result = metric.compute(nll=nll, num_tokens=tokens, num_bytes=n_bytes)
    total = 210.75
    assert result["num_tokens"] == 168 and result["num_bytes"] == 212
    assert result["nll_per_token"] == pytest.approx(total / 168)
    assert result["bits_per_token"] == pytest.approx(total / 168 / math.log(2))
    assert result["bits_per_byte"] == pytest.approx(total / 212 / math.log(2))
    assert result["perplexity"] == pytest.approx(math.exp(total / 168))


def test_batches_accumulate_like_one_call(metric):
    metric.add_batch(nll=[120.5, 80.25], num_tokens=[100, 60], num_bytes=[130, 70])
    metric.add(nll=10.0, num_tokens=8, num_bytes=12)
    in_parts = metric.compute()
    assert in_parts == metric.compute(nll=[120.5, 80.25, 10.0], num_tokens=[100, 60, 8], num_bytes=[130, 70, 12])


def test_from_model_logits(metric):
    # A uniform byte model scores log2(256) = 8 bits per byte and has perplexity 256; the summed
    # cross-entropy of real logits gives the same numbers the metric reports.
    targets = torch.randint(0, 256, (4, 64))
    uniform = torch.zeros(4, 64, 256)
    nll = F.cross_entropy(uniform.flatten(0, 1), targets.flatten(), reduction="sum").item()
    result = metric.compute(nll=[nll], num_tokens=[targets.numel()], num_bytes=[targets.numel()])
    assert result["bits_per_byte"] == pytest.approx(8.0)
    assert result["perplexity"] == pytest.approx(256.0)


def test_needs_tokens_and_bytes(metric):
    with pytest.raises(ValueError, match="num_tokens=10, num_bytes=0"):
        metric.compute(nll=[5.0], num_tokens=[10], num_bytes=[0])


def test_accuracy():
    accuracy = evaluate.load(ACCURACY)
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75, "num_examples": 4}
    accuracy.add_batch(predictions=[3, 3], references=[3, 0])
    assert accuracy.compute() == {"accuracy": 0.5, "num_examples": 2}
    with pytest.raises(ValueError, match="at least one example"):
        accuracy.compute(predictions=[], references=[])
