"""Quality against the field: the same small byte-level causal LM trained with each attention at an equal budget.

The engine behind ``scripts/bench_quality.py`` (issue 10). Every run builds the same ``FMTForCausalLM`` (width,
depth, initialisation seed, optimizer, schedule, steps, batch and data order all equal) and changes only the
attention: FMA variants through the config, dense through ``attn_implementation="sdpa"``, the PyPI peers through
``benchmarks.peers`` (the package's attention module on the same rotated q, k, v). A run records

* ``bpb``: held-out bits per byte over the whole test documents of the corpus split ``scripts/train.py`` uses,
  scored as ``scripts/eval_lm.py`` does (strided windows of the training length, stride half of it, every byte
  once) -- ``fmt_hf.toolkit.evaluation.score_documents`` and the ``lm_bits`` metric;
* ``train_bits``: training loss per step, in bits per token (a token is a byte but for document separators);
* ``s_per_step``: median wall clock of a training step (forward, backward, optimizer), the first step excluded;
  ``peak_bytes``: allocator peak of the first step beyond what was live before it
  (``benchmarks.attention.measure_peak_memory``); on a shared machine both are noisy (see :func:`interleaved_timing`);
* ``extrapolation`` (runs that ask for it): bits per byte with windows of 1x, 2x, 4x, 8x the training length over the
  same first tokens of every test document, or the reason a context cannot run;
* ``accuracy`` (long-range probe runs, :func:`probe_batch`): how often the model names a value stored far beyond
  FMA's near field.

Rows are appended to a JSON Lines file as each run finishes; :func:`run_suite` skips the runs already there, so an
interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import datasets
import evaluate
import torch
from tqdm.auto import tqdm

from benchmarks.attention import measure_peak_memory
from benchmarks.peers import PEER_PACKAGES, attach_peer, peer_unavailable
from fmt_hf import FMTConfig, FMTForCausalLM
from fmt_hf.toolkit.data import pack_documents
from fmt_hf.toolkit.evaluation import score_documents
from fmt_hf.toolkit.metrics import LM_BITS
from fmt_hf.toolkit.tokenizer import byte_tokenizer
from fmt_hf.toolkit.training import CorpusArguments

ATTENTIONS = ("fma", "sdpa", *PEER_PACKAGES)
"""``fma`` (the config's ``fma_*`` fields choose the variant), ``sdpa`` (dense), and the peers of benchmarks.peers."""


@dataclass
class SuiteConfig:
    """The budget every run shares. Defaults: what one run of ~3-4 minutes on one shared CPU thread affords
    (issue 10): 120 steps of 4 x 2048 tokens (~1M tokens, a quarter of the training plays) for a 2-layer, width-128
    model; the probe takes 8 sequences of 1024 per step."""

    seq_len: int = 2048
    batch_size: int = 4
    steps: int = 120
    learning_rate: float = 2e-3
    warmup_steps: int = 15
    weight_decay: float = 0.1
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    block_size: int = 64
    coarse_tokens: int = 4
    eval_batch_size: int = 8
    max_test_documents: int | None = None
    max_test_tokens: int | None = None
    extrapolation: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    extrapolation_tokens: int = 32768
    probe_len: int = 1024
    probe_batch_size: int = 8
    probe_steps: int = 120
    probe_eval_examples: int = 256
    corpus: str = "shakespeare"

    def __post_init__(self) -> None:
        for name in (
            "seq_len",
            "batch_size",
            "steps",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "block_size",
            "coarse_tokens",
            "eval_batch_size",
            "probe_len",
            "probe_batch_size",
            "probe_steps",
            "probe_eval_examples",
            "extrapolation_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        if self.probe_len < 8 * self.block_size:
            raise ValueError(
                f"`probe_len` ({self.probe_len}) must be at least 8 * block_size ({8 * self.block_size}) "
                "so that the stored value lies beyond the near field"
            )


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name (the resume key), task, attention, FMTConfig overrides and seed; ``steps``
    overrides the suite's budget (the longer-budget rows)."""

    name: str
    attention: str = "fma"
    overrides: tuple[tuple[str, object], ...] = ()
    seed: int = 0
    task: str = "lm"  # "lm" (held-out bits per byte) or "probe" (long-range recall accuracy)
    extrapolate: bool = False
    group: str = "main"  # which table the row belongs to: main, probe, seeds, ablation, long
    steps: int | None = None
    probe_len: int | None = None  # a probe run's own sequence length (default: the suite's)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"`attention` must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.task not in ("lm", "probe"):
            raise ValueError(f"`task` must be 'lm' or 'probe', got {self.task!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"`steps` must be a positive integer, got {self.steps}")
        if self.probe_len is not None and self.task != "probe":
            raise ValueError(f"`probe_len` is for probe runs; {self.name!r} is a {self.task!r} run")

    def length(self, cfg: SuiteConfig) -> int:
        """The sequence length this run trains at."""
        return cfg.seq_len if self.task == "lm" else self.probe_len or cfg.probe_len


def default_suite() -> list[RunSpec]:
    """Issue 10's runs: the main comparison, the long-range probe, a second seed for dense and FMA-depthwise, the
    ablations over m, p, scale_attn and the boundary, and FMA-depthwise, dense and the sliding window again at 2x
    the steps (does the ranking hold with more training?). Ordered so the headline rows finish first."""

    def fine(family, **kw):
        return (("fma_downsample", family), *kw.items())

    main = [
        RunSpec("fma-depthwise", overrides=fine("depthwise")),
        RunSpec("dense", attention="sdpa", extrapolate=True),
        RunSpec("sliding-window", attention="sliding", extrapolate=True),
        RunSpec("h-transformer-1d", attention="h_transformer_1d", extrapolate=True),
        RunSpec("fma-recursive", overrides=fine("recursive"), extrapolate=True),
        RunSpec("fma-avgpool", overrides=fine("avgpool"), extrapolate=True),
        RunSpec("fma-coarse-queries", overrides=fine("depthwise", fma_query_mode="coarse")),
    ]
    probe = [
        RunSpec(f"probe/{spec.name}", spec.attention, spec.overrides, task="probe", group="probe") for spec in main[:3]
    ]
    seeds = [replace(spec, name=f"{spec.name}-seed1", seed=1, extrapolate=False, group="seeds") for spec in main[:2]]
    ablation = [
        RunSpec(f"fma-depthwise-{tag}", overrides=fine("depthwise", **{key: value}), group="ablation")
        for tag, key, value in (
            ("m32", "fma_block_size", 32),
            ("m128", "fma_block_size", 128),
            ("p2", "fma_coarse_tokens", 2),
            ("p8", "fma_coarse_tokens", 8),
            ("noscale", "fma_scale_attn", False),
            ("zerosink", "fma_boundary", "zero_sink"),
        )
    ]
    # the value stored thousands of tokens before the question (FMA and dense; the window cannot reach it)
    probe_far = [replace(spec, name=f"{spec.name}-4096", probe_len=4096) for spec in probe[:2]]
    longer = [
        replace(spec, name=f"{spec.name}-240steps", steps=240, extrapolate=False, group="long") for spec in main[:3]
    ]
    # Last: on CPU its causal prefix sums run ~5x slower than the others (no length extrapolation, for the budget).
    performer = [RunSpec("performer", attention="performer")]
    return main + probe + seeds + ablation + probe_far + longer + performer


# ---------------------------------------------------------------------------------------------------- model


def build_model(spec: RunSpec, cfg: SuiteConfig, tokenizer, max_len: int) -> FMTForCausalLM:
    """The shared model shape with ``spec``'s attention, initialised from ``spec.seed``. ``max_len`` is the longest
    input it will see (peers size buffers for it); ``max_position_embeddings`` is the training length."""
    options = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": spec.length(cfg),
        "fma_block_size": cfg.block_size,
        "fma_coarse_tokens": cfg.coarse_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    options.update(dict(spec.overrides))
    torch.manual_seed(spec.seed)
    model = FMTForCausalLM(FMTConfig(**options))
    if spec.attention == "sdpa":
        model.set_attn_implementation("sdpa")
    elif spec.attention != "fma":
        attach_peer(model, spec.attention, max_len)
    return model


def optimizer_and_schedule(model: torch.nn.Module, cfg: SuiteConfig, steps: int):
    """AdamW (0.9, 0.95), weight decay on matrices only, linear warm-up then cosine decay to 10%."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: FMTForCausalLM,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: SuiteConfig,
    steps: int,
    desc: str = "train",
    progress: bool = True,
) -> dict:
    """``steps`` optimizer steps on ``batches`` of (input_ids, labels); returns per-step bits per token, the median
    step time (first step excluded: it runs under the memory profiler) and the first step's peak memory."""
    optimizer, schedule = optimizer_and_schedule(model, cfg, steps)
    model.train()
    bits, seconds, peak = [], [], None

    def step(input_ids, labels):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        return loss.item()

    for index in tqdm(range(steps), desc=desc, unit="step", disable=not progress, mininterval=10):
        input_ids, labels = next(batches)
        if index == 0:
            first = []
            peak, _ = measure_peak_memory(lambda out=first, ids=input_ids, lab=labels: out.append(step(ids, lab)))
            loss = first[0]
        else:
            start = time.perf_counter()
            loss = step(input_ids, labels)
            seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {index}")
        bits.append(loss / math.log(2))
    model.eval()
    return {"train_bits": bits, "s_per_step": statistics.median(seconds) if seconds else None, "peak_bytes": peak}


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """Training blocks and held-out test documents of the corpus split scripts/train.py uses."""

    train_blocks: torch.Tensor  # (blocks, seq_len)
    test_texts: list[str]


def load_corpus_splits(cfg: SuiteConfig, tokenizer) -> Corpus:
    documents = CorpusArguments(corpus=cfg.corpus).load_documents()
    blocks = pack_documents(datasets.DatasetDict(train=documents["train"]), tokenizer, cfg.seq_len)["train"]
    test = documents["test"]
    if cfg.max_test_documents is not None:
        test = test.select(range(min(cfg.max_test_documents, len(test))))
    return Corpus(torch.tensor(blocks["input_ids"]), list(test["text"]))


def lm_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of training blocks in an order fixed by ``seed`` alone (the same for every attention), epoch after
    epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = blocks[order[start : start + batch_size]]
            yield batch, batch


PROBE_VALUES = b"ABCDEFGHIJKLMNOP"
"""The 16 values the probe stores (chance accuracy 1/16); the filler is digits, the question mark asks."""
PROBE_FILLER = b"0123456789"
PROBE_QUESTION = ord("?")


def probe_batch(
    generator: torch.Generator, batch_size: int, n: int, run: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Long-range recall: ``n`` random digits with one value letter written ``run`` times in a row at a random
    start in the first quarter, then ``?`` and the value at the end. Returns (input_ids, labels, start of each
    value's run): labels are -100 but at the answer (position ``n - 1``, predicted from the ``?`` at ``n - 2``),
    which lies at least ``3n/4 - 1`` tokens after the run -- far beyond FMA's near field of ``2m`` keys when
    ``n >= 8m``. (A run rather than one letter: a single letter among 1024 digits was not learnt by a dense model in
    the suite's budget, ~4 bits of training loss after 120 steps, i.e. chance.)"""
    filler = torch.tensor(list(PROBE_FILLER))
    values = torch.tensor(list(PROBE_VALUES))
    ids = filler[torch.randint(len(filler), (batch_size, n), generator=generator)]
    starts = torch.randint(n // 4 - run + 1, (batch_size,), generator=generator)
    answers = values[torch.randint(len(values), (batch_size,), generator=generator)]
    columns = starts[:, None] + torch.arange(run)
    ids.scatter_(1, columns, answers[:, None].expand(-1, run))
    ids[:, n - 2] = PROBE_QUESTION
    ids[:, n - 1] = answers
    labels = torch.full_like(ids, -100)
    labels[:, n - 1] = answers
    return ids, labels, starts


def probe_batches(batch_size: int, n: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches of :func:`probe_batch`, in an order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids, labels, _ = probe_batch(generator, batch_size, n)
        yield ids, labels


@torch.no_grad()
def probe_accuracy(model: FMTForCausalLM, cfg: SuiteConfig, n: int, seed: int = 12345, progress: bool = True) -> float:
    """Fraction of held-out probe sequences (their own seed) whose value the model predicts after the ``?``."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    batches = math.ceil(cfg.probe_eval_examples / cfg.eval_batch_size)
    for index in tqdm(range(batches), desc="probe eval", disable=not progress, mininterval=10):
        size = min(cfg.eval_batch_size, cfg.probe_eval_examples - index * cfg.eval_batch_size)
        ids, labels, _ = probe_batch(generator, size, n)
        logits = model(input_ids=ids[:, :-1], use_cache=False, logits_to_keep=1).logits[:, -1]
        correct += int((logits.argmax(-1) == labels[:, -1]).sum())
    return correct / cfg.probe_eval_examples


# ------------------------------------------------------------------------------------------------ evaluation


def held_out_bpb(
    model: FMTForCausalLM,
    tokenizer,
    texts: list[str],
    context: int,
    batch_size: int,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Bits per byte over ``texts`` with windows of ``context`` tokens, stride ``context // 2`` (as eval_lm.py)."""
    scores = score_documents(
        model,
        tokenizer,
        texts,
        context,
        max(1, context // 2),
        batch_size,
        progress=progress,
        max_document_tokens=max_tokens,
    )
    result = evaluate.load(LM_BITS, keep_in_memory=True).compute(**scores)
    return {"bpb": result["bits_per_byte"], "num_bytes": result["num_bytes"]}


def extrapolation(model: FMTForCausalLM, tokenizer, texts: list[str], cfg: SuiteConfig, progress: bool) -> list[dict]:
    """Bits per byte at ``cfg.extrapolation`` multiples of the training length, on the same first
    ``extrapolation_tokens`` tokens of each document; a context the model cannot take gets its reason."""
    rows = []
    cap = model.max_sequence_length
    for multiple in cfg.extrapolation:
        context = multiple * cfg.seq_len
        if cap is not None and context > cap:
            rows.append(
                {
                    "multiple": multiple,
                    "context": context,
                    "reason": f"capped at max_position_embeddings={cap} (fma_downsample={model.config.fma_downsample})",
                }
            )
            continue
        batch = max(1, cfg.eval_batch_size // multiple)
        rows.append(
            {
                "multiple": multiple,
                "context": context,
                **held_out_bpb(model, tokenizer, texts, context, batch, cfg.extrapolation_tokens, progress),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------- suite


def run_one(spec: RunSpec, cfg: SuiteConfig, tokenizer, corpus: Corpus | None, progress: bool = True) -> dict:
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
    model = build_model(spec, cfg, tokenizer, longest)
    row["parameters"] = model.num_parameters()
    start = time.perf_counter()
    if spec.task == "lm":
        history = train(
            model,
            lm_batches(corpus.train_blocks, cfg.batch_size, spec.seed),
            cfg,
            spec.steps or cfg.steps,
            desc=spec.name,
            progress=progress,
        )
    else:
        history = train(
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
            row["extrapolation"] = extrapolation(model, tokenizer, corpus.test_texts, cfg, progress)
    else:
        row["accuracy"] = probe_accuracy(model, cfg, n, progress=progress)
    row["eval_seconds"] = time.perf_counter() - start
    return row


def read_rows(path: str) -> list[dict]:
    """The rows of a results file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(rows: list[dict]) -> set[str]:
    """Names of the runs a resumed suite skips: rows with a result or a reason (an ``error`` row runs again)."""
    return {row["name"] for row in rows if "error" not in row}


def run_suite(
    specs: list[RunSpec], cfg: SuiteConfig, path: str, progress: bool = True, corpus: Corpus | None = None
) -> list[dict]:
    """Run every spec not yet in ``path``, appending each row as it finishes; returns all rows of ``path``.
    ``corpus`` defaults to :func:`load_corpus_splits` (loaded only when a language-modelling run is left).

    A run that raises gets a row with its ``error`` (and runs again on the next resume) so the others still run.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    done = finished(read_rows(path))
    todo = [spec for spec in specs if spec.name not in done]
    tokenizer = byte_tokenizer()
    if corpus is None and any(spec.task == "lm" for spec in todo):
        corpus = load_corpus_splits(cfg, tokenizer)
    meta = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return read_rows(path)


def interleaved_timing(specs: list[RunSpec], cfg: SuiteConfig, repeats: int = 5, progress: bool = True) -> list[dict]:
    """Training-step time of each spec's model measured side by side: one warm-up step each, then ``repeats``
    rounds in which every model takes one step on the same batch, in rotating order; the median per model and its
    ratio to the first spec's. (Absolute times on a shared machine mean little; ratios taken this way do.)"""
    tokenizer = byte_tokenizer()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(256, (cfg.batch_size, cfg.seq_len), generator=generator)
    models = [build_model(spec, cfg, tokenizer, cfg.seq_len) for spec in specs]
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


# ---------------------------------------------------------------------------------------------------- report


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


REPORT_SECTIONS = ("lm", "probe", "extrapolation")


def format_report(rows: list[dict], sections: tuple[str, ...] = REPORT_SECTIONS) -> str:
    """Markdown tables of the rows: language modelling (``lm``: bpb, relative to dense, s/step, peak MiB), the
    ``probe`` and the ``extrapolation``; sections without rows are left out. A row with a reason or an error shows
    it instead of numbers."""
    latest = {row["name"]: row for row in rows}  # a rerun (after an error) replaces the earlier row
    rows = list(latest.values())
    # "vs dense": against the dense row of the same seed and step budget
    dense = {
        (row["seed"], len(row["train_bits"])): row["bpb"]
        for row in rows
        if row.get("attention") == "sdpa" and row.get("task") == "lm" and "bpb" in row
    }
    tables = []
    lm = [row for row in rows if row.get("task", "lm") == "lm"]
    if "lm" in sections and lm:
        out = [
            "| run | group | attention | bpb (test) | vs dense | s/step | peak MiB | params |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in lm:
            if "bpb" not in row:
                out.append(
                    f"| {row['name']} | {row['group']} | {row['attention']} | not run: "
                    f"{row.get('reason') or row.get('error')} | | | | |"
                )
                continue
            reference = dense.get((row["seed"], len(row["train_bits"])))
            relative = f"{100 * (row['bpb'] / reference - 1):+.1f}%" if reference else "—"
            out.append(
                f"| {row['name']} | {row['group']} | {row['attention']} | {_fmt(row['bpb'])} | {relative} | "
                f"{_fmt(row['s_per_step'], 2)} | {row['peak_bytes'] / 2**20:.0f} | {row['parameters']:,} |"
            )
        tables.append("\n".join(out))
    probe = [row for row in rows if row.get("task") == "probe"]
    if "probe" in sections and probe:
        out = ["| probe run | length | accuracy | s/step |", "|---|---|---|---|"]
        for row in probe:
            reason = row.get("reason") or row.get("error")
            value = _fmt(row["accuracy"]) if "accuracy" in row else f"not run: {reason}"
            out.append(f"| {row['name']} | {row.get('seq_len', '')} | {value} | {_fmt(row.get('s_per_step'), 2)} |")
        tables.append("\n".join(out))
    extrapolated = [row for row in rows if row.get("extrapolation")]
    if "extrapolation" in sections and extrapolated:
        contexts = [item["context"] for item in extrapolated[0]["extrapolation"]]
        out = ["| run | " + " | ".join(f"bpb @ {c}" for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for row in extrapolated:
            cells = [_fmt(item["bpb"]) if "bpb" in item else "capped" for item in row["extrapolation"]]
            out.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        tables.append("\n".join(out))
    return "\n\n".join(tables)


def plot_training(rows: list[dict], path: str, smooth: int = 10, group: str = "main") -> str:
    """Training bits per token against step (moving average over ``smooth`` steps) for the LM rows of ``group``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        if row.get("task") == "lm" and row.get("group") == group and "train_bits" in row:
            bits = torch.tensor(row["train_bits"])
            kernel = min(smooth, len(bits))
            smoothed = bits.unfold(0, kernel, 1).mean(1)
            ax.plot(range(kernel, len(bits) + 1), smoothed, label=f"{row['name']} ({row.get('bpb', 0):.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training bits per token ({smooth}-step mean)")
    ax.set_title("Same model, data and budget; legend: held-out bits per byte")
    return _save(fig, ax, path)


def plot_extrapolation(rows: list[dict], path: str) -> str:
    """Held-out bits per byte against the evaluation context for the rows with an extrapolation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        points = [(item["context"], item["bpb"]) for item in row.get("extrapolation") or [] if "bpb" in item]
        if points:
            ax.plot(*zip(*points), marker="o", label=row["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context (tokens); trained at the first")
    ax.set_ylabel("held-out bits per byte")
    return _save(fig, ax, path)


def _save(fig, ax, path: str) -> str:
    """Grid, legend, and the figure written to ``path`` (and closed)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = [
    "ATTENTIONS",
    "REPORT_SECTIONS",
    "Corpus",
    "RunSpec",
    "SuiteConfig",
    "build_model",
    "default_suite",
    "extrapolation",
    "format_report",
    "held_out_bpb",
    "interleaved_timing",
    "lm_batches",
    "load_corpus_splits",
    "plot_extrapolation",
    "plot_training",
    "probe_accuracy",
    "probe_batch",
    "probe_batches",
    "read_rows",
    "run_one",
    "run_suite",
    "train",
]
