"""Incremental decoding (docs/fma.md §8, `fma_decode.py`): decoding against the full forward pass."""

import itertools

import pytest
import torch
from helpers.fma import F64, decode, decode_batch, fma_layer, qkv

from fmt_hf.model.fma_partition import num_levels

STATE_OPTIONS = list(
    itertools.product(["fine", "coarse"], ["depthwise", "full", "avgpool", "recursive"], ["mask", "zero_sink"])
)


@pytest.mark.parametrize("query_mode,downsample,boundary", STATE_OPTIONS)
def test_decoding_equals_full_forward(query_mode, downsample, boundary):
    attn = fma_layer(query_mode=query_mode, downsample=downsample, boundary=boundary, max_seq_len=96).eval()
    q, k, v = qkv(77, batch=1)
    full = attn(q, k, v)[0]
    for prompt, chunks in ((0, [1]), (13, [1, 3]), (32, [7, 1, 16]), (50, [1]), (16, [2])):
        out, state = decode(attn, q[0], k[0], v[0], prompt, chunks)
        torch.testing.assert_close(out, full[:, prompt:], rtol=0, atol=1e-12)
        assert state.lengths == [77]


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_decoding_without_coarse_levels(query_mode):
    attn = fma_layer(query_mode=query_mode, max_seq_len=8).eval()  # n_max = 2m: level 0 only
    q, k, v = qkv(8, batch=1)
    out, _ = decode(attn, q[0], k[0], v[0], 3, [1])
    torch.testing.assert_close(out, attn(q, k, v)[0, :, 3:], rtol=0, atol=1e-12)


def test_chunked_prefill_state_equals_one_shot():
    attn = fma_layer(max_seq_len=96).eval()
    q, k, v = qkv(70, batch=1)
    one_shot = attn.decoder.init_state(4, 2, F64)
    attn.decoder.prefill(one_shot, q, k, v)
    _, chunked = decode(attn, q[0], k[0], v[0], 0, [9, 16, 5])
    for a, b in zip(one_shot.tensors(), chunked.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "query_mode,downsample", list(itertools.product(["fine", "coarse"], ["depthwise", "full", "avgpool", "recursive"]))
)
@pytest.mark.parametrize("sink_tokens", [1, 4])
def test_decoding_with_sink_tokens_equals_full_forward(query_mode, downsample, sink_tokens):
    """§3a through prefill, chunks and single steps, from prompts shorter than s too (the steps fill the sink
    tokens), with holes, one of them a sink token."""
    attn = fma_layer(query_mode=query_mode, downsample=downsample, max_seq_len=96, sink_tokens=sink_tokens).eval()
    q, k, v = qkv(77, batch=1)
    valid = torch.ones(77, dtype=torch.bool)
    valid[[0, 30, 40, 41, 76]] = False
    for mask in (None, valid):
        full = attn(q, k, v, key_padding_mask=None if mask is None else mask[None])[0]
        defined = torch.ones(77, dtype=torch.bool)
        defined[0] = mask is None  # a masked query 0 has no real key: its output is undefined
        for prompt, chunks in ((0, [1]), (2, [1, 3]), (13, [7, 1, 16]), (50, [1]), (0, [30])):
            out, _ = decode(attn, q[0], k[0], v[0], prompt, chunks, mask)
            rows = defined[prompt:]
            torch.testing.assert_close(out[:, rows], full[:, prompt:][:, rows], rtol=0, atol=1e-10)


def test_decoding_with_sink_tokens_without_a_length_cap():
    """Sink tokens in a length-free layer whose state adds levels as it goes (§7a)."""
    attn = fma_layer(downsample="recursive", max_seq_len=None, sink_tokens=3).eval()
    q, k, v = qkv(150, batch=1)
    full = attn(q, k, v)[0]
    for prompt, chunks in ((0, [1]), (1, [5, 1]), (70, [1])):
        out, state = decode(attn, q[0], k[0], v[0], prompt, chunks)
        torch.testing.assert_close(out, full[:, prompt:], rtol=0, atol=1e-10)
        assert state.num_levels == num_levels(151, 4)


