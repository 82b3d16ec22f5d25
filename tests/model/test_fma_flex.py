"""The FlexAttention path of fine-query FMA (fma_flex.py) on CPU: FlexAttention runs eagerly there (forward only,
scores materialised), which checks the mask and offsets exactly; the block lists, which only a compiled kernel
reads, are checked by expanding them the way the kernel does."""

import pytest
import torch
from helpers.fma import fma_layer, qkv
from helpers.reference import multiplicity, reference_fma

import fmt_hf.model.fma_attention as fma_attention
import fmt_hf.model.fma_flex as fma_flex
from fmt_hf import FMTConfig, FMTForCausalLM, FMTForMaskedLM
from fmt_hf.model.fma_attention import FastMultipoleAttention
from fmt_hf.model.fma_flex import block_mask, flex_plan, flex_unsupported, kernel_options
from fmt_hf.model.fma_partition import num_levels

pytestmark = pytest.mark.skipif(not fma_flex.FLEX_AVAILABLE, reason="this torch has no FlexAttention")


def both_paths(attn, q, k, v, key_padding_mask=None):
    """(flex, gather) outputs of one layer; no gradient: FlexAttention has no backward on CPU."""
    with torch.no_grad():
        attn.kernel = "flex"
        flex = attn(q, k, v, key_padding_mask=key_padding_mask)
        attn.kernel = "gather"
        return flex, attn(q, k, v, key_padding_mask=key_padding_mask)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("downsample", ["depthwise", "full", "recursive", "avgpool"])
