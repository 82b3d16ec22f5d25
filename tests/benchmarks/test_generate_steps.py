"""benchmarks.generate_steps (scripts/bench_generate.py's decoding-step mode), on tiny sizes: it runs end to end and
counts both caches as they are."""

import torch

from benchmarks.generate_steps import (
    dense_cache_bytes,
    filled_dense_cache,
    format_decode_table,
    plot_decode,
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
