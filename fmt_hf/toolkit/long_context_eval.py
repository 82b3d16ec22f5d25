"""Greedy answers of causal LMs to the long-context tasks (:mod:`fmt_hf.toolkit.long_context`) at equal decode
memory: the engine of ``scripts/eval_long_context.py``.

A :class:`System` answers a prompt greedily with the cache its model's forward builds: a dense transformers model
with its full ``DynamicCache``, an FMT with its ``FMTCache``. :class:`StreamingLLM` (Xiao et al., arXiv:2309.17453)
is the same dense model holding only the first ``sinks`` tokens and a sliding window of recent ones, sized per prompt
length to the key/value vectors FMT's cache holds there (:func:`fmt_cache_vectors`), so every baseline decodes with
the same memory. It reads the prompt in chunks, evicting after each one (transformers has no sink cache, so the
eviction is a slice of ``DynamicCache``'s layers), and keeps the keys' original positions.

Every answer is one JSON line of ``samples.jsonl`` (prompt hash, answers, prediction, score, seconds and costs); a run
skips the (system, prompt) pairs already there, so it resumes where it stopped. :func:`results_table` and
:func:`plot_heat_maps` summarise the file. :func:`run_long_context` is the whole run of a
:class:`~fmt_hf.toolkit.arguments.LongContextArguments`: its systems (:func:`build_systems`), its samples
(:func:`build_samples`), the answers, the table and the heat maps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..model.cache_fmt import is_fmt_cache
from .arguments import LongContextArguments, parse_config_overrides
from .convert import convert_llama_to_fmt, load_llama
from .data import SMOLLM2_GGUF, fetch_smollm2, load_corpus
from .long_context import TASKS, Haystack, Sample, answer_complete, encode, make_sample, score, wilson_interval


def fmt_cache_vectors(model: PreTrainedModel, tokens: int) -> int:
    """Key/value vectors per layer and KV head an FMT model's cache holds after ``tokens`` tokens: its state holds the
    levels the next query reads (docs/fma.md §8)."""
    fma = model.model.layers[0].self_attn.fma
    state = fma.decoder.init_state(1, 1, torch.float32)
    state.grow_levels(fma.partition.levels_for(tokens + 1))
    return state.num_vectors


def cache_size(cache) -> tuple[int, int]:
    """(key/value vectors per layer and KV head, bytes) of an ``FMTCache`` or a ``DynamicCache`` of one sequence."""
    if is_fmt_cache(cache):
        return cache.layers[0].state.num_vectors, cache.nbytes
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return 2 * cache.layers[0].keys.shape[-2], sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Answer:
    prediction: str
    prefill_seconds: float
    decode_ms_per_token: float | None  # None when the first token (from the prefill) ended the answer
    cache_vectors: int
    cache_mib: float


class System:
    """A causal LM answering greedily with the cache its forward makes (dense: ``DynamicCache``; FMT: ``FMTCache``)."""

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.name, self.model, self.tokenizer = name, model.eval(), tokenizer
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def training_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Logits of the prompt's last position and the cache after it."""
        out = self.model(input_ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.cache

    def step(self, token: int, position: int, cache) -> torch.Tensor:
        """Logits after one more token at ``position``."""
        ids = torch.tensor([[token]], device=self.model.device)
        out = self.model(ids, cache=cache, position_ids=torch.tensor([[position]], device=ids.device), use_cache=True)
        return out.logits[0, -1]

    @torch.no_grad()
    def answer(self, sample: Sample) -> Answer:
        ids = torch.tensor([encode(self.tokenizer, sample.prompt, sample.chat_template)], device=self.model.device)
        start = time.perf_counter()
        logits, cache = self.prefill(ids)
        prefill_seconds = time.perf_counter() - start
        vectors, nbytes = cache_size(cache)
        generated: list[int] = []
        steps, start = 0, time.perf_counter()
        for position in range(ids.shape[1], ids.shape[1] + sample.max_new_tokens):
            token = int(logits.argmax())
            if token in self.eos:
                break
            generated.append(token)
            if len(generated) == sample.max_new_tokens:
                break
            if answer_complete(self.tokenizer.decode(generated), len(sample.answers)):
                break
            logits, steps = self.step(token, position, cache), steps + 1
        decode_ms = 1000 * (time.perf_counter() - start) / steps if steps else None
        return Answer(self.tokenizer.decode(generated), prefill_seconds, decode_ms, vectors, nbytes / 2**20)


class StreamingLLM(System):
    """Attention sinks and a sliding window: the cache keeps the first ``sinks`` tokens and as many recent ones as
    make ``budget(prompt_length)`` key/value vectors per layer and KV head. The prompt goes in chunks of
    ``chunk_size`` tokens with an eviction after each, so a prompt token attends the sinks and the last window to
    window + chunk_size - 1 tokens; a generated token attends the sinks and the window."""

    def __init__(self, name, model, tokenizer, sinks: int, budget, chunk_size: int = 256):
        super().__init__(name, model, tokenizer)
        if sinks < 0 or chunk_size < 1:
            raise ValueError(f"StreamingLLM needs sinks >= 0 and chunk_size >= 1, got {sinks} and {chunk_size}")
        self.sinks, self.budget, self.chunk_size, self.window = sinks, budget, chunk_size, None

    def evict(self, cache: DynamicCache) -> None:
        for layer in cache.layers:
            if layer.keys.shape[-2] > self.sinks + self.window:
                layer.keys, layer.values = (
                    torch.cat([t[..., : self.sinks, :], t[..., -self.window :, :]], dim=-2)
                    for t in (layer.keys, layer.values)
                )

    def prefill(self, input_ids):
        self.window = self.budget(input_ids.shape[1]) // 2 - self.sinks
        if self.window < 1:
            raise ValueError(f"a cache of {self.budget(input_ids.shape[1])} vectors cannot hold {self.sinks} sinks")
        cache = DynamicCache(config=self.model.config)
        for begin in range(0, input_ids.shape[1], self.chunk_size):
            end = min(begin + self.chunk_size, input_ids.shape[1])
            positions = torch.arange(begin, end, device=input_ids.device)[None]
            out = self.model(
                input_ids[:, begin:end], cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            self.evict(cache)
        return out.logits[0, -1], cache

    def step(self, token, position, cache):
        logits = super().step(token, position, cache)
        self.evict(cache)
        return logits


def read_rows(path: str) -> list[dict]:
    """The JSON lines of ``path`` (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_samples(systems: Sequence[System], samples: Iterable[Sample], path: str, progress: bool = True) -> list[dict]:
    """Answer every sample with every system, appending one JSON line per answer to ``path`` and skipping the
    (system, prompt) pairs already there; return every row of ``path``."""
    done = {(row["system"], row["prompt_hash"]) for row in read_rows(path)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for sample in tqdm(list(samples), desc="samples", unit="prompt", disable=not progress):
        for system in systems:
            if (system.name, sample.prompt_hash) in done:
                continue
            start = time.perf_counter()
            answer = system.answer(sample)
            value = score(answer.prediction, sample.answers)
            row = {
                "system": system.name,
                "task": sample.task,
                "length": sample.length,
                "depth": sample.depth,
                "index": sample.index,
                "prompt_hash": sample.prompt_hash,
                "num_tokens": sample.num_tokens,
                "answers": list(sample.answers),
                "prediction": answer.prediction,
                "score": value,
                "correct": value == 1.0,
                "seconds": round(time.perf_counter() - start, 3),
                "prefill_seconds": round(answer.prefill_seconds, 3),
                "decode_ms_per_token": None
                if answer.decode_ms_per_token is None
                else round(answer.decode_ms_per_token, 2),
                "cache_vectors": answer.cache_vectors,
                "cache_mib": round(answer.cache_mib, 3),
                "training_length": system.training_length(),
            }
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            done.add((system.name, sample.prompt_hash))
    return read_rows(path)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def results_table(rows: list[dict]) -> str:
    """A markdown table, one line per (task, length, system): samples, mean score with its 95% Wilson interval, the
    cache's key/value vectors per layer and KV head, and the medians of prefill seconds, decode ms/token and cache
    MiB; a length past a system's training length is marked with a dagger."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["task"], row["length"], row["system"])].append(row)
    lines = [
        "| task | length | system | n | score (95% CI) | cache vectors | prefill s | decode ms/token | cache MiB |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for (task, length, system), group in sorted(cells.items()):
        total = sum(r["score"] for r in group)
        low, high = wilson_interval(total, len(group))
        past = group[0]["training_length"] is not None and length > group[0]["training_length"]
        decode = _median([r["decode_ms_per_token"] for r in group])
        lines.append(
            f"| {task} | {length}{' †' if past else ''} | {system} | {len(group)} | {total / len(group):.2f} "
            f"({low:.2f}-{high:.2f}) | {_median([r['cache_vectors'] for r in group]):.0f} | "
            f"{_median([r['prefill_seconds'] for r in group]):.1f} | "
            f"{'-' if decode is None else f'{decode:.0f}'} | {_median([r['cache_mib'] for r in group]):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_heat_maps(rows: list[dict], output_dir: str) -> list[str]:
    """Per system, a PNG of mean score by length (columns) and depth (rows), one panel per task with a depth;
    returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for system in sorted({r["system"] for r in rows}):
        mine = [r for r in rows if r["system"] == system and r["depth"] is not None]
        tasks = sorted({r["task"] for r in mine})
        if not tasks:
            continue
        figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.2), squeeze=False)
        for axis, task in zip(axes[0], tasks):
            cells = defaultdict(list)
            for r in mine:
                if r["task"] == task:
                    cells[(r["depth"], r["length"])].append(r["score"])
            depths, lengths = sorted({d for d, _ in cells}), sorted({n for _, n in cells})
            grid = [[statistics.mean(cells.get((d, n), [float("nan")])) for n in lengths] for d in depths]
            image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            axis.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
            axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            axis.set_xlabel("prompt tokens")
            axis.set_ylabel("needle depth")
            axis.set_title(task)
        figure.colorbar(image, ax=axes[0].tolist(), label="score")
        figure.suptitle(system)
        path = os.path.join(output_dir, f"heatmap_{system}.png")
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def build_systems(args: LongContextArguments) -> tuple[list[System], PreTrainedTokenizerBase]:
    """The systems of ``args`` and their shared tokenizer."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source, gguf = args.model_name_or_path, args.gguf_file
    if source is None:
        source, gguf = str(fetch_smollm2()), SMOLLM2_GGUF
    model, tokenizer = load_llama(source, gguf, args.dtype)
    model = model.to(device).eval()
    systems = []
    if "dense" in args.systems:
        systems.append(System("dense", model, tokenizer))
    if "fmt" in args.systems or "streaming" in args.systems:
        fmt = convert_llama_to_fmt(model, **parse_config_overrides(args.conversion)).eval()
        if "fmt" in args.systems:
            systems.append(System("fmt", fmt, tokenizer))
        if "streaming" in args.systems:
            systems.append(
                StreamingLLM(
                    "streaming",
                    model,
                    tokenizer,
                    args.streaming_sinks,
                    lambda tokens: fmt_cache_vectors(fmt, tokens),
                    args.streaming_chunk_size,
                )
            )
    for path in args.checkpoints:
        checkpoint = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
        systems.append(System(os.path.basename(os.path.normpath(path)), checkpoint, tokenizer))
    return systems, tokenizer


def build_samples(args: LongContextArguments, tokenizer: PreTrainedTokenizerBase) -> Iterator[Sample]:
    """Every sample of the run, length by length (the cheap lengths first), task by task."""
    needs_text = any(TASKS[t].needs_text for t in args.tasks)
    haystack = Haystack.from_documents(load_corpus(args.haystack_corpus)["text"]) if needs_text else None
    for length in args.lengths:
        for task in args.tasks:
            for index in range(args.num_samples):
                depth = args.depths[index % len(args.depths)] if TASKS[task].has_depth else None
                yield make_sample(
                    task,
                    tokenizer,
                    length,
                    depth,
                    index,
                    haystack=haystack,
                    seed=args.seed,
                    chat_template=args.chat_template,
                )


def run_long_context(args: LongContextArguments) -> str:
    """Answer every sample of ``args`` with every system (resuming ``samples.jsonl``), write ``results.md`` and the
    heat maps to ``args.output_dir``; print and return the markdown table of this run's systems."""
    systems, tokenizer = build_systems(args)
    rows = run_samples(systems, build_samples(args, tokenizer), os.path.join(args.output_dir, "samples.jsonl"))
    names = {system.name for system in systems}
    rows = [row for row in rows if row["system"] in names]
    table = results_table(rows)
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k != "output_dir"}
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"Settings: `{settings}`\n\n{table}")
    plot_heat_maps(rows, args.output_dir)
    print(table)
    return table


__all__ = [
    "Answer",
    "StreamingLLM",
    "System",
    "build_samples",
    "build_systems",
    "cache_size",
    "fmt_cache_vectors",
    "plot_heat_maps",
    "read_rows",
    "results_table",
    "run_long_context",
    "run_samples",
]
