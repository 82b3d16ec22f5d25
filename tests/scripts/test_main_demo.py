"""scripts/main_demo.py (the main job behind `make demo`), end to end at a tiny size: every stage runs."""

import json
import math

import pytest
from helpers.lm import script

pytestmark = pytest.mark.download  # registry corpora


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
