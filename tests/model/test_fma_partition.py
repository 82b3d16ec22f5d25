"""The §3 partition (docs/fma.md): coverage, level counts, and the shared plan cache."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers.fma import F64, fma_layer, qkv, with_identity_pooling
from helpers.reference import multiplicity

from fmt_hf.model.fma_partition import PLANS, PlanCache, num_levels


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink_tokens", [0, 1, 3])
def test_coverage_multiplicity_is_one(causal, sink_tokens):
    """Also with sink tokens (§3a): each is covered by the fine band or by its sink slot, never by a summary."""
    for n, m in ((64, 4), (37, 4), (96, 8), (200, 4)):
        counts = multiplicity(n, m, num_levels(n, m), causal, min(sink_tokens, m))
        legal = torch.ones(n, n, dtype=torch.long)
        assert torch.equal(counts, legal.tril() if causal else legal)


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_coverage_through_one_hot_values(causal):
    """The optimised kernel's own partition: uniform logits and one-hot values expose each key's weight."""
    n = 37 if causal else 48  # bidirectional: whole widest groups, so no zero-padded slot joins a softmax
    attn = with_identity_pooling(fma_layer(perturb=False, causal=causal, head_dim=n, max_seq_len=64))
    q = torch.zeros(1, 1, n, n, dtype=F64)
    v = torch.eye(n, dtype=F64)[None, None]
    weights = attn(q, torch.zeros_like(v), v)[0, 0]  # row i: the weight of each key j
    legal = torch.ones(n, n, dtype=F64)
    legal = legal.tril() if causal else legal
    # multiplicity exactly 1 on legal pairs, 0 elsewhere: every legal key weighs 1 / (number of legal keys)
    torch.testing.assert_close(weights, legal / legal.sum(1, keepdim=True), rtol=0, atol=1e-14)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink_tokens", [1, 3, 4])
def test_kernel_coverage_with_sink_tokens(causal, sink_tokens):
    """As above with sink tokens (§3a). A summary's sink tokens are zero vectors that still take a share of the
    softmax, so a row's weights need not sum to 1; but every legal key, sink tokens included, carries one equal
    share (multiplicity 1) and every other key none."""
    n = 61 if causal else 48
    attn = with_identity_pooling(
        fma_layer(perturb=False, causal=causal, head_dim=n, max_seq_len=64, sink_tokens=sink_tokens)
    )
    q = torch.zeros(1, 1, n, n, dtype=F64)
    v = torch.eye(n, dtype=F64)[None, None]
    weights = attn(q, torch.zeros_like(v), v)[0, 0]
    legal = torch.ones(n, n, dtype=torch.bool)
    legal = legal.tril() if causal else legal
    share = weights.amax(1, keepdim=True)
    torch.testing.assert_close(weights, torch.where(legal, share, 0.0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n,expected", [(1, 0), (128, 0), (129, 1), (256, 1), (257, 2), (8192, 6)])
def test_num_levels(n, expected):
    assert num_levels(n, 64) == expected


def test_layers_share_one_plan_cache():
    """Plans depend only on the partition and the shape: two layers (or models) with the same settings read one
    copy, not one each."""
    first, second = fma_layer(max_seq_len=64), fma_layer(max_seq_len=64, seed=1)
    plans = [attn.partition.plans(45, (2, 2, 2), torch.device("cpu"), F64) for attn in (first, second)]
    assert plans[0] is plans[1]
    other = fma_layer(max_seq_len=64, scale_attn=False).partition.plans(45, (2, 2, 2), torch.device("cpu"), F64)
    assert other is not plans[0]


def test_capped_and_length_free_layers_do_not_share_plans():
    """The cap is part of the partition (it decides which slots are zero sinks), so it is part of the plan key."""
    capped = fma_layer(max_seq_len=64, boundary="zero_sink", downsample="recursive").partition
    free = fma_layer(max_seq_len=None, boundary="zero_sink", downsample="recursive").partition
    assert free.capacity is None and capped.capacity == 64
    cpu = torch.device("cpu")
    plans = [partition.plans(20, (2, 2), cpu, F64) for partition in (capped, free)]  # 2 levels; the cap has 3
    assert plans[0] is not plans[1]
    assert not torch.equal(plans[0][0][1], plans[1][0][1])  # a capped layer's short input sinks the missing level
    assert free.plans(20, (2, 2), cpu, F64) is plans[1]


def test_plan_cache_is_bounded_in_bytes():
    cache = PlanCache(max_bytes=10_000)
    for key in range(10):
        cache.get(key, lambda: torch.zeros(500))  # 2000 bytes each
    assert cache.nbytes <= 10_000
    assert cache.get(9, lambda: None) is not None and cache.get(0, lambda: "rebuilt") == "rebuilt"  # oldest went


def test_one_model_from_several_threads():
    """Threads sharing one layer (and the plan cache) get what each call gets alone."""
    attn = fma_layer(max_seq_len=64)
    inputs = [qkv(n, seed=n) for n in (9, 23, 37, 50, 64, 9, 23, 37)]
    PLANS.clear()
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda args: attn(*args), inputs))
    for args, out in zip(inputs, concurrent):
        torch.testing.assert_close(out, attn(*args), rtol=0, atol=0)
