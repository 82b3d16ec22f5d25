"""Generation from real prompts with real checkpoints: the real-checkpoint mode of ``scripts/bench_generate.py``.

:func:`run_checkpoint_benchmark` runs ``model.generate`` of an FMT checkpoint and a dense model on real held-out
text, each model and prompt length in a fresh subprocess (this module run with ``python -m``); how each number is
taken is :data:`METHODS_CHECKPOINT`, also written into the result files.
"""

from __future__ import annotations

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
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from .generate_steps import cache_bytes
from .measure import CpuNeighbours, system_info

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
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a checkpoint can be loaded in for the benchmark."""


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
    """:func:`generate_once` in a fresh Python process: this module run with ``-m`` (installed with the project)."""
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", __name__, str(spec_path), str(result_path)],
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
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CHECKPOINT_DTYPES)}, got {dtype!r}")
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


def _subprocess_main(argv: list[str]) -> None:
    """``python -m benchmarks.generate_checkpoints SPEC RESULT``: :func:`generate_once` on the JSON spec, result to
    RESULT."""
    spec_path, result_path = argv
    result = generate_once(**json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _subprocess_main(sys.argv[1:])
