"""Incremental decoding with Fast Multipole Attention: the multilevel coarse state of one sequence (docs/fma.md §8).

:class:`FMAState` is what a causal FMA layer keeps of a sequence's past; :class:`IncrementalDecoding` (mixed into
``FastMultipoleAttention``) creates it, fills it from a prompt (``prefill``) and attends new tokens to it
(``step``). Decoding is exact: a step sees the same logits and values as the full forward pass over the whole
sequence, up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch



def ring_write(ring: torch.Tensor, first: int, items: torch.Tensor) -> torch.Tensor:
    """``ring`` (H, size, ...) after writing ``items`` (H, c, ...) of consecutive positions ``first ..
    first+c-1``, position j at slot ``j % size`` (only the last ``size`` survive). What a slot then holds is
    :func:`~fma_partition.ring_positions`."""
    size, c = ring.shape[1], items.shape[1]
    keep = min(c, size)
    slots = torch.arange(first + c - keep, first + c, device=ring.device) % size
    return ring.index_copy(1, slots, items[:, c - keep:])


def ring_read(ring: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Positions ``start .. stop-1`` of ``ring`` (H, size, ...), all among the last ``size`` written."""
    return ring[:, torch.arange(start, stop, device=ring.device) % ring.shape[1]]


@dataclass(frozen=True)
class FMAState:
    """What causal FMA keeps of one sequence's past in one layer (§8), with ``length`` tokens consumed.

    - ``fine_k``/``fine_v`` (H_kv, 2m, d): the last ``2m`` fine keys/values, a ring (position j at slot
      ``j % 2m``), so the window ``[(floor(t/m)-1)m, t)`` is always inside.
    - ``partial_k``/``partial_v`` (L, H_kv, p, d): per level, the bias-free partial sum of the group being
      filled, over its complete fine blocks (the tokens of the block being filled wait in the fine ring).
    - ``groups_k``/``groups_v`` (L, H_kv, 3, p, d): per level, a ring of the last three complete groups (group g
      at slot ``g % 3``) -- exactly the groups a present or future query can still need.
    - ``level_queries`` (L, H, d), coarse query mode only: per level, the query that opened the current
      sub-window (the coarse query of every token in it).

    ``4m + 8pL`` key/value vectors per key/value head, whatever the length. Frozen: updates build new tensors,
    so a state shared by several beams after reordering stays intact.
    """

    length: int
    fine_k: torch.Tensor
    fine_v: torch.Tensor
    partial_k: torch.Tensor
    partial_v: torch.Tensor
    groups_k: torch.Tensor
    groups_v: torch.Tensor
    level_queries: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map_tensors(self, fn) -> FMAState:
        """A copy with ``fn`` applied to every tensor (e.g. a device move)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass(frozen=True)
class LevelUpdate:
    """One level's part of consuming new tokens: the summaries of the groups they complete (``first_group`` ..,
    bias included) and the new partial sums (bias-free) of the group then being filled."""

    first_group: int
    complete_k: torch.Tensor  # (H_kv, groups, p, d)
    complete_v: torch.Tensor
    partial_k: torch.Tensor  # (H_kv, p, d)
    partial_v: torch.Tensor


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics need float32 at least: bf16/fp16 inputs are computed (and states kept) in float32."""
    return torch.promote_types(dtype, torch.float32)


