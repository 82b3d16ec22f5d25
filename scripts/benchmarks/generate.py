"""Per-token decoding cost of FMT's multilevel cache against the same weights with dense attention.

The engine behind ``scripts/bench_generate.py``. For each context length n, one model -- by default the shape of
SmolLM2-135M (hidden 576, 30 layers, 9 query / 3 key-value heads, head dim 64), random weights -- decodes single
tokens after n cached tokens twice over, interleaved: under FMA with an :class:`~fmt_hf.FMTCache`, and under
``attn_implementation="sdpa"`` with transformers' ``DynamicCache``.

How the numbers are taken (also written into the result files, see :data:`METHODS`):

* **caches** -- neither is built by a prefill (minutes per length on two cores). A decode step's cost does not
  depend on what the cache holds, only on its shape, so the dense cache is filled with random key/value tensors of
  the right size ``(1, kv_heads, n, head_dim)`` per layer, and each FMT state is a random state of the right
  structure with ``length = n`` (its shape is the same at every n; ``n`` sets only which slots the step's masks
  select). Exactness of real prefills and steps is covered by ``tests/test_cache_fmt.py``.
* **time** -- wall clock of one ``model(next_token, cache=...)`` call under ``torch.no_grad()``; FMT and dense
  alternate, ``steps`` calls each after one untimed warm-up, and the median is reported.
* **bytes** -- FMT: :attr:`FMTCache.nbytes` (every state tensor); dense: the key and value tensors held.

:func:`run_batch_benchmark` instead measures decoding throughput by batch size after a real prefill (METHODS_BATCH).
:func:`run_checkpoint_benchmark` runs ``model.generate`` of real checkpoints on real held-out text, each model and
prompt length in a fresh subprocess (METHODS_CHECKPOINT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

from fmt_hf import FMTCache, FMTConfig, FMTForCausalLM
from fmt_hf.model.cache_fmt import is_fmt_cache

from .attention import CpuNeighbours, system_info

METHODS = {
    "caches": "random tensors of the right shape: dense DynamicCache (1, kv_heads, n, head_dim) per layer; FMT "
    "states of length n (their size does not depend on n); no prefill",
    "time": "wall clock of one single-token forward under no_grad; FMT and dense interleaved after one warm-up "
    "each; median over the steps",
    "bytes": "FMT: every tensor of every layer's state; dense: key + value tensors",
}


METHODS_BATCH = {
    "caches": "real prefills: a batch of random prompts of prompt_len tokens through model(..., use_cache=True); FMT "
    "with FMTCache, dense SDPA with DynamicCache",
    "time": "wall clock of `steps` consecutive single-token forwards under no_grad (one whole fine block: every row "
    "completes one block in it), divided by steps; every (implementation, batch) pair in turn, rotating "
    "the order each repeat; median over repeats. tokens/s = batch / step time",
}


def byte_model_config(max_position_embeddings: int, **overrides) -> FMTConfig:
    """The project's byte-level model shape (scripts/main_demo.py): 4 layers, hidden 256, 4 heads, block 64."""
    options = dict(
        vocab_size=260,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        fma_block_size=64,
        max_position_embeddings=max_position_embeddings,
    )
    options.update(overrides)
    return FMTConfig(**options)


def smollm2_shaped_config(max_position_embeddings: int, **overrides) -> FMTConfig:
    """An FMT config with SmolLM2-135M's shape (random weights are enough to time a decoding step)."""
    options = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=max_position_embeddings,
    )
    options.update(overrides)
    return FMTConfig(**options)


def filled_fmt_cache(model: FMTForCausalLM, length: int, generator: torch.Generator) -> FMTCache:
    """An FMTCache whose every layer holds a random state of ``length`` consumed tokens (batch of one)."""
    config = model.config
    cache = FMTCache(config.num_hidden_layers)
    for layer, cache_layer in zip(model.model.layers, cache.layers):
        fma = layer.self_attn.fma
        state = fma.decoder.init_state(config.num_attention_heads, config.num_key_value_heads, model.dtype)
        state = state.map_tensors(
            lambda t: (
                t
                if t.dtype == torch.bool
                # validity flags stay "all real"
                else torch.randn(t.shape, generator=generator, dtype=t.dtype)
            )
        )
        # What `FMTCacheLayer.attend` would have left after `length` tokens of a batch of one.
        cache_layer.state = dataclasses.replace(state, lengths=[length])
        cache_layer.seen_tokens, cache_layer.is_initialized = length, True
    return cache


