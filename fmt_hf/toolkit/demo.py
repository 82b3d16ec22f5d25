"""The main job behind ``make demo`` (``scripts/main_demo.py``): train a byte-level FMT language model on
Shakespeare's plays, measure it, reload it and let it write, in five stages with progress bars throughout.

Every stage is one call into the toolkit (:func:`~fmt_hf.toolkit.training.train`,
:func:`~fmt_hf.toolkit.evaluation.evaluate_lm`, :func:`~fmt_hf.toolkit.hub.save_for_hub`), so the same runs from the
command line with scripts/train.py, scripts/eval_lm.py and scripts/push_to_hub.py.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, TrainingArguments

from .arguments import DataArguments, EvalArguments, MainDemoArguments, ModelArguments
from .evaluation import evaluate_lm
from .hub import save_for_hub
from .training import train


def dense_cache_bytes(config: PretrainedConfig, batch_size: int, num_tokens: int, dtype: torch.dtype) -> int:
    """What a dense key/value cache of `num_tokens` tokens holds: keys and values of every layer and KV head."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * batch_size * num_tokens * dtype.itemsize


def long_prompt(text: str, num_bytes: int) -> str:
    """About `num_bytes` bytes of `text` from its middle, starting at a line start (a held-out play's dialogue)."""
    data = text.encode("utf-8")  # the line start found in bytes, where the slice is taken
    start = data.index(b"\n", len(data) // 2) + 1
    return data[start : start + num_bytes].decode("utf-8", errors="ignore")


def run_demo(args: MainDemoArguments) -> dict[str, float]:
    """Run the five stages; return validation and test bits per byte."""
    started = time.perf_counter()

    def stage(title: str) -> None:
        print(f"\n== {title}  [{time.perf_counter() - started:.0f} s]\n", flush=True)

    stage("1-2. Shakespeare corpus (split by play) -> byte-level FMT causal LM, trained from scratch with the Trainer")
    model_args = ModelArguments(task="clm", config_overrides=args.config_overrides)
    data_args = DataArguments(corpus="shakespeare", seq_len=args.seq_len, max_eval_samples=args.max_eval_samples)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        do_train=True,
        do_eval=True,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, args.max_steps // 10),
        weight_decay=0.1,
        adam_beta2=0.99,
        logging_steps=max(1, args.max_steps // 14),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
        seed=0,
    )
    metrics = train(model_args, data_args, training_args)

    stage("3. Held-out bits per byte (model reloaded through AutoModelForCausalLM)")
    eval_args = EvalArguments(
        model_name_or_path=args.output_dir, split="test", context_length=args.seq_len, max_documents=args.eval_documents
    )
    test = evaluate_lm(eval_args, data_args)
    print(
        f"validation, first {metrics['eval_samples']} packed {args.seq_len}-byte blocks: "
        f"{metrics['eval_bits_per_byte']:.3f} bits per byte (perplexity {metrics['eval_perplexity']:.2f} per byte)"
    )
    print(
        f"test, {test['documents']} whole held-out plays ({test['num_bytes']:,} bytes), context "
        f"{test['context_length']}, stride {test['stride']}: {test['bits_per_byte']:.3f} bits per byte"
    )
    print("(a uniform guess over 256 byte values costs 8 bits per byte)")

    stage("4. Generation from a long held-out prompt")
    model = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    print(
        f"reloaded {type(model).__name__}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, FMA block "
        f"{model.config.fma_block_size}, attention {model.config._attn_implementation}"
    )
    play = data_args.load_documents()["test"][0]
    prompt = long_prompt(play["text"], args.seq_len - args.max_new_tokens - 1)
    inputs = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    generate_started = time.perf_counter()
    generated = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    continuation = tokenizer.decode(generated.sequences[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(
        f"prompt: {len(prompt.encode())} bytes from the middle of {play['title']} (held out), ending\n"
        f"...{prompt[-300:]}"
    )
    print(
        f"\ncontinuation ({args.max_new_tokens} bytes, {time.perf_counter() - generate_started:.1f} s):\n"
        f"{continuation}\n"
    )
    num_tokens = generated.sequences.shape[1]
    dense = dense_cache_bytes(model.config, 1, num_tokens, model.dtype)
    held = generated.cache.nbytes  # FMTCache: the multilevel coarse states of every layer
    print(
        f"KV cache after {num_tokens} tokens: {held / 2**20:.2f} MiB (multilevel FMA cache); a dense cache would "
        f"hold {dense / 2**20:.2f} MiB ({held / dense:.0%} of it)\n"
    )

    stage("5. Artifacts")
    hub_dir = save_for_hub(args.output_dir, os.path.join(args.output_dir, "hub"), repo_id="fmt-shakespeare-demo")
    print(f"model, tokenizer and FMT code:     {os.path.abspath(args.output_dir)}")
    print(f"training and validation metrics:   {os.path.abspath(os.path.join(args.output_dir, 'all_results.json'))}")
    print(f"test bits per byte:                {os.path.abspath(eval_args.output_file)}")
    print(
        f"Hub-ready folder with model card:  {os.path.abspath(hub_dir)}  (README.md; publish with "
        f"scripts/push_to_hub.py --model_dir {args.output_dir} --repo_id <user>/<name>)"
    )
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return {"eval_bits_per_byte": metrics["eval_bits_per_byte"], "test_bits_per_byte": test["bits_per_byte"]}


__all__ = ["dense_cache_bytes", "long_prompt", "run_demo"]
