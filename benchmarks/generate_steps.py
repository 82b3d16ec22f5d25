"""Per-token decoding cost of FMT's multilevel cache against the same weights with dense attention: the decoding-step
and batch-throughput modes of ``scripts/bench_generate.py``.

For each context length n, one model -- by default the shape of SmolLM2-135M (hidden 576, 30 layers, 9 query / 3
key-value heads, head dim 64), random weights -- decodes single tokens after n cached tokens twice over, interleaved:
under FMA with an :class:`~fmt_hf.FMTCache`, and under ``attn_implementation="sdpa"`` with transformers'
``DynamicCache``.

How the numbers are taken (also written into the result files, see :data:`METHODS`):

* **caches** -- neither is built by a prefill (minutes per length on two cores). A decode step's cost does not
  depend on what the cache holds, only on its shape, so the dense cache is filled with random key/value tensors of
  the right size ``(1, kv_heads, n, head_dim)`` per layer, and each FMT state is a random state of the right
  structure with ``length = n`` (its shape is the same at every n; ``n`` sets only which slots the step's masks
  select). Exactness of real prefills and steps is covered by ``tests/test_cache_fmt.py``.
* **time** -- wall clock of one ``model(next_token, cache=...)`` call under ``torch.no_grad()``; FMT and dense
  alternate, ``steps`` calls each after one untimed warm-up, and the median is reported.
* **threads** -- each row ran under one ``torch.set_num_threads`` count; several counts take turns step by step on
  the same caches (so each count's context is a few tokens longer than the last's), and the count in force before
  the run is restored after it.
* **bytes** -- FMT: :attr:`FMTCache.nbytes` (every state tensor); dense: the key and value tensors held.

:func:`run_batch_benchmark` instead measures decoding throughput by batch size after a real prefill (METHODS_BATCH).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from transformers import DynamicCache

from fmt_hf import FMTCache, FMTConfig, FMTForCausalLM
from fmt_hf.model.cache_fmt import is_fmt_cache

from .measure import CpuNeighbours, system_info

METHODS = {
    "caches": "random tensors of the right shape: dense DynamicCache (1, kv_heads, n, head_dim) per layer; FMT "
    "states of length n (their size does not depend on n); no prefill",
    "time": "wall clock of one single-token forward under no_grad; FMT and dense interleaved after one warm-up "
    "each; median over the steps",
    "threads": "torch.set_num_threads per row; several counts interleaved step by step on the same caches",
    "bytes": "FMT: every tensor of every layer's state; dense: key + value tensors",
}


METHODS_BATCH = {
    "caches": "real prefills: a batch of random prompts of prompt_len tokens through model(..., use_cache=True); FMT "
    "with FMTCache, dense SDPA with DynamicCache",
    "time": "wall clock of `steps` consecutive single-token forwards under no_grad (one whole fine block: every row "
    "completes one block in it), divided by steps; every (threads, implementation, batch) triple in turn, rotating "
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
        levels = fma.partition.levels_for(length + 1)  # derived families (§7a) gain their levels as they decode
        state.grow_levels(levels)
        if fma.refine_groups:  # a store of every complete block (§3c), as a prefill would leave it
            state.grow_store(length // fma.block_size, fma.block_size)
        state = state.map_tensors(
            lambda t: (
                t
                if t.dtype == torch.bool
                # validity flags stay "all real"
                else torch.randn(t.shape, generator=generator, dtype=t.dtype)
            )
        )
        for name in ("store_valid", "store_available", "store_groups_valid"):  # the store's, empty ones False
            setattr(state, name, torch.ones_like(getattr(state, name)))
        # What `FMTCacheLayer.attend` would have left after `length` tokens of a batch of one.
        cache_layer.state = dataclasses.replace(state, lengths=[length], levels=[state.num_levels])
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


def cache_bytes(cache) -> int:
    """Bytes of every tensor a generation cache holds: an FMTCache's states or a DynamicCache's keys and values."""
    return cache.nbytes if is_fmt_cache(cache) else dense_cache_bytes(cache)


MODEL_FIELDS = (
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
"""The config fields a result file records of the benchmarked model."""


def thread_counts(threads: list[int] | None) -> list[int]:
    """The thread counts a benchmark runs under: ``threads``, or torch's current count when None."""
    return [torch.get_num_threads()] if threads is None else list(threads)


