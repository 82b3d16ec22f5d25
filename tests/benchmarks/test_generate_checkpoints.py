"""benchmarks.generate_checkpoints (scripts/bench_generate.py --model_name_or_path) on a tiny random checkpoint: each
model generates in its own process, and the numbers count what they claim."""

import json

import pytest
import torch
from helpers.lm import script

from benchmarks.generate_checkpoints import generate_once, prompt_token_ids, run_checkpoint_benchmark
from benchmarks.generate_steps import smollm2_shaped_config
from fmt_hf import FMTForCausalLM
from fmt_hf.toolkit.data import build_corpus
from fmt_hf.toolkit.tokenizer import byte_tokenizer


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
            "--prompt_lens",
            "300",
            "--new_tokens",
            "4",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no_progress",
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
