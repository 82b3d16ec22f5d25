"""The downsampler families (docs/fma.md §2): gradients, average init, parameter counts."""


import pytest
import torch

from fma_helpers import F64, make, qkv
from fmt_hf.model.fma_attention import FastMultipoleAttention


@pytest.mark.parametrize("downsample", ["depthwise", "full", "avgpool"])
def test_downsampler_gradcheck(downsample):
    attn = make(downsample=downsample, max_seq_len=16, block_size=2, coarse_tokens=1, head_dim=2)
    x = torch.randn(1, 1, 16, 2, dtype=F64, requires_grad=True)
    params = list(attn.k_downsample.parameters())
    assert torch.autograd.gradcheck(lambda x, *ps: torch.cat([c.flatten() for c in attn.k_downsample(x, 2)]),
                                    (x, *params))


def test_average_init_equals_avgpool():
    """Learned downsamplers start as sub-window means (§2)."""
    avg = make(perturb=False, downsample="avgpool")
    for family in ("depthwise", "full"):
        learned = make(perturb=False, downsample=family)
        q, k, v = qkv(64)
        torch.testing.assert_close(learned(q, k, v), avg(q, k, v), rtol=0, atol=1e-13)


def test_depthwise_parameter_count_grows_with_max_seq_len():
    for max_seq_len in (256, 1024):
        attn = FastMultipoleAttention(16, max_seq_len, block_size=16, coarse_tokens=4)
        widths = [attn.group_width(level) for level in range(1, attn.num_levels + 1)]
        expected = 2 * (4 * 16 * sum(widths) + 4 * 16 * len(widths))  # K and V
        assert sum(p.numel() for p in attn.parameters()) == expected
