"""Pretrained Llama-family checkpoints to FMT: the engine of ``scripts/convert_llama.py``.

FMT is Llama-shaped on purpose (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, the same parameter
names), so a ``LlamaForCausalLM`` becomes an ``FMTForCausalLM`` by copying every weight; only the FMA downsamplers
are new, and they start at their average init (an untrained FMT summarises distant groups by sub-window means, as
H-Transformer-1D). Wherever FMA is exact -- sequences of at most ``(fma_near_blocks + 1) * fma_block_size``
tokens -- the converted model computes the original's logits; beyond, distant tokens are seen through the summaries,
which a short uptraining adapts (``scripts/train.py --train_only_downsamplers``). :func:`convert_checkpoint` records
what it converted (:func:`conversion_record`) for the model card.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from ..model import FMTConfig, FMTForCausalLM
from ..model.configuration_fmt import FMT_ROPE_TYPES
from .arguments import ConvertArguments, parse_config_overrides
from .records import CONVERSION_RECORD_NAME

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


HUB_MODEL_URL = re.compile(r"^https://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
"""A Hub model repository's address, as GGUF metadata (``general.source.repo_url``) gives it."""


def gguf_metadata(path: str) -> dict[str, Any]:
    """The ``general.*`` metadata (name, organization, licence, ...) of the GGUF file at ``path``."""
    from gguf import GGUFReader  # the GGUF loader's own dependency

    fields = GGUFReader(path).fields
    return {name: field.contents() for name, field in fields.items() if name.startswith("general.")}


def gguf_base_model(metadata: dict[str, Any], gguf_file: str) -> str | None:
    """The Hub id of the model a GGUF file was made from: the repository ``general.source.repo_url`` names, else
    ``general.organization``/the file name up to its first dot (the llama.cpp naming, e.g.
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` of ``HuggingFaceTB``), else None."""
    if match := HUB_MODEL_URL.match(metadata.get("general.source.repo_url", "")):
        return match.group(1)
    organization = metadata.get("general.organization")
    return f"{organization}/{os.path.basename(gguf_file).split('.')[0]}" if organization else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _card_license(name_or_path: str) -> str | None:
    """The licence a model card (a local folder's README.md or a Hub repository's) declares; None without one."""
    readme = os.path.join(name_or_path, "README.md")
    try:
        card = ModelCard.load(readme if os.path.isdir(name_or_path) else name_or_path)
    except Exception:  # no card, no network: the licence is then not recorded, never guessed
        return None
    return card.data.license


def conversion_record(
    args: ConvertArguments, source: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, fmt: FMTForCausalLM
) -> dict[str, Any]:
    """What :func:`convert_checkpoint` converted (written as :data:`CONVERSION_RECORD_NAME`): ``base_model`` (the
    source's Hub id: ``args.base_model``, else ``model_name_or_path`` when it is not a local folder, else what a GGUF
    file's metadata names, else None), the source's ``license``, ``languages`` and whether its tokenizer has a
    ``chat_template``, the ``source`` files (``model_name_or_path``, ``gguf_file``, the GGUF's ``sha256``, the Hub
    ``revision`` where known), the ``dtype`` and the FMA settings (``fma``: ``max_position_embeddings`` and every
    ``fma_*`` field of the new config)."""
    local = os.path.isdir(args.model_name_or_path)
    base_model = args.base_model or (None if local else args.model_name_or_path)
    license_, languages, sha256 = None, None, None
    if args.gguf_file is not None:
        path = cached_file(args.model_name_or_path, args.gguf_file)
        metadata = gguf_metadata(path)
        base_model = base_model or gguf_base_model(metadata, args.gguf_file)
        license_, languages, sha256 = metadata.get("general.license"), metadata.get("general.languages"), _sha256(path)
    if license_ is None and (local or base_model is not None):
        license_ = _card_license(args.model_name_or_path if local else base_model)
    fma = {name: getattr(fmt.config, name) for name in ("max_position_embeddings", *FMA_OPTIONS)}
    return {
        "base_model": base_model,
        "license": license_,
        "languages": languages,
        "chat_template": tokenizer.chat_template is not None,
        "source": {
            "model_name_or_path": args.model_name_or_path,
            "gguf_file": args.gguf_file,
            "sha256": sha256,
            "revision": None if local else getattr(source.config, "_commit_hash", None),
        },
        "dtype": str(fmt.dtype).removeprefix("torch."),
        "fma": fma,
    }


def convert_checkpoint(args: ConvertArguments) -> FMTForCausalLM:
    """Load the Llama checkpoint (or GGUF file) and its tokenizer, convert it and save the FMT checkpoint (and, with
    ``dense_output_dir``, the source) with the tokenizer and, beside the FMT weights, the
    :func:`conversion_record`; return the FMT model."""
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
    with open(os.path.join(args.output_dir, CONVERSION_RECORD_NAME), "w", encoding="utf-8") as f:
        json.dump(conversion_record(args, model, tokenizer, fmt), f, indent=2)
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
    "conversion_record",
    "convert_checkpoint",
    "convert_llama_to_fmt",
    "fmt_config_from_llama",
    "gguf_base_model",
    "gguf_metadata",
    "load_llama",
]
