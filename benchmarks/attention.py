"""Timing and FLOP accounting for FastMultipoleAttention against dense PyTorch SDPA: the sweep, and the command of
``scripts/bench_attention.py`` (:class:`AttentionBenchArguments`, :func:`bench_attention`).

The speed/memory part of ``scripts/demo_attention.py`` runs the same sweep (:func:`run_benchmark`); its table, plot
and files are ``benchmarks.attention_report``'s.

How the numbers are taken (also written into every result file, see :data:`METHODS`):

* **time** -- wall clock (``time.perf_counter``) of one call: forward under ``torch.no_grad()``, or forward
  plus ``out.backward(grad)`` with a fixed random ``grad`` on ``requires_grad`` inputs. Per cell (length,
  mode, pass) FMA and SDPA alternate (FMA, SDPA, SDPA, FMA, FMA, SDPA, ...) after one untimed warm-up call
  each, and the median is reported. FMA layers with other downsamplers (``compare_downsample``, e.g. recursive
  against depthwise) join the same alternation as implementations ``fma_<family>``, with their time relative
  to the main FMA's. An implementation stops repeating at ``repeats`` samples, or earlier
  once it has ``min_repeats`` samples *and* has spent ``budget_s`` seconds in the cell -- so dense attention
  at 64K gets one or two samples while FMA keeps its full count. A warm-up call that alone takes longer than
  ``budget_s`` is itself counted as a sample (a first-call overhead is negligible at that size).
* **peak memory** -- the warm-up call runs under ``benchmarks.measure.measure_peak_memory``: bytes PyTorch's CPU
  allocator held beyond what was live before the call (inputs and parameters excluded; outputs, saved activations
  and gradients included).
* **FLOPs** -- only the logits and weighted sums FMA needs: ``2d`` (``d`` multiply-adds) per (query, key
  slot) pair for ``q.k`` and again for ``p.v``, i.e. ``4 * B * H * d * pairs``, with per-query slots ``2m + 2pL``
  causal or ``3m + 3pL`` bidirectional for fine queries (``L`` = coarse levels used at that length; masked
  slots of the diagonal block counted, the downsampling convolutions not). Forward+backward counts 3x the
  forward (each forward matmul has two gradient matmuls). Achieved GFLOP/s is set against the median rate of a
  large float matmul timed in the same run.
* **others** -- cores kept busy by other processes during each cell (``benchmarks.measure.CpuNeighbours``).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from fmt_hf.model.fma_attention import FastMultipoleAttention
from fmt_hf.model.fma_downsample import DOWNSAMPLE_MODES
from fmt_hf.model.fma_partition import num_levels

from .attention_report import format_table, plot_results, write_results
from .measure import DTYPES, CpuNeighbours, matmul_rate, measure_peak_memory, system_info

MODES = ("causal", "bidir")
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("fma", "sdpa")

METHODS = {
    "time": "wall clock of one call (forward under no_grad, or forward + backward(random grad)); FMA and SDPA "
    "interleaved after one untimed warm-up each; median of the samples",
    "memory": "peak bytes held by PyTorch's CPU allocator during one call beyond what was live before it "
    "(torch.profiler profile_memory events replayed in order; inputs excluded, outputs/activations/"
    "grads included)",
    "flops": "FMA: 4*B*H*d per (query, key slot) pair, slots 2m+2pL causal / 3m+3pL bidir per fine query "
    "(L = levels used at n), downsampling excluded; fwd+bwd = 3x fwd. SDPA (csv/json only): "
    "4*B*H*d*n^2 bidir, 4*B*H*d*n(n+1)/2 causal",
}


@dataclass
class BenchConfig:
    """What one sweep measures. Defaults: batch 1, 8 heads, d = 64, fp32, m = 64, p = 4."""

    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    block_size: int = 64
    coarse_tokens: int = 4
    query_mode: str = "fine"
    downsample: str = "depthwise"
    # other FMA downsample families timed in the same cells, interleaved with the main one (implementations
    # "fma_<family>"), e.g. ("recursive",) against downsample="depthwise"
    compare_downsample: tuple[str, ...] = ()
    sink_tokens: int = 0
    refine_groups: int = 0  # adaptive refinement (docs/fma.md §3c)
    repeats: int = 5
    min_repeats: int = 1
    budget_s: float = 30.0
    sdpa_max_n: int | None = None  # skip dense attention above this length (None: never skip)
    seed: int = 0


# ---------------------------------------------------------------------------------------------- FLOP counts


def fma_pairs(
    n: int,
    block_size: int,
    coarse_tokens: int,
    causal: bool,
    query_mode: str = "fine",
    sink_tokens: int = 0,
    refine_groups: int = 0,
) -> int:
    """(query, key slot) pairs FMA evaluates per head at length ``n`` (see module docstring); with refinement, at most
    ``refine_groups * (m + (L-1) p)`` more per query (picks and the summaries replacing their slots), and the 2n/m
    bounds each query scores counted as pairs too."""
    per_group = 2 if causal else 3  # fine blocks per query, and coarse groups per query per level
    levels = num_levels(n, block_size)
    pairs = n * (per_group * block_size + sink_tokens)
    if refine_groups:
        pairs += n * (refine_groups * (block_size + max(levels - 1, 0) * coarse_tokens) + 2 * n // block_size)
    for level in range(1, levels + 1):
        width = block_size << (level - 1)
        queries = n if query_mode == "fine" else n * coarse_tokens // width
        pairs += queries * per_group * coarse_tokens
    return pairs


def fma_flops(n: int, cfg: BenchConfig, causal: bool, backward: bool) -> float:
    fwd = (
        4.0
        * cfg.batch
        * cfg.heads
        * cfg.head_dim
        * fma_pairs(n, cfg.block_size, cfg.coarse_tokens, causal, cfg.query_mode, cfg.sink_tokens, cfg.refine_groups)
    )
    return 3.0 * fwd if backward else fwd


def dense_flops(n: int, cfg: BenchConfig, causal: bool, backward: bool) -> float:
    pairs = n * (n + 1) / 2 if causal else float(n) * n
    fwd = 4.0 * cfg.batch * cfg.heads * cfg.head_dim * pairs
    return 3.0 * fwd if backward else fwd


# ---------------------------------------------------------------------------------------------- measurement


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def implementations(cfg: BenchConfig) -> list[str]:
    """What one sweep times: the main FMA, one FMA per ``compare_downsample`` family, dense SDPA."""
    return ["fma"] + [f"fma_{family}" for family in cfg.compare_downsample] + ["sdpa"]


class _Cell:
    """Inputs and the callables (one per implementation) for one (length, mode, pass)."""

    def __init__(self, n: int, cfg: BenchConfig, causal: bool, backward: bool):
        torch.manual_seed(cfg.seed)
        dtype = DTYPES[cfg.dtype]
        shape = (cfg.batch, cfg.heads, n, cfg.head_dim)
        self.q, self.k, self.v = (torch.randn(shape, dtype=dtype).requires_grad_(backward) for _ in range(3))
        self.grad = torch.randn(shape, dtype=dtype) if backward else None
        families = {"fma": cfg.downsample, **{f"fma_{family}": family for family in cfg.compare_downsample}}
        self.attns = {
            impl: FastMultipoleAttention(
                cfg.head_dim,
                n,
                block_size=cfg.block_size,
                coarse_tokens=cfg.coarse_tokens,
                causal=causal,
                downsample=family,
                query_mode=cfg.query_mode,
                sink_tokens=cfg.sink_tokens,
                refine_groups=cfg.refine_groups,
            ).to(dtype)
            for impl, family in families.items()
        }
        self.causal, self.backward = causal, backward

    def _forward(self, impl: str) -> torch.Tensor:
        if impl in self.attns:
            return self.attns[impl](self.q, self.k, self.v)
        return F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal)

    def reset(self) -> None:
        """Untimed: drop gradients from the previous call so every call allocates the same way."""
        for t in (self.q, self.k, self.v):
            t.grad = None
        for attn in self.attns.values():
            attn.zero_grad(set_to_none=True)
        gc.collect()

    def call(self, impl: str) -> None:
        if self.backward:
            self._forward(impl).backward(self.grad)
        else:
            with torch.no_grad():
                self._forward(impl)


def _measure_cell(n: int, mode: str, pass_: str, cfg: BenchConfig, status: Callable[[str], None]) -> dict:
    causal, backward = mode == "causal", pass_ == "fwd+bwd"
    cell = _Cell(n, cfg, causal, backward)
    impls = [i for i in implementations(cfg) if i != "sdpa" or cfg.sdpa_max_n is None or n <= cfg.sdpa_max_n]
    times: dict[str, list[float]] = {i: [] for i in impls}
    spent = dict.fromkeys(impls, 0.0)
    peak: dict[str, int] = {}
    warmup_counted = dict.fromkeys(impls, False)
    for impl in impls:  # warm-up doubles as the memory measurement
        status(f"n={n} {mode} {pass_} {impl} warm-up+memory")
        cell.reset()
        peak[impl], elapsed = measure_peak_memory(partial(cell.call, impl))
        spent[impl] += elapsed
        if elapsed >= cfg.budget_s:
            times[impl].append(elapsed)
            warmup_counted[impl] = True

    def done(impl: str) -> bool:
        count = len(times[impl])
        return count >= cfg.repeats or (count >= cfg.min_repeats and spent[impl] >= cfg.budget_s)

    round_ = 0
    while not all(done(i) for i in impls):
        order = impls if round_ % 2 == 0 else impls[::-1]
        for impl in order:
            if done(impl):
                continue
            status(f"n={n} {mode} {pass_} {impl} rep {len(times[impl]) + 1}")
            cell.reset()
            elapsed = _timed(partial(cell.call, impl))
            times[impl].append(elapsed)
            spent[impl] += elapsed
        round_ += 1
    cell = None  # drop this cell's tensors before the next one is allocated
    gc.collect()

    row = {
        "n": n,
        "mode": mode,
        "pass": pass_,
        "levels": num_levels(n, cfg.block_size),
        "fma_flops": fma_flops(n, cfg, causal, backward),
        "sdpa_flops": dense_flops(n, cfg, causal, backward),
    }
    for impl in implementations(cfg):
        samples = times.get(impl, [])
        row[f"{impl}_times_s"] = samples
        row[f"{impl}_median_s"] = statistics.median(samples) if samples else None
        row[f"{impl}_peak_bytes"] = peak.get(impl)
        row[f"{impl}_warmup_counted"] = warmup_counted.get(impl, False)
        if impl in IMPLS:
            row[f"{impl}_gflops"] = row[f"{impl}_flops"] / row[f"{impl}_median_s"] / 1e9 if samples else None
        else:  # another downsampler: its time relative to the main FMA's
            row[f"ratio_{impl}_over_fma"] = row[f"{impl}_median_s"] / row["fma_median_s"]
    row["ratio_sdpa_over_fma"] = (
        row["sdpa_median_s"] / row["fma_median_s"] if row["sdpa_median_s"] is not None else None
    )
    return row


def run_benchmark(
    lengths: Iterable[int],
    modes: Iterable[str] = ("causal",),
    passes: Iterable[str] = PASSES,
    cfg: BenchConfig | None = None,
    *,
    matmul_size: int = 2048,
    matmul_repeats: int = 5,
    progress: bool = True,
    desc: str = "bench",
) -> tuple[list[dict], dict]:
    """Measure every (length, mode, pass) cell; return (rows, metadata).

    The matmul rate is sampled before and after the sweep (the machine may be shared and noisy) and its pooled
    median is the reference for FMA's fraction of peak.
    """
    from tqdm.auto import tqdm

    cfg = cfg or BenchConfig()
    lengths, modes, passes = list(lengths), list(modes), list(passes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for pass_ in passes:
        if pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if not 1 <= cfg.min_repeats <= cfg.repeats:
        raise ValueError(f"need 1 <= min_repeats <= repeats, got {cfg.min_repeats} and {cfg.repeats}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    for family in (cfg.downsample, *cfg.compare_downsample):
        if family not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {family!r}")
    dtype = DTYPES[cfg.dtype]
    cells = [(n, mode, pass_) for n in lengths for mode in modes for pass_ in passes]
    neighbours = CpuNeighbours().start()
    bar = tqdm(total=len(cells) + 2, desc=desc, disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str(f"matmul {matmul_size}^3")
    matmul = matmul_rate(matmul_size, matmul_repeats, dtype)
    bar.update()
    rows = []
    for n, mode, pass_ in cells:
        cell_neighbours = CpuNeighbours().start()
        rows.append(_measure_cell(n, mode, pass_, cfg, bar.set_postfix_str))
        rows[-1]["other_cores"] = cell_neighbours.stop()
        bar.update()
    bar.set_postfix_str(f"matmul {matmul_size}^3")
    matmul_after = matmul_rate(matmul_size, matmul_repeats, dtype)
    bar.update()
    bar.close()
    matmul_gflops = statistics.median(matmul + matmul_after)
    for row in rows:
        row["fma_fraction_of_matmul"] = row["fma_gflops"] / matmul_gflops
    meta = {
        "config": asdict(cfg),
        "system": {**system_info(), "other_cores": neighbours.stop()},
        "methods": METHODS,
        "matmul": {
            "size": matmul_size,
            "dtype": cfg.dtype,
            "gflops_before": matmul,
            "gflops_after": matmul_after,
            "gflops_median": matmul_gflops,
        },
    }
    return rows, meta


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class AttentionBenchArguments:
    """The command line of ``scripts/bench_attention.py``: the sweep's lengths, modes and passes, and a
    :class:`BenchConfig`."""

    lengths: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768, 65536], metadata={"help": "sequence lengths n"}
    )
    modes: list[str] = field(
        default_factory=lambda: list(MODES), metadata={"choices": MODES, "help": "attention modes"}
    )
    passes: list[str] = field(
        default_factory=lambda: list(PASSES), metadata={"choices": PASSES, "help": "what one timed call does"}
    )
    repeats: int = field(default=5, metadata={"help": "timed samples per implementation and cell (at most)"})
    min_repeats: int = field(default=1, metadata={"help": "samples always taken, even when one call exceeds --budget"})
    budget: float = field(
        default=30.0,
        metadata={"help": "seconds per implementation and cell after which repeating stops (once --min_repeats)"},
    )
    sdpa_max_n: int | None = field(default=None, metadata={"help": "skip SDPA above this length; unset: never"})
    batch: int = field(default=1, metadata={"help": "batch size"})
    heads: int = field(default=8, metadata={"help": "attention heads (K/V heads too)"})
    head_dim: int = field(default=64, metadata={"help": "d"})
    dtype: str = field(default="float32", metadata={"choices": list(DTYPES), "help": "inputs and the matmul reference"})
    block_size: int = field(default=64, metadata={"help": "FMA m"})
    coarse_tokens: int = field(default=4, metadata={"help": "FMA p"})
    query_mode: str = field(default="fine", metadata={"choices": ["fine", "coarse"], "help": "FMA query_mode"})
    downsample: str = field(
        default="depthwise",
        metadata={"choices": DOWNSAMPLE_MODES, "help": "FMA downsample (learned ones at their average init)"},
    )
    compare_downsample: list[str] = field(
        default_factory=list,
        metadata={
            "choices": DOWNSAMPLE_MODES,
            "help": "also time FMA with these downsamplers, interleaved with --downsample in every cell, and report "
            "their time relative to it (e.g. --downsample depthwise --compare_downsample recursive); --sdpa_max_n 0 "
            "leaves dense attention out",
        },
    )
    sink_tokens: int = field(default=0, metadata={"help": "FMA sink tokens s (docs/fma.md §3a)"})
    refine_groups: int = field(
        default=0, metadata={"help": "FMA adaptive refinement k (docs/fma.md §3c: far blocks each query reads exactly)"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads; unset: torch's default"})
    matmul_size: int = field(default=2048, metadata={"help": "square matmul timed for the machine's rate"})
    seed: int = field(default=0, metadata={"help": "seed for inputs"})
    out: str = field(
        default="outputs/bench_attention.png",
        metadata={"help": "plot path; <stem>.csv and <stem>.json are written beside it"},
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})

    def bench_config(self) -> BenchConfig:
        return BenchConfig(
            batch=self.batch,
            heads=self.heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            block_size=self.block_size,
            coarse_tokens=self.coarse_tokens,
            query_mode=self.query_mode,
            downsample=self.downsample,
            compare_downsample=tuple(self.compare_downsample),
            sink_tokens=self.sink_tokens,
            refine_groups=self.refine_groups,
            repeats=self.repeats,
            min_repeats=self.min_repeats,
            budget_s=self.budget,
            sdpa_max_n=self.sdpa_max_n,
            seed=self.seed,
        )


def bench_attention(args: AttentionBenchArguments) -> tuple[list[dict], dict]:
    """Run the sweep, print its table, write the plot, CSV and JSON; return (rows, metadata)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = args.bench_config()
    rows, meta = run_benchmark(
        args.lengths,
        args.modes,
        args.passes,
        cfg,
        matmul_size=args.matmul_size,
        progress=not args.no_progress,
        desc="bench_attention",
    )
    print(format_table(rows, meta))
    png = plot_results(
        rows,
        args.out,
        title=f"FMA (m={cfg.block_size}, p={cfg.coarse_tokens}, {cfg.query_mode} queries) vs dense SDPA, "
        f"{cfg.dtype}, {meta['system']['threads']} threads",
    )
    csv_path, json_path = write_results(rows, meta, png)
    print(f"\nwrote {png}, {csv_path}, {json_path}")
    return rows, meta
