"""One run's model and training in the quality suite: the shared model shape with the run's attention
(:func:`build_run_model`), AdamW with warm-up and cosine decay, and the training loop (:func:`train_steps`) that
records bits per token, step time and the first step's peak memory."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from fmt_hf import FMTConfig, FMTForCausalLM

from .measure import measure_peak_memory
from .peers import attach_peer
from .quality_suite import RunSpec, SuiteConfig


def build_run_model(spec: RunSpec, cfg: SuiteConfig, tokenizer, max_len: int) -> FMTForCausalLM:
    """The shared model shape with ``spec``'s attention, initialised from ``spec.seed``. ``max_len`` is the longest
    input it will see (peers size buffers for it); ``max_position_embeddings`` is the training length."""
    options = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": spec.length(cfg),
        "fma_block_size": cfg.block_size,
        "fma_coarse_tokens": cfg.coarse_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    options.update(dict(spec.overrides))
    torch.manual_seed(spec.seed)
    model = FMTForCausalLM(FMTConfig(**options))
    if spec.attention == "sdpa":
        model.set_attn_implementation("sdpa")
    elif spec.attention != "fma":
        attach_peer(model, spec.attention, max_len)
    return model


def optimizer_and_schedule(model: torch.nn.Module, cfg: SuiteConfig, steps: int):
    """AdamW (0.9, 0.95), weight decay on matrices only, linear warm-up then cosine decay to 10%."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_steps(
    model: FMTForCausalLM,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: SuiteConfig,
    steps: int,
    desc: str = "train",
    progress: bool = True,
) -> dict:
    """``steps`` optimizer steps on ``batches`` of (input_ids, labels); returns per-step bits per token, the median
    step time (first step excluded: it runs under the memory profiler) and the first step's peak memory."""
    optimizer, schedule = optimizer_and_schedule(model, cfg, steps)
    model.train()
    bits, seconds, peak = [], [], None

    def step(input_ids, labels):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        return loss.item()

    for index in tqdm(range(steps), desc=desc, unit="step", disable=not progress, mininterval=10):
        input_ids, labels = next(batches)
        if index == 0:
            first = []
            peak, _ = measure_peak_memory(lambda out=first, ids=input_ids, lab=labels: out.append(step(ids, lab)))
            loss = first[0]
        else:
            start = time.perf_counter()
            loss = step(input_ids, labels)
            seconds.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {index}")
        bits.append(loss / math.log(2))
    model.eval()
    return {"train_bits": bits, "s_per_step": statistics.median(seconds) if seconds else None, "peak_bytes": peak}