def test_flex_equals_reference_and_gather(causal, downsample):
    """float64, grouped-query heads, lengths that are no power of two (L = 3 and 5 levels at m = 8)."""
    attn = fma_layer(
        causal=causal,
        downsample=downsample,
        block_size=8,
        coarse_tokens=2,
        max_seq_len=None if downsample in ("recursive", "avgpool") else 1024,
    )
    for n in (130, 333):
        q, k, v = qkv(n, batch=1)
        flex, gather = both_paths(attn, q, k, v)
        torch.testing.assert_close(flex, gather, rtol=0, atol=1e-13)
        if n == 130:
            with torch.no_grad():
                torch.testing.assert_close(flex, reference_fma(attn, q, k, v), rtol=0, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_gather_at_a_longer_length(causal):
    attn = fma_layer(causal=causal, downsample="recursive", block_size=16, coarse_tokens=4, max_seq_len=None)
    q, k, v = qkv(700, batch=2, heads=4, kv_heads=1)  # multi-query: one key/value head for four query heads
    flex, gather = both_paths(attn, q, k, v)
    torch.testing.assert_close(flex, gather, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "block_size,coarse_tokens,scale_attn", [(12, 3, True), (8, 8, True), (16, 4, False), (4, 1, True)]
)
def test_flex_for_other_block_sizes(block_size, coarse_tokens, scale_attn):
    """m not a power of two, p = m (one summary per token), no offsets (no score_mod), p = 1."""
    for causal in (True, False):
        attn = fma_layer(
            causal=causal,
            block_size=block_size,
            coarse_tokens=coarse_tokens,
            scale_attn=scale_attn,
            max_seq_len=block_size * 32,
        )
        q, k, v = qkv(block_size * 9 + 5, batch=2)
        flex, gather = both_paths(attn, q, k, v)
        torch.testing.assert_close(flex, gather, rtol=0, atol=1e-13)
        with torch.no_grad():
            torch.testing.assert_close(flex, reference_fma(attn, q, k, v), rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", [1, 5, 8, 16])
def test_flex_without_coarse_levels(n):
    """n <= 2m: the fine level alone (dense causal attention; the bidirectional band covers everything)."""
    for causal in (True, False):
        attn = fma_layer(causal=causal, block_size=8)
        q, k, v = qkv(n)
        flex, gather = both_paths(attn, q, k, v)
        torch.testing.assert_close(flex, gather, rtol=0, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_key_padding(causal):
    attn = fma_layer(causal=causal, block_size=8, coarse_tokens=2, max_seq_len=256)
    q, k, v = qkv(150, batch=3)
    mask = torch.ones(3, 150, dtype=torch.bool)
    mask[0, 90:] = False
    mask[1, :19] = False
    mask[2, 30:75] = False  # whole groups of levels 1-3 without a real token
    flex, gather = both_paths(attn, q, k, v, mask)
    with torch.no_grad():
        expected = reference_fma(attn, q, k, v, mask)
    defined = torch.ones(3, 150, dtype=torch.bool)
    if causal:
        defined[1, :19] = False  # no real key at all: no defined output (flex gives 0, gather an average)
    torch.testing.assert_close(flex.transpose(1, 2)[defined], expected.transpose(1, 2)[defined], rtol=0, atol=1e-13)
    torch.testing.assert_close(flex.transpose(1, 2)[defined], gather.transpose(1, 2)[defined], rtol=0, atol=1e-13)
    assert torch.isfinite(flex).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink_tokens", [1, 3, 8])
def test_flex_with_sink_tokens(causal, sink_tokens):
    """§3a: the sinks are extra fine keys of blocks >= 2, and summaries of sinks only are masked (s = m = 8 makes
    whole level-1 summaries of sinks only); with and without a key padding mask (a padded sink included)."""
    attn = fma_layer(
        causal=causal, downsample="recursive", block_size=8, coarse_tokens=2, max_seq_len=None, sink_tokens=sink_tokens
    )
    q, k, v = qkv(150, batch=2)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, 0] = False
    mask[1, 60:90] = False
    defined = torch.ones(2, 150, dtype=torch.bool)
    defined[1, 0] = not causal  # a causal query 0 that is padding has no real key: no defined output
    for key_padding_mask in (None, mask):
        flex, gather = both_paths(attn, q, k, v, key_padding_mask)
        with torch.no_grad():
            expected = reference_fma(attn, q, k, v, key_padding_mask)
        torch.testing.assert_close(flex, expected, rtol=0, atol=1e-13)
        torch.testing.assert_close(flex.transpose(1, 2)[defined], gather.transpose(1, 2)[defined], rtol=0, atol=1e-13)
    # the block lists still hold every pair the mask allows, and full blocks only allowed pairs
    plan = flex_plan(attn.partition, 333, (2,) * num_levels(333, 8), 8, "cpu")
    view, legal = kernel_view(block_mask(plan, attn.partition, 8, 336), 336, len(plan.level))
    assert torch.equal(view, legal)
    assert legal[16:, :sink_tokens].all() and not legal[16:, sink_tokens:8].any()  # blocks >= 2 read the sinks


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("near_blocks", [2, 3])
@pytest.mark.parametrize("downsample,max_seq_len", [("depthwise", 512), ("recursive", None)])
def test_flex_with_a_wider_near_field(causal, near_blocks, downsample, max_seq_len):
    """A near field of w blocks (§3): the mask's fine band and interaction lists follow w, with sink tokens and a
    key padding mask, and the block lists hold every allowed pair."""
    attn = fma_layer(
        causal=causal,
        downsample=downsample,
        block_size=8,
        coarse_tokens=2,
        max_seq_len=max_seq_len,
        near_blocks=near_blocks,
        sink_tokens=3,
    )
    q, k, v = qkv(203, batch=2)
    mask = torch.ones(2, 203, dtype=torch.bool)
    mask[1, 60:90] = False
    for key_padding_mask in (None, mask):
        flex, gather = both_paths(attn, q, k, v, key_padding_mask)
        torch.testing.assert_close(flex, gather, rtol=0, atol=1e-13)
        with torch.no_grad():
            torch.testing.assert_close(flex, reference_fma(attn, q, k, v, key_padding_mask), rtol=0, atol=1e-13)
    levels = num_levels(203, 8, near_blocks)
    plan = flex_plan(attn.partition, 203, (2,) * levels, 8, "cpu")
    view, legal = kernel_view(block_mask(plan, attn.partition, 8, 208), 208, len(plan.level))
    assert torch.equal(view, legal)
    expected = multiplicity(203, 8, levels, causal, 3, near_blocks).double()
    torch.testing.assert_close(position_multiplicity(legal, plan, 203, 8)[:, 3:], expected[:, 3:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_flex_keeps_low_precision_inputs(dtype, monkeypatch):
    """No upcast on the flex path: FlexAttention gets the input dtype (and keeps its softmax in float32)."""
    attn = fma_layer(block_size=8, coarse_tokens=2, max_seq_len=256).to(dtype)
    q, k, v = qkv(100, dtype=dtype)
    seen = []
    original = fma_flex.flex_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(fma_flex, "flex_attention", spy)
    flex, _ = both_paths(attn, q, k, v)
    assert seen == [(dtype, dtype, dtype)] and flex.dtype == dtype
    with torch.no_grad():
        expected = reference_fma(attn.double(), q.double(), k.double(), v.double())
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(flex.double(), expected, rtol=0, atol=tolerance)


# ---------------------------------------------------------------------- the block mask as a kernel reads it


def kernel_view(mask, n_fine, keys):
    """(n_fine, keys) pairs a block-sparse kernel computes: ``mask_mod`` inside listed partial blocks, everything
    inside listed full blocks, nothing elsewhere; and the dense mask_mod itself (what eager FlexAttention uses)."""
    q_block, kv_block = mask.BLOCK_SIZE
    legal = mask.mask_mod(torch.tensor(0), torch.tensor(0), torch.arange(n_fine)[:, None], torch.arange(keys)[None])
    view = torch.zeros(n_fine, keys, dtype=torch.bool)
    for lists, partial in (
        ((mask.kv_num_blocks, mask.kv_indices), True),
        ((mask.full_kv_num_blocks, mask.full_kv_indices), False),
    ):
        if lists[0] is None:
            continue
        for row in range(n_fine // q_block):
            for col in lists[1][0, 0, row, : lists[0][0, 0, row]].tolist():
                rows, cols = slice(row * q_block, (row + 1) * q_block), slice(col * kv_block, (col + 1) * kv_block)
                assert not view[rows, cols].any(), "a block listed twice"
                view[rows, cols] = legal[rows, cols] if partial else True
    return view, legal


def dense_blocks(num, indices, cols):
    out = torch.zeros(indices.shape[2], cols, dtype=torch.bool)
    for row in range(indices.shape[2]):
        out[row, indices[0, 0, row, : num[0, 0, row]].long()] = True
    return out


def position_multiplicity(legal, plan, n, m):
    """How often each (query, token) pair is covered by the keys ``legal`` lets a query read: a fine key covers
    its token once, each of a group's p summaries covers the group's tokens 1/p times."""
    counts = torch.zeros(n, n, dtype=torch.float64)
    level, position, width = plan.level.long(), plan.position.long(), plan.width.long()
    for key in range(legal.shape[1]):
        readers = legal[:n, key]
        if level[key] == 0 and position[key] < n:
            counts[readers, position[key]] += 1
        elif level[key] > 0:
            start = position[key] * width[key]
            p = int(((level == level[key]) & (position == position[key])).sum())
            counts[readers, start : min(start + width[key], n)] += 1 / p
    return counts


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "n,block_size,coarse_tokens,kv_block",
    [(200, 8, 2, 8), (333, 8, 4, 16), (333, 16, 4, 8), (130, 4, 2, 4), (97, 12, 3, 12), (16, 8, 2, 8)],
)
def test_block_lists_cover_every_legal_pair_exactly_once(causal, n, block_size, coarse_tokens, kv_block):
    attn = FastMultipoleAttention(
        8, None, block_size=block_size, coarse_tokens=coarse_tokens, causal=causal, downsample="recursive"
    )
    m, levels = block_size, num_levels(n, block_size)
    n_fine = -(-n // m) * m
    plan = flex_plan(attn.partition, n, (coarse_tokens,) * levels, kv_block, "cpu")
    keys = len(plan.level)
    for key_valid in (None, plan.real[None]):
        mask = block_mask(plan, attn.partition, kv_block, n_fine, key_valid)
        view, legal = kernel_view(mask, n_fine, keys)
        # The kernel computes exactly the pairs the mask allows: every legal pair lies in a listed block, and a
        # full block (no mask applied) holds only legal pairs.
        assert torch.equal(view, legal)
        if key_valid is not None:
            assert mask.full_kv_num_blocks is None  # padding masks must reach every block
        else:
            assert int(mask.full_kv_num_blocks.sum()) > 0 or n_fine <= m or kv_block > m
        # The backward's per-KV-block lists are the transpose of the forward's.
        cols = keys // kv_block
        for kv_lists, q_lists in (((0, 1), (4, 5)), ((2, 3), (6, 7))):
            tensors = mask.as_tuple(flatten=True)[2:10]
            if tensors[kv_lists[0]] is None:
                continue
            assert torch.equal(
                dense_blocks(*[tensors[i] for i in kv_lists], cols),
                dense_blocks(*[tensors[i] for i in q_lists], n_fine // m).T,
            )
    # ... and the allowed pairs are the §3 partition: every (query, token) pair covered exactly once.
    expected = multiplicity(n, m, levels, causal).double()
    torch.testing.assert_close(position_multiplicity(legal, plan, n, m), expected, rtol=0, atol=1e-12)


def test_block_mask_is_built_from_blocks_not_a_dense_mask(monkeypatch):
    """64K tokens at m = 64, p = 4: per query block 2 fine KV blocks and at most one KV block per level (the 2p
    causal keys of a level are one aligned run), in lists of width O(L); create_block_mask is never called."""
    import torch.nn.attention.flex_attention as flex_module

    def refuse(*args, **kwargs):
        raise AssertionError("create_block_mask evaluates the mask densely")

    monkeypatch.setattr(flex_module, "create_block_mask", refuse)
    attn = FastMultipoleAttention(64, None, downsample="recursive")
    n, levels = 65536, num_levels(65536, 64)
    plan = flex_plan(attn.partition, n, (4,) * levels, 64, "cpu")
    mask = block_mask(plan, attn.partition, 64, n, None)
    per_row = mask.kv_num_blocks[0, 0] + mask.full_kv_num_blocks[0, 0]
    assert levels == 9 and mask.kv_indices.shape[-1] + mask.full_kv_indices.shape[-1] <= 2 + levels + 1
    blocks = torch.arange(n // 64)
    # rows use a level l once they reach query 2 w_l; the previous fine block is full from the second row on
    expected = (
        1 + (blocks >= 1).int() + sum((blocks * 64 >= 2 * (64 << (level - 1))).int() for level in range(1, levels + 1))
    )
    # at most that: levels 8 and 9 (32 and 16 summaries) share the bank's last KV block
    assert (per_row <= expected).all() and int(per_row.max()) == 2 + levels - 1
    assert torch.equal(mask.full_kv_num_blocks[0, 0], (blocks >= 1).int())
    # the backward's lists hold the same pairs per KV block (a top-level KV block is read by most query blocks)
    assert int(mask.q_num_blocks.sum()) == int(mask.kv_num_blocks.sum())
    assert int(mask.full_q_num_blocks.sum()) == int(mask.full_kv_num_blocks.sum())


# ---------------------------------------------------------------------- choosing the path


def test_kernel_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = FastMultipoleAttention(16, 256, block_size=16)
    # "auto" takes only paths that have run on the device kind: the flex path has not run on a GPU yet
    assert fma_attention.FLEX_VERIFIED_DEVICES == ()
    assert not auto._runs_flex(cpu) and not auto._runs_flex(cuda)
    assert FastMultipoleAttention(16, 256, block_size=16, kernel="flex")._runs_flex(cuda)  # opt-in
    monkeypatch.setattr(fma_attention, "FLEX_VERIFIED_DEVICES", ("cuda",))  # once check_gpu.py has passed
    assert not auto._runs_flex(cpu) and auto._runs_flex(cuda)  # the choice only; nothing runs on CUDA here
    assert not FastMultipoleAttention(16, 256, block_size=8)._runs_flex(cuda)  # tiles of 16 would not fit
    assert not FastMultipoleAttention(8, 256, block_size=16)._runs_flex(cuda)  # head_dim < 16
    assert not FastMultipoleAttention(16, 256, block_size=16, query_mode="coarse")._runs_flex(cuda)
    assert not FastMultipoleAttention(16, 256, block_size=16, kernel="gather")._runs_flex(cuda)
    forced = FastMultipoleAttention(8, 256, block_size=8, kernel="flex", dropout=0.1).eval()
    assert forced._runs_flex(cpu)
    assert not forced.train()._runs_flex(cpu)  # FlexAttention has no dropout: training falls back to gather
    with pytest.raises(ValueError, match="multiples of 16"):
        forced.eval()._runs_flex(cuda)
    monkeypatch.setattr(fma_flex, "FLEX_AVAILABLE", False)
    assert "flex_attention" in flex_unsupported(64, 64, 64, cuda)
    assert flex_unsupported(64, 64, 64, cpu) is not None and flex_unsupported(12, 12, 8, cpu) is not None
    monkeypatch.undo()
    assert flex_unsupported(64, 64, 64, cuda) is None and flex_unsupported(12, 12, 8, cpu) is None
    assert "head_dim" in flex_unsupported(64, 64, 8, cuda)


def test_kernel_options_divide_the_blocks():
    assert kernel_options(64, 64, torch.bfloat16) == {
        "fwd_BLOCK_M": 64,
        "fwd_BLOCK_N": 64,
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
        "FORCE_USE_FLEX_ATTENTION": True,
    }
    options = kernel_options(256, 48, torch.bfloat16)
    assert options["fwd_BLOCK_M"] == 128 and options["fwd_BLOCK_N"] == 16 and options["bwd_BLOCK_M1"] == 16
    options = kernel_options(64, 64, torch.float32)
    assert options["fwd_BLOCK_M"] == 64 and options["fwd_BLOCK_N"] == 32 and options["bwd_BLOCK_N2"] == 16


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(kernel="triton"), ValueError, "kernel"),
        (dict(kernel="flex", query_mode="coarse"), ValueError, "`query_mode`='fine'"),
        (dict(kernel="flex", boundary="zero_sink"), ValueError, "`boundary`='mask'"),
    ],
)
def test_bad_kernel_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        FastMultipoleAttention(8, 64, block_size=4, coarse_tokens=2, **kwargs)


def test_flex_without_flex_attention_is_an_error(monkeypatch):
    monkeypatch.setattr(fma_attention, "FLEX_AVAILABLE", False)
    with pytest.raises(ImportError, match="flex_attention"):
        FastMultipoleAttention(8, 64, block_size=4, coarse_tokens=2, kernel="flex")
    FastMultipoleAttention(8, 64, block_size=4, coarse_tokens=2, kernel="auto")  # auto just uses gather


# ---------------------------------------------------------------------- through the model


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM])
def test_model_logits_equal_under_either_kernel(model_class):
    config = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        fma_block_size=8,
        fma_coarse_tokens=2,
        fma_downsample="recursive",
        pad_token_id=0,
    )
    torch.manual_seed(0)
    gather = model_class(FMTConfig(**config, fma_kernel="gather")).double().eval()
    flex = model_class(FMTConfig(**config, fma_kernel="flex")).double().eval()
    flex.load_state_dict(gather.state_dict())
    assert all(layer.self_attn.fma.kernel == "flex" for layer in flex.model.layers)
    ids = torch.randint(1, 50, (2, 150))
    attention_mask = torch.ones(2, 150, dtype=torch.long)
    attention_mask[1, 120:] = 0
    extra = {"use_cache": False} if model_class is FMTForCausalLM else {}
    with torch.no_grad():
        expected = gather(input_ids=ids, attention_mask=attention_mask, **extra).logits
        got = flex(input_ids=ids, attention_mask=attention_mask, **extra).logits
    torch.testing.assert_close(got[attention_mask.bool()], expected[attention_mask.bool()], rtol=0, atol=1e-10)


def test_config_kernel_field():
    assert FMTConfig().fma_kernel == "auto"
    assert FMTConfig(fma_kernel="flex").fma_kernel == "flex"


def full_width(mask, partition, n_fine, keys, kv_block):
    """``mask`` with its lists padded to one column per block: the layout Inductor's CPU template insists on."""
    from torch.nn.attention.flex_attention import BlockMask

    def pad(x, cols):
        if x is None:
            return None
        out = torch.zeros(*x.shape[:-1], max(cols, x.shape[-1]), dtype=x.dtype)
        out[..., : x.shape[-1]] = x
        return out

    kv_cols, q_cols = keys // kv_block, n_fine // partition.block_size
    return BlockMask(
        seq_lengths=mask.seq_lengths,
        kv_num_blocks=mask.kv_num_blocks,
        kv_indices=pad(mask.kv_indices, kv_cols),
        full_kv_num_blocks=mask.full_kv_num_blocks,
        full_kv_indices=pad(mask.full_kv_indices, kv_cols),
        q_num_blocks=mask.q_num_blocks,
        q_indices=pad(mask.q_indices, q_cols),
        full_q_num_blocks=mask.full_q_num_blocks,
        full_q_indices=pad(mask.full_q_indices, q_cols),
        BLOCK_SIZE=mask.BLOCK_SIZE,
        mask_mod=mask.mask_mod,
    )


def test_compiled_kernel_reads_the_block_lists(monkeypatch):
    """The nearest thing to the CUDA kernel on a CPU: FlexAttention compiled by Inductor (a C++ block-sparse kernel
    that skips unlisted blocks and the mask of full ones). The mask and offsets must lower to elementwise code, and
    the lists must give the gather path's output (float32). Causal without padding reads the full/partial split,
    bidirectional with a padding mask the all-partial lists."""

    def wide_block_mask(plan, partition, kv_block, n_fine, key_valid=None):
        mask = block_mask(plan, partition, kv_block, n_fine, key_valid)
        return full_width(mask, partition, n_fine, len(plan.level), kv_block)

    monkeypatch.setattr(fma_flex, "block_mask", wide_block_mask)
    monkeypatch.setattr(fma_flex, "flex_attention", torch.compile(fma_flex.flex_attention))
    q, k, v = qkv(300, batch=2, heads=4, kv_heads=2, dtype=torch.float32)
    padding = torch.ones(2, 300, dtype=torch.bool)
    padding[1, 230:] = False
    for causal, key_padding_mask in ((True, None), (False, padding)):
        attn = fma_layer(causal=causal, block_size=16, coarse_tokens=4, max_seq_len=512).float()
        flex, gather = both_paths(attn, q, k, v, key_padding_mask)
        rows = padding if key_padding_mask is not None else torch.ones_like(padding)
        torch.testing.assert_close(flex.transpose(1, 2)[rows], gather.transpose(1, 2)[rows], rtol=0, atol=1e-5)
