"""Greedy answers of causal LMs to the long-context tasks (:mod:`fmt_hf.toolkit.long_context`) at equal decode
memory: the engine of ``scripts/eval_long_context.py``.

A :class:`System` answers a prompt greedily with the cache its model's forward builds: a dense transformers model
with its full ``DynamicCache``, an FMT with its ``FMTCache``. :class:`StreamingLLM` (Xiao et al., arXiv:2309.17453)
is the same dense model holding only the first ``sinks`` tokens and a sliding window of recent ones, sized per prompt
length to the key/value vectors FMT's cache holds there (:func:`fmt_cache_vectors`), so every baseline decodes with
the same memory. It reads the prompt in chunks, evicting after each one (transformers has no sink cache, so the
eviction is a slice of ``DynamicCache``'s layers), and keeps the keys' original positions. The kvpress systems
(:class:`KVPress`) are NVIDIA kvpress's presses compressing the dense model's prompt cache to the same size; kvpress
needs an older transformers, so ``benchmarks/kvpress_runner.py`` answers them in a venv of its own, in a subprocess.

Every answer is one JSON line of ``samples.jsonl`` (prompt hash, answers, prediction, score, seconds and costs); a run
skips the (system, prompt) pairs already there, so it resumes where it stopped; :mod:`.long_context_report`
summarises the file. :func:`run_long_context` is the whole run of a
:class:`~fmt_hf.toolkit.arguments.LongContextArguments`: its systems (:func:`build_systems`), its samples
(:func:`build_samples`), the answers, the table and the heat maps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..model.cache_fmt import is_fmt_cache
from .arguments import KVPRESS_SYSTEMS, LongContextArguments, parse_config_overrides
from .convert import convert_llama_to_fmt, load_llama
from .data import SMOLLM2_GGUF, fetch_smollm2, load_corpus
from .long_context import TASKS, Haystack, Sample, answer_complete, encode, make_sample, score
from .long_context_report import plot_heat_maps, results_table
from .records import append_rows, read_rows


def fmt_cache_vectors(model: PreTrainedModel, tokens: int) -> int:
    """Key/value vectors per layer and KV head an FMT model's cache holds after ``tokens`` tokens: its state holds the
    levels the next query reads (docs/fma.md §8)."""
    fma = model.model.layers[0].self_attn.fma
    state = fma.decoder.init_state(1, 1, torch.float32)
    state.grow_levels(fma.partition.levels_for(tokens + 1))
    return state.num_vectors


def cache_size(cache) -> tuple[int, int]:
    """(key/value vectors per layer and KV head, bytes) of an ``FMTCache`` or a ``DynamicCache`` of one sequence; an
    FMT cache's vectors include its refinement store (docs/fma.md §3c)."""
    if is_fmt_cache(cache):
        state = cache.layers[0].state
        return state.num_vectors + state.store_vectors, cache.nbytes
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return 2 * cache.layers[0].keys.shape[-2], sum(t.numel() * t.element_size() for t in tensors)


def answer_done(tokenizer: PreTrainedTokenizerBase, generated: list[int], sample: Sample) -> bool:
    """Whether greedy decoding stops after ``generated``: its token budget is spent, or a one-answer reply has ended
    its first sentence or line."""
    return len(generated) == sample.max_new_tokens or answer_complete(tokenizer.decode(generated), len(sample.answers))


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
            if answer_done(self.tokenizer, generated, sample):
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


def answer_row(system: str, sample: Sample, answer: Answer, seconds: float, training_length: int | None) -> dict:
    """The ``samples.jsonl`` line of ``system``'s answer to ``sample``, scored."""
    value = score(answer.prediction, sample.answers)
    return {
        "system": system,
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
        "seconds": round(seconds, 3),
        "prefill_seconds": round(answer.prefill_seconds, 3),
        "decode_ms_per_token": None if answer.decode_ms_per_token is None else round(answer.decode_ms_per_token, 2),
        "cache_vectors": answer.cache_vectors,
        "cache_mib": round(answer.cache_mib, 3),
        "training_length": training_length,
    }


def done_pairs(path: str) -> set[tuple[str, str]]:
    """The (system, prompt hash) pairs ``path`` already answers."""
    return {(row["system"], row["prompt_hash"]) for row in read_rows(path)}


