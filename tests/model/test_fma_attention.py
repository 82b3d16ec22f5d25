"""Fast Multipole Attention's forward pass against its definition (docs/fma.md) and against dense attention."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers.fma import D, fma_layer, qkv, with_identity_pooling
from helpers.reference import reference_fma

from fmt_hf.model.fma_attention import FastMultipoleAttention

OPTIONS = list(
    itertools.product(
        [True, False],
        ["fine", "coarse"],
        ["depthwise", "full", "avgpool", "recursive"],
        [True, False],
        ["mask", "zero_sink"],
    )
)
LENGTH_FREE_OPTIONS = list(
    itertools.product([True, False], ["fine", "coarse"], ["recursive", "avgpool"], ["mask", "zero_sink"])
)


@pytest.mark.parametrize("causal,query_mode,downsample,scale_attn,boundary", OPTIONS)
def test_matches_reference_for_every_option(causal, query_mode, downsample, scale_attn, boundary):
    attn = fma_layer(
        causal=causal, query_mode=query_mode, downsample=downsample, scale_attn=scale_attn, boundary=boundary
    )
    for n in (3, 37, 64):  # L = 0, 3, 3; only 64 is the built length and a power of two
        q, k, v = qkv(n, batch=1)
        torch.testing.assert_close(attn(q, k, v), reference_fma(attn, q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,query_mode,downsample,boundary", LENGTH_FREE_OPTIONS)
def test_length_free_layer_matches_reference(causal, query_mode, downsample, boundary):
    """max_seq_len=None (§7a): each input gets the levels it needs (up to 5 here); only groups before position 0
    are outside the sequence."""
    attn = fma_layer(causal=causal, query_mode=query_mode, downsample=downsample, boundary=boundary, max_seq_len=None)
    for n in (3, 37, 129):
        q, k, v = qkv(n, batch=1)
        torch.testing.assert_close(attn(q, k, v), reference_fma(attn, q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,query_mode", list(itertools.product([True, False], ["fine", "coarse"])))
def test_length_free_layer_equals_a_capped_one_under_mask(causal, query_mode):
    """With boundary="mask" the cap only bounds the length: below it, a capped layer and a length-free one with the
    same weights agree, and causal outputs do not depend on how long the rest of the sequence is."""
    capped = fma_layer(causal=causal, query_mode=query_mode, downsample="recursive", max_seq_len=300)
    free = fma_layer(causal=causal, query_mode=query_mode, downsample="recursive", max_seq_len=None)
    free.load_state_dict(capped.state_dict())
    q, k, v = qkv(300, batch=1)
    for n in (37, 129, 300):
        torch.testing.assert_close(
            free(q[:, :, :n], k[:, :, :n], v[:, :, :n]),
            capped(q[:, :, :n], k[:, :, :n], v[:, :, :n]),
            rtol=0,
            atol=1e-13,
        )
    if causal:
        full = free(q, k, v)
        torch.testing.assert_close(free(q[:, :, :37], k[:, :, :37], v[:, :, :37]), full[:, :, :37], rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "causal,query_mode,downsample",
    list(itertools.product([True, False], ["fine", "coarse"], ["depthwise", "recursive", "avgpool"])),
)
def test_sink_tokens_match_reference(causal, query_mode, downsample):
    """§3a at lengths that are no power of two, s = 1, 3 and m (= 4: level 1's group 0 holds sink tokens only),
    with grouped-query heads."""
    for sink_tokens, n in ((1, 200), (3, 333), (4, 1000)):
        attn = fma_layer(
            causal=causal, query_mode=query_mode, downsample=downsample, max_seq_len=1024, sink_tokens=sink_tokens
        )
        q, k, v = qkv(n, batch=1, heads=6, kv_heads=2, seed=n)
        torch.testing.assert_close(attn(q, k, v), reference_fma(attn, q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,boundary", [(True, "mask"), (False, "mask"), (True, "zero_sink")])
def test_sink_tokens_with_key_padding_match_reference(causal, boundary):
    """A padded sink token is masked like any padded key; holes elsewhere too; zero sinks at the boundary."""
    attn = fma_layer(causal=causal, boundary=boundary, sink_tokens=3)
    q, k, v = qkv(50, batch=3)
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[0, 1] = False  # one sink token
    mask[1, :2] = False
    mask[2, 10:27] = False
    out = attn(q, k, v, key_padding_mask=mask)
    defined = torch.ones(3, 50, dtype=torch.bool)
    if causal:
        defined[1, :2] = False  # no real key at all
    expected = reference_fma(attn, q, k, v, mask)
    torch.testing.assert_close(out.transpose(1, 2)[defined], expected.transpose(1, 2)[defined], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_sink_tokens_change_only_queries_past_the_second_block(causal):
    """Queries of blocks 0 and 1 see the sink tokens in their band (and causal ones read no summary): s changes
    nothing there; every later query attends the sinks exactly and its summaries lose them (§3a)."""
    plain, sinks = fma_layer(causal=causal), fma_layer(causal=causal, sink_tokens=3)
    q, k, v = qkv(45)
    out, expected = sinks(q, k, v), plain(q, k, v)
    if causal:
        torch.testing.assert_close(out[:, :, :8], expected[:, :, :8], rtol=0, atol=0)
    assert (out[:, :, 8:] - expected[:, :, 8:]).abs().amax((0, 1, 3)).min() > 1e-6


@pytest.mark.parametrize("causal,downsample", [(True, "depthwise"), (False, "recursive"), (True, "full")])
def test_sink_tokens_are_in_no_summary(causal, downsample):
    """Perturbing a sink token's key and value changes no coarse summary of any level (the downsamplers read
    zeros there), but changes outputs (the sink slots read it)."""
    attn = fma_layer(causal=causal, downsample=downsample, sink_tokens=3)
    summaries = []
    for module in (attn.k_downsample, attn.v_downsample):
        module.register_forward_hook(lambda module, args, out: summaries.append([level.clone() for level in out]))
    q, k, v = qkv(61)
    out = attn(q, k, v)
    k[:, :, 2] += 1.0
    v[:, :, 2] += 1.0
    perturbed = attn(q, k, v)
    assert len(summaries) == 4 and len(summaries[0]) == 3
    for before, after in zip(summaries[:2], summaries[2:]):
        for level_before, level_after in zip(before, after):
            torch.testing.assert_close(level_after, level_before, rtol=0, atol=0)
    assert not torch.allclose(perturbed[:, :, 8:], out[:, :, 8:])


NEAR_FIELD_OPTIONS = list(
    itertools.product([2, 3], [True, False], ["fine", "coarse"], ["depthwise", "full", "avgpool", "recursive"])
)


@pytest.mark.parametrize("near_blocks,causal,query_mode,downsample", NEAR_FIELD_OPTIONS)
def test_near_field_matches_reference(near_blocks, causal, query_mode, downsample):
    """A near field of w = 2, 3 blocks (§3) at lengths that are no multiple of m (L = 0 .. 3), with sink tokens and a
    key padding mask (a padded sink, a hole wider than a level-1 group), capped and length-free."""
    for max_seq_len in (96, None) if downsample in ("avgpool", "recursive") else (96,):
        attn = fma_layer(
            causal=causal,
            query_mode=query_mode,
            downsample=downsample,
            max_seq_len=max_seq_len,
            near_blocks=near_blocks,
            sink_tokens=3,
        )
        for n in (7, 45, 91):
            q, k, v = qkv(n)
            mask = torch.ones(2, n, dtype=torch.bool)
            mask[0, 1] = False
            mask[1, n // 3 : n // 3 + 6] = False
            out = attn(q, k, v, key_padding_mask=mask)
            torch.testing.assert_close(out, reference_fma(attn, q, k, v, mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("near_blocks,causal", list(itertools.product([2, 3], [True, False])))
def test_near_field_with_zero_sinks_matches_reference(near_blocks, causal):
    """``boundary="zero_sink"`` counts the wider field's blocks and groups before position 0 (and past the cap)."""
    attn = fma_layer(causal=causal, boundary="zero_sink", near_blocks=near_blocks, max_seq_len=96, sink_tokens=2)
    for n in (5, 37, 96):
        q, k, v = qkv(n, batch=1)
        torch.testing.assert_close(attn(q, k, v), reference_fma(attn, q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,query_mode", list(itertools.product([True, False], ["fine", "coarse"])))
def test_key_padding_matches_reference(causal, query_mode):
    attn = fma_layer(causal=causal, query_mode=query_mode)
    q, k, v = qkv(50, batch=3)  # 13 blocks of 4, padded to 64 for the widest groups
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, :7] = False
    mask[2, 10:27] = False
    out = attn(q, k, v, key_padding_mask=mask)
    expected = reference_fma(attn, q, k, v, mask)
    # a query with no real key at all (causal row 1 before position 7) has no defined output; it must be finite
    defined = torch.ones(3, 50, dtype=torch.bool)
    if causal:
        defined[1, :7] = False
    torch.testing.assert_close(out.transpose(1, 2)[defined], expected.transpose(1, 2)[defined], rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_padded_rows_equal_unpadded_rows(query_mode):
    """Bidirectional: a right-padded batch row gives the outputs of the same row alone, at its real tokens."""
    attn = fma_layer(causal=False, query_mode=query_mode)
    q, k, v = qkv(50, batch=2)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 29:] = False
    out = attn(q, k, v, key_padding_mask=mask)
    alone = attn(q[1:, :, :29], k[1:, :, :29], v[1:, :, :29])
    torch.testing.assert_close(out[1, :, :29], alone[0], rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()  # padding queries (all slots masked) stay finite


@pytest.mark.parametrize("n", [1, 5, 8])
def test_no_coarse_level_is_dense_causal(n):
    """n <= 2m (L = 0): exactly dense causal attention (§6)."""
    attn = fma_layer(perturb=False, block_size=4)
    q, k, v = qkv(n)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(attn(q, k, v), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal,query_mode", list(itertools.product([True, False], ["fine", "coarse"])))
@pytest.mark.parametrize("near_blocks", [1, 2, 3])
def test_identity_pooling_is_dense_attention(causal, query_mode, near_blocks):
    """§6: one fine token per coarse token at every level -> exactly dense attention (tests partition + softmax),
    for every near-field width."""
    attn = with_identity_pooling(
        fma_layer(perturb=False, causal=causal, query_mode=query_mode, near_blocks=near_blocks)
    )
    # bidirectional groups partly past the end are zero-padded (§7), so use lengths of whole widest groups (for every
    # w here)
    for n in (5, 19, 37, 64) if causal else (24, 48, 64):
        q, k, v = qkv(n)
        dense = F.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
        )
        torch.testing.assert_close(attn(q, k, v), dense, rtol=0, atol=1e-12)


# bidirectional: whole groups only -- groups partly past the end are zero-padded (§7)
@pytest.mark.parametrize("causal,n", [(True, 9), (True, 13), (True, 16), (False, 12), (False, 16)])
def test_recursive_identity_level_one_is_dense_attention(causal, n):
    """§6 where it applies to the recursive family: with p = m an untrained level 1 is the fine tokens themselves
    (and log(w_1 / p) = 0), so lengths with a single coarse level (2m < n <= 4m) give dense attention. (Level 2
    maps 2m tokens to p = m summaries, so no longer length is an identity.)"""
    attn = fma_layer(
        perturb=False, causal=causal, downsample="recursive", block_size=4, coarse_tokens=4, max_seq_len=None
    )
    q, k, v = qkv(n)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    torch.testing.assert_close(attn(q, k, v), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 5, 8])
def test_length_free_without_coarse_levels_is_dense_causal(n):
    """n <= 2m (L = 0): exactly dense causal attention (§6), also without a cap."""
    attn = fma_layer(downsample="recursive", max_seq_len=None)
    q, k, v = qkv(n)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(attn(q, k, v), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
@pytest.mark.parametrize("n,j", [(33, 32), (65, 64), (65, 48), (129, 128), (129, 64), (130, 97)])
def test_length_free_causality_across_level_boundaries(query_mode, n, j):
    """Perturbing token j changes no output before j, also through the gradient, where lengths cross 2^k m (a new
    level appears) and j opens a group of some level (m = 4)."""
    attn = fma_layer(query_mode=query_mode, downsample="recursive", max_seq_len=None)
    assert_causal(attn, *qkv(n, batch=1), j)
    for downsample in (attn.k_downsample, attn.v_downsample):  # the shared map U took part
        assert downsample.combine_weight.grad.abs().max() > 0


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
@pytest.mark.parametrize("sink_tokens,j", [(0, 33), (3, 33), (3, 2), (4, 3)])
def test_causality_by_perturbation_and_gradient(query_mode, sink_tokens, j):
    """Also when the perturbed token is a sink token (§3a)."""
    assert_causal(fma_layer(query_mode=query_mode, sink_tokens=sink_tokens), *qkv(61), j)


def assert_causal(attn, q, k, v, j):
    """Perturbing token j (and later queries) changes no output before j, also through the gradient."""
    out = attn(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, j:] += 1.0
    k2[:, :, j] += 1.0
    v2[:, :, j] += 1.0
    out2 = attn(q2, k2, v2)
    torch.testing.assert_close(out2[:, :, :j], out[:, :, :j], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, j], out[:, :, j])
    for t in (q, k, v):
        t.requires_grad_(True)
    attn(q, k, v)[:, :, :j].sum().backward()
    for t in (q, k, v):
        assert t.grad[:, :, j:].abs().max() == 0
        assert t.grad[:, :, :j].abs().max() > 0


@pytest.mark.parametrize("causal,sink_tokens", [(True, 0), (False, 0), (True, 3)])
def test_grouped_query_attention_equals_repeated_kv_heads(causal, sink_tokens):
    attn = fma_layer(causal=causal, sink_tokens=sink_tokens)
    q, k, v = qkv(37, heads=6, kv_heads=2)
    repeated = attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(attn(q, k, v), repeated, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_low_precision_inputs(dtype, query_mode):
    attn = fma_layer(query_mode=query_mode)
    q, k, v = qkv(50)
    expected = attn(q, k, v)
    out = attn.to(dtype)(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_gradients_match_reference(sink_tokens):
    attn = fma_layer(causal=True, query_mode="fine", sink_tokens=sink_tokens)
    q, k, v = qkv(21, batch=1)
    grads = []
    for fn in (attn, lambda *x: reference_fma(attn, *x)):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        attn.zero_grad()
        fn(*inputs).pow(2).sum().backward()
        grads.append([t.grad for t in inputs] + [p.grad.clone() for p in attn.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 3
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)


def test_dropout_only_in_training():
    attn = fma_layer(dropout=0.5)
    q, k, v = qkv(30)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), attn(q, k, v), rtol=0, atol=0)
    attn.train()
    assert not torch.allclose(attn(q, k, v), attn(q, k, v))


def test_memory_is_not_quadratic():
    """Forward + backward at n = 8192 must stay far below one n x n float32 matrix per head (268 MB)."""
    torch.manual_seed(0)
    attn = FastMultipoleAttention(16, 8192, block_size=32, coarse_tokens=4)
    q, k, v = (torch.randn(1, 2, 8192, 16, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(profile_memory=True) as prof:
        attn(q, k, v).sum().backward()
    peak = max(event.cpu_memory_usage for event in prof.key_averages())
    assert peak < 8192 * 8192 * 4 / 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(coarse_tokens=8), "coarse_tokens"),
        (dict(coarse_tokens=3), "coarse_tokens"),
        (dict(block_size=0), "block_size"),
        (dict(max_seq_len=-1), "max_seq_len"),
        (dict(max_seq_len=None), "max_seq_len=None"),
        (dict(max_seq_len=None, downsample="full"), "max_seq_len=None"),
        (dict(head_dim=2.5), "head_dim"),
        (dict(downsample="conv"), "downsample"),
        (dict(query_mode="medium"), "query_mode"),
        (dict(boundary="wrap"), "boundary"),
        (dict(dropout=1.0), "dropout"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(sink_tokens=5), "sink_tokens"),  # more than block_size = 4
        (dict(sink_tokens=True), "sink_tokens"),
        (dict(sink_tokens=1.0), "sink_tokens"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    options = dict(head_dim=D, max_seq_len=64, block_size=4, coarse_tokens=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        FastMultipoleAttention(**options)


def test_bad_inputs():
    attn = fma_layer()
    q, k, v = qkv(20)
    cases = [
        ((q, k, v[:, :, :10]), "same shape"),
        ((q[0], k, v), "4-d"),
        ((q, k.float(), v.float()), "dtype"),
        ((q, k[:1], v[:1]), "batch or seq_len"),
        ((q[:, :3], k, v), "multiple of key/value heads"),
        ((q[..., :4], k, v), "head_dim"),
        ((q.long(), k, v), "floating-point"),
        (qkv(65), "max_seq_len"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            attn(*args)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(q, k, v, key_padding_mask=torch.ones(2, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(q, k, v, key_padding_mask=torch.ones(2, 20))


def test_padding_mask_is_not_materialised_per_sequence_and_head(monkeypatch):
    """With padding, the fused kernel gets one mask per sequence, shared by its key/value heads."""
    attn = fma_layer()
    q, k, v = qkv(50, batch=3)
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, 40:] = False
    expected = attn(q, k, v, key_padding_mask=mask)
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        shapes.append(tuple(attn_mask.shape))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    torch.testing.assert_close(attn(q, k, v, key_padding_mask=mask), expected, rtol=0, atol=0)
    assert shapes and all(shape[0] == 1 for shape in shapes)


def test_extra_repr_names_the_sink_tokens():
    assert "sink_tokens=3" in repr(fma_layer(sink_tokens=3))
