"""fmt_hf.toolkit.metrics.trainer_metrics: the Trainer's metrics reduce each batch's logits at once and give the
numbers of a direct computation over the whole evaluation set."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from fmt_hf.toolkit.metrics.trainer_metrics import ClassificationMetrics, LanguageModelingMetrics


def test_causal_lm_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 8, 11), torch.randint(0, 11, (3, 8))
    labels[1, 5:] = -100  # padding: not scored
    num_bytes = [9, 5, 7]
    metrics = LanguageModelingMetrics("clm", num_bytes)

    # A model output tuple puts the logits first; the rest is ignored.
    reduced = metrics.preprocess_logits((logits, torch.zeros(1)), labels)
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(-1)
    torch.testing.assert_close(reduced[:, 0], nll.double())
    assert reduced[:, 1].tolist() == [7, 4, 7]

    result = metrics(EvalPrediction(predictions=reduced.numpy(), label_ids=labels.numpy()))
    total = nll.sum().item()
    assert result["num_tokens"] == 18 and result["num_bytes"] == 21
    assert result["bits_per_byte"] == pytest.approx(total / 21 / math.log(2))
    assert result["perplexity"] == pytest.approx(math.exp(total / 18))


def test_masked_lm_metrics_report_per_token_results_only():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 11), torch.full((2, 6), -100)
    labels[0, 1], labels[1, 4] = 3, 7  # the masked tokens, scored in place (no shift)
    metrics = LanguageModelingMetrics("mlm")

    reduced = metrics.preprocess_logits(logits, labels)
    nll = F.cross_entropy(logits[[0, 1], [1, 4]], torch.tensor([3, 7]), reduction="sum").item()
    result = metrics(EvalPrediction(predictions=reduced.numpy(), label_ids=labels.numpy()))
    assert set(result) == {"nll_per_token", "bits_per_token", "perplexity", "num_tokens"}
    assert result["num_tokens"] == 2 and result["nll_per_token"] == pytest.approx(nll / 2)


def test_language_modelling_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="causal LM evaluation needs the byte count of every block"):
        LanguageModelingMetrics("clm")
    with pytest.raises(ValueError, match="masked LM takes none"):
        LanguageModelingMetrics("mlm", [3])
    metrics = LanguageModelingMetrics("clm", [3, 4])
    one_block = np.array([[2.0, 3.0]])
    with pytest.raises(RuntimeError, match="evaluation returned 1 blocks for a dataset of 2"):
        metrics(EvalPrediction(predictions=one_block, label_ids=one_block))


def test_classification_metrics_score_the_predicted_class():
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.5, 0.2, 0.1], [0.0, 0.1, 0.9], [0.3, 0.2, 0.1]])
    metrics = ClassificationMetrics()
    predicted = metrics.preprocess_logits((logits,), torch.tensor([1, 0, 1, 0]))
    assert predicted.tolist() == [1, 0, 2, 0]
    result = metrics(EvalPrediction(predictions=predicted.numpy(), label_ids=np.array([1, 0, 1, 0])))
    assert result == {"accuracy": 0.75, "num_examples": 4}