def run_samples(systems: Sequence[System], samples: Iterable[Sample], path: str, progress: bool = True) -> list[dict]:
    """Answer every sample with every system, appending one JSON line per answer to ``path`` and skipping the
    (system, prompt) pairs already there; return every row of ``path``."""
    done = done_pairs(path)
    for sample in tqdm(list(samples), desc="samples", unit="prompt", disable=not progress):
        for system in systems:
            if (system.name, sample.prompt_hash) in done:
                continue
            start = time.perf_counter()
            answer = system.answer(sample)
            append_rows(
                path, [answer_row(system.name, sample, answer, time.perf_counter() - start, system.training_length())]
            )
            done.add((system.name, sample.prompt_hash))
    return read_rows(path)


def kvpress_compression_ratio(cache_vectors: int, prompt_tokens: int) -> float:
    """The kvpress ``compression_ratio`` whose press keeps ``cache_vectors`` key/value vectors per layer and KV head
    of a ``prompt_tokens``-token prompt: ``cache_vectors // 2`` tokens, a key and a value each (0: a prompt that small
    stays whole). A press keeps ``int(prompt_tokens * (1 - ratio))`` tokens, so the ratio aims half a token above the
    count, where float rounding cannot drop it one token below."""
    kept = cache_vectors // 2
    return 0.0 if kept >= prompt_tokens else 1 - (kept + 0.5) / prompt_tokens


KVPRESS_RUNNER = "benchmarks.kvpress_runner"
"""The module whose file the kvpress venv runs (it imports no fmt_hf, so it runs there by path)."""


@dataclass
class KVPress:
    """kvpress's presses (``systems``, each ``kvpress_<press>``) on the dense checkpoint, each compressing a prompt's
    cache to ``budget(prompt tokens)`` key/value vectors per layer and KV head; ``python`` (the kvpress venv's) runs
    ``benchmarks/kvpress_runner.py`` on them, at most ``timeout`` seconds per answer."""

    systems: list[str]
    tokenizer: PreTrainedTokenizerBase
    budget: Callable[[int], int]
    model_name_or_path: str
    gguf_file: str | None
    dtype: str
    device: str
    sinks: int
    python: str
    timeout: float
    training_length: int | None

    def prompt_rows(self, samples: Iterable[Sample], done: set[tuple[str, str]]) -> list[dict]:
        """The runner's prompt lines: one per (system, sample) not in ``done``."""
        rows = []
        for sample in samples:
            input_ids = encode(self.tokenizer, sample.prompt, sample.chat_template)
            ratio = kvpress_compression_ratio(self.budget(len(input_ids)), len(input_ids))
            for system in self.systems:
                if (system, sample.prompt_hash) not in done:
                    rows.append(
                        {
                            "id": sample.prompt_hash,
                            "press": system.removeprefix("kvpress_"),
                            "input_ids": input_ids,
                            "max_new_tokens": sample.max_new_tokens,
                            "compression_ratio": ratio,
                            "n_sink": self.sinks,
                        }
                    )
        return rows

    def answer_rows(self, samples: Iterable[Sample], predictions: Iterable[dict]) -> list[dict]:
        """The ``samples.jsonl`` lines of the runner's ``predictions``: each reply cut where this suite's greedy
        decoding stops (:func:`answer_done`; the runner decodes to its token budget), decoded and scored."""
        by_hash = {sample.prompt_hash: sample for sample in samples}
        rows = []
        for prediction in predictions:
            sample, generated = by_hash[prediction["id"]], prediction["generated_ids"]
            end = next(
                (n for n in range(1, len(generated) + 1) if answer_done(self.tokenizer, generated[:n], sample)), None
            )
            answer = Answer(
                self.tokenizer.decode(generated[:end]),
                prediction["prefill_seconds"],
                prediction["decode_ms_per_token"],
                prediction["cache_vectors"],
                prediction["cache_mib"],
            )
            system = f"kvpress_{prediction['press']}"
            rows.append(answer_row(system, sample, answer, prediction["seconds"], self.training_length))
        return rows

    def command(self, prompts: str, predictions: str) -> list[str]:
        """The runner's command line; ``-P`` keeps the runner's own folder (benchmarks/) off its import path."""
        runner = importlib.util.find_spec(KVPRESS_RUNNER).origin
        gguf = ["--gguf_file", self.gguf_file] if self.gguf_file else []
        model = ["--model_name_or_path", self.model_name_or_path, *gguf, "--dtype", self.dtype, "--device", self.device]
        return [self.python, "-P", runner, "--prompts", prompts, "--output", predictions, *model]

    def run(self, samples: Sequence[Sample], path: str) -> None:
        """Answer the (system, sample) pairs ``path`` lacks in one runner subprocess and append their lines to
        ``path``, also those it finished before a timeout or a failure (so a rerun resumes); then raise for either."""
        prompts = self.prompt_rows(samples, done_pairs(path))
        if not prompts:
            return
        folder = os.path.dirname(os.path.abspath(path))
        prompts_path, predictions_path = (
            os.path.join(folder, f"kvpress_{kind}.jsonl") for kind in ("prompts", "predictions")
        )
        os.makedirs(folder, exist_ok=True)
        with open(prompts_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in prompts)
        if os.path.exists(predictions_path):
            os.remove(predictions_path)
        command = self.command(prompts_path, predictions_path)
        failure = None
        try:
            subprocess.run(command, check=True, timeout=self.timeout * len(prompts))
        except subprocess.TimeoutExpired:
            failure = (
                f"the kvpress runner passed its {self.timeout * len(prompts):.0f} s (--kvpress_timeout per answer)"
            )
        except subprocess.CalledProcessError as error:
            failure = f"the kvpress runner exited with status {error.returncode} (its output is above)"
        finally:
            predictions = read_rows(predictions_path)
            append_rows(path, self.answer_rows(samples, predictions))
        if failure is not None:
            raise RuntimeError(f"{failure} after {len(predictions)} of {len(prompts)} answers: {' '.join(command)}")