def filled_dense_cache(model: FMTForCausalLM, length: int, generator: torch.Generator) -> DynamicCache:
    """A DynamicCache holding ``length`` random keys and values in every layer (batch of one)."""
    config = model.config
    cache = DynamicCache(config=config)
    shape = (1, config.num_key_value_heads, length, config.head_dim)
    for layer_idx in range(config.num_hidden_layers):
        cache.update(
            torch.randn(shape, generator=generator, dtype=model.dtype),
            torch.randn(shape, generator=generator, dtype=model.dtype),
            layer_idx,
        )
    return cache


def dense_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _step_seconds(model: FMTForCausalLM, implementation: str, cache, token: torch.Tensor, position: int):
    """Time one decoding step; returns (seconds, cache after the step)."""
    model.set_attn_implementation(implementation)
    position_ids = torch.tensor([[position]])
    start = time.perf_counter()
    out = model(token, cache=cache, position_ids=position_ids, use_cache=True)
    return time.perf_counter() - start, out.cache


@torch.no_grad()
def run_decode_benchmark(
    lengths: list[int], steps: int = 8, config: FMTConfig | None = None, seed: int = 0, progress: bool = True
) -> tuple[list[dict], dict]:
    """Median per-token decoding time and cache bytes of FMT and dense attention at each context length."""
    from tqdm.auto import tqdm

    if config is None:
        config = smollm2_shaped_config(max(lengths) + steps + 1)
    if max(lengths) + steps + 1 > config.max_position_embeddings:
        raise ValueError(
            f"lengths up to {max(lengths)} plus {steps + 1} decoding steps exceed "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    torch.manual_seed(seed)
    model = FMTForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    bar = tqdm(total=len(lengths) * 2 * (steps + 1), desc="decode steps", disable=not progress)
    for length in lengths:
        caches = {
            "fma": filled_fmt_cache(model, length, generator),
            "sdpa": filled_dense_cache(model, length, generator),
        }
        held = {name: cache_bytes(cache) for name, cache in caches.items()}
        times = {"fma": [], "sdpa": []}
        neighbours = CpuNeighbours().start()
        for step in range(steps + 1):  # step 0 warms up
            order = ("fma", "sdpa") if step % 2 else ("sdpa", "fma")
            for implementation in order:
                token = torch.randint(0, config.vocab_size, (1, 1), generator=generator)
                seconds, caches[implementation] = _step_seconds(
                    model, implementation, caches[implementation], token, length + step
                )
                if step:
                    times[implementation].append(seconds)
                bar.update()
        fma_s, dense_s = statistics.median(times["fma"]), statistics.median(times["sdpa"])
        rows.append(
            {
                "context": length,
                "fmt_ms": 1e3 * fma_s,
                "dense_ms": 1e3 * dense_s,
                "speedup": dense_s / fma_s,
                "fmt_cache_bytes": held["fma"],
                "dense_cache_bytes": held["sdpa"],
                "cache_ratio": held["sdpa"] / held["fma"],
                "other_cores": neighbours.stop(),
            }
        )
        del caches
    bar.close()
    meta = {
        "system": system_info(),
        "methods": METHODS,
        "steps": steps,
        "model": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "fma_block_size",
                "fma_coarse_tokens",
                "fma_downsample",
            )
        },
    }
    return rows, meta


