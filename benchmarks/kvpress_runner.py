#!/usr/bin/env python
"""Greedy answers of a causal LM whose prompt cache a kvpress press (NVIDIA/kvpress) compressed: the kvpress systems
of the long-context suite (fmt_hf.toolkit.long_context_eval).

kvpress 0.5.5 needs transformers < 5.3, so this script runs in its own venv (`make kvpress-venv`) and imports only
the standard library, torch, transformers and kvpress -- never fmt_hf. The suite writes the prompts as JSON lines
(``id``, ``press``, ``input_ids``, ``max_new_tokens``, ``compression_ratio``, ``n_sink``) and reads back one JSON line
per prompt (``id``, ``press``, ``generated_ids``, ``prefill_seconds``, ``decode_ms_per_token``, ``cache_vectors``,
``cache_mib``, ``seconds``), appended as each answer ends, so a run stopped by its timeout keeps what it finished.

The press compresses the whole prompt in its prefill (the question and the answer prefix too, as FMT's cache does);
the answer then decodes greedily from the compressed cache with the prompt tokens' original positions, stopping at
end of sequence or after ``max_new_tokens`` tokens. The suite tokenizes and scores; this script only decodes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from transformers import HfArgumentParser

PRESSES = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
}
"""The presses this runner builds (by kvpress class name), under the names the suite gives its systems
(``kvpress_<name>``). ExpectedAttention is the press kvpress's README leads with."""


@dataclass
class KVPressRunnerArguments:
    prompts: str = field(metadata={"help": "JSONL of prompts (see the module docstring)."})
    output: str = field(metadata={"help": "JSONL the answers are appended to."})
    model_name_or_path: str = field(metadata={"help": "Checkpoint folder (or the folder of --gguf_file)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model_name_or_path."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16."})
    device: str = field(default="cpu", metadata={"help": "Torch device."})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def parse_args(argv: list[str] | None = None) -> tuple[KVPressRunnerArguments]:
    """The command line (or `argv`) as its dataclass; runs nothing."""
    parser = HfArgumentParser(KVPressRunnerArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def read_prompts(path: str) -> list[dict]:
    """The prompt rows of ``path``, each checked for the fields an answer needs and a press this runner knows."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    needed = ("id", "press", "input_ids", "max_new_tokens", "compression_ratio", "n_sink")
    for number, row in enumerate(rows, 1):
        missing = [name for name in needed if name not in row]
        if missing:
            raise ValueError(f"{path} line {number}: missing {missing}")
        if row["press"] not in PRESSES:
            raise ValueError(f"{path} line {number}: unknown press {row['press']!r}; known: {', '.join(PRESSES)}")
        if not 0 <= row["compression_ratio"] < 1:
            raise ValueError(
                f"{path} line {number}: compression_ratio must lie in [0, 1), got {row['compression_ratio']}"
            )
        if not row["input_ids"] or row["max_new_tokens"] < 1:
            raise ValueError(f"{path} line {number}: input_ids must be non-empty and max_new_tokens at least 1")
    return rows


def make_press(kvpress_module, name: str, compression_ratio: float, n_sink: int):
    """The press ``name`` of :data:`PRESSES` keeping a fraction ``1 - compression_ratio`` of the prompt's vectors."""
    press_class = getattr(kvpress_module, PRESSES[name])
    options = {"n_sink": n_sink} if name == "streaming" else {}
    return press_class(compression_ratio=compression_ratio, **options)


def answer(model, press, input_ids: list[int], max_new_tokens: int, eos: set[int]) -> dict:
    """Prefill ``input_ids`` under ``press`` into a ``DynamicCache``, then decode greedily from the compressed cache."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([input_ids], device=model.device)
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.no_grad(), press(model):
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    prefill_seconds = time.perf_counter() - start
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    cache_vectors, nbytes = 2 * cache.layers[0].keys.shape[-2], sum(t.numel() * t.element_size() for t in tensors)
    generated: list[int] = []
    steps, start = 0, time.perf_counter()
    with torch.no_grad():
        for position in range(len(input_ids), len(input_ids) + max_new_tokens):
            token = int(logits.argmax())
            if token in eos:
                break
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            step = model(
                torch.tensor([[token]], device=model.device),
                past_key_values=cache,
                position_ids=torch.tensor([[position]], device=model.device),
                use_cache=True,
            )
            logits, steps = step.logits[0, -1], steps + 1
    decode_ms = 1000 * (time.perf_counter() - start) / steps if steps else None
    return {
        "generated_ids": generated,
        "prefill_seconds": prefill_seconds,
        "decode_ms_per_token": decode_ms,
        "cache_vectors": cache_vectors,
        "cache_mib": nbytes / 2**20,
    }


Answerer = Callable[[dict], dict]
"""A prompt row -> the answer fields of its output row."""


def answer_prompts(rows: Iterable[dict], answerer: Answerer, output: str) -> Iterator[dict]:
    """Answer every row, appending each output row to ``output`` (flushed, so a killed run keeps it) as it ends."""
    for row in rows:
        start = time.perf_counter()
        result = {"id": row["id"], "press": row["press"], **answerer(row)}
        result["seconds"] = time.perf_counter() - start
        with open(output, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        yield result


def kvpress_answerer(args: KVPressRunnerArguments) -> Answerer:
    """Load the model of ``args`` once; answer each prompt row with a fresh press of its settings."""
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the GGUF dequantization's and the weights' bars would drown the suite's output
    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype), **gguf)
    model = model.to(args.device).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def answerer(row: dict) -> dict:
        press = make_press(kvpress, row["press"], row["compression_ratio"], row["n_sink"])
        return answer(model, press, row["input_ids"], row["max_new_tokens"], eos)

    return answerer


def main(argv: list[str] | None = None, answerer: Answerer | None = None) -> list[dict]:
    """Answer the prompts of the command line (or ``argv``) with kvpress (or ``answerer``); return the output rows."""
    (args,) = parse_args(argv)
    rows = read_prompts(args.prompts)
    results = []
    for result in answer_prompts(rows, answerer or kvpress_answerer(args), args.output):
        results.append(result)
        print(
            f"kvpress {len(results)}/{len(rows)}: {result['press']} {result['id']} {result['seconds']:.1f} s",
            file=sys.stderr,
        )
    return results


if __name__ == "__main__":
    main()