@pytest.mark.parametrize(
    "query_mode,downsample", [("fine", "depthwise"), ("coarse", "full"), ("fine", "avgpool"), ("coarse", "recursive")]
)
@pytest.mark.parametrize("near_blocks", [1, 2, 3])
def test_batched_steps_with_sink_tokens_equal_rows_alone(query_mode, downsample, near_blocks):
    """Rows at different positions, some still filling their sink tokens in the batched steps, some with holes
    (one a sink token), each equal to its full forward (§3a); for every near-field width (§3b: rows gain derived
    levels at different steps)."""
    attn = fma_layer(
        query_mode=query_mode, downsample=downsample, max_seq_len=96, sink_tokens=3, near_blocks=near_blocks
    ).eval()
    q, k, v = qkv(60, batch=4)
    valid = torch.ones(4, 60, dtype=torch.bool)
    valid[1, [2, 15, 40]] = False
    valid[3, 1] = False
    prompts = [0, 1, 13, 2]
    outs, state = decode_batch(attn, q, k, v, prompts, valid)
    for b, prompt in enumerate(prompts):
        full = attn(q[b : b + 1], k[b : b + 1], v[b : b + 1], key_padding_mask=valid[b : b + 1])[0]
        torch.testing.assert_close(outs[b], full[:, prompt : prompt + 47], rtol=0, atol=1e-10)
    for b in range(4):  # every row holds its own sink tokens (masked ones zeroed, as in forward)
        torch.testing.assert_close(state.sink_k[b], k[b, :, :3] * valid[b, :3, None], rtol=0, atol=0)
        assert state.sink_valid[b].tolist() == valid[b, :3].tolist()


