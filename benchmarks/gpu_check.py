"""FMA's two fine-query kernels on an accelerator: the FlexAttention path (``kernel="flex"``) against the gather path
(``kernel="gather"``) and dense FlashAttention (SDPA). The engine behind ``scripts/check_gpu.py``.

How the numbers are taken (also written into the result file, see :data:`METHODS`):

* **exactness** -- one FMA layer (learned downsampler weights moved off their average init) and one set of
  inputs per (length, dtype, kernel), on the device, against the *same* rounded weights and inputs in float64 on
  the CPU through the gather path, which the tests pin to the float64 reference of docs/fma.md. Errors of the
  output and, where the device runs a backward (not FlexAttention on CPU), of the gradients of q, k, v and of
  the downsampler weights for one fixed random output gradient: max absolute error and relative error
  ``||x - ref|| / ||ref||`` (Frobenius).
* **time** -- one call is forward + backward (forward only where FlexAttention has no backward: CPU) of causal
  attention over (batch, heads, n, d) inputs of the timing dtype. Per length the implementations alternate after
  their first call (which includes compilation: reported separately as ``first_call_s``) and one warm-up, up to
  ``repeats`` samples or ``budget_s`` seconds each; the median is reported. CUDA: CUDA events around the call;
  elsewhere wall clock.
* **memory** -- CUDA: ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it
  (inputs excluded; outputs, activations, gradients and workspaces included); elsewhere the CPU allocator's peak
  through ``benchmarks.attention.measure_peak_memory``.
* **skips** -- an implementation whose previous length took so long that this one would exceed ``budget_s`` per
  sample is skipped with the reason; one that runs out of memory or fails is recorded with the error and the
  sweep goes on. Results are rewritten after every row, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.attention import DTYPES, _fmt_mib, measure_peak_memory, system_info
from fmt_hf.model.fma_attention import FastMultipoleAttention
from fmt_hf.model.fma_downsample import LENGTH_FREE_MODES
from fmt_hf.model.fma_partition import num_levels

IMPLEMENTATIONS = ("sdpa", "fma_gather", "fma_flex")
# Issue 12's targets for the flex path, fwd+bwd bf16 on a GPU: SDPA time / flex time at least this, from length n.
TARGETS = {8192: 1.0, 65536: 5.0, 131072: 10.0}

METHODS = {
    "exactness": "device layer vs the same rounded weights/inputs in float64 on CPU through the gather path; "
    "output and gradients (q, k, v, downsampler weights) for one random output gradient; max abs and "
    "relative Frobenius error",
    "time": "causal forward+backward (forward only without a backward: FlexAttention on CPU); implementations "
    "alternate after a first call (compilation, reported as first_call_s) and one warm-up; median of the "
    "samples; CUDA events on CUDA, wall clock elsewhere",
    "memory": "CUDA: max_memory_allocated during one call minus memory allocated before it; CPU: allocator peak "
    "from torch.profiler memory events",
}


@dataclass
class CheckConfig:
    """What one check measures. Defaults: issue 12's GPU check (causal, batch 1, 16 heads, d = 64, bf16)."""

    device: str = "cuda"
    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
    exact_lengths: tuple[int, ...] = (1000, 4096)
    exact_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    dtype: str = "bfloat16"
    batch: int = 1
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 64
    block_size: int = 64
    coarse_tokens: int = 4
    downsample: str = "depthwise"
    flex_kv_block: int | None = None  # None: block_size
    repeats: int = 5
    budget_s: float = 20.0
    seed: int = 0
    implementations: tuple[str, ...] = field(default=IMPLEMENTATIONS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_layer(
    cfg: CheckConfig, n: int, kernel: str, dtype: torch.dtype, device, perturb: float = 0.0
) -> FastMultipoleAttention:
    """A causal FMA layer for length ``n`` (no cap for the length-free families), learned weights moved off their
    average init by ``perturb`` x N(0, 1) so that they matter."""
    max_len = None if cfg.downsample in LENGTH_FREE_MODES else n
    layer = FastMultipoleAttention(
        cfg.head_dim,
        max_len,
        block_size=cfg.block_size,
        coarse_tokens=cfg.coarse_tokens,
        downsample=cfg.downsample,
        kernel=kernel,
    )
    if perturb:
        with torch.no_grad():
            for param in layer.parameters():
                param.add_(perturb * torch.randn_like(param))
    layer.flex_kv_block = cfg.flex_kv_block or cfg.block_size
    return layer.to(device=device, dtype=dtype).eval()


def _runs_backward(device: torch.device, kernel: str) -> bool:
    return device.type == "cuda" or kernel != "flex"


def _errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = got.detach().double().cpu() - ref
    return {"max_abs": diff.abs().max().item(), "rel": (diff.norm() / ref.norm().clamp(min=1e-300)).item()}


def check_exactness(cfg: CheckConfig, n: int, dtype_name: str, kernel: str) -> dict:
    """Errors of one (length, dtype, kernel) against float64 on the CPU (see module docstring)."""
    device, dtype = torch.device(cfg.device), DTYPES[dtype_name]
    torch.manual_seed(cfg.seed)
    layer = make_layer(cfg, n, kernel, dtype, device, perturb=0.05)
    reference = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    reference.kernel = "gather"
    shapes = [(cfg.batch, cfg.heads, n, cfg.head_dim)] + [(cfg.batch, cfg.kv_heads, n, cfg.head_dim)] * 2
    inputs = [torch.randn(shape, device=device).to(dtype) for shape in shapes]
    grad = torch.randn(shapes[0], device=device).to(dtype)
    backward = _runs_backward(device, kernel)
    ref_inputs = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref_out = reference(*ref_inputs)
    ref_out.backward(grad.double().cpu())
    row = {"n": n, "dtype": dtype_name, "kernel": kernel, "backward": backward}
    with torch.set_grad_enabled(backward):
        dev_inputs = [x.detach().requires_grad_(backward) for x in inputs]
        out = layer(*dev_inputs)
        row["out"] = _errors(out, ref_out.detach())
        if backward:
            out.backward(grad)
            for name, got, ref in zip("qkv", dev_inputs, ref_inputs):
                row[f"grad_{name}"] = _errors(got.grad, ref.grad)
            for (name, param), ref_param in zip(layer.named_parameters(), reference.parameters()):
                if ref_param.grad is not None:  # a level this length does not use has no gradient
                    row[f"grad_{name}"] = _errors(param.grad, ref_param.grad)
    return row


class _Timed:
    """Inputs and one callable per implementation for one length."""

    def __init__(self, cfg: CheckConfig, n: int):
        self.device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        torch.manual_seed(cfg.seed)
        self.backward = self.device.type == "cuda"  # FlexAttention has no backward elsewhere
        shapes = [(cfg.batch, cfg.heads, n, cfg.head_dim)] + [(cfg.batch, cfg.kv_heads, n, cfg.head_dim)] * 2
        self.inputs = [
            torch.randn(shape, device=self.device, dtype=dtype).requires_grad_(self.backward) for shape in shapes
        ]
        self.grad = torch.randn(shapes[0], device=self.device, dtype=dtype)
        self.layers = {
            f"fma_{kernel}": make_layer(cfg, n, kernel, dtype, self.device)
            for kernel in ("gather", "flex")
            if f"fma_{kernel}" in cfg.implementations
        }
        self.gqa = cfg.kv_heads != cfg.heads

    def call(self, impl: str) -> None:
        for x in self.inputs:
            x.grad = None
        with torch.set_grad_enabled(self.backward):
            if impl == "sdpa":
                out = self._sdpa()
            else:
                out = self.layers[impl](*self.inputs)
            if self.backward:
                out.backward(self.grad)

    def _sdpa(self) -> torch.Tensor:
        if self.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*self.inputs, is_causal=True, enable_gqa=self.gqa)
        return F.scaled_dot_product_attention(*self.inputs, is_causal=True, enable_gqa=self.gqa)

    def seconds(self, impl: str) -> float:
        """One timed call: CUDA events on CUDA, wall clock elsewhere."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.call(impl)
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        self.call(impl)
        return time.perf_counter() - begin

    def peak_bytes(self, impl: str) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.call(impl)
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        return measure_peak_memory(lambda: self.call(impl))[0]


def _growth(impl: str, ratio: float) -> float:
    """How much longer a call gets when n grows by ``ratio``: quadratic for dense attention, about n log n for FMA."""
    return ratio**2 if impl == "sdpa" else ratio * 1.2


def time_length(cfg: CheckConfig, n: int, previous: dict, status: Callable[[str], None]) -> dict:
    """Time, first-call time and peak memory of every implementation at length n; ``previous`` (impl -> (n,
    median seconds)) predicts which would exceed the budget."""
    row = {"n": n, "levels": num_levels(n, cfg.block_size), "pass": None}
    try:
        timed = _Timed(cfg, n)
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory allocating the inputs"}
    row["pass"] = "fwd+bwd" if timed.backward else "fwd"
    runnable = []
    for impl in cfg.implementations:
        if impl in previous:
            last_n, last_s = previous[impl]
            predicted = last_s * _growth(impl, n / last_n)
            if predicted > cfg.budget_s:
                row[f"{impl}_skipped"] = f"predicted {predicted:.1f} s per call > budget {cfg.budget_s:.0f} s"
                continue
        try:
            status(f"n={n} {impl} first call")
            start = time.perf_counter()
            timed.call(impl)
            _sync(timed.device)
            row[f"{impl}_first_call_s"] = time.perf_counter() - start
            timed.call(impl)  # warm-up
            row[f"{impl}_peak_bytes"] = timed.peak_bytes(impl)
            runnable.append(impl)
        except torch.OutOfMemoryError:
            row[f"{impl}_skipped"] = "out of memory"
        except Exception as error:  # noqa: BLE001 - one failing implementation must not end a one-shot GPU session
            row[f"{impl}_skipped"] = f"error: {type(error).__name__}: {str(error)[:300]}"
            row[f"{impl}_traceback"] = traceback.format_exc()[-3000:]
        if timed.device.type == "cuda":
            torch.cuda.empty_cache()
    samples = {impl: [] for impl in runnable}
    for round_ in range(cfg.repeats):
        for impl in runnable if round_ % 2 == 0 else runnable[::-1]:
            if sum(samples[impl]) < cfg.budget_s:
                status(f"n={n} {impl} rep {len(samples[impl]) + 1}")
                samples[impl].append(timed.seconds(impl))
    for impl in runnable:
        row[f"{impl}_times_s"] = samples[impl]
        row[f"{impl}_median_s"] = statistics.median(samples[impl])
        previous[impl] = (n, row[f"{impl}_median_s"])
    for impl in ("fma_gather", "fma_flex"):
        if row.get("sdpa_median_s") and row.get(f"{impl}_median_s"):
            row[f"sdpa_over_{impl}"] = row["sdpa_median_s"] / row[f"{impl}_median_s"]
    return row


def run_check(cfg: CheckConfig, out_dir: str, status: Callable[[str], None] = print) -> dict:
    """Exactness, then timing; results (JSON and markdown) rewritten under ``out_dir`` after every row."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch.cuda.is_available() is False (use --device cpu for a dry run)")
    unknown = set(cfg.implementations) - set(IMPLEMENTATIONS)
    if unknown:
        raise ValueError(f"implementations must be among {IMPLEMENTATIONS}, got {sorted(unknown)}")
    for name in (cfg.dtype, *cfg.exact_dtypes):
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    os.makedirs(out_dir, exist_ok=True)
    result = {"config": asdict(cfg), "system": _system(cfg.device), "methods": METHODS, "exactness": [], "timing": []}
    for n in cfg.exact_lengths:
        for dtype_name in cfg.exact_dtypes:
            for kernel in ("flex", "gather"):
                if kernel == "gather" and dtype_name != cfg.dtype:
                    continue  # the gather path computes in float32 whatever the input: one dtype says enough
                status(f"exactness n={n} {dtype_name} {kernel}")
                try:
                    row = check_exactness(cfg, n, dtype_name, kernel)
                except Exception as error:  # noqa: BLE001 - see time_length
                    row = {
                        "n": n,
                        "dtype": dtype_name,
                        "kernel": kernel,
                        "error": f"{type(error).__name__}: {str(error)[:300]}",
                        "traceback": traceback.format_exc()[-3000:],
                    }
                result["exactness"].append(row)
                write_results(result, out_dir)
    previous: dict = {}
    for n in cfg.lengths:
        result["timing"].append(time_length(cfg, n, previous, status))
        write_results(result, out_dir)
    return result


