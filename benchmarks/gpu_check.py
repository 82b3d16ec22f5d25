"""The GPU check of ``scripts/check_gpu.py`` (:class:`GpuCheckArguments`, :func:`check_gpu`): exactness, then
fwd+bwd speed and memory of FMA's FlexAttention path against its gather path and FlashAttention, each row as
``benchmarks.gpu_check_measure`` takes it, and the result files (``gpu_check.json``, ``gpu_check.md``) rewritten
after every row, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from fmt_hf.model.fma_downsample import DOWNSAMPLE_MODES

from .gpu_check_measure import IMPLEMENTATIONS, METHODS, CheckConfig, check_exactness, time_length
from .measure import DTYPES, format_mib, system_info

# The targets set for the flex path, fwd+bwd bf16 on a GPU: SDPA time / flex time at least this, from length n.
TARGETS = {8192: 1.0, 65536: 5.0, 131072: 10.0}


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
    """The SDPA/flex ratio :data:`TARGETS` asks for at length n (None below 8K)."""
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
        cells += [format_mib(row.get(f"{impl}_peak_bytes")) for impl in IMPLEMENTATIONS]
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


CPU_EXACT_LENGTHS = (100, 333)
"""Lengths of a CPU dry run's exactness check (eager FlexAttention is slow)."""


@dataclass
class GpuCheckArguments:
    """The command line of ``scripts/check_gpu.py``; defaults are :class:`CheckConfig`'s."""

    device: str = field(default=CheckConfig.device, metadata={"help": "cuda, or cpu for a dry run"})
    lengths: list[int] = field(default_factory=lambda: list(CheckConfig.lengths), metadata={"help": "timed lengths n"})
    exact_lengths: list[int] | None = field(
        default=None,
        metadata={
            "help": f"lengths of the exactness check (default {list(CheckConfig.exact_lengths)} on cuda, "
            f"{list(CPU_EXACT_LENGTHS)} elsewhere)"
        },
    )
    exact_dtypes: list[str] = field(
        default_factory=lambda: list(CheckConfig.exact_dtypes),
        metadata={"choices": list(DTYPES), "help": "dtypes of the flex path's exactness check"},
    )
    dtype: str = field(default=CheckConfig.dtype, metadata={"choices": list(DTYPES), "help": "timed dtype"})
    batch: int = field(default=CheckConfig.batch, metadata={"help": "batch size"})
    heads: int = field(default=CheckConfig.heads, metadata={"help": "query heads"})
    kv_heads: int | None = field(default=None, metadata={"help": "key/value heads (default: --heads)"})
    head_dim: int = field(default=CheckConfig.head_dim, metadata={"help": "d"})
    block_size: int = field(default=CheckConfig.block_size, metadata={"help": "FMA m"})
    coarse_tokens: int = field(default=CheckConfig.coarse_tokens, metadata={"help": "FMA p"})
    downsample: str = field(
        default=CheckConfig.downsample, metadata={"choices": DOWNSAMPLE_MODES, "help": "FMA downsampler"}
    )
    flex_kv_block: int | None = field(
        default=None, metadata={"help": "keys per KV block of the flex block mask (default: --block_size)"}
    )
    implementations: list[str] = field(
        default_factory=lambda: list(IMPLEMENTATIONS),
        metadata={"choices": IMPLEMENTATIONS, "help": "what is timed"},
    )
    repeats: int = field(default=CheckConfig.repeats, metadata={"help": "timed samples per implementation (most)"})
    budget: float = field(
        default=CheckConfig.budget_s,
        metadata={
            "help": "seconds per implementation and length: fewer samples, or a skip when one call would take longer"
        },
    )
    seed: int = field(default=CheckConfig.seed, metadata={"help": "seed of the weights and inputs"})
    out: str = field(
        default_factory=lambda: os.environ.get("OUT") or "outputs",
        metadata={"help": "folder for gpu_check.json/.md (default: $OUT if set, else outputs)"},
    )

    def check_config(self) -> CheckConfig:
        exact_lengths = self.exact_lengths
        if exact_lengths is None:
            exact_lengths = CheckConfig.exact_lengths if self.device == "cuda" else CPU_EXACT_LENGTHS
        return CheckConfig(
            device=self.device,
            lengths=tuple(self.lengths),
            exact_lengths=tuple(exact_lengths),
            exact_dtypes=tuple(self.exact_dtypes),
            dtype=self.dtype,
            batch=self.batch,
            heads=self.heads,
            kv_heads=self.kv_heads or self.heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
            coarse_tokens=self.coarse_tokens,
            downsample=self.downsample,
            flex_kv_block=self.flex_kv_block,
            repeats=self.repeats,
            budget_s=self.budget,
            seed=self.seed,
            implementations=tuple(self.implementations),
        )


def check_gpu(args: GpuCheckArguments) -> dict:
    """Run the check with progress lines, print its markdown; return the result (also under ``args.out``)."""
    cfg = args.check_config()
    # Compiled FlexAttention specialises on dtype and on (static, then dynamic) shapes: the check needs a few
    # more graphs than dynamo's default limit allows before it would fall back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    start = time.perf_counter()

    def status(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    result = run_check(cfg, args.out, status)
    print(format_markdown(result))
    print(
        f"written to {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md ({time.perf_counter() - start:.0f} s)"
    )
    return result