def test_chunked_prefill_with_sink_tokens_equals_one_shot():
    attn = fma_layer(max_seq_len=96, sink_tokens=3).eval()
    q, k, v = qkv(70, batch=1)
    one_shot = attn.decoder.init_state(4, 2, F64)
    attn.decoder.prefill(one_shot, q, k, v)
    _, chunked = decode(attn, q[0], k[0], v[0], 0, [2, 9, 16, 5])
    for a, b in zip(one_shot.tensors(), chunked.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_decoding_needs_causal_attention():
    with pytest.raises(ValueError, match="causal"):
        fma_layer(causal=False).decoder.init_state(4, 2, F64)


@pytest.mark.parametrize("query_mode,boundary", [("fine", "mask"), ("coarse", "mask"), ("fine", "zero_sink")])
def test_decoding_with_holes_equals_the_masked_forward(query_mode, boundary):
    """Masked tokens (holes) are positions left out of every level: the state gives what ``forward`` gives with
    the same ``key_padding_mask``, through prefill, chunks and single steps."""
    attn = fma_layer(query_mode=query_mode, boundary=boundary, max_seq_len=96).eval()
    q, k, v = qkv(77, batch=1)
    valid = torch.ones(77, dtype=torch.bool)
    valid[[2, 5, 6, 30, 76]] = False
    valid[40:57] = False  # a hole wider than a level-2 group: that group holds no real token
    full = attn(q, k, v, key_padding_mask=valid[None])[0]
    for prompt, chunks in ((0, [1]), (13, [1, 3]), (32, [7, 1, 16]), (50, [1])):
        out, _ = decode(attn, q[0], k[0], v[0], prompt, chunks, valid)
        torch.testing.assert_close(out, full[:, prompt:], rtol=0, atol=1e-12)


def test_derived_levels_grow_with_the_length():
    """Families whose levels derive from each other (§7a) hold the levels the next query reads, L(t+1), and
    gain one each time the length doubles: 4m + 6pL vectors, within the 4m + 8pL bound."""
    attn = fma_layer(downsample="avgpool", max_seq_len=4096, block_size=4, coarse_tokens=2).eval()
    q, k, v = qkv(300, batch=1)
    state = attn.decoder.init_state(4, 2, F64)
    assert state.num_levels == 0
    for t in range(300):
        attn.decoder.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        levels = num_levels(t + 2, 4)
        assert state.num_levels == levels and state.levels == [levels]
        assert state.num_vectors == 4 * 4 + 6 * 2 * levels <= 4 * 4 + 8 * 2 * levels


@pytest.mark.parametrize("query_mode,downsample", [("fine", "recursive"), ("coarse", "recursive"), ("fine", "avgpool")])
def test_decoding_without_a_length_cap_equals_full_forward(query_mode, downsample):
    """A length-free layer (max_seq_len=None, §7a) decodes exactly across every level its state adds, through
    prefill, chunks and single steps, with holes too."""
    attn = fma_layer(query_mode=query_mode, downsample=downsample, max_seq_len=None).eval()
    q, k, v = qkv(150, batch=1)  # m = 4: levels are added at t = 8, 16, 32, 64, 128
    valid = torch.ones(150, dtype=torch.bool)
    valid[[3, 70, 71, 140]] = False
    for mask in (None, valid):
        full = attn(q, k, v, key_padding_mask=None if mask is None else mask[None])[0]
        for prompt, chunks in ((0, [1]), (13, [1, 3]), (31, [7, 1, 16]), (100, [1])):
            out, state = decode(attn, q[0], k[0], v[0], prompt, chunks, mask)
            torch.testing.assert_close(out, full[:, prompt:], rtol=0, atol=1e-12)
            assert state.num_levels == num_levels(151, 4)


def test_zero_sink_decoding_without_a_length_cap_is_refused_clearly():
    with pytest.raises(ValueError, match="zero_sink"):
        fma_layer(downsample="recursive", boundary="zero_sink", max_seq_len=None).decoder.init_state(4, 2, F64)


@pytest.mark.parametrize("query_mode,downsample,boundary", STATE_OPTIONS)
def test_batched_steps_equal_rows_alone(query_mode, downsample, boundary):
    """One batched step per token for rows at different positions (as left padding makes them) equals each row's
    full forward: rows complete blocks and groups at different steps, and some have holes."""
    attn = fma_layer(query_mode=query_mode, downsample=downsample, boundary=boundary, max_seq_len=96).eval()
    q, k, v = qkv(77, batch=4)
    valid = torch.ones(4, 77, dtype=torch.bool)
    valid[1, [2, 15, 40, 41, 60]] = False
    valid[3, 55:66] = False
    prompts = [0, 13, 33, 50]
    outs, state = decode_batch(attn, q, k, v, prompts, valid)
    for b, prompt in enumerate(prompts):
        full = attn(q[b : b + 1], k[b : b + 1], v[b : b + 1], key_padding_mask=valid[b : b + 1])[0]
        torch.testing.assert_close(outs[b], full[:, prompt : prompt + 27], rtol=0, atol=1e-12)
    assert state.lengths == [t + 27 for t in prompts] and state.holes == [False, True, False, True]


@pytest.mark.parametrize("query_mode,downsample", [("fine", "recursive"), ("coarse", "avgpool")])
def test_batched_steps_with_levels_that_grow_per_row(query_mode, downsample):
    """Length-free layers (§7a): rows gain levels at different steps; the batch holds the most any row holds and
    each row's own count, and every row equals its full forward."""
    attn = fma_layer(query_mode=query_mode, downsample=downsample, max_seq_len=None).eval()
    q, k, v = qkv(150, batch=3)  # m = 4: levels are added at t = 8, 16, 32, 64, 128
    prompts = [0, 5, 70]
    outs, state = decode_batch(attn, q, k, v, prompts)
    for b, prompt in enumerate(prompts):
        torch.testing.assert_close(
            outs[b], attn(q[b : b + 1], k[b : b + 1], v[b : b + 1])[0, :, prompt : prompt + 80], rtol=0, atol=1e-12
        )
    assert state.levels == [num_levels(t + 81, 4) for t in prompts] and state.num_levels == max(state.levels)
    row = state.select([0])  # a row alone holds its own levels, and matches stepping it alone
    _, alone = decode(attn, q[0, :, :80], k[0, :, :80], v[0, :, :80], 0, [1])
    assert row.lengths == alone.lengths == [80] and row.num_levels == alone.num_levels
    for a, b in zip(row.tensors(), alone.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("query_mode,downsample", [("fine", "recursive"), ("coarse", "recursive"), ("fine", "avgpool")])
def test_batched_derived_steps_update_levels_without_splitting_rows(query_mode, downsample, monkeypatch):
    """Derived families (§7a): rows that complete fine blocks, groups and new levels at different steps (some at the
    same step) update their levels in one batched pass per step -- the state is never split into rows -- and every
    row equals decoding it alone, outputs and state."""
    attn = fma_layer(query_mode=query_mode, downsample=downsample, max_seq_len=None).eval()
    q, k, v = qkv(150, batch=4)  # m = 4: levels are added at t = 8, 16, 32, 64, 128
    valid = torch.ones(4, 150, dtype=torch.bool)
    valid[2, [9, 40, 41, 100]] = False
    prompts = [0, 3, 6, 70]  # rows 2 and 3 complete their blocks at the same steps
    decoder, steps = attn.decoder, 150 - max(prompts)
    state = decoder.init_state(4, 2, F64, batch_size=4)
    decoder.prefill(state, q, k, v, valid, lengths=prompts)

    def refuse(*args, **kwargs):
        raise AssertionError("a decoding step split the state into rows")

    completions = []
    complete = type(decoder)._complete_derived_blocks
    monkeypatch.setattr(
        type(decoder),
        "_complete_derived_blocks",
        lambda self, s, rows: completions.append(rows) or complete(self, s, rows),
    )
    monkeypatch.setattr(type(state), "select", refuse)
    monkeypatch.setattr(type(state), "put", refuse)
    outs = []
    for step in range(steps):
        at, rows = torch.tensor(prompts) + step, torch.arange(4)
        outs.append(
            decoder.step(state, q[rows, :, at, None], k[rows, :, at, None], v[rows, :, at, None], valid[rows, at, None])
        )
    monkeypatch.undo()
    assert len(completions) == len({step for step in range(steps) for t in prompts if (t + step + 1) % 4 == 0})
    assert max(len(rows) for rows in completions) == 2
    assert state.levels == [4, 4, 4, 5]  # rows hold different numbers of levels, gained at different steps
    for b, prompt in enumerate(prompts):
        end = prompt + steps
        out, alone = decode(attn, q[b, :, :end], k[b, :, :end], v[b, :, :end], prompt, [1], valid[b, :end])
        torch.testing.assert_close(torch.cat(outs, 2)[b], out, rtol=0, atol=1e-12)
        row = state.select([b])
        assert row.lengths == alone.lengths and row.levels == alone.levels and row.holes == alone.holes
        for a, c in zip(row.tensors(), alone.tensors()):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


NEAR_FIELD_LAYERS = [("depthwise", 160), ("full", 160), ("avgpool", None), ("recursive", None), ("recursive", 160)]


@pytest.mark.parametrize("near_blocks", [2, 3])
@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
@pytest.mark.parametrize("downsample,max_seq_len", NEAR_FIELD_LAYERS)
def test_near_field_decoding_equals_full_forward(near_blocks, query_mode, downsample, max_seq_len):
    """A near field of w blocks (§3): a fine ring of (w+1)m, rings of 2w+1 groups, derived levels gained at
    t = (w+1) w_l; through prefill, chunks and single steps, with sink tokens and holes (one a sink token)."""
    attn = fma_layer(
        query_mode=query_mode,
        downsample=downsample,
        max_seq_len=max_seq_len,
        near_blocks=near_blocks,
        sink_tokens=3,
    ).eval()
    q, k, v = qkv(150, batch=1)
    valid = torch.ones(150, dtype=torch.bool)
    valid[[0, 30, 41, 100]] = False
    for mask in (None, valid):
        full = attn(q, k, v, key_padding_mask=None if mask is None else mask[None])[0]
        defined = torch.ones(150, dtype=torch.bool)
        defined[0] = mask is None  # a masked query 0 has no real key: its output is undefined
        for prompt, chunks in ((0, [1]), (13, [7, 1, 16]), (50, [1]), (0, [33])):
            out, state = decode(attn, q[0], k[0], v[0], prompt, chunks, mask)
            rows = defined[prompt:]
            torch.testing.assert_close(out[:, rows], full[:, prompt:][:, rows], rtol=0, atol=1e-10)
            assert state.num_levels == attn.partition.levels_for(151)  # = those of the cap, 160 tokens


@pytest.mark.parametrize("near_blocks", [2, 3])
def test_near_field_zero_sink_decoding_equals_full_forward(near_blocks):
    attn = fma_layer(boundary="zero_sink", max_seq_len=96, near_blocks=near_blocks).eval()
    q, k, v = qkv(77, batch=1)
    full = attn(q, k, v)[0]
    for prompt, chunks in ((0, [1]), (13, [1, 3]), (32, [7, 1, 16])):
        out, _ = decode(attn, q[0], k[0], v[0], prompt, chunks)
        torch.testing.assert_close(out, full[:, prompt:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("near_blocks", [2, 3])
@pytest.mark.parametrize("downsample,max_seq_len", [("depthwise", 96), ("recursive", None)])
def test_near_field_chunked_prefill_state_equals_one_shot(near_blocks, downsample, max_seq_len):
    attn = fma_layer(downsample=downsample, max_seq_len=max_seq_len, near_blocks=near_blocks, sink_tokens=3).eval()
    q, k, v = qkv(90, batch=1)
    one_shot = attn.decoder.init_state(4, 2, F64)
    attn.decoder.prefill(one_shot, q, k, v)
    _, chunked = decode(attn, q[0], k[0], v[0], 0, [2, 9, 16, 5])
    for a, b in zip(one_shot.tensors(), chunked.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("near_blocks", [2, 3])
def test_near_field_derived_levels_grow_with_the_length(near_blocks):
    """The derived families hold L(t+1) levels of a near field of w blocks: 2(w+1)m + 2(2w+1)pL vectors."""
    attn = fma_layer(downsample="avgpool", max_seq_len=None, near_blocks=near_blocks).eval()
    q, k, v = qkv(200, batch=1)
    state = attn.decoder.init_state(4, 2, F64)
    for t in range(200):
        attn.decoder.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        levels = num_levels(t + 2, 4, near_blocks)
        assert state.num_levels == levels and state.levels == [levels]
        assert state.num_vectors == 2 * (near_blocks + 1) * 4 + 2 * (2 * near_blocks + 1) * 2 * levels