def _step_seconds(model: FMTForCausalLM, implementation: str, cache, token: torch.Tensor, position: int):
    """Time one decoding step; returns (seconds, cache after the step)."""
    model.set_attn_implementation(implementation)
    position_ids = torch.tensor([[position]])
    start = time.perf_counter()
    out = model(token, cache=cache, position_ids=position_ids, use_cache=True)
    return time.perf_counter() - start, out.cache


@torch.no_grad()
def run_decode_benchmark(
    lengths: list[int],
    steps: int = 8,
    config: FMTConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: list[int] | None = None,
) -> tuple[list[dict], dict]:
    """Median per-token decoding time and cache bytes of FMT and dense attention at each context length, one row per
    length and thread count (``threads`` None: torch's current count)."""
    from tqdm.auto import tqdm

    counts, restore = thread_counts(threads), torch.get_num_threads()
    decoded = len(counts) * (steps + 1)  # tokens each cache takes
    if config is None:
        config = smollm2_shaped_config(max(lengths) + decoded)
    if max(lengths) + decoded > config.max_position_embeddings:
        raise ValueError(
            f"lengths up to {max(lengths)} plus {decoded} decoding steps ({len(counts)} thread counts x {steps + 1}) "
            f"exceed max_position_embeddings={config.max_position_embeddings}"
        )
    torch.manual_seed(seed)
    model = FMTForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    bar = tqdm(total=len(lengths) * 2 * decoded, desc="decode steps", disable=not progress)
    try:
        for length in lengths:
            caches = {
                "fma": filled_fmt_cache(model, length, generator),
                "sdpa": filled_dense_cache(model, length, generator),
            }
            held = {name: cache_bytes(cache) for name, cache in caches.items()}
            times = {(count, implementation): [] for count in counts for implementation in ("fma", "sdpa")}
            neighbours = CpuNeighbours().start()
            position = length
            for step in range(steps + 1):  # step 0 warms up
                for count in counts:
                    torch.set_num_threads(count)
                    order = ("fma", "sdpa") if step % 2 else ("sdpa", "fma")
                    for implementation in order:
                        token = torch.randint(0, config.vocab_size, (1, 1), generator=generator)
                        seconds, caches[implementation] = _step_seconds(
                            model, implementation, caches[implementation], token, position
                        )
                        if step:
                            times[count, implementation].append(seconds)
                        bar.update()
                    position += 1
            other_cores = neighbours.stop()
            for count in counts:
                fma_s, dense_s = (statistics.median(times[count, name]) for name in ("fma", "sdpa"))
                rows.append(
                    {
                        "context": length,
                        "threads": count,
                        "fmt_ms": 1e3 * fma_s,
                        "dense_ms": 1e3 * dense_s,
                        "speedup": dense_s / fma_s,
                        "fmt_cache_bytes": held["fma"],
                        "dense_cache_bytes": held["sdpa"],
                        "cache_ratio": held["sdpa"] / held["fma"],
                        "other_cores": other_cores,
                    }
                )
            del caches
    finally:
        torch.set_num_threads(restore)
    bar.close()
    meta = {
        "system": system_info(),
        "methods": METHODS,
        "steps": steps,
        "model": {name: getattr(config, name) for name in MODEL_FIELDS},
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
    threads: list[int] | None = None,
) -> tuple[list[dict], dict]:
    """Per-step decoding time and tokens per second of FMT and dense attention at each batch size and thread count
    (``threads`` None: torch's current count), after a real prefill of ``prompt_len`` tokens per row (see
    :data:`METHODS_BATCH`)."""
    from tqdm.auto import tqdm

    counts, restore = thread_counts(threads), torch.get_num_threads()
    rounds = repeats * len(counts)  # every thread count decodes on from the same caches
    if prompt_len + rounds * steps + 1 > config.max_position_embeddings:
        raise ValueError(
            f"prompt_len={prompt_len} plus {rounds} x {steps} steps ({repeats} repeats x {len(counts)} thread "
            f"counts) exceed max_position_embeddings={config.max_position_embeddings}"
        )
    torch.manual_seed(seed)
    model = FMTForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    prefills = [(implementation, batch) for batch in batch_sizes for implementation in ("fma", "sdpa")]
    runs = [(count, implementation, batch) for count in counts for implementation, batch in prefills]
    caches, tokens = {}, {}
    for implementation, batch in tqdm(prefills, desc="prefills", disable=not progress):
        model.set_attn_implementation(implementation)
        ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=generator)
        out = model(ids, use_cache=True, logits_to_keep=1)
        caches[implementation, batch], tokens[implementation, batch] = out.cache, out.logits[:, -1:].argmax(-1)
    times = {run: [] for run in runs}
    neighbours = CpuNeighbours().start()
    try:
        for repeat in tqdm(range(repeats), desc="repeats", disable=not progress):
            shift = repeat % len(runs)
            for count, implementation, batch in runs[shift:] + runs[:shift]:
                torch.set_num_threads(count)
                model.set_attn_implementation(implementation)
                cache, token = caches[implementation, batch], tokens[implementation, batch]
                start = time.perf_counter()
                for _ in range(steps):
                    out = model(token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                times[count, implementation, batch].append((time.perf_counter() - start) / steps)
                caches[implementation, batch], tokens[implementation, batch] = cache, token
    finally:
        torch.set_num_threads(restore)
    other_cores = neighbours.stop()
    rows = []
    for count in counts:
        batch_rows = []
        for batch in batch_sizes:
            fma_s, dense_s = (statistics.median(times[count, name, batch]) for name in ("fma", "sdpa"))
            batch_rows.append(
                {
                    "threads": count,
                    "batch": batch,
                    "fmt_ms": 1e3 * fma_s,
                    "dense_ms": 1e3 * dense_s,
                    "fmt_tokens_per_s": batch / fma_s,
                    "dense_tokens_per_s": batch / dense_s,
                }
            )
        for row in batch_rows:
            row["fmt_step_vs_batch_1"] = row["fmt_ms"] / batch_rows[0]["fmt_ms"]
        rows += batch_rows
    meta = {
        "system": system_info(),
        "methods": METHODS_BATCH,
        "prompt_len": prompt_len,
        "steps": steps,
        "repeats": repeats,
        "other_cores": other_cores,
        "model": {name: getattr(config, name) for name in MODEL_FIELDS},
    }
    return rows, meta


def format_batch_table(rows: list[dict]) -> str:
    lines = [
        f"{'threads':>7} {'batch':>6} {'FMT ms/step':>12} {'dense ms/step':>14} {'FMT tok/s':>10} {'dense tok/s':>12} "
        f"{'FMT step / batch-' + str(rows[0]['batch']):>20}"
    ]
    for r in rows:
        lines.append(
            f"{r['threads']:>7} {r['batch']:>6} {r['fmt_ms']:>12.1f} {r['dense_ms']:>14.1f} "
            f"{r['fmt_tokens_per_s']:>10.0f} {r['dense_tokens_per_s']:>12.0f} {r['fmt_step_vs_batch_1']:>19.1f}x"
        )
    return "\n".join(lines)


def format_decode_table(rows: list[dict]) -> str:
    lines = [
        f"{'context':>8} {'threads':>7} {'FMT ms/tok':>11} {'dense ms/tok':>13} {'speedup':>8} {'FMT cache':>10} "
        f"{'dense cache':>12} {'smaller':>8} {'other cores':>12}"
    ]
    for r in rows:
        other = "-" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        lines.append(
            f"{r['context']:>8} {r['threads']:>7} {r['fmt_ms']:>11.1f} {r['dense_ms']:>13.1f} {r['speedup']:>7.1f}x "
            f"{r['fmt_cache_bytes'] / 2**20:>8.2f}MB {r['dense_cache_bytes'] / 2**20:>10.1f}MB "
            f"{r['cache_ratio']:>7.1f}x {other:>12}"
        )
    return "\n".join(lines)


def plot_decode(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["threads"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for count in counts:
        of_count = [r for r in rows if r["threads"] == count]
        contexts, threads = [r["context"] for r in of_count], f", {count} threads" if len(counts) > 1 else ""
        left.loglog(contexts, [r["fmt_ms"] for r in of_count], "o-", label=f"FMT (FMTCache){threads}")
        left.loglog(contexts, [r["dense_ms"] for r in of_count], "s-", label=f"dense SDPA (DynamicCache){threads}")
    left.set(xlabel="context (tokens)", ylabel="ms per decoded token", title="decoding step")
    sizes = [r for r in rows if r["threads"] == counts[0]]  # the caches are the same whatever the threads
    contexts = [r["context"] for r in sizes]
    right.loglog(contexts, [r["fmt_cache_bytes"] / 2**20 for r in sizes], "o-", label="FMT (FMTCache)")
    right.loglog(contexts, [r["dense_cache_bytes"] / 2**20 for r in sizes], "s-", label="dense (DynamicCache)")
    right.set(xlabel="context (tokens)", ylabel="cache MiB", title="KV cache size")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
