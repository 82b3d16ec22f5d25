"""What the decoder layers of an FMT model read, prepared from the model's inputs in one call (`prepare_layer_inputs`,
as Llama's `create_causal_mask` is one call): the cache, checked against the attention implementation and the
length cap, and the mask; and the cache `generate` keeps (`prepare_generation_cache`).

Under FMA the mask is FMA's 2D key padding mask, and the rows are aligned first: FMA's hierarchy is positional, so a
left-padded row has its padding moved behind its tokens (each row's hierarchy then starts at its first real token
and the row gives exactly what it gives alone), and the outputs are shifted back afterwards (`LayerInputs.restore`).
Masked columns after a row's first real token (holes, e.g. a pad id inside a prompt) are positions whose keys are
left out, with or without a cache. A row the cache has already started takes every new column as a position (no
shift). The dense implementations get transformers' own masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMode
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging

from .cache_fmt import FMTCache, is_fmt_cache
from .fma_downsample import LENGTH_FREE_MODES
from .fma_options import FMA_ATTN_IMPLEMENTATION, sequence_cap

logger = logging.get_logger(__name__)

# For error messages: the settings that lift the length cap.
_LENGTH_FREE_CHOICES = " or ".join(f'fma_downsample="{mode}"' for mode in LENGTH_FREE_MODES) + ', fma_boundary="mask"'


@dataclass
class LayerInputs:
    """The decoder layers' inputs. Under FMA `inputs_embeds` and `position_ids` are aligned (each row's first real
    token at index 0) and `attention_mask` is the boolean key padding mask of the aligned columns (None: nothing is
    padded, FMA's faster path); for the dense implementations it is what `create_causal_mask` returns."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.LongTensor
    cache: Cache | None
    # FMA with a cache: how many of the new columns are each row's positions (the alignment padding is not).
    fma_lengths: list[int] | None = None
    # How far each row moved left (None: no row did).
    shift: torch.Tensor | None = None

    def restore(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` of the aligned rows back in the layout of the inputs."""
        return hidden_states if self.shift is None else shift_rows(hidden_states, -self.shift)


def prepare_layer_inputs(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cache: Cache | None,
    build_cache: bool,
    output_attentions: bool = False,
) -> LayerInputs:
    """The inputs of the decoder layers of an FMT model of `config` (its attention implementation decides the mask
    and the cache). `cache` is the caller's; with none given, one is built when `build_cache` (causal models only).
    Refuses an empty input; warns that FMA has no attention weights to return."""
    fma = config._attn_implementation == FMA_ATTN_IMPLEMENTATION
    if inputs_embeds.shape[1] == 0:
        raise ValueError(
            "FMT got an empty input (`input_ids` of length 0): pass at least one token; to generate from nothing, "
            "start from the tokenizer's BOS token, e.g. `input_ids=torch.tensor([[tokenizer.bos_token_id]])`."
        )
    if fma and output_attentions:  # a warning, not an error: tools that ask for every output keep working
        logger.warning_once(
            "output_attentions=True: FMA never forms a token-by-token attention matrix (distant tokens are read "
            "through coarse summaries), so `attentions` stays empty. Load the same weights with "
            'attn_implementation="eager" to see dense attention weights.'
        )
    cache = _checked_cache(config, cache, build_cache, fma)
    past = cache.get_seq_length() if cache is not None else 0
    batch, seq_len = inputs_embeds.shape[:2]
    cap = sequence_cap(config, config._attn_implementation)
    if cap is not None and past + seq_len > cap:
        raise ValueError(
            f"Input length {past + seq_len} ({past} cached + {seq_len} new) exceeds max_position_embeddings ({cap}), "
            f'the longest sequence the FMA hierarchy of this model (fma_downsample="{config.fma_downsample}") was '
            f"built for. Length-free downsamplers ({_LENGTH_FREE_CHOICES}) have no such cap; these weights also run "
            'densely at any length (attn_implementation="sdpa").'
        )
    if fma:
        key_padding_mask, shift = _fma_key_padding_mask(attention_mask, inputs_embeds, cache, past)
        lengths = None
        if cache is not None:
            lengths = [seq_len] * batch if shift is None else (seq_len - shift).tolist()
        if shift is not None:
            inputs_embeds = shift_rows(inputs_embeds, shift)
            if position_ids is not None:
                position_ids = shift_rows(position_ids.expand(batch, -1), shift)
    if position_ids is None:  # under FMA, aligned rows count from their first real token
        position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)
    if fma:
        return LayerInputs(inputs_embeds, key_padding_mask, position_ids, cache, lengths, shift)
    # Causal or bidirectional according to `config.is_causal` (transformers switches on that field).
    mask = create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
    )
    return LayerInputs(inputs_embeds, mask, position_ids, cache)


def _checked_cache(config, cache: Cache | None, build_cache: bool, fma: bool) -> Cache | None:
    """The cache this call reads and extends: the given one, a new one when `build_cache`, or None."""
    if cache is None:
        if not build_cache or not config.is_causal:
            return None
        return FMTCache(config.num_hidden_layers) if fma else DynamicCache(config=config)
    if not config.is_causal:
        raise ValueError("A key/value cache needs a causal model; this one is bidirectional (config.is_causal).")
    if fma and not is_fmt_cache(cache):
        raise ValueError(
            f"FMA attention keeps its own multilevel cache (FMTCache); got {type(cache).__name__}. Pass no cache "
            'to have one built, or load the model with attn_implementation="sdpa" to use transformers\' caches.'
        )
    if not fma and is_fmt_cache(cache):
        raise ValueError(f"FMTCache serves only FMA attention, not {config._attn_implementation!r}.")
    return cache


def _fma_key_padding_mask(
    attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor, cache: Cache | None, past: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """FMA's view of the padding: the 2D boolean key padding mask of the new columns, aligned (None when nothing is
    padded), and how far each row must shift left so that its first real token sits at index 0 (None when no row
    starts with padding)."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() != 2:
        raise ValueError(
            "FMA takes a 2D (batch_size, seq_len) attention_mask of 1s (tokens) and 0s (padding), got shape "
            f"{tuple(attention_mask.shape)}; prepared 4D masks only work with a dense attn_implementation."
        )
    batch, seq_len = inputs_embeds.shape[:2]
    if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (seq_len, past + seq_len):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the inputs ({batch}, {seq_len})"
            + (f" after {past} cached tokens" if past else "")
            + "."
        )
    key_padding_mask = attention_mask[:, -seq_len:].to(device=inputs_embeds.device, dtype=torch.bool)
    if bool(key_padding_mask.all()):
        return None, None
    shift = (key_padding_mask.cumsum(1) == 0).sum(1)  # leading padding of each row
    started = cache.started_rows() if cache is not None else []
    if any(started):
        shift = shift.masked_fill(torch.tensor(started, device=shift.device), 0)
    if bool(shift.any()):
        key_padding_mask = shift_rows(key_padding_mask, shift)
    else:
        shift = None
    return (None if bool(key_padding_mask.all()) else key_padding_mask), shift


def shift_rows(tensor: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move row b of `tensor` (batch, seq_len, ...) `shift[b]` positions to the left (right when negative); what
    enters at the other end is zero."""
    seq_len = tensor.shape[1]
    source = torch.arange(seq_len, device=tensor.device) + shift[:, None]
    inside = (source >= 0) & (source < seq_len)
    gathered = tensor.gather(
        1, source.clamp(0, seq_len - 1).view(*source.shape, *[1] * (tensor.dim() - 2)).expand_as(tensor)
    )
    return gathered * inside.view(*inside.shape, *[1] * (tensor.dim() - 2))


def prepare_generation_cache(
    config, generation_config, model_kwargs: dict, generation_mode, max_cache_length: int
) -> bool:
    """`FMTForCausalLM`'s part of `generate`'s cache preparation: checks, before any work, that the prompt and the
    new tokens fit the model (`max_cache_length` is every position `generate` will run through it); then, under FMA,
    puts the `FMTCache` into `model_kwargs` and returns True. False: a dense implementation, whose cache transformers
    prepares."""
    limit = sequence_cap(config, config._attn_implementation)
    if limit is not None and max_cache_length > limit:
        new_tokens = generation_config.max_new_tokens
        asked = (
            f"a prompt of {max_cache_length + 1 - new_tokens} tokens plus max_new_tokens={new_tokens}"
            if new_tokens is not None
            else f"max_length={generation_config.max_length}"
        )
        raise ValueError(
            f"generate() would run {max_cache_length} positions through the model ({asked}), but it holds at "
            f"most max_position_embeddings={limit}: its FMA downsamplers ({config.fma_downsample!r}) have "
            "weights for that length only. Lower max_new_tokens (or max_length), shorten the prompt, or use a "
            f"length-free downsampler ({_LENGTH_FREE_CHOICES})."
        )
    if config._attn_implementation != FMA_ATTN_IMPLEMENTATION:
        return False
    if generation_mode == GenerationMode.ASSISTED_GENERATION:
        raise ValueError(
            "Assisted and prompt-lookup decoding roll the cache back token by token, which FMT's multilevel "
            "cache cannot do (it keeps coarse summaries); use greedy, sampling or beam search."
        )
    if generation_config.cache_implementation is not None:
        raise ValueError(
            f"cache_implementation={generation_config.cache_implementation!r} is not supported with FMA: FMT "
            "builds its own multilevel FMTCache. Leave cache_implementation unset, or load the model with "
            'attn_implementation="sdpa" to use transformers\' caches.'
        )
    user_cache = model_kwargs.get("cache")
    if user_cache is not None:
        if not is_fmt_cache(user_cache):
            raise ValueError(f"FMT under FMA needs an FMTCache to continue from, got {type(user_cache).__name__}.")
        user_cache._is_user_defined = True
    elif generation_config.use_cache:
        model_kwargs["cache"] = FMTCache(config.num_hidden_layers)
    return True


__all__ = ["LayerInputs", "prepare_generation_cache", "prepare_layer_inputs", "shift_rows"]
