"""benchmarks.quality and scripts/bench_quality.py on tiny sizes: every attention trains and scores, rows are
appended and resumed, the command runs named runs and writes the report."""

import json
import math

import pytest
from helpers.lm import script
from helpers.models import random_byte_ids

from benchmarks import quality
from benchmarks.quality import interleaved_timing, run_suite
from benchmarks.quality_data import SuiteData
from benchmarks.quality_report import format_report, plot_extrapolation, plot_training
from benchmarks.quality_suite import RunSpec, SuiteConfig, default_suite

TINY = {
    "seq_len": 128,
    "batch_size": 2,
    "steps": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "block_size": 16,
    "coarse_tokens": 2,
    "eval_batch_size": 4,
    "extrapolation": [1, 2],
    "extrapolation_tokens": 300,
    "probe_len": 128,
    "probe_batch_size": 2,
    "probe_steps": 2,
    "probe_eval_examples": 3,
}
TEXTS = ["To be, or not to be, that is the question: " * 7, "Now is the winter of our discontent. " * 5]


@pytest.fixture
def suite_data():
    return SuiteData(random_byte_ids(6, TINY["seq_len"], seed=0), TEXTS)


def test_every_attention_trains_scores_and_the_suite_resumes(tmp_path, suite_data):
    cfg = SuiteConfig(**TINY)
    path = str(tmp_path / "runs.jsonl")
    specs = [spec for spec in default_suite() if spec.group == "main" or spec.name == "performer"]
    rows = run_suite(specs, cfg, path, progress=False, corpus=suite_data)
    assert [row["name"] for row in rows] == [spec.name for spec in specs]
    for row in rows:
        assert "error" not in row, row.get("traceback")
        assert math.isfinite(row["bpb"]) and row["bpb"] > 0 and row["s_per_step"] > 0 and row["peak_bytes"] > 0
        assert len(row["train_bits"]) == cfg.steps and all(math.isfinite(b) for b in row["train_bits"])
    by_name = {row["name"]: row for row in rows}
    # length-free FMA, dense and the peers score at twice the training length; their 1x bpb is over fewer tokens
    assert [item["context"] for item in by_name["fma-recursive"]["extrapolation"]] == [128, 256]
    assert all(math.isfinite(item["bpb"]) for item in by_name["dense"]["extrapolation"])
    # one model shape: dense and the peers run the FMA model's own weights (their modules add no parameters)
    assert {
        by_name[name]["parameters"]
        for name in ("fma-depthwise", "dense", "sliding-window", "h-transformer-1d", "performer")
    } == {by_name["dense"]["parameters"]}

    # resume: finished rows are skipped, an error row runs again, a new run is appended
    with open(path, "a") as f:
        f.write(json.dumps({"name": "probe/dense", "group": "probe", "attention": "sdpa", "error": "boom"}) + "\n")
    more = [spec for spec in default_suite() if spec.name == "probe/dense"]
    more.append(RunSpec("dense-3steps", attention="sdpa", steps=3, group="long"))
    more.append(RunSpec("probe/fma-256", task="probe", group="probe", probe_len=256))
    rows = run_suite(specs + more, cfg, path, progress=False, corpus=suite_data)
    assert len(rows) == len(specs) + 4 and rows[-3]["name"] == "probe/dense" and 0 <= rows[-3]["accuracy"] <= 1
    assert len(rows[-2]["train_bits"]) == 3  # a run's own step budget
    assert rows[-1]["seq_len"] == 256 and rows[-3]["seq_len"] == TINY["probe_len"]  # a probe's own length
    assert "probe/dense" in format_report(rows) and "boom" not in format_report(rows)
    assert format_report(rows, ("probe",)).startswith("| probe run") and "bpb @ 256" in format_report(rows)
    assert plot_training(rows, str(tmp_path / "t.png")) and (tmp_path / "t.png").stat().st_size > 0
    assert plot_extrapolation(rows, str(tmp_path / "e.png")) and (tmp_path / "e.png").stat().st_size > 0


def test_a_peer_that_cannot_import_gets_a_row_with_the_reason(tmp_path, suite_data, monkeypatch):
    monkeypatch.setattr(quality, "peer_unavailable", lambda name: f"{name} is not installed")
    rows = run_suite(
        [RunSpec("h-transformer-1d", attention="h_transformer_1d")],
        SuiteConfig(**TINY),
        str(tmp_path / "runs.jsonl"),
        progress=False,
        corpus=suite_data,
    )
    assert rows[0]["reason"] == "h_transformer_1d is not installed" and "bpb" not in rows[0]
    assert "not run: h_transformer_1d is not installed" in format_report(rows)
    # a reason row is final: resuming does not try it again
    assert (
        len(
            run_suite(
                [RunSpec("h-transformer-1d", attention="h_transformer_1d")],
                SuiteConfig(**TINY),
                str(tmp_path / "runs.jsonl"),
                progress=False,
                corpus=suite_data,
            )
        )
        == 1
    )


def test_cli_runs_named_runs_and_writes_the_report(tmp_path, suite_data, monkeypatch):
    monkeypatch.setattr(quality, "load_suite_data", lambda cfg, tokenizer: suite_data)
    argv = [
        "--output_file",
        str(tmp_path / "q.jsonl"),
        "--runs",
        "dense,fma-avgpool",
        "--report_dir",
        str(tmp_path / "img"),
        "--no_progress",
    ] + [f"--{k}={v}" for k, v in TINY.items() if k != "extrapolation"]
    main = script("bench_quality").main
    rows = main(argv + ["--extrapolation", "1", "2"])
    assert [row["name"] for row in rows] == ["dense", "fma-avgpool"]
    assert {p.name for p in (tmp_path / "img").iterdir()} == {
        "quality_tables.md",
        "quality_training.png",
        "quality_extrapolation.png",
    }
    with pytest.raises(ValueError, match="unknown run"):
        main(argv[:2] + ["--runs", "nope"])
    # --report_only runs nothing, even for runs not in the file
    monkeypatch.setattr(quality, "run_one", None)
    assert len(main(argv[:2] + ["--report_only", "--no_progress"])) == 2


def test_interleaved_timing_reports_ratios_to_the_first():
    specs = [spec for spec in default_suite() if spec.name in ("fma-depthwise", "dense")]
    rows = interleaved_timing(specs, SuiteConfig(**TINY), repeats=2, progress=False)
    assert [row["name"] for row in rows] == ["fma-depthwise", "dense"] and rows[0]["relative"] == 1.0
    assert all(len(row["samples"]) == 2 and row["median_s"] > 0 for row in rows)
