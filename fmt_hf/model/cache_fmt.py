"""The multilevel coarse key/value cache of FMT: a transformers `Cache` whose layers keep, per sequence, only what
Fast Multipole Attention can still read -- the last two fine blocks, and per level the group being filled plus the
last three complete coarse groups (docs/fma.md §8). Memory per layer and key/value head is
``4m + 8pL`` vectors, O(m + p log n), instead of the ``2n`` of a dense cache; decoding is exact.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .fma_attention import FastMultipoleAttention
from .fma_state import FMAState


def is_fmt_cache(cache) -> bool:
    """Whether ``cache`` is an :class:`FMTCache` -- also one from another copy of this module (Hub code is imported
    under ``transformers_modules...`` next to an installed ``fmt_hf``), so the check is by marker, not identity."""
    return bool(getattr(cache, "is_multilevel_fma_cache", False))


class FMTCacheLayer(CacheLayerMixin):
    """One decoder layer's cache: an :class:`FMAState` per sequence of the batch.

    Sequences are kept apart because each one's hierarchy starts at its own first real token (left padding), so
    their positions differ. States are immutable, which makes beam reordering a plain re-indexing. The layer
    owns its updates: :meth:`attend` takes a layer's new queries, keys and values, attends them to the past and
    stores what FMA can still read.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.states: list[FMAState] = []
        self.seen_tokens = 0  # every position fed so far, padding included: what `get_seq_length` reports

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "FMTCacheLayer holds multilevel coarse states, not full key/value tensors, so it cannot hand back the "
            "past keys and values: use `attend`, which attends the new tokens to the past and stores them.")

    def attend(self, fma: FastMultipoleAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding_mask: torch.Tensor | None, lengths: list[int] | None = None) -> torch.Tensor:
        """FMA output of new tokens over everything this layer has seen, then consume them (the FMT counterpart
        of a transformers cache layer's ``update``).

        ``query`` (B, H, c, d), ``key``/``value`` (B, H_kv, c, d). Rows arrive aligned (see ``FMTModel``): row b's
        first ``lengths[b]`` columns (default: all) are its next positions, the rest is alignment padding;
        ``key_padding_mask`` (B, c) marks real tokens, so masked columns among a row's positions are holes (zero
        keys and values, never attended, as in the full forward pass). A first chunk of every row runs the full
        O(n log n) forward and prefills the states; later chunks and decoding steps attend each row's state
        (exact, see ``FastMultipoleAttention.step``).
        """
        batch, heads, length, _ = query.shape
        lengths = [length] * batch if lengths is None else lengths
        valid = [None] * batch if key_padding_mask is None else [row[:n] for row, n in zip(key_padding_mask, lengths)]
        states = list(self.states) or [fma.init_state(heads, key.shape[1], key.dtype, key.device)] * batch
        if all(state.length == 0 for state in states):
            output = fma(query, key, value, key_padding_mask=key_padding_mask)
            states = [fma.prefill(state, q[:, :n], k[:, :n], v[:, :n], row_valid) if n else state
                      for state, n, q, k, v, row_valid in zip(states, lengths, query, key, value, valid)]
        else:
            output = torch.zeros_like(query)
            for row, (state, n) in enumerate(zip(states, lengths)):
                if n:
                    output[row, :, :n], states[row] = fma.step(
                        state, query[row, :, :n], key[row, :, :n], value[row, :, :n], valid[row])
        self.states = states
        self.seen_tokens += length
        self.is_initialized = True
        return output

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.states)

    @property
    def batch_size(self) -> int:
        return len(self.states)

    def reset(self) -> None:
        self.states, self.seen_tokens, self.is_initialized = [], 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = [self.states[i] for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = [state for state in self.states for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = [self.states[i] for i in indices.tolist()]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "FMTCache cannot be cropped: it keeps coarse summaries, not the tokens a crop would roll back, so "
            "assisted and prompt-lookup decoding are not supported with FMT.")

    def offload(self):
        self.states = [state.map_tensors(lambda t: t.to("cpu", non_blocking=True)) for state in self.states]

    def prefetch(self):
        if self.states:
            device = self.states[0].fine_k.device
            self.states = [state.map_tensors(lambda t: t.to(device, non_blocking=True)) for state in self.states]


class FMTCache(Cache):
    """The key/value cache `FMTForCausalLM` builds for `generate` and for `forward(use_cache=True)`.

    Args:
        num_hidden_layers: number of decoder layers (one :class:`FMTCacheLayer` each).

    Supports greedy and sampled decoding, beam search (`reorder_cache`), `num_return_sequences`
    (`batch_repeat_interleave`), continuing from a returned cache, and `reset`. `crop` -- and with it assisted and
    prompt-lookup decoding -- raises, since the summaries cannot be rolled back token by token.
    """

    is_multilevel_fma_cache = True  # see is_fmt_cache

    def __init__(self, num_hidden_layers: int):
        super().__init__(layers=[FMTCacheLayer() for _ in range(num_hidden_layers)])

    def attend(self, layer_idx: int, fma: FastMultipoleAttention, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
               lengths: list[int] | None = None) -> torch.Tensor:
        """:meth:`FMTCacheLayer.attend` of layer ``layer_idx``."""
        return self.layers[layer_idx].attend(fma, query, key, value, key_padding_mask, lengths)

    def started_rows(self) -> list[bool]:
        """Per row, whether its sequence has begun (some real token consumed); empty before the first call."""
        return [state.length > 0 for state in self.layers[0].states] if self.layers else []

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(layer.nbytes for layer in self.layers)

    def activate_past_recording(self):
        raise NotImplementedError(
            "FMTCache cannot record and roll back its past: assisted and prompt-lookup decoding are not supported "
            "with FMT; use greedy, sampling or beam search.")
