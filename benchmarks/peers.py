"""Other attentions from PyPI inside the same FMT model, for equal-budget comparisons (scripts/bench_quality.py).

Each peer is a transformers attention function (``AttentionInterface.register``) that runs a package's own attention
module on the queries, keys and values FMTAttention hands it -- projections and rotary embeddings already applied --
so a model with ``attn_implementation=<peer>`` differs from the FMA model in its attention alone (embeddings, RoPE,
MLP, optimizer and data stay identical). The modules are attached to every layer by :func:`attach_peer` before the
optimizer is built; none of them has parameters of its own.

- ``sliding``: ``local_attention.LocalAttention(window_size=m, causal=True, look_backward=1)``: every query sees its
  own block (causally) and the previous one -- exactly FMA's level 0 (docs/fma.md §3) with the coarse levels
  removed. O(n m).
- ``h_transformer_1d``: ``h_transformer_1d.CausalHAttention1D`` (lucidrains) with its input and output projections
  replaced by identities, on ``cat(q, k, v)``: the package's hierarchical attention, block size ``m``. Its causal
  variant is the package's: averaged keys, summed values, per-level normalisation.
- ``performer``: ``performer_pytorch.FastAttention(causal=True)``: FAVOR+ random features (``d log d`` of them),
  linear in n; on CPU the package's chunked causal prefix sums.

A peer whose package is missing is reported by :func:`peer_unavailable` (a row with the reason, not a crash).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math

import torch
from torch import nn
from transformers import AttentionInterface

PEER_PACKAGES = {"sliding": "local_attention", "h_transformer_1d": "h_transformer_1d", "performer": "performer_pytorch"}
"""Peer name -> the module it imports (the PyPI distributions are local-attention, h-transformer-1d,
performer-pytorch)."""


def peer_unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here (its package does not import), or None when it can."""
    try:
        importlib.import_module(PEER_PACKAGES[name])
    except Exception as error:  # noqa: BLE001 -- any import failure is the reason of the row
        return f"{PEER_PACKAGES[name]} does not import: {type(error).__name__}: {error}"
    return None


def _identity_projections(module: nn.Module) -> nn.Module:
    module.to_qkv = nn.Identity()
    module.to_out = nn.Identity()
    return module


def build_peer_module(name: str, head_dim: int, heads: int, block_size: int, max_seq_len: int) -> nn.Module:
    """The package module peer ``name`` runs in one layer. ``block_size`` is FMA's ``m`` (the near field's block);
    ``max_seq_len`` the longest input the module must take (h-transformer-1d sizes a mask buffer for it)."""
    if name == "sliding":
        from local_attention import LocalAttention

        return LocalAttention(
            window_size=block_size, causal=True, look_backward=1, autopad=True, use_rotary_pos_emb=False
        )
    if name == "h_transformer_1d":
        from h_transformer_1d.h_transformer_1d import CausalHAttention1D

        # It pads to a power of two, so its mask must cover the next power of two of the longest input.
        size = 2 ** math.ceil(math.log2(max(max_seq_len, 2 * block_size)))
        module = CausalHAttention1D(
            heads * head_dim, max_seq_len=size, heads=heads, dim_head=head_dim, block_size=block_size
        )
        return _identity_projections(module)
    if name == "performer":
        with contextlib.redirect_stdout(io.StringIO()):  # it prints that the CUDA kernel is absent
            from performer_pytorch import FastAttention

            return FastAttention(head_dim, causal=True)
    raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEER_PACKAGES)}")


def _repeat_kv(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    return tensor.repeat_interleave(heads // tensor.shape[1], dim=1)


def run_peer(name: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Peer ``name``'s causal attention; q, k, v ``(batch, heads, n, d)`` (k, v may have fewer heads); returns
    ``(batch, heads, n, d)``."""
    batch, heads, n, d = query.shape
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    if name == "h_transformer_1d":

        def merge(t):
            return t.transpose(1, 2).reshape(batch, n, heads * d)

        out = module(torch.cat([merge(query), merge(key), merge(value)], dim=-1))
        return out.view(batch, n, heads, d).transpose(1, 2)
    return module(query, key, value)


def peer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function of every peer: the layer's ``peer`` module (see :func:`attach_peer`) on the
    rotated q, k, v. Peers are causal by construction and take no padding mask."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(f"peer attention {module.peer_name!r} takes no padding mask")
    out = run_peer(module.peer_name, module.peer, query, key, value)
    return out.transpose(1, 2), None


for _name in PEER_PACKAGES:
    AttentionInterface.register(_name, peer_attention_forward)


def attach_peer(model: nn.Module, name: str, max_seq_len: int) -> None:
    """Give every `FMTAttention` of ``model`` the module of peer ``name`` (and switch the model to it)."""
    config = model.config
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.peer_name = name
        attention.peer = build_peer_module(
            name, config.head_dim, config.num_attention_heads, config.fma_block_size, max_seq_len
        )
    model.set_attn_implementation(name)
