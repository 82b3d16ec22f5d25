"""Pretrained Llama-family checkpoints to FMT: the engine of ``scripts/convert_llama.py``.

FMT is Llama-shaped on purpose (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, the same parameter
names), so a ``LlamaForCausalLM`` becomes an ``FMTForCausalLM`` by copying every weight; only the FMA downsamplers
are new, and they start at their average init (an untrained FMT summarises distant groups by sub-window means, as
H-Transformer-1D). Wherever FMA is exact -- sequences of at most ``(fma_near_blocks + 1) * fma_block_size``
tokens -- the converted model computes the original's logits; beyond, distant tokens are seen through the summaries,
which a short uptraining adapts (``scripts/train.py --train_only_downsamplers``).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM

from ..model import FMTConfig, FMTForCausalLM
from ..model.configuration_fmt import FMT_ROPE_TYPES
from .arguments import ConvertArguments, parse_config_overrides

# LlamaConfig fields that FMTConfig has under the same name and meaning.
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
FMA_OPTIONS = tuple(f.name for f in dataclasses.fields(FMTConfig) if f.name.startswith("fma_"))
"""The FMTConfig fields ``convert_llama_to_fmt`` takes as options: the FMA settings."""


def fmt_config_from_llama(config: LlamaConfig, max_position_embeddings: int | None = None, **fma_options) -> FMTConfig:
    """The ``FMTConfig`` of a Llama model: its sizes, norms, biases and rotary embeddings, the FMA settings
    ``fma_options`` (``fma_block_size``, ``fma_coarse_tokens``, ``fma_downsample``, ...) and
    ``max_position_embeddings`` (default: the source's; FMA builds its hierarchy for it).

    Raises ``ValueError`` naming what FMT cannot reproduce: a rope type whose frequencies change with the length,
    a sliding attention window, an unknown FMA option. ``pretraining_tp`` is no obstacle: transformers 4 only
    sliced the matmuls by it and transformers 5's Llama ignores it, so the function is the same.
    """
    unknown = sorted(set(fma_options) - set(FMA_OPTIONS))
    if unknown:
        raise ValueError(f"unknown FMA options {unknown}; the options are {', '.join(FMA_OPTIONS)}")
    rope_type = config.rope_parameters["rope_type"]
    if rope_type not in FMT_ROPE_TYPES:
        raise ValueError(
            f"the source model's rope_parameters['rope_type'] is {rope_type!r}, which FMT does not support; "
            f"supported: {', '.join(FMT_ROPE_TYPES)} (frequencies that do not change with the sequence length)"
        )
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"the source config sets sliding_window={config.sliding_window}: FMT attends the whole context (fine near "
            "field, coarse far field) and cannot reproduce a sliding-window model"
        )
    values = {name: getattr(config, name) for name in _LLAMA_FIELDS}
    if max_position_embeddings is not None:
        values["max_position_embeddings"] = max_position_embeddings
    # A copy: the rope types that scale with `original_max_position_embeddings` carry it explicitly (transformers'
    # standardisation put it there), so changing max_position_embeddings leaves the frequencies alone.
    return FMTConfig(**values, rope_parameters=copy.deepcopy(config.rope_parameters), **fma_options)


def convert_llama_to_fmt(
    model: LlamaForCausalLM,
    max_position_embeddings: int | None = None,
    fma_block_size: int = 64,
    fma_coarse_tokens: int = 4,
    **fma_options,
) -> FMTForCausalLM:
    """An ``FMTForCausalLM`` with every weight of ``model`` (a transformers ``LlamaForCausalLM``: grouped-query
    attention, tied or untied embeddings, attention and MLP biases, rope types ``default``, ``linear``, ``llama3``,
    ``yarn``), in its dtype and on its device, with its generation config; the FMA downsamplers start at their
    average init. For at most ``(fma_near_blocks + 1) * fma_block_size`` tokens its logits are the source's.

    ``max_position_embeddings`` defaults to the source's; ``fma_options`` are further ``FMTConfig`` FMA fields
    (``fma_downsample``, ``fma_query_mode``, ``fma_scale_attn``, ``fma_boundary``, ``fma_sink_tokens``, which
    keeps the source's attention sinks exact: docs/fma.md §3a, and ``fma_near_blocks``, the width of the exact near
    field: §3). Raises ``TypeError`` for another model class and
    ``ValueError`` for what FMT cannot reproduce (see :func:`fmt_config_from_llama`) or quantized weights.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"convert_llama_to_fmt converts a transformers LlamaForCausalLM; got {type(model).__name__} "
            f"(model_type {getattr(model.config, 'model_type', None)!r})"
        )
    config = fmt_config_from_llama(
        model.config,
        max_position_embeddings,
        fma_block_size=fma_block_size,
        fma_coarse_tokens=fma_coarse_tokens,
        **fma_options,
    )
    state_dict = model.state_dict()
    quantized = sorted(name for name, tensor in state_dict.items() if not tensor.is_floating_point())
    if quantized:
        raise ValueError(
            f"the source weights are quantized ({quantized[0]} is {state_dict[quantized[0]].dtype}); load the model "
            "dequantized (a float dtype) to convert it"
        )
    fmt = FMTForCausalLM(config).to(device=model.device, dtype=model.dtype).eval()
    missing, unexpected = fmt.load_state_dict(state_dict, strict=False)
    new = [name for name in missing if ".self_attn.fma." not in name]
    if new or unexpected:  # the two architectures drifted apart: never hand out a half-converted model
        raise RuntimeError(f"Llama and FMT weights do not match: missing in Llama {new}, unknown to FMT {unexpected}")
    fmt.generation_config = copy.deepcopy(model.generation_config)
    fmt.train(model.training)
    return fmt


def load_llama(model_name_or_path: str, gguf_file: str | None = None, dtype: str = "float32"):
    """The source model and its tokenizer: a checkpoint folder or Hub id, or ``gguf_file`` inside that folder
    (dequantized to plain float weights). ``dtype``: float32, bfloat16, float16, or auto (the checkpoint's)."""
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **gguf)
    if gguf_file:  # plain float weights, also where a GGUF kernel would keep them packed
        gguf["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **gguf
    )
    return model, tokenizer


def convert_checkpoint(args: ConvertArguments) -> FMTForCausalLM:
    """Load the Llama checkpoint (or GGUF file) and its tokenizer, convert it and save the FMT checkpoint (and, with
    ``dense_output_dir``, the source) with the tokenizer; return the FMT model."""
    model, tokenizer = load_llama(args.model_name_or_path, args.gguf_file, args.dtype)
    fmt = convert_llama_to_fmt(
        model,
        args.max_position_embeddings,
        args.fma_block_size,
        args.fma_coarse_tokens,
        **parse_config_overrides(args.fma_options),
    )
    fmt.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    if args.dense_output_dir is not None:
        # A GGUF load records how the file was quantized and refuses to save; the weights are plain floats now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(args.dense_output_dir)
        tokenizer.save_pretrained(args.dense_output_dir)
    return fmt


__all__ = [
    "FMA_OPTIONS",
    "convert_checkpoint",
    "convert_llama_to_fmt",
    "fmt_config_from_llama",
    "load_llama",
]
