"""How the quality suite scores a trained run: held-out bits per byte as ``scripts/eval_lm.py`` scores them
(:func:`held_out_bpb`), at longer contexts than trained (:func:`extrapolation_scores`), and the probe's recall
accuracy (:func:`probe_accuracy`)."""

from __future__ import annotations

import math

import evaluate
import torch
from tqdm.auto import tqdm

from fmt_hf import FMTForCausalLM
from fmt_hf.toolkit.evaluation import score_documents
from fmt_hf.toolkit.metrics import LM_BITS

from .quality_data import probe_batch
from .quality_suite import SuiteConfig


@torch.no_grad()
def probe_accuracy(model: FMTForCausalLM, cfg: SuiteConfig, n: int, seed: int = 12345, progress: bool = True) -> float:
    """Fraction of held-out probe sequences (their own seed) whose value the model predicts after the ``?``."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    batches = math.ceil(cfg.probe_eval_examples / cfg.eval_batch_size)
    for index in tqdm(range(batches), desc="probe eval", disable=not progress, mininterval=10):
        size = min(cfg.eval_batch_size, cfg.probe_eval_examples - index * cfg.eval_batch_size)
        ids, labels, _ = probe_batch(generator, size, n)
        logits = model(input_ids=ids[:, :-1], use_cache=False, logits_to_keep=1).logits[:, -1]
        correct += int((logits.argmax(-1) == labels[:, -1]).sum())
    return correct / cfg.probe_eval_examples


# ------------------------------------------------------------------------------------------------ evaluation


def held_out_bpb(
    model: FMTForCausalLM,
    tokenizer,
    texts: list[str],
    context: int,
    batch_size: int,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Bits per byte over ``texts`` with windows of ``context`` tokens, stride ``context // 2`` (as eval_lm.py)."""
    scores = score_documents(
        model,
        tokenizer,
        texts,
        context,
        max(1, context // 2),
        batch_size,
        progress=progress,
        max_document_tokens=max_tokens,
    )
    result = evaluate.load(LM_BITS, keep_in_memory=True).compute(**scores)
    return {"bpb": result["bits_per_byte"], "num_bytes": result["num_bytes"]}


def extrapolation_scores(
    model: FMTForCausalLM, tokenizer, texts: list[str], cfg: SuiteConfig, progress: bool
) -> list[dict]:
    """Bits per byte at ``cfg.extrapolation`` multiples of the training length, on the same first
    ``extrapolation_tokens`` tokens of each document; a context the model cannot take gets its reason."""
    rows = []
    cap = model.max_sequence_length
    for multiple in cfg.extrapolation:
        context = multiple * cfg.seq_len
        if cap is not None and context > cap:
            rows.append(
                {
                    "multiple": multiple,
                    "context": context,
                    "reason": f"capped at max_position_embeddings={cap} (fma_downsample={model.config.fma_downsample})",
                }
            )
            continue
        batch = max(1, cfg.eval_batch_size // multiple)
        rows.append(
            {
                "multiple": multiple,
                "context": context,
                **held_out_bpb(model, tokenizer, texts, context, batch, cfg.extrapolation_tokens, progress),
            }
        )
    return rows
