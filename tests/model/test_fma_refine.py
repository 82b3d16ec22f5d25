"""fma_refine.py: adaptive refinement (docs/fma.md §3c) -- the forward pass and decoding against the float64 loop
reference, the identity that refining every far block is dense attention, and the decoding store."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers.fma import decode, decode_batch, fma_layer, qkv
from helpers.reference import reference_fma

from fmt_hf.model.fma_refine import siblings, split_slots

DOWNSAMPLERS = [("depthwise", 64), ("full", 64), ("avgpool", None), ("recursive", None)]


def padding(n, batch=2):
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[-1, 17:20] = False  # a hole
    mask[-1, n - 3 :] = False  # right padding
    return mask


@pytest.mark.parametrize("downsample,max_seq_len", DOWNSAMPLERS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("near_blocks,sink_tokens,refine_groups,n", [(1, 0, 2, 37), (2, 3, 3, 53), (1, 2, 1, 61)])
def test_refinement_matches_reference(downsample, max_seq_len, causal, near_blocks, sink_tokens, refine_groups, n):
    attn = fma_layer(
        causal=causal,
        downsample=downsample,
        max_seq_len=max_seq_len,
        near_blocks=near_blocks,
        sink_tokens=sink_tokens,
        refine_groups=refine_groups,
    )
    q, k, v = qkv(n)
    torch.testing.assert_close(attn(q, k, v), reference_fma(attn, q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("downsample,max_seq_len", [("depthwise", 64), ("recursive", None)])
def test_refinement_with_padding_matches_reference(causal, downsample, max_seq_len):
    attn = fma_layer(causal=causal, downsample=downsample, max_seq_len=max_seq_len, sink_tokens=2, refine_groups=2)
    q, k, v = qkv(50)
    mask = padding(50)
    real = mask[:, None, :, None]
    out, ref = attn(q, k, v, mask), reference_fma(attn, q, k, v, mask)
    torch.testing.assert_close(out * real, ref * real, rtol=0, atol=1e-12)


def test_refinement_changes_what_pure_fma_computes():
    """The reference comparison above could not tell refinement from none if selection never split anything."""
    q, k, v = qkv(53)
    refined = fma_layer(refine_groups=2)(q, k, v)
    pure = fma_layer(refine_groups=0)(q, k, v)
    # blocks 0 and 1 (m = 4) have no far field to refine; from block 2 on, block 0 is a candidate
    torch.testing.assert_close(refined[:, :, :8], pure[:, :, :8], rtol=0, atol=1e-12)
    assert (refined - pure)[:, :, 8:].abs().amax() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_refining_every_far_block_is_dense_attention(causal, sink_tokens):
    """With k at least the number of far blocks every summary is split down to its fine keys (§3c)."""
    attn = fma_layer(causal=causal, downsample="recursive", max_seq_len=None, sink_tokens=sink_tokens, refine_groups=16)
    q, k, v = qkv(61)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    torch.testing.assert_close(attn(q, k, v), dense, rtol=0, atol=1e-12)


def test_gradients_flow_through_what_is_selected():
    attn = fma_layer(refine_groups=2)
    q, k, v = (x.requires_grad_() for x in qkv(45))
    attn(q, k, v).square().sum().backward()
    for x in (q, k, v, *attn.parameters()):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_split_slots_and_siblings_cover_a_group_once():
    """Blocks 5 and 6 selected in level-4 group 0 (blocks 0-7): it splits into level-3 groups 0 (blocks 0-3, kept)
    and 1 (4-7, split), that into level-2 groups 2 and 3 (both split), and those into blocks 4 and 7 (kept) and the
    two selected blocks."""
    blocks, used, cover = torch.tensor([5, 6]), torch.tensor([True, True]), torch.tensor([4, 4])
    groups, use = siblings(blocks, used, cover, levels=4)
    chosen = {
        (level + 1, int(g))
        for (b, level), g in zip(itertools.product(range(2), range(3)), groups.flatten())
        if use[b, level]
    }
    assert chosen == {(1, 4), (1, 7), (3, 0)}  # (level, group)
    slot_groups = torch.tensor([[4, 5, 6], [1, 2, 3], [0, 1, 2], [0, 1, -1]])  # levels 1 .. 4, -1 for no group
    assert split_slots(slot_groups, blocks, used).tolist() == [
        [False, True, True],
        [False, True, True],
        [False, True, False],
        [True, False, False],
    ]


@pytest.mark.parametrize("downsample,max_seq_len", DOWNSAMPLERS)
@pytest.mark.parametrize("prompt,chunks", [(0, [1]), (9, [1, 5, 2]), (30, [13])])
def test_refined_decoding_equals_full_forward(downsample, max_seq_len, prompt, chunks):
    attn = fma_layer(downsample=downsample, max_seq_len=max_seq_len, near_blocks=2, sink_tokens=3, refine_groups=3)
    attn.eval()
    q, k, v = qkv(61, batch=1)
    out, state = decode(attn, q[0], k[0], v[0], prompt, chunks)
    torch.testing.assert_close(out, attn(q, k, v)[0, :, prompt:], rtol=0, atol=1e-12)
    assert state.store_blocks == 61 // 4  # every complete block is stored
    assert state.store_vectors > 2 * 60  # past keys and values, bounds and summaries, reported apart


@pytest.mark.parametrize("downsample,max_seq_len", [("depthwise", 64), ("recursive", None)])
def test_refined_batched_decoding_with_holes_equals_full_forward(downsample, max_seq_len):
    attn = fma_layer(downsample=downsample, max_seq_len=max_seq_len, sink_tokens=2, refine_groups=2).eval()
    q, k, v = qkv(50, batch=3)
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[1, 10:13], valid[2, 30] = False, False
    full = attn(q, k, v, valid)
    prompts = [20, 33, 41]
    outs, _ = decode_batch(attn, q, k, v, prompts, valid)
    for b, start in enumerate(prompts):
        real = valid[b, None, start : start + 9, None]
        torch.testing.assert_close(outs[b] * real, full[b, :, start : start + 9] * real, rtol=0, atol=1e-12)


def test_pure_fma_keeps_no_store():
    attn = fma_layer(downsample="recursive", max_seq_len=None).eval()
    q, k, v = qkv(40, batch=1)
    _, state = decode(attn, q[0], k[0], v[0], 20, [1])
    assert state.store_blocks == 0 and state.store_vectors == 0 and state.store_nbytes == 0