class IncrementalDecoding:
    """``init_state`` / ``prefill`` / ``step`` of a causal ``FastMultipoleAttention`` (§8).

    Uses the host module's ``partition``, ``k_downsample``/``v_downsample``, ``num_levels``, ``query_mode`` and
    ``boundary``.
    """

    def init_state(self, heads: int, kv_heads: int, dtype: torch.dtype, device=None) -> FMAState:
        """The state of an empty sequence: nothing consumed, every buffer zero. Half-precision inputs get a
        float32 state: partial sums add up thousands of shares."""
        if not self.causal:
            raise ValueError("incremental decoding needs a causal FastMultipoleAttention (causal=True)")
        if self.num_levels is None:  # its levels would have to grow with the sequence (§7a)
            raise ValueError("incremental decoding of a FastMultipoleAttention without a length cap (max_seq_len=None) "
                             "is not supported yet: build it with a max_seq_len, or run without a cache "
                             "(use_cache=False)")
        dtype = _softmax_dtype(dtype)
        m, p, d, levels = self.block_size, self.coarse_tokens, self.head_dim, self.num_levels

        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return FMAState(0, zeros(kv_heads, 2 * m, d), zeros(kv_heads, 2 * m, d), zeros(levels, kv_heads, p, d),
                        zeros(levels, kv_heads, p, d), zeros(levels, kv_heads, 3, p, d),
                        zeros(levels, kv_heads, 3, p, d),
                        zeros(levels, heads, d) if self.query_mode == "coarse" else None)

    def prefill(self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> FMAState:
        """Consume tokens whose attention output was computed elsewhere (e.g. by ``forward`` over a whole prompt):
        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) of one sequence. Only the tail the state keeps is summarised,
        in the state's precision (float32 at least)."""
        dtype = state.fine_k.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return self._advance(state, q, k, v, self._level_updates(state, k, v, tail_only=True))

    def step(self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[torch.Tensor, FMAState]:
        """Attend ``c`` new tokens of one sequence to its past and to each other, then consume them.

        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) at positions ``state.length + [0, c)``. Returns the output
        (H, c, d) -- the same as rows ``length .. length+c-1`` of ``forward`` over the whole sequence (§8) --
        and the new state. ``c = 1`` is a decoding step; larger ``c`` is one chunk of a chunked prefill, whose
        cost grows like ``c * (c + 2m + 3pL)``.
        """
        if self.training and self.dropout:
            raise ValueError("FastMultipoleAttention.step runs without dropout: call .eval() first")
        out_dtype, dtype = q.dtype, state.fine_k.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if q.shape[1] == 1:
            out = self._attend_token(state, q, k, v)
            updates = self._level_updates(state, k, v, tail_only=True)
        else:
            updates = self._level_updates(state, k, v, tail_only=False)
            out = self._attend_chunk(state, q, k, v, updates)
        return out.to(out_dtype), self._advance(state, q, k, v, updates)

    # ------------------------------------------------------------------ consuming tokens

    def _level_updates(self, state, k, v, tail_only) -> list[LevelUpdate] | None:
        """Per level, the :class:`LevelUpdate` of consuming ``k``/``v`` (H_kv, c, d); None when no fine block
        completes (the levels take new tokens once per fine block: group widths are multiples of m, so no group
        can complete before its last block does). With ``tail_only``, at most the last three complete groups."""
        t, c, m = state.length, k.shape[1], self.block_size
        block_start, end = t // m * m, (t + c) // m * m  # shares are summed over positions [block_start, end)
        if end == block_start or not self.num_levels:
            return None
        # the block's earlier tokens wait in the fine ring
        tokens_k = torch.cat([ring_read(state.fine_k, block_start, t), k], 1)[:, :end - block_start]
        tokens_v = torch.cat([ring_read(state.fine_v, block_start, t), v], 1)[:, :end - block_start]
        updates = []
        for level in range(1, self.num_levels + 1):
            width = self.partition.group_width(level)
            end_group = (t + c) // width  # groups before this one are complete after the chunk
            start = max(block_start, (end_group - 3) * width) if tail_only else block_start
            positions = torch.arange(start, end, device=k.device)
            first = start // width
            summed = {}
            for name, family, tokens, partial in (("k", self.k_downsample, tokens_k, state.partial_k[level - 1]),
                                                  ("v", self.v_downsample, tokens_v, state.partial_v[level - 1])):
                x = tokens[:, start - block_start:]
                shares, bias = family(x, level=level, offsets=positions % width)  # (H_kv, c', p, d)
                group_sums = x.new_zeros(x.shape[0], (end - 1) // width - first + 1, shares.shape[-2], x.shape[-1])
                group_sums.index_add_(1, positions // width - first, shares)
                if first == t // width:  # the group being filled when the chunk began
                    group_sums[:, 0] += partial
                n_complete = end_group - first
                new_partial = group_sums[:, n_complete] if end > end_group * width else torch.zeros_like(partial)
                summed[name] = (group_sums[:, :n_complete] + bias, new_partial)
            updates.append(LevelUpdate(first, summed["k"][0], summed["v"][0], summed["k"][1], summed["v"][1]))
        return updates

    def _advance(self, state, q, k, v, updates) -> FMAState:
        """The state after consuming ``q``/``k``/``v`` (c tokens) with the given level updates."""
        t, c = state.length, k.shape[1]
        changed = {"fine_k": ring_write(state.fine_k, t, k), "fine_v": ring_write(state.fine_v, t, v)}
        if updates is not None:
            changed["groups_k"] = torch.stack([ring_write(ring, u.first_group, u.complete_k)
                                               for ring, u in zip(state.groups_k, updates)])
            changed["groups_v"] = torch.stack([ring_write(ring, u.first_group, u.complete_v)
                                               for ring, u in zip(state.groups_v, updates)])
            changed["partial_k"] = torch.stack([u.partial_k for u in updates])
            changed["partial_v"] = torch.stack([u.partial_v for u in updates])
        if state.level_queries is not None and self.num_levels:
            level_queries = []
            for level in range(1, self.num_levels + 1):
                sub_window = self.partition.group_width(level) // self.coarse_tokens
                opener = (t + c - 1) // sub_window * sub_window  # first position of the last sub-window touched
                level_queries.append(q[:, opener - t] if opener >= t else state.level_queries[level - 1])
            changed["level_queries"] = torch.stack(level_queries)
        return replace(state, length=t + c, **changed)

    # ------------------------------------------------------------------ attending new tokens

    def _level_query_rows(self, state, q, level):
        """Coarse query mode: the level-l query of each new token -- the query that opened its sub-window of
        ``w_l / p`` tokens, new (in ``q``) or stored in the state."""
        t, c = state.length, q.shape[1]
        sub_window = self.partition.group_width(level) // self.coarse_tokens
        opener = torch.arange(t, t + c, device=q.device) // sub_window * sub_window
        fresh = q[:, (opener - t).clamp(min=0)]  # (H, c, d)
        stored = state.level_queries[level - 1][:, None].expand_as(fresh)
        return torch.where((opener >= t)[None, :, None], fresh, stored)

    def _attend_chunk(self, state, q, k, v, updates):
        """The §3/§4 partition for queries at ``t .. t+c-1`` over the state and the new tokens, one softmax."""
        heads, c, d = q.shape
        kv_heads, t, p = k.shape[0], state.length, self.coarse_tokens
        rows = heads // kv_heads * c  # (g heads, c positions) per key/value head
        queries = (q * d ** -0.5).reshape(kv_heads, rows, d)

        keys, values = [torch.cat([state.fine_k, k], 1)], [torch.cat([state.fine_v, v], 1)]
        logits = [queries @ keys[0].transpose(-1, -2)]
        new_groups = []
        for level in range(1, self.num_levels + 1):
            if updates is None:
                new_k = new_v = k.new_zeros(kv_heads, 0, p, d)
            else:
                new_k, new_v = updates[level - 1].complete_k, updates[level - 1].complete_v
            new_groups.append(new_k.shape[1])
            level_keys = torch.cat([state.groups_k[level - 1], new_k], 1).flatten(1, 2)
            values.append(torch.cat([state.groups_v[level - 1], new_v], 1).flatten(1, 2))
            level_q = queries
            if self.query_mode == "coarse":
                level_q = (self._level_query_rows(state, q, level) * d ** -0.5).reshape(kv_heads, rows, d)
            logits.append(level_q @ level_keys.transpose(-1, -2))
        if self.boundary == "zero_sink":
            logits.append(queries.new_zeros(kv_heads, rows, 1))
            values.append(v.new_zeros(kv_heads, 1, d))
        bias = self.partition.state_bias(t, c, self.num_levels, new_groups, q.dtype, q.device)
        logits = torch.cat(logits, -1).view(kv_heads, -1, c, bias.shape[-1]) + bias
        probs = torch.softmax(logits, -1).flatten(1, 2)  # (H_kv, g*c, S)
        return (probs @ torch.cat(values, 1)).reshape(heads, c, d)

    def _attend_token(self, state, q, k, v):
        """:meth:`_attend_chunk` for one token in about a dozen tensor operations: the token's own group is never
        complete, so it reads the fine ring, itself and the rings of complete groups, with the cached slot bias
        of its position."""
        heads, _, d = q.shape
        kv_heads, t, m, p = k.shape[0], state.length, self.block_size, self.coarse_tokens
        levels = self.num_levels

        coarse_k = state.groups_k.transpose(0, 1).reshape(kv_heads, -1, d)
        keys = [state.fine_k, k, coarse_k]
        values = [state.fine_v, v, state.groups_v.transpose(0, 1).reshape(kv_heads, -1, d)]
        if self.boundary == "zero_sink":
            keys.append(k.new_zeros(kv_heads, 1, d))
            values.append(v.new_zeros(kv_heads, 1, d))

        queries = (q * d ** -0.5).reshape(kv_heads, heads // kv_heads, d)
        logits = queries @ torch.cat(keys, 1).transpose(-1, -2)  # (H_kv, g, S): a key/value head's g heads as rows
        if self.query_mode == "coarse" and levels:
            level_queries = torch.stack([self._level_query_rows(state, q, level)[:, 0]
                                         for level in range(1, levels + 1)]) * d ** -0.5  # (L, H, d)
            coarse_logits = torch.einsum("lkgd,lksd->kgls", level_queries.view(levels, kv_heads, -1, d),
                                         state.groups_k.flatten(2, 3)).flatten(2)
            fine_slots = 2 * m + 1
            logits = torch.cat([logits[..., :fine_slots], coarse_logits, logits[..., fine_slots + levels * 3 * p:]],
                               -1)
        probs = torch.softmax(logits + self.partition.step_bias(t, levels, q.dtype, q.device), -1)
        return (probs @ torch.cat(values, 1)).reshape(heads, 1, d)