def _system(device: str) -> dict:
    info = system_info()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _fmt_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def target(n: int) -> float | None:
    """The SDPA/flex ratio issue 12 asks for at length n (None below 8K)."""
    reached = [ratio for length, ratio in TARGETS.items() if n >= length]
    return max(reached) if reached else None


def format_markdown(result: dict) -> str:
    cfg, system = result["config"], result["system"]
    lines = [
        f"# FMA kernels on {system.get('gpu', cfg['device'])}",
        "",
        f"torch {system['torch']}, causal, batch {cfg['batch']}, {cfg['heads']} heads ({cfg['kv_heads']} "
        f"key/value), d = {cfg['head_dim']}, m = {cfg['block_size']}, p = {cfg['coarse_tokens']}, "
        f"downsample {cfg['downsample']}, flex KV block {cfg['flex_kv_block'] or cfg['block_size']}.",
        "",
        "## Exactness against float64 on the CPU",
        "",
        "| n | dtype | kernel | out max abs | out rel | worst grad rel (of) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["exactness"]:
        if "error" in row:
            lines.append(f"| {row['n']} | {row['dtype']} | {row['kernel']} | error: {row['error']} | | |")
            continue
        grads = {k: v for k, v in row.items() if k.startswith("grad_")}
        worst = max(grads, key=lambda k: grads[k]["rel"]) if grads else None
        worst_text = f"{grads[worst]['rel']:.2e} ({worst[5:]})" if worst else "no backward"
        lines.append(
            f"| {row['n']} | {row['dtype']} | {row['kernel']} | {row['out']['max_abs']:.2e} | "
            f"{row['out']['rel']:.2e} | {worst_text} |"
        )
    timing = result["timing"]
    pass_ = next((row["pass"] for row in timing if row.get("pass")), "fwd+bwd")
    lines += [
        "",
        f"## Time ({pass_}, {cfg['dtype']}; median) and peak memory (MiB)",
        "",
        "| n | L | SDPA | FMA gather | FMA flex | SDPA/gather | SDPA/flex | target | SDPA MiB | gather MiB | "
        "flex MiB | flex first call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in timing:
        if "error" in row:
            lines.append(f"| {row['n']} | {row['levels']} | {row['error']} |" + " |" * 9)
            continue
        ratios = [row.get(f"sdpa_over_fma_{kernel}") for kernel in ("gather", "flex")]
        goal = target(row["n"])
        met = "" if goal is None or ratios[1] is None else (" met" if ratios[1] >= goal else " missed")
        cells = [str(row["n"]), str(row["levels"])]
        cells += [
            _fmt_seconds(row.get(f"{impl}_median_s"))
            if f"{impl}_skipped" not in row
            else f"skipped ({row[f'{impl}_skipped']})"
            for impl in IMPLEMENTATIONS
        ]
        cells += ["-" if r is None else f"{r:.2f}x" for r in ratios]
        cells += ["-" if goal is None else f">= {goal:g}x{met}"]
        cells += [_fmt_mib(row.get(f"{impl}_peak_bytes")) for impl in IMPLEMENTATIONS]
        first = row.get("fma_flex_first_call_s")
        cells.append("-" if first is None else f"{first:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "How: " + "; ".join(f"**{k}** {v}" for k, v in result["methods"].items()), ""]
    return "\n".join(lines)


def write_results(result: dict, out_dir: str) -> tuple[str, str]:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables) under ``out_dir``."""
    json_path, md_path = os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.md")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(md_path, "w") as f:
        f.write(format_markdown(result))
    return json_path, md_path
