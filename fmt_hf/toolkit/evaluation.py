"""Bits per byte and perplexity of a causal language model over whole long documents: the engine of
``scripts/eval_lm.py``.

Each document is scored with strided windows, as in the Hugging Face perplexity guide: windows of
``context_length`` tokens start every ``stride`` tokens and each scores only the tokens that no earlier window
scored, so every token is predicted exactly once, with at least ``context_length - stride`` tokens of context once
the first window is past. A beginning-of-sequence token (the document separator the byte-level FMT models are
trained with) is put before each document, so its first token is scored too and bits per byte cover every byte of
every document. Any causal checkpoint works -- an FMT, or a dense transformers model for comparison.

The same held-out documents are also lm-evaluation-harness tasks (:data:`LM_EVAL_TASKS`), for lm-eval's ``hf``
model type.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import evaluate
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .arguments import CorpusArguments, EvalArguments
from .metrics import LM_BITS
from .tokenizer import load_tokenizer, token_byte_lengths

LM_EVAL_TASKS: str = os.path.join(os.path.dirname(__file__), "lm_eval_tasks")
"""Folder of fmt_hf's lm-evaluation-harness tasks, for ``lm-eval run --include_path``: ``fmt_heldout_perplexity``
(rolling log-likelihood of whole held-out documents: word and byte perplexity, bits per byte) and
``fmt_heldout_continuation`` (which of four continuations follows a passage). They read the held-out documents of a
registry corpus (by default the plays ``scripts/train.py`` holds out) or a JSON Lines file; see
``lm_eval_tasks/fmt_lm_eval.py`` for their options. Beside them, ``fmt_lc_<task>`` for every long-context task of
:mod:`fmt_hf.toolkit.long_context` (``fmt_lc_passkey``, ``fmt_lc_niah_single``, ...; options in
``lm_eval_tasks/fmt_long_context.py``)."""


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of document ``document`` go through the model; tokens ``[first_target, end)`` are
    scored, each predicted from the tokens before it in the window."""

    document: int
    begin: int
    end: int
    first_target: int


