"""Tokenizers for FMT language models: a byte-level default, or any tokenizer by path.

The byte tokenizer maps each of the 256 byte values of the UTF-8 encoding to the id equal to that
byte, then adds three special tokens (pad, end of text, mask). It is a plain ``tokenizers`` pipeline
wrapped in ``PreTrainedTokenizerFast``, so ``save_pretrained`` writes a ``tokenizer.json`` that
``AutoTokenizer.from_pretrained`` loads with no ``fmt_hf`` code and no ``trust_remote_code``.
Byte-level tokens make bits per byte a direct readout of the loss (one target token is one byte),
the unit long-context language models are compared in (enwik8-style results).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_TOKENIZER = "bytes"
"""Name that :func:`load_tokenizer` resolves to :func:`byte_tokenizer` instead of a path."""

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<mask>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer: ids 0-255 are the bytes, then ``<pad>``, ``<|endoftext|>``, ``<mask>``.

    ``<|endoftext|>`` is both the end-of-sequence and the beginning-of-sequence token (the GPT-2
    convention for separating packed documents). Encoding adds no special tokens, so
    ``tok(text).input_ids == list(text.encode("utf-8"))`` and decoding restores the text exactly.
    """
    # The ByteLevel pre-tokenizer maps every byte to a printable character (GPT-2's table); a BPE
    # model with those 256 characters and no merges then emits exactly one token per byte.
    # ``use_regex=False`` keeps whitespace and punctuation inside that stream untouched.
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Added after the 256 byte tokens, in this order, they take ids 256, 257 and 258.
    backend.add_special_tokens([PAD_TOKEN, EOS_TOKEN, MASK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        # The default clean-up rewrites " ." to "." on decode, which would break the exact round trip.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str | None = BYTE_TOKENIZER) -> PreTrainedTokenizerBase:
    """Return the byte tokenizer for ``None`` or ``"bytes"``, else ``AutoTokenizer.from_pretrained(name_or_path)``.

    A loaded tokenizer without a pad token gets its end-of-sequence token as pad (the usual choice
    for causal LMs), since batching and the masked-LM collator need one.
    """
    if name_or_path in (None, BYTE_TOKENIZER):
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_byte_lengths(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes of ``text`` covered by each token, from a fast tokenizer's ``offset_mapping``.

    Each token is credited with the bytes between the end of the previous token and its own end;
    tokens that share one character (the byte tokens of a multi-byte character) split its bytes
    evenly, so every byte token counts exactly 1. The last token also takes any trailing bytes the
    tokenizer skipped, so the counts sum to ``len(text.encode("utf-8"))``, and summing them over
    the tokens a model predicts gives the byte count for bits per byte with any tokenizer.
    """
    if not offsets:
        return []
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # Offsets count characters; a character starts at every byte that is not a UTF-8 continuation
    # byte (0b10xxxxxx), which gives the byte position of each character offset.
    char_to_byte = np.append(np.flatnonzero((raw & 0xC0) != 0x80), raw.size)
    ends = np.maximum.accumulate(char_to_byte[np.asarray(offsets, dtype=np.int64)[:, 1]])
    # Runs of tokens with the same end share the bytes since the previous run's end.
    run_ends, run_starts, run_sizes = np.unique(ends, return_index=True, return_counts=True)
    share, extra = np.divmod(np.diff(run_ends, prepend=0), run_sizes)
    position_in_run = np.arange(ends.size) - np.repeat(run_starts, run_sizes)
    lengths = np.repeat(share, run_sizes) + (position_in_run < np.repeat(extra, run_sizes))
    lengths[-1] += raw.size - ends[-1]
    return lengths.tolist()
