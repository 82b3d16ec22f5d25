"""The benchmark engines behind scripts/bench_attention.py and scripts/bench_generate.py, on tiny sizes: they must
run end to end and count what they claim (the timings themselves are the scripts' business, not the tests')."""

import json

import pytest
import torch
from lm_helpers import script

from benchmarks.attention import BenchConfig, fma_pairs, format_table, plot_results, run_benchmark, write_results
from benchmarks.generate import (
    dense_cache_bytes,
    filled_dense_cache,
    format_decode_table,
    generate_once,
    plot_decode,
    prompt_token_ids,
    run_checkpoint_benchmark,
    run_decode_benchmark,
    smollm2_shaped_config,
)
from fmt_hf import FMTForCausalLM
from fmt_hf.toolkit.data import build_corpus
from fmt_hf.toolkit.tokenizer import byte_tokenizer


def test_fma_pairs_count_the_slots_of_section_3():
    assert fma_pairs(128, 64, 4, causal=True) == 128 * 2 * 64  # n = 2m: the fine level alone
    assert fma_pairs(1024, 64, 4, causal=True) == 1024 * (2 * 64 + 2 * 4 * 3)  # L = 3 coarse levels
    assert fma_pairs(1024, 64, 4, causal=False) == 1024 * (3 * 64 + 3 * 4 * 3)
    # coarse queries: one per sub-window of w_l / p tokens at level l
    assert fma_pairs(1024, 64, 4, causal=True, query_mode="coarse") == 1024 * 2 * 64 + sum(
        1024 * 4 // (64 << (level - 1)) * 2 * 4 for level in (1, 2, 3)
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
    """--compare-downsample: other FMA families timed in the same cells, with their time relative to the main one."""
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


def test_decode_benchmark_counts_both_caches(tmp_path):
    config = smollm2_shaped_config(
        512,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        fma_block_size=8,
        fma_coarse_tokens=2,
    )
    rows, meta = run_decode_benchmark([64, 300], steps=2, config=config, progress=False)
    levels = FMTForCausalLM(config).model.layers[0].self_attn.fma.num_levels
    # 4m + 8pL vectors x kv heads x d x fp32, plus one validity byte per fine slot, partial sum and stored group
    fmt_bound = ((4 * 8 + 8 * 2 * levels) * 2 * 8 * 4 + 2 * 8 + 4 * levels) * 2  # x layers
    for row, context in zip(rows, (64, 300)):
        assert row["context"] == context and row["fmt_ms"] > 0 and row["dense_ms"] > 0
        assert row["fmt_cache_bytes"] == fmt_bound
        assert row["dense_cache_bytes"] == 2 * context * 2 * 8 * 4 * 2
    assert "300" in format_decode_table(rows)
    plot_decode(rows, str(tmp_path / "decode.png"))
    assert (tmp_path / "decode.png").exists()
    cache = filled_dense_cache(FMTForCausalLM(config), 10, torch.Generator().manual_seed(0))
    assert dense_cache_bytes(cache) == 2 * 10 * 2 * 8 * 4 * 2


def _tiny_fmt_checkpoint(folder):
    """A random 2-layer FMT (m = 16, length-free recursive downsampler) with the byte tokenizer, saved to folder."""
    config = smollm2_shaped_config(
        256,
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        fma_block_size=16,
        fma_coarse_tokens=2,
        fma_downsample="recursive",
    )
    torch.manual_seed(0)
    model = FMTForCausalLM(config).eval()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.download  # registry corpora: the prompt is a held-out play
def test_checkpoint_benchmark_runs_each_model_in_its_own_process(tmp_path):
    """--model_name_or_path: FMT and dense each in a fresh subprocess; the numbers count what they claim."""
    model = _tiny_fmt_checkpoint(tmp_path / "fmt")
    out = tmp_path / "e2e.json"
    script("bench_generate").main(
        [
            "--model_name_or_path",
            str(tmp_path / "fmt"),
            "--prompt-lens",
            "300",
            "--new-tokens",
            "4",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    result = json.loads(out.read_text())
    (s,) = result["summary"]
    for name in ("fmt", "dense"):
        assert s[f"{name}_ttft_s"] > 0 and s[f"{name}_decode_tokens_per_s"] > 0 and len(s[f"{name}_ids"]) == 4
        assert s[f"{name}_peak_rss_bytes"] >= s[f"{name}_weights_rss_bytes"] > 0
        assert s[f"{name}_text"] == byte_tokenizer().decode(s[f"{name}_ids"])
    # the cache after generate holds the prompt and every new token but the last (never fed back)
    prompt = prompt_token_ids(byte_tokenizer(), build_corpus("shakespeare")["test"]["text"], 300)
    with torch.no_grad():
        assert s["fmt_cache_bytes"] == model(torch.tensor([prompt + s["fmt_ids"][:-1]]), use_cache=True).cache.nbytes
    assert s["dense_cache_bytes"] == 2 * 2 * 303 * 2 * 8 * 4  # layers x (K, V) x tokens x kv heads x d x fp32
    assert s["cache_ratio"] == s["dense_cache_bytes"] / s["fmt_cache_bytes"] > 1  # past a few blocks FMA's is smaller
    rows = {row["model"]: row for row in result["rows"]}
    assert rows["fmt"]["cache_class"] == "FMTCache" and rows["dense"]["cache_class"] == "DynamicCache"
    assert rows["fmt"]["attn_implementation"] == "fma" and rows["dense"]["attn_implementation"] == "sdpa"
    assert rows["fmt"]["threads"] == rows["dense"]["threads"] == 1
    assert result["summary"][0]["prompt_len"] == 300 and "FMT gain" in out.with_suffix(".md").read_text()


def test_generate_once_dense_side_is_the_same_model(tmp_path):
    """Up to 2m = 32 tokens FMA is exact, so the FMT weights under sdpa (the default dense side) generate the same
    tokens; each run's cache is counted (in process here: the subprocess only isolates the memory figures)."""
    _tiny_fmt_checkpoint(tmp_path / "fmt")
    prompt = list(b"Now is the winter of our")
    fmt, dense = (generate_once(str(tmp_path / "fmt"), implementation, prompt, 4) for implementation in (None, "sdpa"))
    assert fmt["generated_ids"] == dense["generated_ids"] and len(fmt["generated_ids"]) == 4
    assert (fmt["cache_class"], dense["cache_class"]) == ("FMTCache", "DynamicCache")
    assert dense["cache_bytes"] == 2 * 2 * (len(prompt) + 3) * 2 * 8 * 4
    assert fmt["ttft_s"] > 0 and dense["decode_tokens_per_s"] > 0


def test_checkpoint_benchmark_refuses_bad_settings(tmp_path):
    _tiny_fmt_checkpoint(tmp_path / "fmt")
    with pytest.raises(ValueError, match="fewer than the prompt length 500"):
        prompt_token_ids(byte_tokenizer(), ["a" * 200, "b" * 200], 500)
    assert prompt_token_ids(byte_tokenizer(), ["ab", "cd"], 5) == list(b"ab\n\nc")
    for kwargs, field in (
        ({"new_tokens": 1}, "new_tokens"),
        ({"prompt_lens": [0]}, "prompt_lens"),
        ({"repeats": 0}, "repeats"),
        ({"dtype": "int8"}, "dtype"),
    ):
        arguments = {"prompt_lens": [8], "new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=field):
            run_checkpoint_benchmark(str(tmp_path / "fmt"), texts=["x" * 100], progress=False, **arguments)
