"""benchmarks.generate_steps (scripts/bench_generate.py's decoding-step mode), on tiny sizes: it runs end to end and
counts both caches as they are."""

import json

import pytest
import torch
from helpers.lm import script

from benchmarks.generate_steps import (
    byte_model_config,
    dense_cache_bytes,
    filled_dense_cache,
    format_batch_table,
    format_decode_table,
    plot_decode,
    run_batch_benchmark,
    run_decode_benchmark,
    smollm2_shaped_config,
)
from fmt_hf import FMTForCausalLM


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


def test_thread_counts_take_turns_one_row_each(tmp_path):
    """--threads 1 2: one row per count, interleaved on the same caches; torch's own count is restored after."""
    before = torch.get_num_threads()
    config = byte_model_config(256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, fma_block_size=8)
    rows, meta = run_batch_benchmark([1, 2], 16, 2, 1, config, progress=False, threads=[1, 2])
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["fmt_ms"] > 0 and r["dense_ms"] > 0 for r in rows) and "threads" in format_batch_table(rows)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="max_position_embeddings"):  # two counts decode twice as many tokens
        run_batch_benchmark([1], 200, 16, 2, config, progress=False, threads=[1, 2])

    out = tmp_path / "decode.png"
    script("bench_generate").main(
        ["--lengths", "64", "--steps", "1", "--layers", "1", "--threads", "1", "2", "--out", str(out), "--no_progress"]
    )
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["context"], r["threads"]) for r in rows] == [(64, 1), (64, 2)] and out.exists()
    assert torch.get_num_threads() == before


def test_thread_counts_are_checked():
    (args,) = script("bench_generate").parse_args(["--threads", "1", "2"])
    assert args.threads == [1, 2]
    with pytest.raises(ValueError, match="--threads takes positive"):
        script("bench_generate").main(["--threads", "0", "--lengths", "64"])
    with pytest.raises(ValueError, match="--threads: real-checkpoint mode takes one"):
        script("bench_generate").main(["--model_name_or_path", "nowhere", "--threads", "1", "2"])