def check_kvpress_python(python: str) -> None:
    """Fail early, before any model loads, when the kvpress venv is missing."""
    if not os.path.isfile(python):
        raise FileNotFoundError(
            f"--kvpress_python {python} does not exist: the kvpress systems ({', '.join(KVPRESS_SYSTEMS)}) run in "
            "kvpress's own venv; create it with `make kvpress-venv` (in the repository root) or pass its python"
        )


def build_systems(args: LongContextArguments) -> tuple[list[System], KVPress | None, PreTrainedTokenizerBase]:
    """The in-process systems of ``args``, its kvpress systems (None when it has none) and their shared tokenizer."""
    kvpress_systems = [name for name in args.systems if name in KVPRESS_SYSTEMS]
    if kvpress_systems:
        check_kvpress_python(args.kvpress_python)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source, gguf = args.model_name_or_path, args.gguf_file
    if source is None:
        source, gguf = str(fetch_smollm2()), SMOLLM2_GGUF
    model, tokenizer = load_llama(source, gguf, args.dtype)
    model = model.to(device).eval()
    systems = []
    if "dense" in args.systems:
        systems.append(System("dense", model, tokenizer))
    kvpress = None
    conversion = parse_config_overrides(args.conversion)
    if "fmt_refined" in args.systems:  # the same conversion with adaptive refinement (docs/fma.md §3c)
        refined = convert_llama_to_fmt(model, **{**conversion, "fma_refine_groups": args.refine_groups}).eval()
        systems.append(System("fmt_refined", refined, tokenizer))
    if "fmt" in args.systems or "streaming" in args.systems or kvpress_systems:
        fmt = convert_llama_to_fmt(model, **conversion).eval()
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
        if kvpress_systems:
            kvpress = KVPress(
                kvpress_systems,
                tokenizer,
                lambda tokens: fmt_cache_vectors(fmt, tokens),
                source,
                gguf,
                args.dtype,
                device,
                args.streaming_sinks,
                args.kvpress_python,
                args.kvpress_timeout,
                getattr(model.config, "max_position_embeddings", None),
            )
    for path in args.checkpoints:
        checkpoint = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
        systems.append(System(os.path.basename(os.path.normpath(path)), checkpoint, tokenizer))
    return systems, kvpress, tokenizer


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
    """Answer every sample of ``args`` with every system (resuming ``samples.jsonl``; the kvpress systems after the
    others, in one runner subprocess), write ``results.md`` and the heat maps to ``args.output_dir``; print and return
    the markdown table of this run's systems."""
    systems, kvpress, tokenizer = build_systems(args)
    path = os.path.join(args.output_dir, "samples.jsonl")
    samples = list(build_samples(args, tokenizer))
    rows = run_samples(systems, samples, path)
    if kvpress is not None:
        kvpress.run(samples, path)
        rows = read_rows(path)
    names = {system.name for system in systems} | set(kvpress.systems if kvpress else ())
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
    "KVPress",
    "StreamingLLM",
    "System",
    "build_samples",
    "answer_done",
    "answer_row",
    "build_systems",
    "check_kvpress_python",
    "cache_size",
    "fmt_cache_vectors",
    "kvpress_compression_ratio",
    "plot_heat_maps",
    "results_table",
    "run_long_context",
    "run_samples",
]
