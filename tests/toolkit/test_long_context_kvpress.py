"""The kvpress systems of the long-context suite without kvpress: the compression ratio that keeps FMT's cache size,
the prompt and prediction JSON lines between the suite and benchmarks/kvpress_runner.py (run here with a fake press),
the runner's arguments, and the clear error when the kvpress venv is missing."""

import json
import re
import subprocess
import sys

import pytest
from test_long_context import TINY_CONVERSION, tiny_llama

from benchmarks import kvpress_runner
from fmt_hf.toolkit.arguments import KVPRESS_SYSTEMS, LongContextArguments
from fmt_hf.toolkit.long_context import encode, make_sample
from fmt_hf.toolkit.long_context_eval import (
    KVPress,
    build_systems,
    check_kvpress_python,
    kvpress_compression_ratio,
    run_long_context,
)
from fmt_hf.toolkit.records import read_rows
from fmt_hf.toolkit.tokenizer import byte_tokenizer

BYTES = byte_tokenizer()


def kept_tokens(prompt_tokens: int, compression_ratio: float) -> int:
    """What kvpress 0.5.5's ScorerPress keeps (kvpress.utils.compute_n_kept)."""
    return max(1, int(prompt_tokens * (1 - compression_ratio)))


def test_the_ratio_keeps_as_many_vectors_as_fmt():
    # FMT's 1,224 vectors at 2K are 612 keys and 612 values: the press keeps 612 of the 2,048 prompt tokens.
    assert kvpress_compression_ratio(1224, 2048) == 1 - 612.5 / 2048
    for prompt_tokens in range(100, 9000, 37):
        for cache_vectors in (2, 64, 1224, 1248, 1272, 2 * prompt_tokens - 2):
            ratio = kvpress_compression_ratio(cache_vectors, prompt_tokens)
            assert 0 <= ratio < 1
            assert kept_tokens(prompt_tokens, ratio) == min(cache_vectors // 2, prompt_tokens)
    # A prompt within the budget stays whole.
    assert kvpress_compression_ratio(1224, 612) == kvpress_compression_ratio(1224, 400) == 0.0


def test_the_suite_names_the_runners_presses():
    assert KVPRESS_SYSTEMS == tuple(f"kvpress_{press}" for press in kvpress_runner.PRESSES)


def fake_answerer(row: dict) -> dict:
    """A press that finds the pass key in the prompt and answers it, then rambles on to its token budget."""
    key = re.search(r"The pass key is (\d+)", BYTES.decode(row["input_ids"])).group(1)
    reply = BYTES(f" {key}. It is {key}, the key I was given long ago.", add_special_tokens=False).input_ids
    generated = reply[: row["max_new_tokens"]]
    vectors = 2 * int(len(row["input_ids"]) * (1 - row["compression_ratio"]))
    return {
        "generated_ids": generated,
        "prefill_seconds": 0.5,
        "decode_ms_per_token": 10.0,
        "cache_vectors": vectors,
        "cache_mib": 0.25,
    }


def kvpress(budget=lambda tokens: 200, systems=KVPRESS_SYSTEMS) -> KVPress:
    return KVPress(list(systems), BYTES, budget, "model", None, "float32", "cpu", 4, sys.executable, 60.0, 4096)


def test_prompt_and_prediction_lines_round_trip(tmp_path):
    samples = [make_sample("passkey", BYTES, 500, depth, index) for index, depth in enumerate((0.0, 1.0))]
    press = kvpress()
    done = {("kvpress_snapkv", samples[1].prompt_hash)}
    prompts = press.prompt_rows(samples, done)
    assert len(prompts) == 2 * 3 - 1
    assert {(row["press"], row["id"]) for row in prompts} == {
        (system.removeprefix("kvpress_"), sample.prompt_hash) for system in KVPRESS_SYSTEMS for sample in samples
    } - {("snapkv", samples[1].prompt_hash)}
    first = prompts[0]
    assert first["input_ids"] == encode(BYTES, samples[0].prompt, False)
    assert first["compression_ratio"] == kvpress_compression_ratio(200, samples[0].num_tokens)
    assert first["max_new_tokens"] == 16 and first["n_sink"] == 4
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    argv = ["--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    results = kvpress_runner.main([*argv, "--model_name_or_path", "model"], answerer=fake_answerer)
    assert read_rows(str(tmp_path / "out.jsonl")) == results and len(results) == 5
    assert "kvpress" not in sys.modules  # the runner imports kvpress only to answer for real
    rows = press.answer_rows(samples, results)
    assert [(row["system"], row["prompt_hash"]) for row in rows] == [
        (f"kvpress_{row['press']}", row["id"]) for row in prompts
    ]
    for row, sample in zip(rows, [samples[0]] * 3 + [samples[1]] * 2):
        # The reply is cut where the suite's own greedy decoding stops: once a token follows the first sentence.
        assert row["prediction"] == f" {sample.answers[0]}. I" and row["score"] == 1.0 and row["correct"]
        assert row["cache_vectors"] == 200 and row["training_length"] == 4096 and row["decode_ms_per_token"] == 10.0


def test_the_runner_rejects_bad_prompt_lines(tmp_path):
    good = {
        "id": "a",
        "press": "snapkv",
        "input_ids": [1, 2],
        "max_new_tokens": 4,
        "compression_ratio": 0.5,
        "n_sink": 4,
    }
    for row, message in (
        ({**good, "press": "h2o"}, "line 1: unknown press 'h2o'; known: streaming, snapkv, expected_attention"),
        ({**good, "compression_ratio": 1.0}, r"line 1: compression_ratio must lie in \[0, 1\), got 1.0"),
        ({**good, "input_ids": []}, "line 1: input_ids must be non-empty"),
        ({k: v for k, v in good.items() if k != "n_sink"}, r"line 1: missing \['n_sink'\]"),
    ):
        (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=message):
            kvpress_runner.read_prompts(str(tmp_path / "p.jsonl"))
    (args,) = kvpress_runner.parse_args(
        ["--prompts", "p", "--output", "o", "--model_name_or_path", "m", "--gguf_file", "g.gguf", "--dtype", "bfloat16"]
    )
    assert (args.prompts, args.output, args.model_name_or_path, args.gguf_file, args.dtype) == (
        "p",
        "o",
        "m",
        "g.gguf",
        "bfloat16",
    )
    with pytest.raises(ValueError, match="--dtype must be float32, bfloat16 or float16, got 'auto'"):
        kvpress_runner.parse_args(["--prompts", "p", "--output", "o", "--model_name_or_path", "m", "--dtype", "auto"])


def test_a_missing_venv_names_the_make_target(tmp_path):
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(
        FileNotFoundError, match=r"--kvpress_python .*no-venv/bin/python does not exist.*make kvpress-venv"
    ):
        check_kvpress_python(missing)
    # before any model loads: this checkpoint does not exist either
    args = LongContextArguments(
        model_name_or_path=str(tmp_path / "no-model"), systems=["dense", "kvpress_snapkv"], kvpress_python=missing
    )
    with pytest.raises(FileNotFoundError, match="make kvpress-venv"):
        build_systems(args)
    with pytest.raises(ValueError, match="--kvpress_timeout must be positive, got 0"):
        LongContextArguments(kvpress_timeout=0)


def test_the_suite_runs_kvpress_systems_through_the_runner(tmp_path, monkeypatch):
    """run_long_context with the runner's subprocess replaced by the runner itself (fake press): the kvpress rows land
    in samples.jsonl and the table beside dense; a timeout keeps the finished answers and a rerun answers the rest."""
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    BYTES.save_pretrained(model_dir)
    commands, answers_before_timeout = [], [None]

    def run(command, check, timeout):
        assert command[:3] == [sys.executable, "-P", kvpress_runner.__file__] and check and timeout > 0
        commands.append(command)
        (args,) = kvpress_runner.parse_args(command[3:])
        rows = kvpress_runner.read_prompts(args.prompts)[: answers_before_timeout[0]]
        list(kvpress_runner.answer_prompts(rows, fake_answerer, args.output))
        if answers_before_timeout[0] is not None:
            raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(subprocess, "run", run)
    output = tmp_path / "out"
    options = dict(
        model_name_or_path=str(model_dir),
        conversion=TINY_CONVERSION,
        systems=["dense", "kvpress_streaming", "kvpress_snapkv"],
        tasks=["passkey"],
        lengths=[600],
        depths=[0.5],
        num_samples=2,
        kvpress_python=sys.executable,
        output_dir=str(output),
    )
    answers_before_timeout[0] = 3
    with pytest.raises(RuntimeError, match=r"passed its 240 s \(--kvpress_timeout per answer\) after 3 of 4 answers"):
        run_long_context(LongContextArguments(**options, kvpress_timeout=60))
    assert len(read_rows(str(output / "samples.jsonl"))) == 2 + 3
    answers_before_timeout[0] = None
    table = run_long_context(LongContextArguments(**options))
    assert len(read_rows(str(output / "kvpress_prompts.jsonl"))) == 1 and len(commands) == 2
    rows = read_rows(str(output / "samples.jsonl"))
    assert sorted(row["system"] for row in rows) == ["dense"] * 2 + ["kvpress_snapkv"] * 2 + ["kvpress_streaming"] * 2
    assert "| passkey | 600 | kvpress_snapkv | 2 | 1.00 (0.34-1.00) |" in table
    assert "| passkey | 600 | kvpress_streaming | 2 | 1.00" in table and "| passkey | 600 | dense | 2 |" in table
