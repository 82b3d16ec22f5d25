"""Tiny FMT and Llama models and random token ids: the model tests' float64 FMT, and byte-level models that save
with the byte tokenizer (fmt_hf.toolkit.tokenizer.byte_tokenizer)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fmt_hf import FMTConfig, FMTForCausalLM

BLOCK = 8  # FMA block size of `tiny_fmt`: sequences longer than 2 * BLOCK = 16 use coarse levels
MAX_LEN = 128  # 3 coarse levels at BLOCK = 8
VOCAB = 61  # `tiny_fmt`'s vocabulary; id 0 is its padding token

BYTE_IDS = {"vocab_size": 259, "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 257}
"""The byte tokenizer's vocabulary size and special tokens."""

TINY_FMT_OPTIONS = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "fma_block_size": 16,
}
"""A byte-level FMT that trains a step in milliseconds, FMA with a coarse level from 64 tokens on (the sizes serve
the tiny Llama too)."""
TINY_SIZES = {name: value for name, value in TINY_FMT_OPTIONS.items() if not name.startswith("fma_")}


def tiny_config(**overrides) -> FMTConfig:
    """`tiny_fmt`'s config: 4 query and 2 key/value heads, 8-token FMA blocks up to MAX_LEN tokens."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        fma_block_size=BLOCK,
        fma_coarse_tokens=2,
        pad_token_id=0,
        initializer_range=0.2,  # a wide init makes attention patterns (and so errors) visible
    )
    kwargs.update(overrides)
    return FMTConfig(**kwargs)


def tiny_fmt(model_class, dtype=torch.float64, seed=0, **overrides):
    """A `model_class` of `tiny_config(**overrides)` in eval mode, float64 unless told."""
    torch.manual_seed(seed)
    return model_class(tiny_config(**overrides)).to(dtype).eval()


def random_ids(batch, length, seed=1, vocab=VOCAB):
    """(batch, length) ids of a `vocab`-token vocabulary, never the padding id 0."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_byte_ids(batch, length, seed=1):
    """(batch, length) byte values: ids of the byte tokenizer, never a special token."""
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_attn(model, implementation):
    """A second model with the same weights and another attention implementation."""
    clone = type(model)(model.config.__class__.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    clone.set_attn_implementation(implementation)
    return clone.to(model.dtype).eval()


def tiny_byte_fmt(model_class=FMTForCausalLM, seed=0, **overrides):
    """A `model_class` of TINY_FMT_OPTIONS over the byte tokenizer's ids, 128 positions unless told, in eval mode."""
    torch.manual_seed(seed)
    return model_class(
        FMTConfig(**{**TINY_FMT_OPTIONS, "max_position_embeddings": 128, **BYTE_IDS, **overrides})
    ).eval()


def tiny_byte_llama(seed=0, **overrides) -> LlamaForCausalLM:
    """A Llama of TINY_SIZES over the byte tokenizer's ids, 256 positions unless told, in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(**{**TINY_SIZES, "max_position_embeddings": 256, **BYTE_IDS, **overrides})
    ).eval()
