"""The decoding state (docs/fma.md §8, `fma_state.py`): its size, and row selection for beams and batch operations."""

import pytest
import torch
from helpers.fma import F64, decode_batch, fma_layer, qkv

from fmt_hf.model.fma_attention import FastMultipoleAttention
from fmt_hf.model.fma_partition import num_levels
from fmt_hf.model.fma_state import LEVEL_FIELDS


@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_state_size_is_the_section_8_bound(sink_tokens):
    """4m + 2s + 8pL vectors per key/value head, whatever the length (fine queries)."""
    attn = FastMultipoleAttention(16, 8192, block_size=64, coarse_tokens=4, sink_tokens=sink_tokens).eval()
    state = attn.decoder.init_state(4, 2, torch.float32)
    bound = 4 * 64 + 2 * sink_tokens + 8 * 4 * attn.num_levels  # vectors of size d per key/value head
    assert attn.num_levels == 6 and state.num_vectors == bound
    empty_bytes = state.nbytes
    q, k, v = (torch.randn(1, h, 3000, 16) for h in (4, 2, 2))
    attn.decoder.prefill(state, q, k, v)
    assert state.num_vectors == bound and state.nbytes == empty_bytes


@pytest.mark.parametrize("near_blocks", [2, 3])
def test_state_size_of_a_wider_near_field(near_blocks):
    """A near field of w blocks: a fine ring of (w+1)m and rings of 2w+1 groups, 2(w+1)m + 2(2w+2)pL vectors."""
    attn = FastMultipoleAttention(16, 8192, block_size=64, coarse_tokens=4, near_blocks=near_blocks).eval()
    state = attn.decoder.init_state(4, 2, torch.float32)
    assert attn.num_levels == num_levels(8192, 64, near_blocks) == (5 if near_blocks == 3 else 6)
    bound = 2 * (near_blocks + 1) * 64 + 2 * (2 * near_blocks + 2) * 4 * attn.num_levels
    assert state.num_vectors == bound
    q, k, v = (torch.randn(1, h, 3000, 16) for h in (4, 2, 2))
    attn.decoder.prefill(state, q, k, v)
    assert state.num_vectors == bound


def test_a_batch_state_counts_vectors_per_row():
    attn = fma_layer(max_seq_len=96, sink_tokens=2).eval()
    one, three = (attn.decoder.init_state(4, 2, F64, batch_size=b) for b in (1, 3))
    assert three.batch_size == 3 and three.num_vectors == one.num_vectors == 4 * 4 + 2 * 2 + 8 * 2 * attn.num_levels
    assert three.nbytes == 3 * one.nbytes


def test_select_copies_rows_with_the_levels_they_hold():
    """Rows of a length-free layer hold different numbers of levels (§7a): a selection holds the most its rows
    hold, a copy (beams never share memory), and putting it back restores the state."""
    attn = fma_layer(downsample="recursive", max_seq_len=None).eval()
    q, k, v = qkv(40, batch=3)
    _, state = decode_batch(attn, q, k, v, [0, 20, 30])  # lengths 10, 30, 40
    assert state.levels == [num_levels(t + 1, 4) for t in (10, 30, 40)] == [1, 2, 3]
    assert state.num_levels == 3
    beams = state.select([1, 1, 0])
    assert beams.lengths == [30, 30, 10] and beams.levels == [2, 2, 1] and beams.num_levels == 2
    for name in beams.tensor_fields():
        held = getattr(state, name)[[1, 1, 0]]
        torch.testing.assert_close(getattr(beams, name), held[:, :2] if name in LEVEL_FIELDS else held, rtol=0, atol=0)
    beams.fine_k.add_(1.0)
    assert not torch.equal(beams.fine_k[2], state.fine_k[0])  # a copy
    before = [t.clone() for t in state.tensors()]
    state.put([0], state.select([0]))
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors()))


def test_put_grows_the_levels_a_state_holds():
    attn = fma_layer(downsample="avgpool", max_seq_len=None).eval()
    q, k, v = qkv(40, batch=2)
    _, state = decode_batch(attn, q, k, v, [0, 30])  # lengths 10 and 40: 1 and 3 levels
    short = state.select([0])
    assert short.num_levels == 1
    short.put([0], state.select([1]))
    assert short.levels == [3] and short.num_levels == 3 and short.lengths == [40]
    for a, b in zip(short.tensors(), state.select([1]).tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_map_tensors_moves_every_tensor():
    state = fma_layer(query_mode="coarse", max_seq_len=96).decoder.init_state(4, 2, F64, batch_size=2)
    moved = state.map_tensors(lambda t: t.float() if t.is_floating_point() else t, lengths=[3, 4])
    assert moved.lengths == [3, 4] and state.lengths == [0, 0]
    assert {t.dtype for t in moved.tensors()} == {torch.float32, torch.bool}
    assert len(moved.tensors()) == len(state.tensors()) == 22  # level_queries too (coarse query mode), the empty store