@torch.no_grad()
def run_batch_benchmark(
    batch_sizes: list[int],
    prompt_len: int,
    steps: int,
    repeats: int,
    config: FMTConfig,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Per-step decoding time and tokens per second of FMT and dense attention at each batch size, after a real
    prefill of ``prompt_len`` tokens per row (see :data:`METHODS_BATCH`)."""
    from tqdm.auto import tqdm

    if prompt_len + repeats * steps + 1 > config.max_position_embeddings:
        raise ValueError(
            f"prompt_len={prompt_len} plus {repeats} x {steps} steps exceed "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    torch.manual_seed(seed)
    model = FMTForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    runs = [(implementation, batch) for batch in batch_sizes for implementation in ("fma", "sdpa")]
    caches, tokens = {}, {}
    for implementation, batch in tqdm(runs, desc="prefills", disable=not progress):
        model.set_attn_implementation(implementation)
        ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=generator)
        out = model(ids, use_cache=True, logits_to_keep=1)
        caches[implementation, batch], tokens[implementation, batch] = out.cache, out.logits[:, -1:].argmax(-1)
    times = {run: [] for run in runs}
    neighbours = CpuNeighbours().start()
    for repeat in tqdm(range(repeats), desc="repeats", disable=not progress):
        shift = repeat % len(runs)
        for implementation, batch in runs[shift:] + runs[:shift]:
            model.set_attn_implementation(implementation)
            cache, token = caches[implementation, batch], tokens[implementation, batch]
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            times[implementation, batch].append((time.perf_counter() - start) / steps)
            caches[implementation, batch], tokens[implementation, batch] = cache, token
    other_cores = neighbours.stop()
    rows = []
    for batch in batch_sizes:
        fma_s, dense_s = (statistics.median(times[implementation, batch]) for implementation in ("fma", "sdpa"))
        rows.append(
            {
                "batch": batch,
                "fmt_ms": 1e3 * fma_s,
                "dense_ms": 1e3 * dense_s,
                "fmt_tokens_per_s": batch / fma_s,
                "dense_tokens_per_s": batch / dense_s,
            }
        )
    for row in rows:
        row["fmt_step_vs_batch_1"] = row["fmt_ms"] / rows[0]["fmt_ms"]
    meta = {
        "system": system_info(),
        "methods": METHODS_BATCH,
        "prompt_len": prompt_len,
        "steps": steps,
        "repeats": repeats,
        "other_cores": other_cores,
        "model": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "fma_block_size",
                "fma_coarse_tokens",
                "fma_downsample",
            )
        },
    }
    return rows, meta


METHODS_CHECKPOINT = {
    "prompt": "the first prompt_len tokens (the FMT checkpoint's tokenizer, its default special tokens) of held-out "
    "documents joined by blank lines; the same ids for both models",
    "process": "every (model, prompt length) in a fresh Python subprocess, one at a time: load the checkpoint, then "
    "one greedy model.generate with min_new_tokens = max_new_tokens (every run decodes the same count) "
    "and the model's own cache: FMTCache under FMA, DynamicCache under sdpa",
    "ttft": "wall clock from calling generate to the first new token reaching its streamer: prefill of the whole "
    "prompt plus the first token",
    "decode": "tokens/s after the first: (new_tokens - 1) / wall clock from the first new token to the last",
    "cache": "bytes of every tensor the cache returned by generate holds (FMTCache: every state tensor; "
    "DynamicCache: keys + values): the prompt and every new token but the last, which is never fed back",
    "rss": "weights: the subprocess's resident set after loading the model and reading every weight once "
    "(interpreter, libraries, weights); peak: its ru_maxrss (getrusage high-water mark) after generate",
    "other_cores": "cores kept busy by other processes during the run (/proc/stat minus this benchmark's processes)",
}
DTYPES = ("float32", "bfloat16", "float16")


class _TokenClock(BaseStreamer):
    """When ``generate`` hands each new token to its streamer (its first call carries the prompt, not a token)."""

    def __init__(self):
        self.prompt_seen, self.times = False, []

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def _resident_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_resident_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak  # bytes on macOS, kilobytes on Linux


def cache_bytes(cache) -> int:
    """Bytes of every tensor a generation cache holds: an FMTCache's states or a DynamicCache's keys and values."""
    return cache.nbytes if is_fmt_cache(cache) else dense_cache_bytes(cache)


@torch.no_grad()
def generate_once(
    model_name_or_path: str,
    attn_implementation: str | None,
    prompt_ids: list[int],
    new_tokens: int,
    dtype: str = "float32",
    threads: int | None = None,
) -> dict:
    """Load a checkpoint, greedily generate ``new_tokens`` after ``prompt_ids`` with its own cache and measure the
    run (:data:`METHODS_CHECKPOINT`). Run it alone in a fresh process: the resident-set figures are the process's.
    ``attn_implementation`` None keeps the checkpoint's (FMA for an FMT checkpoint)."""
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    ).eval()
    for parameter in model.parameters():  # read every weight once: a memory-mapped checkpoint loads pages lazily
        parameter.sum()
    input_ids = torch.tensor([prompt_ids])
    weights_rss = _resident_bytes()
    clock = _TokenClock()
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        return_dict_in_generate=True,
    )
    first, last = clock.times[0], clock.times[-1]
    return {
        "ttft_s": first - start,
        "decode_tokens_per_s": (len(clock.times) - 1) / (last - first) if last > first else None,
        "generated_ids": out.sequences[0, len(prompt_ids) :].tolist(),
        "cache_bytes": cache_bytes(out.cache),
        "cache_class": type(out.cache).__name__,
        "weights_rss_bytes": weights_rss,
        "peak_rss_bytes": _peak_resident_bytes(),
        "model_class": type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
    }


