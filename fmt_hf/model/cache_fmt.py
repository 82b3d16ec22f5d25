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
    """One decoder layer's cache: an :class:`FMAState` holding every row of the batch.

    Rows have their own positions (each one's hierarchy starts at its own first real token, so left padding makes
    them differ); a decoding step attends and stores every row's token in one batched step. The layer owns its
    updates: :meth:`attend` takes a layer's new queries, keys and values, attends them to the past and stores what
    FMA can still read.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state: FMAState | None = None
        self.seen_tokens = 0  # every position fed so far, padding included: what `get_seq_length` reports

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "FMTCacheLayer holds multilevel coarse states, not full key/value tensors, so it cannot hand back the "
            "past keys and values: use `attend`, which attends the new tokens to the past and stores them."
        )

    def attend(
        self,
        fma: FastMultipoleAttention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """FMA output of new tokens over everything this layer has seen, then consume them (the FMT counterpart
        of a transformers cache layer's ``update``).

        ``query`` (B, H, c, d), ``key``/``value`` (B, H_kv, c, d). Rows arrive aligned (see ``FMTModel``): row b's
        first ``lengths[b]`` columns (default: all) are its next positions, the rest is alignment padding;
        ``key_padding_mask`` (B, c) marks real tokens, so masked columns among a row's positions are holes (zero
        keys and values, never attended, as in the full forward pass). A first chunk of every row runs the full
        O(n log n) forward and prefills the rows' states; later chunks are one
        :meth:`~fma_decode.FMADecoder.step` (a decoding step, one position per row, is a fixed number of batched
        operations; all exact, §8).
        """
        batch, heads, length, _ = query.shape
        if self.state is None or not any(self.state.lengths):
            output = fma(query, key, value, key_padding_mask=key_padding_mask)
            self.state = fma.decoder.init_state(heads, key.shape[1], key.dtype, key.device, batch_size=batch)
            fma.decoder.prefill(self.state, query, key, value, key_padding_mask, lengths)
        else:
            output = fma.decoder.step(self.state, query, key, value, key_padding_mask, lengths)
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
        return 0 if self.state is None else self.state.nbytes

    @property
    def batch_size(self) -> int:
        return 0 if self.state is None else self.state.batch_size

    def reset(self) -> None:
        self.state, self.seen_tokens, self.is_initialized = None, 0, False

    def _select_rows(self, rows: list[int]) -> None:
        if self.state is not None:
            self.state = self.state.select(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows([b for b in range(self.batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "FMTCache cannot be cropped: it keeps coarse summaries, not the tokens a crop would roll back, so "
            "assisted and prompt-lookup decoding are not supported with FMT."
        )

    def offload(self):
        if self.state is not None:
            self.state = self.state.map_tensors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.state is not None:
            device = self.state.fine_k.device
            self.state = self.state.map_tensors(lambda t: t.to(device, non_blocking=True))


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

    def attend(
        self,
        layer_idx: int,
        fma: FastMultipoleAttention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """:meth:`FMTCacheLayer.attend` of layer ``layer_idx``."""
        return self.layers[layer_idx].attend(fma, query, key, value, key_padding_mask, lengths)

    def started_rows(self) -> list[bool]:
        """Per row, whether its sequence has begun (some real token consumed); empty before the first call."""
        state = self.layers[0].state if self.layers else None
        return [] if state is None else [length > 0 for length in state.lengths]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(layer.nbytes for layer in self.layers)

    def activate_past_recording(self):
        raise NotImplementedError(
            "FMTCache cannot record and roll back its past: assisted and prompt-lookup decoding are not supported "
            "with FMT; use greedy, sampling or beam search."
        )
