"""Timing, peak-memory and FLOP accounting for FastMultipoleAttention against dense PyTorch SDPA.

The engine behind ``scripts/bench_attention.py`` and the speed/memory part of ``scripts/demo_attention.py``; both
scripts are thin command-line layers over :func:`run_benchmark`, :func:`format_table`, :func:`plot_results`
and :func:`write_results`.

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
* **peak memory** -- the warm-up call runs under ``torch.profiler`` with ``profile_memory=True``; the
  allocator's allocation/free events are replayed in time order and the highest running total is the peak:
  bytes PyTorch's CPU allocator held *beyond what was live before the call* (inputs and parameters excluded;
  outputs, saved activations and gradients included). It is the CPU analogue of
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; it does not see allocator slack,
  the Python heap or library scratch buffers that bypass PyTorch's allocator. (Checked once against the
  ru_maxrss increase of a fresh process for FMA at n = 4096: 165 MiB here, 175-189 MiB RSS.)
* **FLOPs** -- only the logits and weighted sums FMA needs: ``2d`` (``d`` multiply-adds) per (query, key
  slot) pair for ``q.k`` and again for ``p.v``, i.e. ``4 * B * H * d * pairs``, with per-query slots ``2m + 2pL``
  causal or ``3m + 3pL`` bidirectional for fine queries (``L`` = coarse levels used at that length; masked
  slots of the diagonal block counted, the downsampling convolutions not). Forward+backward counts 3x the
  forward (each forward matmul has two gradient matmuls). Achieved GFLOP/s is set against the median rate of a
  large float matmul timed in the same run.
* **others** -- cores kept busy by other processes (and hypervisor steal) during each cell, from /proc/stat
  minus this process's CPU time. On a shared machine it marks the timings to distrust.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

from fmt_hf.model.fma_attention import FastMultipoleAttention
from fmt_hf.model.fma_downsample import DOWNSAMPLE_MODES
from fmt_hf.model.fma_partition import num_levels

MODES = ("causal", "bidir")
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("fma", "sdpa")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
    """What one sweep measures. Defaults are issue 2's benchmark: batch 1, 8 heads, d = 64, fp32, m = 64, p = 4."""

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
    repeats: int = 5
    min_repeats: int = 1
    budget_s: float = 30.0
    sdpa_max_n: int | None = None  # skip dense attention above this length (None: never skip)
    seed: int = 0


# ---------------------------------------------------------------------------------------------- FLOP counts


def fma_pairs(n: int, block_size: int, coarse_tokens: int, causal: bool, query_mode: str = "fine") -> int:
    """(query, key slot) pairs FMA evaluates per head at length ``n`` (see module docstring)."""
    per_group = 2 if causal else 3  # fine blocks per query, and coarse groups per query per level
    levels = num_levels(n, block_size)
    pairs = n * per_group * block_size
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
        * fma_pairs(n, cfg.block_size, cfg.coarse_tokens, causal, cfg.query_mode)
    )
    return 3.0 * fwd if backward else fwd


def dense_flops(n: int, cfg: BenchConfig, causal: bool, backward: bool) -> float:
    pairs = n * (n + 1) / 2 if causal else float(n) * n
    fwd = 4.0 * cfg.batch * cfg.heads * cfg.head_dim * pairs
    return 3.0 * fwd if backward else fwd


# ---------------------------------------------------------------------------------------------- measurement