def _generate_in_subprocess(spec: dict, folder: Path) -> dict:
    """:func:`generate_once` in a fresh Python process (this module run with ``-m``; same import path as here)."""
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
    done = subprocess.run(
        [sys.executable, "-m", __name__, str(spec_path), str(result_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(
            f"generation subprocess for {spec['model_name_or_path']} at {len(spec['prompt_ids'])} "
            f"tokens failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(result_path.read_text())


def prompt_token_ids(tokenizer, texts, length: int) -> list[int]:
    """The first ``length`` tokens of ``texts`` (documents, in order) joined by blank lines; ``ValueError`` when
    all of them hold fewer tokens."""
    joined = None
    for text in texts:
        joined = text if joined is None else f"{joined}\n\n{text}"
        ids = tokenizer(joined).input_ids  # the whole join, so tokens across a document boundary merge as usual
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(
        f"the prompt documents hold {0 if joined is None else len(ids)} tokens, fewer than the prompt length {length}"
    )


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_checkpoint_benchmark(
    model_name_or_path: str,
    prompt_lens: list[int],
    new_tokens: int,
    texts,
    dense_model_name_or_path: str | None = None,
    repeats: int = 1,
    dtype: str = "float32",
    threads: int | None = None,
    show_tokens: int = 20,
    progress: bool = True,
) -> tuple[list[dict], list[dict], dict]:
    """Generation from real prompts with a real FMT checkpoint against a dense model (see :data:`METHODS_CHECKPOINT`).

    The FMT checkpoint runs under FMA with an FMTCache. The dense side, loaded with ``attn_implementation="sdpa"``
    and so generating with a DynamicCache, is ``dense_model_name_or_path`` (e.g. the Llama it was converted from) or
    by default the same FMT weights (a converted FMT under sdpa computes its source model's function).
    Every (repeat, prompt length, model) runs in its own subprocess, one after the other, FMT and dense alternating
    which goes first. Returns (rows: one per run, summary: medians and ratios per prompt length, meta).
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    if not prompt_lens or min(prompt_lens) < 1:
        raise ValueError(f"prompt_lens must be positive token counts, got {prompt_lens}")
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be at least 2 (decoding speed is measured after the first), got {new_tokens}"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if (
        dense_model_name_or_path is not None
        and AutoTokenizer.from_pretrained(dense_model_name_or_path).get_vocab() != tokenizer.get_vocab()
    ):
        raise ValueError(
            f"dense_model_name_or_path {dense_model_name_or_path} has another tokenizer than "
            f"{model_name_or_path}: the two models must read the same prompt ids"
        )
    prompt = prompt_token_ids(tokenizer, texts, max(prompt_lens))
    models = {"fmt": (model_name_or_path, None), "dense": (dense_model_name_or_path or model_name_or_path, "sdpa")}
    runs = [
        (repeat, length, name)
        for repeat in range(repeats)
        for length in prompt_lens
        for name in (("fmt", "dense") if repeat % 2 == 0 else ("dense", "fmt"))
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as folder:
        for repeat, length, name in tqdm(runs, desc="generate runs", disable=not progress):
            path, implementation = models[name]
            spec = {
                "model_name_or_path": path,
                "attn_implementation": implementation,
                "prompt_ids": prompt[:length],
                "new_tokens": new_tokens,
                "dtype": dtype,
                "threads": threads,
            }
            neighbours = CpuNeighbours().start()
            result = _generate_in_subprocess(spec, Path(folder))
            rows.append(
                {
                    "model": name,
                    "model_name_or_path": path,
                    "prompt_len": length,
                    "repeat": repeat,
                    **result,
                    "other_cores": neighbours.stop(),
                }
            )
    summary = []
    for length in prompt_lens:
        entry = {"prompt_len": length}
        for name in models:
            mine = [row for row in rows if row["model"] == name and row["prompt_len"] == length]
            for key in (
                "ttft_s",
                "decode_tokens_per_s",
                "cache_bytes",
                "weights_rss_bytes",
                "peak_rss_bytes",
                "other_cores",
            ):
                entry[f"{name}_{key}"] = _median([row[key] for row in mine])
            entry[f"{name}_text"] = tokenizer.decode(mine[0]["generated_ids"][:show_tokens])
            entry[f"{name}_ids"] = mine[0]["generated_ids"]
        entry["ttft_speedup"] = entry["dense_ttft_s"] / entry["fmt_ttft_s"]
        fmt_rate, dense_rate = entry["fmt_decode_tokens_per_s"], entry["dense_decode_tokens_per_s"]
        entry["decode_speedup"] = fmt_rate / dense_rate if fmt_rate and dense_rate else None
        entry["cache_ratio"] = entry["dense_cache_bytes"] / entry["fmt_cache_bytes"]
        entry["peak_rss_ratio"] = entry["dense_peak_rss_bytes"] / entry["fmt_peak_rss_bytes"]
        entry["same_leading_tokens"] = _leading_agreement(entry["fmt_ids"], entry["dense_ids"])
        summary.append(entry)
    meta = {
        "system": system_info(),
        "methods": METHODS_CHECKPOINT,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "dtype": dtype,
        "threads": threads,
        "models": {
            name: {"model_name_or_path": path, "attn_implementation": implementation}
            for name, (path, implementation) in models.items()
        },
    }
    return rows, summary, meta


def format_checkpoint_table(summary: list[dict]) -> str:
    """A markdown table: per prompt length, FMT and dense (medians over repeats), then FMT's gain as ratios."""
    mib = 2**20
    lines = [
        (
            "| prompt tokens | model | TTFT (s) | decode (tok/s) | cache (MiB) | peak RSS (MiB) | weights RSS (MiB) "
            "| other cores |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    for s in summary:
        for name, label in (("fmt", "FMT (FMTCache)"), ("dense", "dense (DynamicCache)")):
            lines.append(
                f"| {s['prompt_len']} | {label} | {number(s[f'{name}_ttft_s'], 2)} | "
                f"{number(s[f'{name}_decode_tokens_per_s'], 2)} | {s[f'{name}_cache_bytes'] / mib:.1f} | "
                f"{s[f'{name}_peak_rss_bytes'] / mib:.0f} | {s[f'{name}_weights_rss_bytes'] / mib:.0f} | "
                f"{number(s[f'{name}_other_cores'], 2)} |"
            )
        decode = "-" if s["decode_speedup"] is None else f"{s['decode_speedup']:.2f}x"
        lines.append(
            f"| {s['prompt_len']} | FMT gain | {s['ttft_speedup']:.2f}x | {decode} | "
            f"{s['cache_ratio']:.1f}x | {s['peak_rss_ratio']:.2f}x | | |"
        )
    return "\n".join(lines)


def format_batch_table(rows: list[dict]) -> str:
    lines = [
        f"{'batch':>6} {'FMT ms/step':>12} {'dense ms/step':>14} {'FMT tok/s':>10} {'dense tok/s':>12} "
        f"{'FMT step / batch-' + str(rows[0]['batch']):>20}"
    ]
    for r in rows:
        lines.append(
            f"{r['batch']:>6} {r['fmt_ms']:>12.1f} {r['dense_ms']:>14.1f} {r['fmt_tokens_per_s']:>10.0f} "
            f"{r['dense_tokens_per_s']:>12.0f} {r['fmt_step_vs_batch_1']:>19.1f}x"
        )
    return "\n".join(lines)


def format_decode_table(rows: list[dict]) -> str:
    lines = [
        f"{'context':>8} {'FMT ms/tok':>11} {'dense ms/tok':>13} {'speedup':>8} {'FMT cache':>10} "
        f"{'dense cache':>12} {'smaller':>8} {'other cores':>12}"
    ]
    for r in rows:
        other = "-" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        lines.append(
            f"{r['context']:>8} {r['fmt_ms']:>11.1f} {r['dense_ms']:>13.1f} {r['speedup']:>7.1f}x "
            f"{r['fmt_cache_bytes'] / 2**20:>8.2f}MB {r['dense_cache_bytes'] / 2**20:>10.1f}MB "
            f"{r['cache_ratio']:>7.1f}x {other:>12}"
        )
    return "\n".join(lines)


def plot_decode(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [r["context"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.loglog(contexts, [r["fmt_ms"] for r in rows], "o-", label="FMT (FMTCache)")
    left.loglog(contexts, [r["dense_ms"] for r in rows], "s-", label="dense SDPA (DynamicCache)")
    left.set(xlabel="context (tokens)", ylabel="ms per decoded token", title="decoding step")
    right.loglog(contexts, [r["fmt_cache_bytes"] / 2**20 for r in rows], "o-", label="FMT (FMTCache)")
    right.loglog(contexts, [r["dense_cache_bytes"] / 2**20 for r in rows], "s-", label="dense (DynamicCache)")
    right.set(xlabel="context (tokens)", ylabel="cache MiB", title="KV cache size")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _subprocess_main(argv: list[str]) -> None:
    """``python -m benchmarks.generate SPEC RESULT``: :func:`generate_once` on the JSON spec, result to RESULT."""
    spec_path, result_path = argv
    result = generate_once(**json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _subprocess_main(sys.argv[1:])
