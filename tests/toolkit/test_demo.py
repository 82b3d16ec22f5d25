"""fmt_hf.toolkit.demo (the main job behind `make demo`, scripts/main_demo.py): the dense cache it compares against,
its long prompt, and the script end to end at a tiny size, every stage running."""

import json
import math

import pytest
import torch
from helpers.lm import script
from transformers import LlamaConfig, LlamaForCausalLM

from fmt_hf.toolkit.demo import dense_cache_bytes, long_prompt


def test_dense_cache_bytes_is_what_a_dense_model_holds():
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        cache = model(torch.zeros(3, 10, dtype=torch.long), use_cache=True).cache
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert dense_cache_bytes(config, 3, 10, torch.float32) == held
    assert dense_cache_bytes(config, 3, 10, torch.bfloat16) == held // 2


def test_long_prompt_starts_at_a_line_in_the_middle():
    text = "".join(f"line {i}: {'é' * (i % 3)}\n" for i in range(100))
    prompt = long_prompt(text, 40)
    data = text.encode("utf-8")
    middle = data.index(b"\n", len(data) // 2) + 1
    assert data[middle:].startswith(prompt.encode("utf-8")) and len(prompt.encode("utf-8")) <= 40
    assert prompt.startswith("line ")
    assert len(prompt.encode("utf-8")) >= 39  # a multi-byte character cut at the end is dropped, no more


@pytest.mark.download  # registry corpora
def test_main_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    results = script("main_demo").main(
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--seq_len",
            "128",
            "--max_eval_samples",
            "8",
            "--eval_documents",
            "1",
            "--max_new_tokens",
            "16",
            "--config_overrides",
            "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,fma_block_size=16",
        ]
    )
    printed = capsys.readouterr().out

    assert all(math.isfinite(v) and 0 < v < 9 for v in results.values())
    test = json.loads((out / "eval_lm_test_128.json").read_text())
    assert test["bits_per_byte"] == results["test_bits_per_byte"] and test["documents"] == 1
    assert "KV cache after 128 tokens" in printed and "a dense cache would hold" in printed
    assert (out / "hub" / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert "done in" in printed