def matmul_rate(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of ``size x size @ size x size`` (one untimed warm-up, then ``repeats`` samples)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return rates


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (libkineto prints unconditional start/stop lines there)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_peak_memory(call: Callable[[], object]) -> tuple[int, float]:
    """Run ``call`` once under the memory profiler; return (peak allocator bytes above the start, seconds)."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
    finally:
        with _quiet_fd2():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, elapsed


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


def system_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class CpuNeighbours:
    """Average number of cores other processes (and hypervisor steal) kept busy between start() and stop().

    System-wide busy time from /proc/stat minus the CPU time of this process and of its children waited for, over
    wall time (so a benchmark subprocess does not count as a neighbour). ``None`` where /proc/stat is unavailable.
    The benchmark reports it per cell: on a shared machine it says which timings to distrust (with every core given
    to torch threads, one busy neighbour can slow small parallel kernels many-fold).
    """

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return time.process_time() + times.children_user + times.children_system

    def start(self) -> CpuNeighbours:
        self._busy, self._own, self._wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        return self

    def stop(self) -> float | None:
        busy, wall = self._busy_seconds(), time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return None
        return max(0.0, (busy - self._busy - (self._own_seconds() - self._own)) / wall)


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


# ---------------------------------------------------------------------------------------------- reporting


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fmt_mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def format_table(rows: list[dict], meta: dict) -> str:
    """Plain-text table of the sweep plus the conventions behind each column."""
    compared = meta["config"]["compare_downsample"]  # per family: its time, its ratio to FMA, its memory
    header = [
        "n",
        "mode",
        "pass",
        "L",
        "FMA",
        "SDPA",
        "SDPA/FMA",
        "FMA MiB",
        "SDPA MiB",
        "FMA GF/s",
        "% matmul",
        "reps F/S",
        "others",
    ]
    for family in compared:
        header[-1:-1] = [f"FMA {family}", f"{family}/FMA", f"{family} MiB"]
    body = []
    for r in rows:
        extra = []
        for family in compared:
            impl = f"fma_{family}"
            extra += [
                _fmt_time(r[f"{impl}_median_s"]),
                f"{r[f'ratio_{impl}_over_fma']:.3f}",
                _fmt_mib(r[f"{impl}_peak_bytes"]),
            ]
        body.append(
            [
                str(r["n"]),
                r["mode"],
                r["pass"],
                str(r["levels"]),
                _fmt_time(r["fma_median_s"]),
                _fmt_time(r["sdpa_median_s"]),
                "-" if r["ratio_sdpa_over_fma"] is None else f"{r['ratio_sdpa_over_fma']:.2f}x",
                _fmt_mib(r["fma_peak_bytes"]),
                _fmt_mib(r["sdpa_peak_bytes"]),
                f"{r['fma_gflops']:.3g}",
                f"{100 * r['fma_fraction_of_matmul']:.2g}%",
                f"{len(r['fma_times_s'])}/{len(r['sdpa_times_s'])}",
                *extra,
                _fmt_cores(r.get("other_cores")),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    cfg, mm, sysinfo = meta["config"], meta["matmul"], meta["system"]
    lines += [
        "",
        f"B={cfg['batch']} H={cfg['heads']} d={cfg['head_dim']} {cfg['dtype']}, m={cfg['block_size']} "
        f"p={cfg['coarse_tokens']} query_mode={cfg['query_mode']} downsample={cfg['downsample']}"
        + "".join(f" (and {family})" for family in compared)
        + "; "
        f"torch {sysinfo['torch']}, {sysinfo['threads']} threads, {sysinfo['cpu']}",
        f"matmul {mm['size']}^3 {mm['dtype']}: median {mm['gflops_median']:.1f} GFLOP/s "
        f"(before {statistics.median(mm['gflops_before']):.1f}, after {statistics.median(mm['gflops_after']):.1f})",
        f"time: {METHODS['time']}",
        f"others: cores kept busy by other processes during the cell (whole run: {_fmt_cores(sysinfo['other_cores'])}"
        f" of {sysinfo['cpus']}); well above 0 means a noisy neighbour and timings to distrust",
        f"memory (MiB): {METHODS['memory']}",
        f"FLOPs: {METHODS['flops']}",
    ]
    return "\n".join(lines)


def _fmt_cores(cores: float | None) -> str:
    return "?" if cores is None else f"{cores:.2f}"


def plot_results(rows: list[dict], path: str, title: str = "FMA vs dense SDPA") -> str:
    """Log-log time and peak memory against n, one line per (implementation, mode, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    # FMA layers with other downsamplers (compare_downsample) are the rows' "ratio_fma_<family>_over_fma" keys
    compared = [
        key[len("ratio_") : -len("_over_fma")] for key in (rows[0] if rows else {}) if key.startswith("ratio_fma_")
    ]
    styles = {
        "fma": ("C0", "FMA"),
        "sdpa": ("C3", "SDPA"),
        **{impl: (f"C{4 + i}", f"FMA {impl[4:]}") for i, impl in enumerate(compared)},
    }
    markers = {"causal": "o", "bidir": "s"}
    lines = {"fwd": "--", "fwd+bwd": "-"}
    series = sorted({(r["mode"], r["pass"]) for r in rows})
    for impl, (color, name) in styles.items():
        for mode, pass_ in series:
            pts = sorted(
                (r["n"], r[f"{impl}_median_s"], r[f"{impl}_peak_bytes"])
                for r in rows
                if r["mode"] == mode and r["pass"] == pass_ and r[f"{impl}_median_s"] is not None
            )
            if not pts:
                continue
            ns = [p[0] for p in pts]
            kw = dict(color=color, marker=markers[mode], linestyle=lines[pass_], label=f"{name} {mode} {pass_}")
            ax_t.plot(ns, [p[1] for p in pts], **kw)
            ax_m.plot(ns, [p[2] / 2**20 for p in pts], **kw)
    for ax, ylabel in ((ax_t, "median time per call (s)"), (ax_m, "peak allocator memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CSV_FIELDS = [
    "n",
    "mode",
    "pass",
    "levels",
    "fma_median_s",
    "sdpa_median_s",
    "ratio_sdpa_over_fma",
    "fma_peak_bytes",
    "sdpa_peak_bytes",
    "fma_flops",
    "fma_gflops",
    "fma_fraction_of_matmul",
    "sdpa_flops",
    "sdpa_gflops",
    "fma_times_s",
    "sdpa_times_s",
    "fma_warmup_counted",
    "sdpa_warmup_counted",
    "other_cores",
]


def write_results(rows: list[dict], meta: dict, png_path: str) -> tuple[str, str]:
    """Raw numbers beside the plot: ``<stem>.csv`` (one row per cell) and ``<stem>.json`` (rows + metadata)."""
    stem = os.path.splitext(png_path)[0]
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    csv_path, json_path = stem + ".csv", stem + ".json"
    compared = [f"fma_{family}" for family in meta["config"]["compare_downsample"]]
    fields = CSV_FIELDS + [f"{impl}_{what}" for impl in compared for what in ("median_s", "peak_bytes", "times_s")]
    fields += [f"ratio_{impl}_over_fma" for impl in compared]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (" ".join(f"{t:.6g}" for t in v) if isinstance(v, list) else v) for k, v in row.items()}
            )
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return csv_path, json_path


# ---------------------------------------------------------------------------------------------- accuracy


def fine_level_mask(n: int, block_size: int, causal: bool) -> torch.Tensor:
    """(n, n) bool: the keys FMA's level 0 covers (§3) -- local attention without any far field."""
    block = torch.arange(n) // block_size
    near = (block[:, None] - block[None, :]).abs() <= 1
    if causal:
        near &= torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    return near


def dense_agreement(
    n: int,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    *,
    max_seq_len: int | None = None,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    local_baseline: bool = False,
    **fma_kwargs,
) -> dict:
    """FMA (fresh module, default average init) against dense SDPA on one random N(0, 1) q, k, v.

    Returns ``max_abs`` (max |FMA - dense|) and ``rel`` (||FMA - dense||_F / ||dense||_F); with
    ``local_baseline`` also ``local_rel``: the same error for attention restricted to FMA's level-0 keys, i.e.
    what FMA would be without its coarse levels.
    """
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_dim, dtype=dtype) for _ in range(3))
    attn = FastMultipoleAttention(head_dim, max_seq_len or n, causal=causal, **fma_kwargs).to(dtype)
    with torch.no_grad():
        out = attn(q, k, v)
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        result = {
            "n": n,
            "causal": causal,
            "dtype": str(dtype).replace("torch.", ""),
            "max_abs": (out - dense).abs().max().item(),
            "rel": ((out - dense).norm() / dense.norm()).item(),
        }
        if local_baseline:
            local = F.scaled_dot_product_attention(q, k, v, attn_mask=fine_level_mask(n, attn.block_size, causal))
            result["local_rel"] = ((local - dense).norm() / dense.norm()).item()
    return result
