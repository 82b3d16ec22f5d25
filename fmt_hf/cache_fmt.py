"""The multilevel coarse key/value cache of FMT: a transformers `Cache` whose layers keep, per sequence, only what
Fast Multipole Attention can still read -- the last two fine blocks, and per level the group being filled plus the
last three complete coarse groups (shared/design/fma.md §8). Memory per layer and key/value head is
``4m + 8pL`` vectors, O(m + p log n), instead of the ``2n`` of a dense cache; decoding is exact.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .fma import FMAState


class FMTCacheLayer(CacheLayerMixin):
    """One decoder layer's cache: an :class:`~fmt_hf.fma.FMAState` per sequence of the batch.

    Sequences are kept apart because each one's hierarchy starts at its own first real token (left padding), so
    their positions differ. States are immutable, which makes beam reordering a plain re-indexing.
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
            "FMTCacheLayer holds multilevel coarse states, not full key/value tensors: FMT attention reads and "
            "writes `states` itself (see FMTAttention).")

    def set_states(self, states: list[FMAState], new_tokens: int) -> None:
        self.states = states
        self.seen_tokens += new_tokens
        self.is_initialized = True

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
        self.states = [_map_tensors(state, lambda t: t.to("cpu", non_blocking=True)) for state in self.states]

    def prefetch(self):
        if self.states:
            device = self.states[0].fine_k.device
            self.states = [_map_tensors(state, lambda t: t.to(device, non_blocking=True)) for state in self.states]


def _map_tensors(state: FMAState, fn) -> FMAState:
    return replace(state, **{f.name: fn(getattr(state, f.name)) for f in fields(state)
                             if isinstance(getattr(state, f.name), torch.Tensor)})


class FMTCache(Cache):
    """The key/value cache `FMTForCausalLM` builds for `generate` and for `forward(use_cache=True)`.

    Args:
        num_hidden_layers: number of decoder layers (one :class:`FMTCacheLayer` each).

    Supports greedy and sampled decoding, beam search (`reorder_cache`), `num_return_sequences`
    (`batch_repeat_interleave`), continuing from a returned cache, and `reset`. `crop` -- and with it assisted and
    prompt-lookup decoding -- raises, since the summaries cannot be rolled back token by token.
    """

    def __init__(self, num_hidden_layers: int):
        super().__init__(layers=[FMTCacheLayer() for _ in range(num_hidden_layers)])

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(layer.nbytes for layer in self.layers)

    def activate_past_recording(self):
        raise NotImplementedError(
            "FMTCache cannot record and roll back its past: assisted and prompt-lookup decoding are not supported "
            "with FMT; use greedy, sampling or beam search.")
