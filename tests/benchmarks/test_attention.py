"""benchmarks.attention and benchmarks.attention_report (scripts/bench_attention.py), on tiny sizes: the sweep runs end
to end and counts what it claims (the timings themselves are the script's business, not the tests')."""

import json

from benchmarks.attention import BenchConfig, fma_pairs, run_benchmark
from benchmarks.attention_report import format_table, plot_results, write_results


def test_fma_pairs_count_the_slots_of_section_3():
    assert fma_pairs(128, 64, 4, causal=True) == 128 * 2 * 64  # n = 2m: the fine level alone
    assert fma_pairs(1024, 64, 4, causal=True) == 1024 * (2 * 64 + 2 * 4 * 3)  # L = 3 coarse levels
    assert fma_pairs(1024, 64, 4, causal=False) == 1024 * (3 * 64 + 3 * 4 * 3)
    # coarse queries: one per sub-window of w_l / p tokens at level l
    assert fma_pairs(1024, 64, 4, causal=True, query_mode="coarse") == 1024 * 2 * 64 + sum(
        1024 * 4 // (64 << (level - 1)) * 2 * 4 for level in (1, 2, 3)
    )
    # sinks, and refinement: k picks of m keys and (L-1) replacing summaries each, and 2n/m bounds scored
    assert fma_pairs(1024, 64, 4, causal=True, sink_tokens=8, refine_groups=2) == 1024 * (
        2 * 64 + 8 + 2 * 4 * 3 + 2 * (64 + 2 * 4) + 2 * 1024 // 64
    )


def test_attention_benchmark_runs_end_to_end(tmp_path):
    cfg = BenchConfig(heads=2, head_dim=16, block_size=32, coarse_tokens=4, repeats=2, budget_s=0.0)
    rows, meta = run_benchmark(
        [256, 300], ("causal", "bidir"), ("fwd", "fwd+bwd"), cfg, matmul_size=64, matmul_repeats=1, progress=False
    )
    assert len(rows) == 8
    for row in rows:
        assert row["fma_median_s"] > 0 and row["sdpa_median_s"] > 0 and row["fma_peak_bytes"] > 0
        assert row["ratio_sdpa_over_fma"] == row["sdpa_median_s"] / row["fma_median_s"]
    table = format_table(rows, meta)
    assert "256" in table and "bidir" in table
    png = plot_results(rows, str(tmp_path / "attention.png"))
    csv_path, json_path = write_results(rows, meta, png)
    assert all((tmp_path / name).exists() for name in ("attention.png", "attention.csv", "attention.json"))
    assert len(json.loads(open(json_path).read())["rows"]) == 8


def test_attention_benchmark_compares_downsamplers(tmp_path):
    """--compare_downsample: other FMA families timed in the same cells, with their time relative to the main one."""
    cfg = BenchConfig(
        heads=2,
        head_dim=16,
        block_size=16,
        coarse_tokens=4,
        repeats=2,
        budget_s=30.0,
        compare_downsample=("recursive", "avgpool"),
        sdpa_max_n=0,
    )
    rows, meta = run_benchmark([300], ("causal",), ("fwd+bwd",), cfg, matmul_size=64, matmul_repeats=1, progress=False)
    (row,) = rows
    assert row["sdpa_median_s"] is None and len(row["fma_times_s"]) == 2
    for family in ("recursive", "avgpool"):
        impl = f"fma_{family}"
        assert len(row[f"{impl}_times_s"]) == 2 and row[f"{impl}_peak_bytes"] > 0
        assert row[f"ratio_{impl}_over_fma"] == row[f"{impl}_median_s"] / row["fma_median_s"]
    assert "recursive/FMA" in format_table(rows, meta)
    png = plot_results(rows, str(tmp_path / "compare.png"))
    csv_path, _ = write_results(rows, meta, png)
    assert "ratio_fma_recursive_over_fma" in open(csv_path).readline()


def test_attention_benchmark_times_refinement():
    refined = BenchConfig(
        heads=2, head_dim=16, block_size=32, coarse_tokens=4, repeats=1, budget_s=0.0, refine_groups=2
    )
    rows, _ = run_benchmark([300], ("causal",), ("fwd",), refined, matmul_size=64, matmul_repeats=1, progress=False)
    assert rows[0]["fma_median_s"] > 0 and rows[0]["sdpa_median_s"] > 0
