"""benchmarks.attention_demo (scripts/demo_attention.py's exactness table): FMA equals dense attention where the
partition covers every key, and the table has a row per check."""

import torch

from benchmarks.attention_demo import dense_agreement, exactness_checks, exactness_table


def test_fma_equals_dense_where_it_is_exact():
    for causal in (True, False):
        whole = dense_agreement(n=32, causal=causal, dtype=torch.float64, block_size=16, head_dim=8)
        identity = dense_agreement(
            n=64, causal=causal, dtype=torch.float64, block_size=16, head_dim=8, downsample="avgpool", coarse_tokens=16
        )
        assert whole["rel"] < 1e-12 and identity["rel"] < 1e-12
    approximate = dense_agreement(n=256, block_size=16, head_dim=8, local_baseline=True)
    assert 1e-6 < approximate["rel"] < 1 and approximate["local_rel"] > 1e-6  # far keys summarised, or dropped


def test_exactness_table_has_a_row_per_check():
    table = exactness_table(progress=False).splitlines()
    assert len(table) == 1 + len(exactness_checks()) + 1  # header, the checks, the legend
    assert sum("n = 2m equals dense" in line for line in table) == 4
