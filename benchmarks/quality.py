"""Quality against the field: the same small byte-level causal LM trained with each attention at an equal budget.

The suite's runs and the command of ``scripts/bench_quality.py`` (:class:`QualityBenchArguments`,
:func:`bench_quality`). Every run (``benchmarks.quality_suite``) builds the same ``FMTForCausalLM`` (width, depth,
initialisation seed, optimizer, schedule, steps, batch and data order all equal: ``benchmarks.quality_training``,
``benchmarks.quality_data``) and changes only the attention: FMA variants through the config, dense through
``attn_implementation="sdpa"``, the PyPI peers through ``benchmarks.peers`` (the package's attention module on the
same rotated q, k, v). A run records (``benchmarks.quality_eval`` scores it)

* ``bpb``: held-out bits per byte over the whole test documents of the corpus split ``scripts/train.py`` uses,
  scored as ``scripts/eval_lm.py`` does (strided windows of the training length, stride half of it, every byte
  once) -- ``fmt_hf.toolkit.evaluation.score_documents`` and the ``lm_bits`` metric;
* ``train_bits``: training loss per step, in bits per token (a token is a byte but for document separators);
* ``s_per_step``: median wall clock of a training step (forward, backward, optimizer), the first step excluded;
  ``peak_bytes``: allocator peak of the first step beyond what was live before it
  (``benchmarks.measure.measure_peak_memory``); on a shared machine both are noisy (see :func:`interleaved_timing`);
* ``extrapolation`` (runs that ask for it): bits per byte with windows of 1x, 2x, 4x, 8x the training length over the
  same first tokens of every test document, or the reason a context cannot run;
* ``accuracy`` (long-range probe runs, ``benchmarks.quality_data.probe_batch``): how often the model names a value
  stored far beyond FMA's near field.

Rows are appended to a JSON Lines file as each run finishes; :func:`run_suite` skips the runs already there, so an
interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from fmt_hf.toolkit.records import append_rows, read_rows
from fmt_hf.toolkit.tokenizer import byte_tokenizer

from .peers import PEER_PACKAGES, peer_unavailable
from .quality_data import SuiteData, lm_batches, load_suite_data, probe_batches
from .quality_eval import extrapolation_scores, held_out_bpb, probe_accuracy
from .quality_report import format_report, plot_extrapolation, plot_training
from .quality_suite import RunSpec, SuiteConfig, default_suite
from .quality_training import build_run_model, optimizer_and_schedule, train_steps


def run_one(spec: RunSpec, cfg: SuiteConfig, tokenizer, corpus: SuiteData | None, progress: bool = True) -> dict:
    """Train and evaluate one run; the JSON row (a peer that cannot import gives a row with its ``reason``)."""
    row = {
        "name": spec.name,
        "group": spec.group,
        "attention": spec.attention,
        "task": spec.task,
        "seed": spec.seed,
        "overrides": dict(spec.overrides),
    }
    if spec.attention in PEER_PACKAGES and (reason := peer_unavailable(spec.attention)) is not None:
        return {**row, "reason": reason}
    n = spec.length(cfg)
    longest = n * max(cfg.extrapolation) if spec.extrapolate else n
    model = build_run_model(spec, cfg, tokenizer, longest)
    row["parameters"] = model.num_parameters()
    start = time.perf_counter()
    if spec.task == "lm":
        history = train_steps(
            model,
            lm_batches(corpus.train_blocks, cfg.batch_size, spec.seed),
            cfg,
            spec.steps or cfg.steps,
            desc=spec.name,
            progress=progress,
        )
    else:
        history = train_steps(
            model,
            probe_batches(cfg.probe_batch_size, n, 1000 + spec.seed),
            cfg,
            spec.steps or cfg.probe_steps,
            desc=spec.name,
            progress=progress,
        )
    row.update(history, train_seconds=time.perf_counter() - start, seq_len=n)
    start = time.perf_counter()
    if spec.task == "lm":
        row.update(
            held_out_bpb(model, tokenizer, corpus.test_texts, n, cfg.eval_batch_size, cfg.max_test_tokens, progress)
        )
        if spec.extrapolate:
            row["extrapolation"] = extrapolation_scores(model, tokenizer, corpus.test_texts, cfg, progress)
    else:
        row["accuracy"] = probe_accuracy(model, cfg, n, progress=progress)
    row["eval_seconds"] = time.perf_counter() - start
    return row


def finished(rows: list[dict]) -> set[str]:
    """Names of the runs a resumed suite skips: rows with a result or a reason (an ``error`` row runs again)."""
    return {row["name"] for row in rows if "error" not in row}


def run_suite(
    specs: list[RunSpec], cfg: SuiteConfig, path: str, progress: bool = True, corpus: SuiteData | None = None
) -> list[dict]:
    """Run every spec not yet in ``path``, appending each row as it finishes; returns all rows of ``path``.
    ``corpus`` defaults to :func:`load_suite_data` (loaded only when a language-modelling run is left).

    A run that raises gets a row with its ``error`` (and runs again on the next resume) so the others still run.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    done = finished(read_rows(path))
    todo = [spec for spec in specs if spec.name not in done]
    tokenizer = byte_tokenizer()
    if corpus is None and any(spec.task == "lm" for spec in todo):
        corpus = load_suite_data(cfg, tokenizer)
    meta = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    for spec in tqdm(todo, desc="suite", unit="run", disable=not progress):
        try:
            row = run_one(spec, cfg, tokenizer, corpus, progress)
        except Exception as error:  # noqa: BLE001 -- recorded, the suite goes on
            row = {
                "name": spec.name,
                "group": spec.group,
                "attention": spec.attention,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=5),
            }
        row["meta"] = meta
        append_rows(path, [row])
    return read_rows(path)


def interleaved_timing(specs: list[RunSpec], cfg: SuiteConfig, repeats: int = 5, progress: bool = True) -> list[dict]:
    """Training-step time of each spec's model measured side by side: one warm-up step each, then ``repeats``
    rounds in which every model takes one step on the same batch, in rotating order; the median per model and its
    ratio to the first spec's. (Absolute times on a shared machine mean little; ratios taken this way do.)"""
    tokenizer = byte_tokenizer()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(256, (cfg.batch_size, cfg.seq_len), generator=generator)
    models = [build_run_model(spec, cfg, tokenizer, cfg.seq_len) for spec in specs]
    optimizers = [optimizer_and_schedule(model, cfg, repeats + 1)[0] for model in models]

    def step(index: int) -> float:
        start = time.perf_counter()
        models[index](input_ids=batch, labels=batch).loss.backward()
        optimizers[index].step()
        optimizers[index].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    samples = [[] for _ in specs]
    for index in range(len(specs)):
        step(index)
    for round_ in tqdm(range(repeats), desc="interleaved timing", disable=not progress):
        for offset in range(len(specs)):
            index = (round_ + offset) % len(specs)
            samples[index].append(step(index))
    medians = [statistics.median(s) for s in samples]
    return [
        {"name": spec.name, "median_s": median, "relative": median / medians[0], "samples": s}
        for spec, median, s in zip(specs, medians, samples, strict=True)
    ]


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class QualityBenchArguments:
    """The command line of ``scripts/bench_quality.py`` beside the suite's :class:`SuiteConfig`."""

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


def bench_quality(cli: QualityBenchArguments, cfg: SuiteConfig) -> list[dict]:
    """Run the suite (or the timing) and write the report; return the rows."""
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
