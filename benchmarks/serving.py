"""Serving throughput, latency and memory of `fmt-serve`: one checkpoint under FMA (FMTCache) and, as the control,
the same weights dense (`--attn-implementation sdpa`, transformers' DynamicCache).

The engine behind `scripts/bench_serve.py`. Each implementation gets a server of its own (`background_server`), one
warm-up request, then for each number of clients that many threads, each sending `requests_per_client` chat
completions one after the other: distinct prompts of `prompt_tokens` tokens, greedy, exactly `new_tokens` new tokens
each (`min_new_tokens` through the request's `generation_config`). How the numbers are taken is in `METHODS`.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch
from transformers import AutoTokenizer

from fmt_hf import FMTForCausalLM
from fmt_hf.toolkit.serve import PLAIN_CHAT_TEMPLATE, BackgroundServer, background_server
from fmt_hf.toolkit.tokenizer import byte_tokenizer
from fmt_hf.toolkit.training import ModelArguments, build_config

IMPLEMENTATIONS = {"fma": (), "sdpa": ("--attn-implementation", "sdpa")}
"""Each implementation's `fmt-serve` options: FMA is an FMT checkpoint's default."""

METHODS = {
    "server": "fmt-serve (transformers serve without continuous batching: one model.generate at a time, the others "
    "queued), one server per implementation, on the same checkpoint",
    "requests": "non-streaming chat completions, greedy, exactly new_tokens new tokens; each client sends its "
    "requests one after another; one warm-up request per server first",
    "requests/s": "requests answered / wall clock from the first request sent to the last answer",
    "latency": "per request, from sending it to its whole answer; p50 and p95 over all requests of the row",
    "memory": "peak resident set (VmHWM) of each process of the server -- the API server and the model's own -- "
    "read before it stops, summed",
}


@dataclass
class ServeBenchmarkArguments:
    """What `scripts/bench_serve.py` measures."""

    checkpoint: str | None = field(
        default=None,
        metadata={"help": "the checkpoint to serve (with a chat template); default: a random byte-level FMT"},
    )
    config_overrides: str = field(
        default="hidden_size=256,intermediate_size=768,num_hidden_layers=4,num_attention_heads=4",
        metadata={"help": "the random FMT's size, as train.py --config_overrides"},
    )
    prompt_tokens: int = field(default=4096, metadata={"help": "tokens of each prompt, chat template included"})
    new_tokens: int = field(default=16, metadata={"help": "tokens of each answer"})
    clients: list[int] = field(default_factory=lambda: [1, 4, 8], metadata={"help": "concurrent clients per row"})
    requests_per_client: int = field(default=2, metadata={"help": "requests each client sends, one after another"})
    output: str = field(default="outputs/bench_serve.json", metadata={"help": "where the results go (JSON)"})

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens", "requests_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.clients or min(self.clients) < 1:
            raise ValueError(f"--clients must be one or more counts of at least 1, got {self.clients}")


def save_random_checkpoint(folder: str, args: ServeBenchmarkArguments) -> str:
    """A byte-level FMT with random weights (`args.config_overrides`), a context of twice the prompt plus the answer
    (room for prompts a token or two long), and `PLAIN_CHAT_TEMPLATE`, saved to `folder`."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    model_args = ModelArguments(task="clm", config_overrides=args.config_overrides)
    config = build_config(model_args, tokenizer, seq_len=2 * args.prompt_tokens + args.new_tokens)
    torch.manual_seed(0)
    FMTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts(checkpoint: str, count: int, tokens: int) -> list[list[dict]]:
    """`count` distinct one-message chats of `tokens` tokens each under the checkpoint's chat template (one or two
    off where the tokenizer merges across the cut): random words, cut to length."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    empty = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, return_dict=True
    )
    template_tokens = len(empty["input_ids"])
    if tokens <= template_tokens:
        raise ValueError(f"--prompt_tokens must exceed the chat template's own {template_tokens} tokens, got {tokens}")
    words = "the of and to in is that for it as with was on be by at this an are from or have had not but".split()
    chats = []
    for index in range(count):
        draw = random.Random(index)
        text = " ".join(draw.choice(words) for _ in range(tokens))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - template_tokens]
        chats.append([{"role": "user", "content": tokenizer.decode(ids)}])
    return chats


def measure(server: BackgroundServer, chats: list[list[dict]], clients: int, new_tokens: int) -> dict:
    """Sends `chats` from `clients` threads (client c takes chats c, c + clients, ...); one row of results."""
    latencies, prompt_lengths, errors = [], [], []

    def client(index: int) -> None:
        for messages in chats[index::clients]:
            body = {
                "messages": messages,
                "max_tokens": new_tokens,
                "temperature": 0,
                "generation_config": json.dumps({"min_new_tokens": new_tokens}),
            }
            sent = time.perf_counter()
            status, text = server.request("/chat/completions", body)
            latencies.append(time.perf_counter() - sent)
            usage = json.loads(text)["usage"] if status == 200 else {}
            if usage.get("completion_tokens") != new_tokens:
                errors.append(f"{status}: {text[:300]}")
            else:
                prompt_lengths.append(usage["prompt_tokens"])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(chats)} requests failed, the first: {errors[0]}")
    return {
        "clients": clients,
        "requests": len(chats),
        "prompt_tokens": statistics.mean(prompt_lengths),
        "seconds": seconds,
        "requests_per_s": len(chats) / seconds,
        "p50_s": percentile(latencies, 0.50),
        "p95_s": percentile(latencies, 0.95),
    }


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile of `values`, interpolated linearly between the nearest ranks (one value: itself)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def peak_resident_bytes(pid: int) -> int:
    """The peak resident set sizes (Linux VmHWM) of process `pid` and its descendants, summed."""
    total = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with open(f"/proc/{process.pid}/status") as status:
            peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        total += peak_kib * 1024
    return total


def run(args: ServeBenchmarkArguments) -> dict:
    """Every implementation at every client count; the rows, each server's peak memory, and how they were taken."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or save_random_checkpoint(folder, args)
        chats = prompts(checkpoint, 1 + args.requests_per_client * max(args.clients), args.prompt_tokens)
        rows, peak_memory = [], {}
        for implementation, options in IMPLEMENTATIONS.items():
            with background_server(checkpoint, *options) as server:
                measure(server, chats[:1], 1, args.new_tokens)
                for clients in args.clients:
                    row = measure(server, chats[1 : 1 + clients * args.requests_per_client], clients, args.new_tokens)
                    rows.append({"implementation": implementation, **row})
                    print(format_row(rows[-1]), flush=True)
                peak_memory[implementation] = peak_resident_bytes(server.process.pid)
    return {"rows": rows, "peak_memory_bytes": peak_memory, "arguments": vars(args), "methods": METHODS}


def format_row(row: dict) -> str:
    return (
        f"| {row['implementation']} | {row['clients']} | {row['requests']} | {row['prompt_tokens']:.0f} | "
        f"{row['requests_per_s']:.3f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} |"
    )


def format_table(results: dict) -> str:
    """The rows as a markdown table, then each implementation's peak memory."""
    header = (
        "| attention | clients | requests | prompt tokens | requests/s | p50 latency (s) | p95 latency (s) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    memory = ", ".join(f"{name} {peak / 2**20:.0f} MiB" for name, peak in results["peak_memory_bytes"].items())
    return "\n".join([header, *map(format_row, results["rows"]), "", f"Peak resident memory of the server: {memory}"])
