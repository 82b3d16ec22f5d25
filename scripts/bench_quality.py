#!/usr/bin/env python
"""Quality against the field: the same small byte-level LM trained with each attention at an equal budget.

Trains FMA (depthwise, recursive, avgpool, coarse queries), dense SDPA, a sliding window with FMA's near field only,
h-transformer-1d and Performer, the ablations over m, p, scale_attn and the boundary, and a long-range recall probe;
appends one JSON row per run to --output_file as it finishes (a rerun skips finished runs), then writes the markdown
tables and plots. Engine: scripts/benchmarks/quality.py. Examples:

    # the whole suite, one thread, resumable (docs/benchmarks.md records the commands it was run with)
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --output_file runs/quality.jsonl --report_dir docs/img

    # a quick look: two runs at a tiny budget
    python scripts/bench_quality.py --output_file /tmp/q.jsonl --runs dense,fma-depthwise --steps 5 --seq_len 256

    # training-step time of the main attentions side by side (interleaved, medians)
    python scripts/bench_quality.py --timing --output_file runs/timing.json
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from benchmarks.quality import (
    SuiteConfig,
    default_suite,
    format_report,
    interleaved_timing,
    plot_extrapolation,
    plot_training,
    read_rows,
    run_suite,
)


@dataclass
class CliArguments:
    output_file: str = field(
        metadata={
            "help": "JSON Lines file of the runs (appended; finished runs are skipped). "
            "With --timing, the JSON file of the timing."
        }
    )
    runs: str | None = field(default=None, metadata={"help": "Comma-separated run names (default: every run)."})
    report_dir: str | None = field(
        default=None, metadata={"help": "Write quality_tables.md and the PNG plots here after the runs."}
    )
    timing: bool = field(
        default=False,
        metadata={"help": "Only time a training step of the main attentions, interleaved, instead of training."},
    )
    timing_repeats: int = field(default=5, metadata={"help": "Rounds of the interleaved timing."})
    report_only: bool = field(
        default=False,
        metadata={
            "help": "Run nothing: only the report of --output_file's rows (e.g. while the suite is still running)."
        },
    )
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the command line (or `argv`), run the suite (or the timing) and write the report; return the rows."""
    parser = HfArgumentParser((CliArguments, SuiteConfig))
    cli, cfg = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    specs = default_suite()
    if cli.runs is not None:
        wanted = cli.runs.split(",")
        unknown = sorted(set(wanted) - {spec.name for spec in specs})
        if unknown:
            raise ValueError(f"--runs: unknown run(s) {unknown}; runs: {', '.join(spec.name for spec in specs)}")
        specs = [spec for spec in specs if spec.name in wanted]
    if cli.timing:
        rows = interleaved_timing(
            [spec for spec in specs if spec.group == "main"], cfg, cli.timing_repeats, progress=not cli.no_progress
        )
        with open(cli.output_file, "w", encoding="utf-8") as f:
            json.dump({"config": cfg.__dict__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
        for row in rows:
            print(f"{row['name']:24s} {row['median_s']:.3f} s/step  x{row['relative']:.2f}")
        return rows
    if not cli.report_only:
        run_suite(specs, cfg, cli.output_file, progress=not cli.no_progress)
    rows = read_rows(cli.output_file)
    tables = format_report(rows)
    print(tables)
    if cli.report_dir is not None:
        os.makedirs(cli.report_dir, exist_ok=True)
        with open(os.path.join(cli.report_dir, "quality_tables.md"), "w", encoding="utf-8") as f:
            f.write(tables + "\n")
        plot_training(rows, os.path.join(cli.report_dir, "quality_training.png"))
        if any(row.get("group") == "long" and "train_bits" in row for row in rows):
            plot_training(rows, os.path.join(cli.report_dir, "quality_training_long.png"), group="long")
        plot_extrapolation(rows, os.path.join(cli.report_dir, "quality_extrapolation.png"))
    return rows


if __name__ == "__main__":
    main()
