"""Shared helpers of the FMA tests: small float64 layers and random inputs."""

import itertools

import torch
import torch.nn as nn

from fmt_hf.model.fma_attention import FastMultipoleAttention

D = 8  # head dim of the small test layers
F64 = torch.float64


def fma_layer(seed=0, perturb=True, **kwargs):
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
    """Outputs of rows prompt.. of one sequence (a state of batch 1): prefill ``prompt`` tokens, then steps of the
    given sizes; ``valid`` (n,) marks real tokens (None: all)."""
    decoder, valid = attn.decoder, torch.ones(q.shape[1], dtype=torch.bool) if valid is None else valid
    q, k, v, valid = q[None], k[None], v[None], valid[None]
    state = decoder.init_state(q.shape[1], k.shape[1], q.dtype)
    if prompt:
        decoder.prefill(state, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], valid[:, :prompt])
    outs, i = [], prompt
    for c in itertools.cycle(chunks):
        if i == q.shape[2]:
            return torch.cat(outs, 2)[0], state
        c = min(c, q.shape[2] - i)
        outs.append(
            decoder.step(state, q[:, :, i : i + c], k[:, :, i : i + c], v[:, :, i : i + c], valid[:, i : i + c])
        )
        i += c


def decode_batch(attn, q, k, v, prompts, valid=None):
    """Batched decoding of rows at different positions: row b of ``q`` (B, H, n, d) is prefilled with
    ``prompts[b]`` tokens, then all rows step together, one token each, ``n - max(prompts)`` times; ``valid``
    (B, n) marks real tokens. Returns per row the outputs of its stepped positions and the state."""
    decoder, (batch, heads, n, _) = attn.decoder, q.shape
    valid = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid
    state = decoder.init_state(heads, k.shape[1], q.dtype, batch_size=batch)
    decoder.prefill(state, q, k, v, valid, lengths=prompts)
    outs = []
    for step in range(n - max(prompts)):
        at = torch.tensor(prompts) + step
        rows = torch.arange(batch)
        args = q[rows, :, at, None], k[rows, :, at, None], v[rows, :, at, None], valid[rows, at, None]
        outs.append(decoder.step(state, *args))
    return [torch.cat(outs, 2)[b] for b in range(batch)], state
