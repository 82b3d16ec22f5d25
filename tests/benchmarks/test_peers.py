"""benchmarks.peers: the peers compute what they claim (the sliding window is FMA's level 0, the h-transformer-1d
adapter is the package's module)."""

import math

import torch
from helpers.reference import fine_keys

from benchmarks.peers import build_peer_module, run_peer


def test_sliding_window_is_fma_without_its_far_field():
    """The sliding peer equals float64 attention over exactly FMA's level-0 keys (the reference's `fine_keys`,
    §3) at an awkward length, i.e. FMA with the coarse levels removed."""
    torch.manual_seed(0)
    batch, heads, n, d, m = 2, 3, 300, 8, 16
    q, k, v = (torch.randn(batch, heads, n, d, dtype=torch.float64) for _ in range(3))
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        allowed[i, fine_keys(i, n, m, None, causal=True)[0]] = True
    logits = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    expected = logits.softmax(-1) @ v
    got = run_peer("sliding", build_peer_module("sliding", d, heads, m, n), q, k, v)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_h_transformer_adapter_is_the_package_module():
    from h_transformer_1d.h_transformer_1d import CausalHAttention1D

    torch.manual_seed(0)
    batch, heads, n, d, m = 2, 3, 200, 8, 16
    package = CausalHAttention1D(heads * d, max_seq_len=256, heads=heads, dim_head=d, block_size=m).double()
    x = torch.randn(batch, n, heads * d, dtype=torch.float64)

    def split(t):
        return t.view(batch, n, heads, d).transpose(1, 2)

    q, k, v = (split(t) for t in package.to_qkv(x).chunk(3, dim=-1))
    out = run_peer("h_transformer_1d", build_peer_module("h_transformer_1d", d, heads, m, n).double(), q, k, v)
    torch.testing.assert_close(package.to_out(out.transpose(1, 2).reshape(batch, n, heads * d)), package(x))
