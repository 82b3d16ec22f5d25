"""Shared helpers of the FMA tests: small float64 layers and random inputs."""

import itertools

import torch
import torch.nn as nn

from fmt_hf.model.fma_attention import FastMultipoleAttention

D = 8  # head dim of the small test layers
F64 = torch.float64


def make(seed=0, perturb=True, **kwargs):
    """A float64 layer; learned downsamplers moved away from their average init so weights matter."""
    torch.manual_seed(seed)
    options = dict(head_dim=D, max_seq_len=64, block_size=4, coarse_tokens=2)
    options.update(kwargs)
    attn = FastMultipoleAttention(**options).double()
    if perturb:
        with torch.no_grad():
            for param in attn.parameters():
                param.add_(0.3 * torch.randn_like(param))
    return attn


def qkv(n, batch=2, heads=4, kv_heads=2, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, D, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, D, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, D, generator=gen, dtype=dtype)
    return q, k, v


class Identity(nn.Module):
    """Identity pooling (§6): at every level each coarse token is one fine token (p_l = w_l)."""

    def __init__(self, widths):
        super().__init__()
        self.widths = widths

    def forward(self, x, levels):
        return [x.unflatten(-2, (-1, w)) for w in self.widths[:levels]]


def with_identity_pooling(attn):
    widths = [attn.group_width(level) for level in range(1, attn.num_levels + 1)]
    attn.k_downsample, attn.v_downsample = Identity(widths), Identity(widths)
    return attn


def decode(attn, q, k, v, prompt, chunks, valid=None):
    """Outputs of rows prompt.. of one sequence: prefill ``prompt`` tokens, then steps of the given sizes;
    ``valid`` (n,) marks real tokens (None: all)."""
    valid = torch.ones(q.shape[1], dtype=torch.bool) if valid is None else valid
    state = attn.init_state(q.shape[0], k.shape[0], q.dtype)
    if prompt:
        state = attn.prefill(state, q[:, :prompt], k[:, :prompt], v[:, :prompt], valid[:prompt])
    outs, i = [], prompt
    for c in itertools.cycle(chunks):
        if i == q.shape[1]:
            return torch.cat(outs, 1), state
        c = min(c, q.shape[1] - i)
        out, state = attn.step(state, q[:, i : i + c], k[:, i : i + c], v[:, i : i + c], valid[i : i + c])
        outs.append(out)
        i += c


def decode_batch(attn, q, k, v, prompts, valid=None):
    """Batched decoding (``step_batch``) of rows at different positions: row b of ``q`` (B, H, n, d) is
    prefilled with ``prompts[b]`` tokens, then all rows step together, one token each, ``n - max(prompts)``
    times; ``valid`` (B, n) marks real tokens. Returns per row the outputs of its stepped positions and the
    batch state."""
    from fmt_hf.model.fma_state import FMABatchState

    batch, heads, n, _ = q.shape
    valid = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid
    empty = attn.init_state(heads, k.shape[1], q.dtype)
    state = FMABatchState.stack(
        [
            attn.prefill(empty, q[b, :, :t], k[b, :, :t], v[b, :, :t], valid[b, :t]) if t else empty
            for b, t in enumerate(prompts)
        ]
    )
    outs = []
    for step in range(n - max(prompts)):
        at = torch.tensor(prompts) + step
        rows = torch.arange(batch)
        outs.append(
            attn.step_batch(
                state, q[rows, :, at, None], k[rows, :, at, None], v[rows, :, at, None], valid[rows, at, None]
            )
        )
    return [torch.cat(outs, 2)[b] for b in range(batch)], state
