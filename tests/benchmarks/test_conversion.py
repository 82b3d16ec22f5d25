"""scripts/bench_conversion.py and benchmarks.conversion on a tiny random Llama: every setting is scored like the
source (equal to it where FMA is exact), the decoding state is counted, finished rows are skipped, bad settings fail
before any scoring."""

import json
import random

import pytest
from helpers.lm import script, write_documents
from helpers.models import random_byte_ids, tiny_byte_llama

from benchmarks.conversion import DENSE, format_table, setting_options, state_vectors
from fmt_hf import convert_llama_to_fmt
from fmt_hf.toolkit.tokenizer import byte_tokenizer

PLAIN = "fma_block_size=16,fma_coarse_tokens=4"
SINKS = "fma_block_size=16,fma_coarse_tokens=4,fma_sink_tokens=4"


def llama_to_convert():
    """A tiny byte-level Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    return tiny_byte_llama(num_attention_heads=4, num_key_value_heads=2)


def run(tmp_path, *extra):
    """The script on a tiny Llama (saved with the byte tokenizer) over eight 400-byte documents, split 6/1/1."""
    llama_to_convert().save_pretrained(tmp_path / "llama")
    byte_tokenizer().save_pretrained(tmp_path / "llama")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(80))[:400] for _ in range(8)]
    documents = write_documents(tmp_path / "documents", texts)
    argv = [
        "--model_name_or_path",
        str(tmp_path / "llama"),
        "--dataset_name",
        documents,
        "--no_progress",
        "--output_file",
        str(tmp_path / "rows.jsonl"),
        *extra,
    ]
    return script("bench_conversion").main(argv)


def test_grid_scores_every_setting_against_the_source_and_resumes(tmp_path):
    extra = ["--settings", DENSE, PLAIN, SINKS, "--context_lengths", "32", "160", "--state_tokens", "200"]
    rows = run(tmp_path, *extra)
    by_key = {(row["setting"], row["context_length"]): row for row in rows}
    assert sorted(by_key) == sorted((s, c) for s in (DENSE, PLAIN, SINKS) for c in (32, 160))
    assert all(row["num_bytes"] == row["num_tokens"] == 400 for row in rows)  # the one held-out document
    for setting in (PLAIN, SINKS):
        # 32 tokens = 2 blocks: FMA is exact, so the converted model scores as the source
        assert by_key[(setting, 32)]["perplexity"] == pytest.approx(by_key[(DENSE, 32)]["perplexity"], rel=1e-5)
        assert by_key[(setting, 160)]["perplexity"] != pytest.approx(by_key[(DENSE, 160)]["perplexity"], rel=1e-5)
    # the sinks' s keys and values are kept on top of the same hierarchy, all far below a dense cache's 2 * 200
    plain, sinks = by_key[(PLAIN, 160)]["state_vectors"], by_key[(SINKS, 160)]["state_vectors"]
    assert sinks == plain + 2 * 4 and sinks < 2 * 200
    assert DENSE not in {row["setting"] for row in rows if "state_vectors" in row}

    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(run(tmp_path, *extra)) == len(lines) == 6  # a rerun scores nothing again
    assert [json.loads(line) for line in lines] == rows
    table = format_table(rows)
    assert f"| {SINKS} | " in table and "x at 200 tokens" in table


def test_state_vectors_count_what_a_generation_cache_holds():
    model = convert_llama_to_fmt(llama_to_convert(), **setting_options(SINKS)).eval()
    ids = random_byte_ids(1, 150, seed=0)
    cache = model(ids, use_cache=True).past_key_values
    state = cache.layers[0].state
    assert state_vectors(model, 150) == state.num_vectors


def test_bad_settings_fail_before_any_scoring(tmp_path):
    with pytest.raises(ValueError, match=r"only fma_\* fields can vary, got \['hidden_size'\]"):
        run(tmp_path, "--settings", DENSE, "hidden_size=8")
    assert not (tmp_path / "rows.jsonl").exists()
