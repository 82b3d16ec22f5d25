"""The byte tokenizer round-trips bytes and saves/loads through AutoTokenizer; other tokenizers load by path."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fmt_hf.toolkit.tokenizer import (
    BYTE_TOKENIZER,
    byte_tokenizer,
    load_tokenizer,
    token_byte_lengths,
)

TEXTS = [
    "",
    "plain ASCII, with  double spaces , odd punctuation .\n",
    "To be, or not to be: that is the question:\r\n\tWhether 'tis nobler\n\n\n",
    "Größe, naïve café, Œuvre — «quotes» … ½ ≠ ∞",
    "日本語のテキスト, 中文, 한국어, עברית, العربية",
    "emoji 🎉👩‍👩‍👧 and a combining e\u0301 and a NUL \x00 and DEL \x7f",
    " leading and trailing spaces ",
]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the spot, standing in for "any tokenizer given by path"."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXTS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_the_utf8_bytes_and_decode_restores_the_text(tok, text):
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    assert len(tok) == 259
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (256, 257, 258)
    assert tok.bos_token_id == tok.eos_token_id
    text = "ab"
    with_specials = [tok.eos_token_id, *tok(text)["input_ids"], tok.eos_token_id]
    assert tok.decode(with_specials, skip_special_tokens=True) == text


def test_save_and_load_through_auto_tokenizer_without_custom_code(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config  # nothing for trust_remote_code to run
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert len(loaded) == len(tok)
    assert loaded.all_special_ids == tok.all_special_ids
    assert (loaded.pad_token, loaded.eos_token, loaded.mask_token) == (tok.pad_token, tok.eos_token, tok.mask_token)
    for text in TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert loaded.decode(ids) == text


def test_load_tokenizer_by_name_or_path(tmp_path):
    assert load_tokenizer(None).get_vocab() == byte_tokenizer().get_vocab()
    assert load_tokenizer(BYTE_TOKENIZER).get_vocab() == byte_tokenizer().get_vocab()
    bpe_tokenizer().save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert len(loaded) == 400
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"  # pad filled in from EOS
    assert loaded.decode(loaded(TEXTS[3])["input_ids"]) == TEXTS[3]


@pytest.mark.parametrize("make", [byte_tokenizer, bpe_tokenizer], ids=["bytes", "bpe"])
def test_token_byte_lengths_sum_to_the_text_bytes(make):
    tokenizer = make()
    for text in TEXTS:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        lengths = token_byte_lengths(text, encoded["offset_mapping"])
        assert len(lengths) == len(encoded["input_ids"])
        assert sum(lengths) == len(text.encode("utf-8"))
        assert min(lengths, default=0) >= 0


def test_token_byte_lengths_of_byte_tokens(tok):
    text = "aé€🎉"  # 1, 2, 3 and 4 bytes
    lengths = token_byte_lengths(text, tok(text, return_offsets_mapping=True)["offset_mapping"])
    assert lengths == [1] * 10  # the byte tokens of a multi-byte character share its bytes
    assert token_byte_lengths("", []) == []