def strided_windows(document: int, num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The windows that score tokens ``1 .. num_tokens - 1`` of a document once each (token 0 has no context).

    Windows start every ``stride`` tokens (``1 <= stride < context_length``) and hold up to ``context_length``
    tokens; the last one ends at the document's end. Every token after the first window is predicted from at least
    ``context_length - stride`` tokens.
    """
    if not 1 <= stride < context_length:
        raise ValueError(f"stride must be at least 1 and less than context_length={context_length}, got {stride}")
    windows, scored_until = [], 1
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + context_length, num_tokens)
        windows.append(Window(document, begin, end, scored_until))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Windows in batches of equal length and equal number of targets, so no batch needs padding."""
    groups: dict[tuple[int, int], list[Window]] = defaultdict(list)
    for window in windows:
        groups[(window.end - window.begin, window.end - window.first_target)].append(window)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


@torch.no_grad()
def score_documents(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context_length: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = True,
    max_document_tokens: int | None = None,
    by_position: bool = False,
) -> dict[str, list]:
    """Per document: summed NLL in nats (``nll``), scored tokens (``num_tokens``) and their UTF-8 bytes
    (``num_bytes``) -- the inputs of the ``lm_bits`` metric -- from strided windows (:func:`strided_windows`).
    ``by_position`` adds, per position ``j`` of a window (a target with ``j`` tokens of context in it), the summed
    NLL of its targets (``position_nll``) and their count (``position_tokens``), over all documents.

    The tokenizer's BOS token, if it has one, is put before each document, so every document token is scored;
    without one, the first token is context only and its bytes are not counted. ``max_document_tokens`` keeps
    only the first tokens of each document (prefix included). Needs a fast tokenizer (its offsets give the byte
    counts).
    """
    if not tokenizer.is_fast:
        raise ValueError("scoring needs a fast tokenizer: its offsets give the bytes of each token")
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    token_ids, token_bytes, windows = [], [], []
    for index, text in enumerate(texts):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        token_ids.append(torch.tensor(prefix + encoded["input_ids"])[:max_document_tokens])
        num_bytes = [0] * len(prefix) + token_byte_lengths(text, encoded["offset_mapping"])
        token_bytes.append(num_bytes[:max_document_tokens])
        windows += strided_windows(index, len(token_ids[-1]), context_length, stride)

    device = model.device
    # Logits only where targets are predicted: the last `targets + 1` positions (the last one predicts past the
    # window and is dropped). Models whose forward has no `logits_to_keep` return every position.
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    totals = {key: [0] * len(texts) for key in ("nll", "num_tokens", "num_bytes")}
    if by_position:
        position_nll = torch.zeros(context_length, dtype=torch.float64)
        position_tokens = torch.zeros(context_length, dtype=torch.long)
    with tqdm(total=len(windows), desc="Scoring windows", unit="window", disable=not progress) as bar:
        for batch in _batches(windows, batch_size):
            targets = batch[0].end - batch[0].first_target
            inputs = torch.stack([token_ids[w.document][w.begin : w.end] for w in batch]).to(device)
            extra = {"logits_to_keep": targets + 1} if keeps_logits else {}
            logits = model(input_ids=inputs, use_cache=False, **extra).logits[:, -(targets + 1) : -1]
            token_nll = F.cross_entropy(
                logits.float().flatten(0, 1), inputs[:, -targets:].flatten(), reduction="none"
            ).view(len(batch), targets)
            if by_position:  # a batch's windows have one length: its targets sit at the same window positions
                length = inputs.shape[1]
                position_nll[length - targets : length] += token_nll.sum(0, dtype=torch.float64).cpu()
                position_tokens[length - targets : length] += len(batch)
            nll = token_nll.sum(-1, dtype=torch.float64)
            for window, window_nll in zip(batch, nll.tolist(), strict=True):
                totals["nll"][window.document] += window_nll
                totals["num_tokens"][window.document] += targets
                totals["num_bytes"][window.document] += sum(
                    token_bytes[window.document][window.first_target : window.end]
                )
            bar.update(len(batch))
    if by_position:
        totals.update(position_nll=position_nll.tolist(), position_tokens=position_tokens.tolist())
    return totals


def position_breakdown(
    position_nll: Sequence[float], position_tokens: Sequence[int], buckets: Sequence[int]
) -> list[dict]:
    """Perplexity per bucket of window positions (``score_documents(by_position=True)``'s sums; ``buckets`` the
    boundaries between positions 1 and the window length): one row per bucket with its positions ``[first, end)``,
    scored tokens, NLL per token and perplexity. Empty buckets are left out."""
    edges = [1, *buckets, len(position_nll)]
    rows = []
    for first, end in pairwise(edges):
        tokens = sum(position_tokens[first:end])
        if tokens:
            nll = sum(position_nll[first:end]) / tokens
            rows.append(
                {"positions": [first, end], "num_tokens": tokens, "nll_per_token": nll, "perplexity": math.exp(nll)}
            )
    return rows


def evaluate_lm(eval_args: EvalArguments, corpus_args: CorpusArguments, progress: bool = True) -> dict:
    """Load the checkpoint and its tokenizer, score the documents of ``eval_args.split`` and return the results.

    The results are the ``lm_bits`` metric's (``bits_per_byte``, ``bits_per_token``, ``perplexity``,
    ``nll_per_token``, token and byte counts) plus what was measured (model, data, split, documents, context
    length, stride); they are also written to ``eval_args.output_file`` when set. Raises ``ValueError`` when the
    context length exceeds the model's ``max_position_embeddings`` (for FMT models, only where it caps the length:
    ``max_sequence_length``) or the split does not exist.
    """
    device = eval_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(eval_args.tokenizer_name or eval_args.model_name_or_path)
    model = (
        AutoModelForCausalLM.from_pretrained(
            eval_args.model_name_or_path,
            dtype=eval_args.dtype if eval_args.dtype == "auto" else getattr(torch, eval_args.dtype),
            attn_implementation=eval_args.attn_implementation,
            trust_remote_code=eval_args.trust_remote_code,
        )
        .to(device)
        .eval()
    )
    # An FMT model says what caps it (None: nothing, e.g. fma_downsample="recursive"); others go by their config.
    max_positions = getattr(model, "max_sequence_length", getattr(model.config, "max_position_embeddings", None))
    if max_positions is not None and eval_args.context_length > max_positions:
        raise ValueError(
            f"--context_length={eval_args.context_length} exceeds the model's max_position_embeddings={max_positions}"
        )

    splits = corpus_args.load_documents()
    if eval_args.split not in splits:
        raise ValueError(f"no split {eval_args.split!r}; the data has {', '.join(splits)}")
    documents = splits[eval_args.split]
    if eval_args.max_documents is not None:
        documents = documents.select(range(min(eval_args.max_documents, len(documents))))

    scores = score_documents(
        model,
        tokenizer,
        documents["text"],
        eval_args.context_length,
        eval_args.stride,
        eval_args.batch_size,
        progress=progress,
        max_document_tokens=eval_args.max_document_tokens,
        by_position=eval_args.position_buckets is not None,
    )
    by_position = None
    if eval_args.position_buckets is not None:
        by_position = position_breakdown(
            scores.pop("position_nll"), scores.pop("position_tokens"), eval_args.position_buckets
        )
    results = evaluate.load(LM_BITS, keep_in_memory=True).compute(**scores)
    results.update(
        model=eval_args.model_name_or_path,
        attn_implementation=model.config._attn_implementation,  # what ran: an FMT checkpoint defaults to FMA
        data=corpus_args.data_id,
        split=eval_args.split,
        documents=len(documents),
        max_document_tokens=eval_args.max_document_tokens,
        context_length=eval_args.context_length,
        stride=eval_args.stride,
    )
    if by_position is not None:
        results["by_position"] = by_position
    if eval_args.output_file is not None:
        with open(eval_args.output_file, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


__all__ = [
    "LM_EVAL_TASKS",
    "Window",
    "evaluate_lm",
    "position_breakdown",
    "score_documents",
    "strided_windows",
]
