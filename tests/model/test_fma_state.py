"""Incremental decoding (docs/fma.md §8): the multilevel state against the full forward pass."""

import itertools

import pytest
import torch

from fma_helpers import F64, decode, make, qkv
from fmt_hf.model.fma_attention import FastMultipoleAttention


STATE_OPTIONS = list(itertools.product(["fine", "coarse"], ["depthwise", "full", "avgpool", "recursive"],
                                      ["mask", "zero_sink"]))


@pytest.mark.parametrize("query_mode,downsample,boundary", STATE_OPTIONS)
def test_decoding_equals_full_forward(query_mode, downsample, boundary):
    attn = make(query_mode=query_mode, downsample=downsample, boundary=boundary, max_seq_len=96).eval()
    q, k, v = qkv(77, batch=1)
    full = attn(q, k, v)[0]
    for prompt, chunks in ((0, [1]), (13, [1, 3]), (32, [7, 1, 16]), (50, [1]), (16, [2])):
        out, state = decode(attn, q[0], k[0], v[0], prompt, chunks)
        torch.testing.assert_close(out, full[:, prompt:], rtol=0, atol=1e-12)
        assert state.length == 77


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_decoding_without_coarse_levels(query_mode):
    attn = make(query_mode=query_mode, max_seq_len=8).eval()  # n_max = 2m: level 0 only
    q, k, v = qkv(8, batch=1)
    out, _ = decode(attn, q[0], k[0], v[0], 3, [1])
    torch.testing.assert_close(out, attn(q, k, v)[0, :, 3:], rtol=0, atol=1e-12)


def test_chunked_prefill_state_equals_one_shot():
    attn = make(max_seq_len=96).eval()
    q, k, v = qkv(70, batch=1)
    one_shot = attn.prefill(attn.init_state(4, 2, F64), q[0], k[0], v[0])
    _, chunked = decode(attn, q[0], k[0], v[0], 0, [9, 16, 5])
    for a, b in zip(one_shot.tensors(), chunked.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_state_size_is_the_section_8_bound():
    """4m + 8pL vectors per key/value head, whatever the length (fine queries)."""
    attn = FastMultipoleAttention(16, 8192, block_size=64, coarse_tokens=4).eval()
    state = attn.init_state(4, 2, torch.float32)
    bound = (4 * 64 + 8 * 4 * attn.num_levels) * 2 * 16 * 4  # vectors x kv heads x d x bytes
    assert attn.num_levels == 6 and state.nbytes == bound
    q, k, v = (torch.randn(h, 3000, 16) for h in (4, 2, 2))
    assert attn.prefill(state, q, k, v).nbytes == bound


def test_decoding_needs_causal_attention():
    with pytest.raises(ValueError, match="causal"):
        make(causal=False).init_state(4, 2, F64)


def test_decoding_without_a_length_cap_is_refused_clearly():
    with pytest.raises(ValueError, match="max_seq_len=None"):
        make(downsample="recursive", max_seq_len=None).init_state(4, 2, F64)
