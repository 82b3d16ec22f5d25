"""The downsampler families (docs/fma.md §2, §7a): gradients, average init, parameter counts, the recursive family's
levels, shares and combine."""

import itertools

import pytest
import torch
from helpers.fma import F64, D, fma_layer, qkv
from helpers.reference import downsample as reference_downsample

from fmt_hf.model.fma_attention import FastMultipoleAttention
from fmt_hf.model.fma_downsample import AvgPoolDownsample, RecursiveDownsample


@pytest.mark.parametrize("downsample", ["depthwise", "full", "avgpool", "recursive"])
def test_downsampler_gradcheck(downsample):
    attn = fma_layer(downsample=downsample, max_seq_len=16, block_size=2, coarse_tokens=1, head_dim=2)
    x = torch.randn(1, 1, 16, 2, dtype=F64, requires_grad=True)
    params = list(attn.k_downsample.parameters())
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.cat([c.flatten() for c in attn.k_downsample(x, 2)]), (x, *params)
    )


def perturbed_recursive(head_dim=D, block_size=4, coarse_tokens=2, seed=0):
    torch.manual_seed(seed)
    module = RecursiveDownsample(head_dim, block_size, coarse_tokens).double()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return module


def test_recursive_gradcheck_through_four_levels():
    """p = 2 and four levels: the shared map U is used three times in a row, its gradient sums all three."""
    module = perturbed_recursive(head_dim=2, block_size=4, coarse_tokens=2)
    x = torch.randn(2, 1, 32, 2, dtype=F64, requires_grad=True)  # level 4 groups 32 tokens: one group
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.cat([c.flatten() for c in module(x, 4)]), (x, *module.parameters())
    )


def test_average_init_equals_avgpool():
    """Learned downsamplers start as sub-window means (§2)."""
    avg = fma_layer(perturb=False, downsample="avgpool")
    for family in ("depthwise", "full", "recursive"):
        learned = fma_layer(perturb=False, downsample=family)
        q, k, v = qkv(64)
        torch.testing.assert_close(learned(q, k, v), avg(q, k, v), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "causal,query_mode,block_size", list(itertools.product([True, False], ["fine", "coarse"], [4, 8]))
)
def test_untrained_recursive_equals_avgpool_at_any_length(causal, query_mode, block_size):
    """§7a: U averages children summaries 2r and 2r + 1, so every level of an untrained recursive layer is the
    sub-window mean -- at lengths that are no power of two and need up to 6 levels."""
    options = dict(perturb=False, causal=causal, query_mode=query_mode, block_size=block_size, max_seq_len=None)
    recursive, avg = fma_layer(downsample="recursive", **options), fma_layer(downsample="avgpool", **options)
    for n in (37, 100, 129, 300):
        q, k, v = qkv(n, batch=1)
        torch.testing.assert_close(recursive(q, k, v), avg(q, k, v), rtol=0, atol=1e-13)


def test_depthwise_parameter_count_grows_with_max_seq_len():
    for max_seq_len in (256, 1024):
        attn = FastMultipoleAttention(16, max_seq_len, block_size=16, coarse_tokens=4)
        widths = [attn.group_width(level) for level in range(1, attn.num_levels + 1)]
        expected = 2 * (4 * 16 * sum(widths) + 4 * 16 * len(widths))  # K and V
        assert sum(p.numel() for p in attn.parameters()) == expected


def test_recursive_parameter_count_does_not_depend_on_length():
    d, m, p = 16, 16, 4
    expected = 2 * (p * d * m + p * d + p * d * 2 * p + p * d)  # K and V: level 1, then the shared map
    for max_seq_len in (256, 8192, None):
        attn = FastMultipoleAttention(d, max_seq_len, block_size=m, coarse_tokens=p, downsample="recursive")
        assert sum(param.numel() for param in attn.parameters()) == expected


@pytest.mark.parametrize("block_size,coarse_tokens", [(4, 2), (8, 4), (4, 1)])
def test_recursive_levels_match_the_reference(block_size, coarse_tokens):
    """Every level of the fast path (depthwise kernel + batched combine) against the reference's conv1d and
    explicit einsum over child pairs."""
    module = perturbed_recursive(block_size=block_size, coarse_tokens=coarse_tokens)
    x = torch.randn(2, 3, block_size * 16, D, dtype=F64)
    levels = module(x, 5)
    assert len(levels) == 5
    for level, got in enumerate(levels, start=1):
        torch.testing.assert_close(got, reference_downsample(module, level, x, block_size), rtol=0, atol=1e-13)


@pytest.mark.parametrize("family", ["recursive", "avgpool"])
def test_combine_builds_the_next_level_from_two_children(family):
    """What a decoding state calls when a group's second child completes: the parent of two stored children."""
    module = perturbed_recursive() if family == "recursive" else AvgPoolDownsample(4, 2)
    x = torch.randn(2, 3, 64, D, dtype=F64)
    levels = [reference_downsample(module, level, x, 4) for level in range(1, 5)]
    for lower, upper in zip(levels, levels[1:]):
        children = lower.unflatten(2, (-1, 2)).flatten(3, 4)  # (B, H, parents, 2p, d): first child's p first
        torch.testing.assert_close(module.combine(children), upper, rtol=0, atol=1e-13)
    # one parent from two loose children, as a state holds them
    torch.testing.assert_close(
        module.combine(torch.cat([levels[1][0, 0, 2], levels[1][0, 0, 3]])), levels[2][0, 0, 1], rtol=0, atol=1e-13
    )
