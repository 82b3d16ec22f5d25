"""scripts/check_gpu.py, the prepared GPU check of the FlexAttention path, as a CPU dry run: it runs end to end,
writes a row per length and implementation, and its exactness rows measure what they claim."""

import json

import pytest
from helpers.lm import script

from benchmarks.gpu_check import target
from benchmarks.gpu_check_measure import CheckConfig, check_exactness
from fmt_hf.model.fma_flex import FLEX_AVAILABLE

pytestmark = pytest.mark.skipif(not FLEX_AVAILABLE, reason="this torch has no FlexAttention")


def test_cpu_dry_run_writes_every_row(tmp_path, capsys):
    script("check_gpu").main(
        [
            "--device",
            "cpu",
            "--lengths",
            "256",
            "512",
            "--heads",
            "4",
            "--kv_heads",
            "2",
            "--head_dim",
            "16",
            "--block_size",
            "16",
            "--exact_lengths",
            "100",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [row["n"] for row in result["timing"]] == [256, 512]
    for row in result["timing"]:
        assert row["pass"] == "fwd"  # FlexAttention has no backward on CPU
        for impl in ("sdpa", "fma_gather", "fma_flex"):
            assert len(row[f"{impl}_times_s"]) == 2 and row[f"{impl}_median_s"] > 0, impl
            assert row[f"{impl}_peak_bytes"] > 0 and row[f"{impl}_first_call_s"] > 0
        assert row["sdpa_over_fma_flex"] == row["sdpa_median_s"] / row["fma_flex_median_s"]
    kinds = {(row["dtype"], row["kernel"]) for row in result["exactness"]}
    assert kinds == {("bfloat16", "flex"), ("float32", "flex"), ("bfloat16", "gather")}
    assert all("error" not in row for row in result["exactness"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| 512 |" in table and "SDPA/flex" in table
    assert "gpu_check.md" in capsys.readouterr().out


def test_exactness_is_measured_against_float64():
    cfg = CheckConfig(
        device="cpu", heads=2, kv_heads=1, head_dim=16, block_size=8, coarse_tokens=2, downsample="recursive"
    )
    float32 = check_exactness(cfg, 100, "float32", "flex")
    assert not float32["backward"] and 0 < float32["out"]["rel"] < 1e-5
    bf16 = check_exactness(cfg, 100, "bfloat16", "gather")  # the gather path runs a backward on CPU
    assert bf16["backward"] and 1e-4 < bf16["out"]["rel"] < 2e-2
    assert {"grad_q", "grad_k", "grad_v", "grad_k_downsample.weight", "grad_v_downsample.combine_weight"} <= set(bf16)


def test_targets_of_the_flex_path():
    assert target(4096) is None and target(8192) == 1.0 and target(32768) == 1.0
    assert target(65536) == 5.0 and target(131072) == 10.0
