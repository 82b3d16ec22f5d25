"""Shared pieces of the training, evaluation and Hub tests: tiny real documents, a tiny FMT, the scripts' `main`."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from fmt_hf.toolkit.data import load_corpus

from .models import TINY_FMT_OPTIONS

REPO = Path(__file__).resolve().parents[2]

TINY_FMT = ",".join(f"{name}={value}" for name, value in TINY_FMT_OPTIONS.items())
"""`--config_overrides` of a model that trains a step in milliseconds (FMA with a coarse level at 64 tokens)."""


@functools.cache
def script(name: str) -> ModuleType:
    """The module of `scripts/<name>.py`, imported once (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"fmt_hf_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def play_excerpts(count: int = 8, chars: int = 6000) -> tuple[str, ...]:
    """The openings of `count` Shakespeare plays: real documents, small enough to pack in a blink."""
    return tuple(text[:chars] for text in load_corpus("shakespeare").select(range(count))["text"])


def write_documents(folder: Path, texts) -> str:
    """A local `datasets` folder (one JSON line per document) for `--dataset_name`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "documents.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(folder)


def train_argv(output_dir: Path, dataset: str | None, *extra: str, model_name_or_path: str | None = None) -> list[str]:
    """Command line of a few-step `scripts/train.py` run on 64-token blocks of the local dataset `dataset` (or the
    default corpus when None), from `model_name_or_path` or else from scratch with the tiny FMT."""
    data = [] if dataset is None else ["--dataset_name", dataset]
    if model_name_or_path is None:
        model = ["--config_overrides", TINY_FMT]
    else:
        model = ["--model_name_or_path", model_name_or_path]
    return [
        "--output_dir",
        str(output_dir),
        *data,
        "--seq_len",
        "64",
        *model,
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--max_eval_samples",
        "16",
        "--logging_steps",
        "1",
        "--learning_rate",
        "3e-3",
        "--dataloader_pin_memory",
        "False",
        "--disable_tqdm",
        "True",
        *extra,
    ]


CUSTOM_CODE_PROMPT = "Do you wish to run the custom code?"
"""transformers' question before running a checkpoint's code without `trust_remote_code`: a snippet must never ask."""


def run_fresh(code: str, cwd: Path, *, with_fmt_hf: bool = True, timeout: int = 300) -> str:
    """Run `code` as `python -c` in a fresh interpreter in `cwd`, offline, stdin closed (a prompt fails instead of
    waiting), with this checkout's `fmt_hf` importable, or (`with_fmt_hf=False`) as on a machine without it; assert
    it succeeds without asking for custom code, and return what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / ".hf_modules"), OMP_NUM_THREADS="1")
    if with_fmt_hf:
        env["PYTHONPATH"] = str(REPO)
        argv = [sys.executable, "-c", code]
    else:  # -I: no PYTHONPATH, user site or working directory; the installed fmt_hf blocked
        argv = [sys.executable, "-I", "-c", 'import sys\nsys.modules["fmt_hf"] = None\n' + code]
    done = subprocess.run(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert CUSTOM_CODE_PROMPT not in output, output[-3000:]
    return done.stdout
