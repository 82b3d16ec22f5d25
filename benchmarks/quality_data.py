"""The data of the quality suite: training blocks and held-out documents of the corpus split ``scripts/train.py``
uses (:class:`SuiteData`), their batches in a seed-fixed order, and the long-range recall probe's synthetic
sequences (:func:`probe_batch`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import torch

from fmt_hf.toolkit.arguments import CorpusArguments
from fmt_hf.toolkit.data import pack_documents

from .quality_suite import SuiteConfig


@dataclass
class SuiteData:
    """Training blocks and held-out test documents of the corpus split scripts/train.py uses."""

    train_blocks: torch.Tensor  # (blocks, seq_len)
    test_texts: list[str]


def load_suite_data(cfg: SuiteConfig, tokenizer) -> SuiteData:
    documents = CorpusArguments(corpus=cfg.corpus).load_documents()
    blocks = pack_documents(datasets.DatasetDict(train=documents["train"]), tokenizer, cfg.seq_len)["train"]
    test = documents["test"]
    if cfg.max_test_documents is not None:
        test = test.select(range(min(cfg.max_test_documents, len(test))))
    return SuiteData(torch.tensor(blocks["input_ids"]), list(test["text"]))


def lm_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of training blocks in an order fixed by ``seed`` alone (the same for every attention), epoch after
    epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = blocks[order[start : start + batch_size]]
            yield batch, batch


PROBE_VALUES = b"ABCDEFGHIJKLMNOP"
"""The 16 values the probe stores (chance accuracy 1/16); the filler is digits, the question mark asks."""
PROBE_FILLER = b"0123456789"
PROBE_QUESTION = ord("?")


def probe_batch(
    generator: torch.Generator, batch_size: int, n: int, run: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Long-range recall: ``n`` random digits with one value letter written ``run`` times in a row at a random
    start in the first quarter, then ``?`` and the value at the end. Returns (input_ids, labels, start of each
    value's run): labels are -100 but at the answer (position ``n - 1``, predicted from the ``?`` at ``n - 2``),
    which lies at least ``3n/4 - 1`` tokens after the run -- far beyond FMA's near field of ``2m`` keys when
    ``n >= 8m``. (A run rather than one letter: a single letter among 1024 digits was not learnt by a dense model in
    the suite's budget, ~4 bits of training loss after 120 steps, i.e. chance.)"""
    filler = torch.tensor(list(PROBE_FILLER))
    values = torch.tensor(list(PROBE_VALUES))
    ids = filler[torch.randint(len(filler), (batch_size, n), generator=generator)]
    starts = torch.randint(n // 4 - run + 1, (batch_size,), generator=generator)
    answers = values[torch.randint(len(values), (batch_size,), generator=generator)]
    columns = starts[:, None] + torch.arange(run)
    ids.scatter_(1, columns, answers[:, None].expand(-1, run))
    ids[:, n - 2] = PROBE_QUESTION
    ids[:, n - 1] = answers
    labels = torch.full_like(ids, -100)
    labels[:, n - 1] = answers
    return ids, labels, starts


def probe_batches(batch_size: int, n: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches of :func:`probe_batch`, in an order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids, labels, _ = probe_batch(generator, batch_size, n)
        yield ids, labels
