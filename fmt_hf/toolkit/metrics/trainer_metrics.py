"""The ``Trainer``'s ``preprocess_logits_for_metrics`` and ``compute_metrics``, computed through the ``evaluate``
modules beside this file: :class:`LanguageModelingMetrics` (``lm_bits``) for language modelling and
:class:`ClassificationMetrics` (``accuracy``) for classification.
"""

from __future__ import annotations

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from ..arguments import Task
from . import ACCURACY, LM_BITS


class LanguageModelingMetrics:
    """``preprocess_logits_for_metrics`` and ``compute_metrics`` of the ``Trainer`` for language modelling.

    Each evaluation block's logits are reduced right away to two numbers, its summed negative log-likelihood
    (nats) and its count of scored tokens, so evaluation keeps no ``seq_len x vocab`` logits. The totals then go
    through the ``lm_bits`` metric: bits per byte, bits per token and perplexity of the whole evaluation set.

    For causal LM, ``num_bytes`` holds the UTF-8 bytes that each evaluation block's predicted tokens cover (the
    ``num_bytes`` column of :func:`fmt_hf.toolkit.data.pack_documents`), in dataset order, as the evaluation loop
    gathers the blocks. Masked LM (``num_bytes=None``) scores randomly masked tokens whose byte spans are not
    recorded, so it reports the per-token results only (with the byte tokenizer a token is a byte).
    """

    def __init__(self, task: Task, num_bytes: list[int] | None = None) -> None:
        if (task == "clm") != (num_bytes is not None):
            raise ValueError("causal LM evaluation needs the byte count of every block; masked LM takes none")
        self.task = task
        self.num_bytes = num_bytes
        self.metric = evaluate.load(LM_BITS, keep_in_memory=True)

    def preprocess_logits(self, logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """``(batch, 2)``: summed NLL and number of scored tokens of each block."""
        if isinstance(logits, tuple):  # models that return more than the logits put them first
            logits = logits[0]
        if self.task == "clm":  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
        return torch.stack([nll.sum(-1, dtype=torch.float64), (labels != -100).sum(-1).to(torch.float64)], dim=-1)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        nll, num_tokens = prediction.predictions[:, 0], prediction.predictions[:, 1].astype(np.int64)
        if self.num_bytes is None:
            # No byte counts: the metric's per-byte outputs (computed here from token counts) are dropped.
            tokens = num_tokens.tolist()
            result = self.metric.compute(nll=nll.tolist(), num_tokens=tokens, num_bytes=tokens)
            return {key: result[key] for key in ("nll_per_token", "bits_per_token", "perplexity", "num_tokens")}
        if len(nll) != len(self.num_bytes):
            raise RuntimeError(f"evaluation returned {len(nll)} blocks for a dataset of {len(self.num_bytes)}")
        return self.metric.compute(nll=nll.tolist(), num_tokens=num_tokens.tolist(), num_bytes=self.num_bytes)


class ClassificationMetrics:
    """``preprocess_logits_for_metrics`` and ``compute_metrics`` of the ``Trainer`` for classification: each
    example's logits are reduced right away to its predicted class, scored by the package's ``accuracy`` module."""

    def __init__(self) -> None:
        self.metric = evaluate.load(ACCURACY, keep_in_memory=True)

    @staticmethod
    def preprocess_logits(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """``(batch,)``: the predicted class of each example."""
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(-1)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        return self.metric.compute(
            predictions=prediction.predictions.tolist(), references=prediction.label_ids.tolist()
        )


__all__ = ["ClassificationMetrics", "LanguageModelingMetrics"]
