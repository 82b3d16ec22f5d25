"""Incremental decoding with Fast Multipole Attention: the multilevel coarse state of one sequence (docs/fma.md §8).

:class:`FMAState` is what a causal FMA layer keeps of a sequence's past; :class:`IncrementalDecoding` (mixed into
``FastMultipoleAttention``) creates it, fills it from a prompt (``prefill``) and attends new tokens to it
(``step``). Decoding is exact: a step sees the same logits and values as the full forward pass over the whole
sequence, up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .fma_partition import MASK_VALUE, num_levels, ring_positions



def ring_write(ring: torch.Tensor, first: int, items: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``ring`` (..., size, ...) after writing ``items`` (..., c, ...) of consecutive positions ``first ..
    first+c-1`` along ``dim``, position j at slot ``j % size`` (only the last ``size`` survive). What a slot then
    holds is :func:`~fma_partition.ring_positions`."""
    size, c = ring.shape[dim], items.shape[dim]
    keep = min(c, size)
    items = items.narrow(dim, c - keep, keep)
    start = (first + c - keep) % size
    head = min(keep, size - start)  # slots start .. size-1, then the rest wraps around to 0 ..
    out = ring.clone()
    out.narrow(dim, start, head).copy_(items.narrow(dim, 0, head))
    out.narrow(dim, 0, keep - head).copy_(items.narrow(dim, head, keep - head))
    return out


def ring_read(ring: torch.Tensor, start: int, stop: int, dim: int = 1) -> torch.Tensor:
    """Positions ``start .. stop-1`` of ``ring`` along ``dim``, all among the last ``size`` written."""
    return ring.index_select(dim, torch.arange(start, stop, device=ring.device) % ring.shape[dim])


def _real(valid: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """``valid`` (c,), or all True for the c tokens of ``tokens`` (H, c, d) when None."""
    return torch.ones(tokens.shape[1], dtype=torch.bool, device=tokens.device) if valid is None else valid


@dataclass(frozen=True)
class FMAState:
    """What causal FMA keeps of one sequence's past in one layer (§8), with ``length`` tokens consumed.

    - ``fine_k``/``fine_v`` (H_kv, 2m, d): the last ``2m`` fine keys/values, a ring (position j at slot
      ``j % 2m``), so the window ``[(floor(t/m)-1)m, t)`` is always inside.
    - ``partial_k``/``partial_v`` (L, H_kv, p, d): per level, the bias-free partial sum of the group being
      filled, over its complete fine blocks (the tokens of the block being filled wait in the fine ring). Empty
      (0 levels) for families whose levels derive from each other (``avgpool``, ``recursive``; §7a): a parent is
      computed from two stored children when the second completes.
    - ``groups_k``/``groups_v`` (L, H_kv, 3, p, d): per level, a ring of the last three complete groups (group g
      at slot ``g % 3``) -- exactly the groups a present or future query can still need.
    - ``level_queries`` (L, H, d), coarse query mode only: per level, the query that opened the current
      sub-window (the coarse query of every token in it).
    - ``fine_valid`` (2m,), ``partial_valid`` (L,), ``groups_valid`` (L, 3): which fine slots hold real tokens
      and which groups hold at least one (masked tokens -- holes in an attention mask -- are positions whose
      keys and values are zero and never attended, as in the forward pass); ``holes`` says whether any consumed
      token was masked (without holes the validity masks are all True and attending skips them).

    ``4m + 8pL`` key/value vectors per key/value head (:attr:`num_vectors`): a constant for the families with a
    level per built length; for the derived families L = L(t+1) = ``num_levels(t + 1, m)``, the levels the next
    query reads, so the state gains a level each time the length doubles (``4m + 6pL``). Frozen: updates build new
    tensors, so a state shared by several beams after reordering stays intact.
    """

    length: int
    fine_k: torch.Tensor
    fine_v: torch.Tensor
    partial_k: torch.Tensor
    partial_v: torch.Tensor
    groups_k: torch.Tensor
    groups_v: torch.Tensor
    fine_valid: torch.Tensor
    partial_valid: torch.Tensor
    groups_valid: torch.Tensor
    level_queries: torch.Tensor | None = None
    holes: bool = False

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def num_levels(self) -> int:
        """Coarse levels held."""
        return self.groups_k.shape[0]

    @property
    def num_vectors(self) -> int:
        """Key/value vectors of size d held per key/value head: ``4m + 8pL``."""
        kv = (self.fine_k, self.fine_v, self.partial_k, self.partial_v, self.groups_k, self.groups_v)
        return sum(t.numel() // t.shape[-1] for t in kv) // self.fine_k.shape[0]

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
    complete_valid: torch.Tensor  # (groups,): the group holds a real token
    partial_k: torch.Tensor | None = None  # (H_kv, p, d); None for derived levels, which keep no partial sums
    partial_v: torch.Tensor | None = None
    partial_valid: torch.Tensor | None = None  # ()


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics need float32 at least: bf16/fp16 inputs are computed (and states kept) in float32."""
    return torch.promote_types(dtype, torch.float32)


class IncrementalDecoding:
    """``init_state`` / ``prefill`` / ``step`` of a causal ``FastMultipoleAttention`` (§8).

    Uses the host module's ``partition``, ``k_downsample``/``v_downsample``, ``num_levels``, ``query_mode`` and
    ``boundary``. Families with ``derives_levels`` build level 1 from fine blocks and every higher level from two
    children (§7a); the others sum every level's shares from the fine tokens.
    """

    @property
    def _derives_levels(self) -> bool:
        return getattr(self.k_downsample, "derives_levels", False)

    def init_state(self, heads: int, kv_heads: int, dtype: torch.dtype, device=None) -> FMAState:
        """The state of an empty sequence: nothing consumed, every buffer zero. Half-precision inputs get a
        float32 state: partial sums add up thousands of shares."""
        if not self.causal:
            raise ValueError("incremental decoding needs a causal FastMultipoleAttention (causal=True)")
        if self.num_levels is None and self.boundary == "zero_sink":
            raise ValueError(
                'boundary="zero_sink" without a length cap (max_seq_len=None) counts sinks for the levels the whole '
                "input needs, so an output depends on the input's length and no decoding state can reproduce it: "
                'build the layer with a max_seq_len, or use boundary="mask"')
        dtype = _softmax_dtype(dtype)
        m, p, d = self.block_size, self.coarse_tokens, self.head_dim
        levels = 0 if self._derives_levels else self.num_levels  # derived levels are added as they are needed

        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        def real(*shape):
            return torch.ones(*shape, dtype=torch.bool, device=device)

        return FMAState(0, zeros(kv_heads, 2 * m, d), zeros(kv_heads, 2 * m, d), zeros(levels, kv_heads, p, d),
                        zeros(levels, kv_heads, p, d), zeros(levels, kv_heads, 3, p, d),
                        zeros(levels, kv_heads, 3, p, d), real(2 * m), ~real(levels), real(levels, 3),
                        zeros(levels, heads, d) if self.query_mode == "coarse" else None)

    def _with_levels(self, state: FMAState, levels: int) -> FMAState:
        """``state`` holding ``levels`` coarse levels: new ones (derived families) start as empty rings."""
        new = levels - state.num_levels
        if new <= 0:
            return state

        def grow(t, fill=0):
            return torch.cat([t, t.new_full((new,) + t.shape[1:], fill)])

        changed = {"groups_k": grow(state.groups_k), "groups_v": grow(state.groups_v),
                   "groups_valid": grow(state.groups_valid, True)}
        if state.level_queries is not None:
            changed["level_queries"] = grow(state.level_queries)
        return replace(state, **changed)

    def prefill(self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor | None = None) -> FMAState:
        """Consume tokens whose attention output was computed elsewhere (e.g. by ``forward`` over a whole prompt):
        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) of one sequence; ``valid`` (c,) bool marks real tokens (None:
        all), the others are holes, as ``forward``'s ``key_padding_mask``. Only the tail the state keeps is
        summarised, in the state's precision (float32 at least)."""
        state, q, k, v, valid = self._new_tokens(state, q, k, v, valid)
        updates = self._level_updates(state, k, v, valid, tail_only=True)
        return self._advance(self._with_levels(state, len(updates or [])), q, k, v, valid, updates)

    def step(self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, FMAState]:
        """Attend ``c`` new tokens of one sequence to its past and to each other, then consume them.

        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) at positions ``state.length + [0, c)``; ``valid`` as in
        :meth:`prefill`. Returns the output (H, c, d) -- the same as rows ``length .. length+c-1`` of ``forward``
        over the whole sequence (§8) -- and the new state. ``c = 1`` is a decoding step; larger ``c`` is one chunk
        of a chunked prefill, whose cost grows like ``c * (c + 2m + 3pL)``.
        """
        if self.training and self.dropout:
            raise ValueError("FastMultipoleAttention.step runs without dropout: call .eval() first")
        out_dtype = q.dtype
        state, q, k, v, valid = self._new_tokens(state, q, k, v, valid)
        if q.shape[1] == 1:
            out = self._attend_token(state, q, k, v, valid)
            updates = self._level_updates(state, k, v, valid, tail_only=True)
            state = self._with_levels(state, len(updates or []))
        else:
            updates = self._level_updates(state, k, v, valid, tail_only=False)
            state = self._with_levels(state, len(updates or []))
            out = self._attend_chunk(state, q, k, v, valid, updates)
        return out.to(out_dtype), self._advance(state, q, k, v, valid, updates)

    @staticmethod
    def _new_tokens(state, q, k, v, valid):
        """New tokens in the state's precision; masked ones zeroed (as ``forward`` does), and the state marked
        as holding holes once one arrives. ``valid`` comes back None when every new token is real."""
        dtype = state.fine_k.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if valid is None or bool(valid.all()):
            return state, q, k, v, None
        keep = valid.to(dtype)[:, None]
        return replace(state, holes=True), q * keep, k * keep, v * keep, valid

    # ------------------------------------------------------------------ consuming tokens

    def _level_updates(self, state, k, v, valid, tail_only) -> list[LevelUpdate] | None:
        """Per level, the :class:`LevelUpdate` of consuming ``k``/``v`` (H_kv, c, d); None when no fine block
        completes (the levels take new tokens once per fine block: group widths are multiples of m, so no group
        can complete before its last block does). With ``tail_only``, at most the last three complete groups."""
        t, c, m = state.length, k.shape[1], self.block_size
        block_start, end = t // m * m, (t + c) // m * m  # shares are summed over positions [block_start, end)
        if end == block_start or self.num_levels == 0:
            return None
        if self._derives_levels:
            return self._derived_updates(state, k, v, valid)
        # the block's earlier tokens wait in the fine ring
        tokens_k = torch.cat([ring_read(state.fine_k, block_start, t), k], 1)[:, :end - block_start]
        tokens_v = torch.cat([ring_read(state.fine_v, block_start, t), v], 1)[:, :end - block_start]
        tokens_valid = torch.cat([ring_read(state.fine_valid, block_start, t, dim=0), _real(valid, k)])
        tokens_valid = tokens_valid[:end - block_start]
        updates = []
        for level in range(1, state.num_levels + 1):
            width = self.partition.group_width(level)
            end_group = (t + c) // width  # groups before this one are complete after the chunk
            start = max(block_start, (end_group - 3) * width) if tail_only else block_start
            positions = torch.arange(start, end, device=k.device)
            first = start // width
            n_complete = end_group - first
            # a group is valid when it holds a real token: count them like the sums below
            real = positions.new_zeros((end - 1) // width - first + 1)
            real.index_add_(0, positions // width - first, tokens_valid[start - block_start:].long())
            if first == t // width:
                real[0] += state.partial_valid[level - 1]
            summed = {}
            for name, family, tokens, partial in (("k", self.k_downsample, tokens_k, state.partial_k[level - 1]),
                                                  ("v", self.v_downsample, tokens_v, state.partial_v[level - 1])):
                x = tokens[:, start - block_start:]
                shares, bias = family(x, level=level, offsets=positions % width)  # (H_kv, c', p, d)
                group_sums = x.new_zeros(x.shape[0], (end - 1) // width - first + 1, shares.shape[-2], x.shape[-1])
                group_sums.index_add_(1, positions // width - first, shares)
                if first == t // width:  # the group being filled when the chunk began
                    group_sums[:, 0] += partial
                new_partial = group_sums[:, n_complete] if end > end_group * width else torch.zeros_like(partial)
                summed[name] = (group_sums[:, :n_complete] + bias, new_partial)
            partial_valid = real[n_complete] > 0 if end > end_group * width else real.new_zeros((), dtype=torch.bool)
            updates.append(LevelUpdate(first, summed["k"][0], summed["v"][0], real[:n_complete] > 0,
                                       summed["k"][1], summed["v"][1], partial_valid))
        return updates

    def _derived_updates(self, state, k, v, valid) -> list[LevelUpdate]:
        """:meth:`_level_updates` for families whose levels derive from each other (§7a): level 1 summarises each
        completed fine block, level l+1 group g is ``combine`` of level-l groups 2g, 2g+1, computed when 2g+1
        completes. The state holds the levels the next query reads, L(t+c+1): a level that becomes needed is built
        from its children, all of which are still stored then (a query first needs level l+1 when level l's
        fourth group completes, and the ring holds the three before it)."""
        t, c, m = state.length, k.shape[1], self.block_size
        levels = num_levels(t + c + 1, m) if self.num_levels is None else min(num_levels(t + c + 1, m),
                                                                                self.num_levels)
        levels = max(levels, state.num_levels)
        if levels == 0:
            return []
        # Level 1: every fine block completed by the chunk; a new level 1 also takes the earlier ones (t < 2m
        # then, so they are all in the fine ring).
        start = 0 if state.num_levels == 0 else t // m * m
        end = (t + c) // m * m
        blocks = {}
        for name, family, ring, new in (("k", self.k_downsample, state.fine_k, k), ("v", self.v_downsample,
                                                                                   state.fine_v, v)):
            tokens = torch.cat([ring_read(ring, start, t), new], 1)[:, :end - start]
            blocks[name] = family(tokens, 1)[0]  # (H_kv, blocks, p, d)
        tokens_valid = torch.cat([ring_read(state.fine_valid, start, t, dim=0), _real(valid, k)])[:end - start]
        updates = [LevelUpdate(start // m, blocks["k"], blocks["v"], tokens_valid.view(-1, m).any(1))]
        for level in range(2, levels + 1):
            children, new_level = updates[-1], level > state.num_levels
            # Children stored before the chunk (the ring, if the level existed) then those the chunk completed.
            before = t // self.partition.group_width(level - 1)
            stored = ring_positions(before - 1, 3, k.device) if level - 1 <= state.num_levels else \
                torch.zeros(0, dtype=torch.long, device=k.device)
            stored = stored[(stored >= 0) & (stored < children.first_group)].sort().values
            first_child = int(stored[0]) if len(stored) else children.first_group
            merged = {}
            for name in ("k", "v", "valid"):
                ring = getattr(state, f"groups_{name}")[level - 2] if len(stored) else None
                new = getattr(children, f"complete_{name}")
                merged[name] = torch.cat([ring.index_select(1 if name != "valid" else 0, stored % 3), new],
                                         1 if name != "valid" else 0) if ring is not None else new
            last_child = first_child + merged["valid"].shape[0] - 1
            # Parents g whose children 2g, 2g+1 are both at hand; an existing level takes only those completed now.
            lowest = first_child if new_level else max(first_child, before - before % 2)
            first_parent, end_parent = -(-lowest // 2), (last_child + 1) // 2
            pairs = slice(2 * first_parent - first_child, 2 * end_parent - first_child)
            combined = {}
            for name, family in (("k", self.k_downsample), ("v", self.v_downsample)):
                pair = merged[name][:, pairs].unflatten(1, (-1, 2)).flatten(2, 3)  # (H_kv, parents, 2p, d)
                combined[name] = family.combine(pair)
            valid_pairs = merged["valid"][pairs].view(-1, 2).any(1)
            updates.append(LevelUpdate(first_parent, combined["k"], combined["v"], valid_pairs))
        return updates

    def _advance(self, state, q, k, v, valid, updates) -> FMAState:
        """The state after consuming ``q``/``k``/``v`` (c tokens) with the given level updates."""
        t, c = state.length, k.shape[1]
        changed = {"fine_k": ring_write(state.fine_k, t, k), "fine_v": ring_write(state.fine_v, t, v)}
        if state.holes:  # without holes every flag stays True
            changed["fine_valid"] = ring_write(state.fine_valid, t, _real(valid, k), dim=0)
        if updates:
            changed["groups_valid"] = torch.stack([ring_write(ring, u.first_group, u.complete_valid, dim=0)
                                                   for ring, u in zip(state.groups_valid, updates)])
            if updates[0].partial_k is not None:  # direct families keep partial sums
                changed["partial_k"] = torch.stack([u.partial_k for u in updates])
                changed["partial_v"] = torch.stack([u.partial_v for u in updates])
                changed["partial_valid"] = torch.stack([u.partial_valid for u in updates])
            changed["groups_k"] = torch.stack([ring_write(ring, u.first_group, u.complete_k)
                                               for ring, u in zip(state.groups_k, updates)])
            changed["groups_v"] = torch.stack([ring_write(ring, u.first_group, u.complete_v)
                                               for ring, u in zip(state.groups_v, updates)])
        if state.level_queries is not None and state.num_levels:
            level_queries = []
            for level in range(1, state.num_levels + 1):
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

    def _attend_chunk(self, state, q, k, v, valid, updates):
        """The §3/§4 partition for queries at ``t .. t+c-1`` over the state and the new tokens, one softmax."""
        heads, c, d = q.shape
        kv_heads, t, p = k.shape[0], state.length, self.coarse_tokens
        rows = heads // kv_heads * c  # (g heads, c positions) per key/value head
        queries = (q * d ** -0.5).reshape(kv_heads, rows, d)

        keys, values = [torch.cat([state.fine_k, k], 1)], [torch.cat([state.fine_v, v], 1)]
        slots_valid = [state.fine_valid, _real(valid, k)]
        logits = [queries @ keys[0].transpose(-1, -2)]
        new_groups = []
        for level in range(1, state.num_levels + 1):
            if not updates:
                new_k = new_v = k.new_zeros(kv_heads, 0, p, d)
                new_valid, first = state.fine_valid.new_zeros(0), t // self.partition.group_width(level)
            else:
                update = updates[level - 1]
                new_k, new_v, new_valid = update.complete_k, update.complete_v, update.complete_valid
                first = update.first_group
            new_groups.append((first, new_k.shape[1]))
            level_keys = torch.cat([state.groups_k[level - 1], new_k], 1).flatten(1, 2)
            values.append(torch.cat([state.groups_v[level - 1], new_v], 1).flatten(1, 2))
            slots_valid.append(torch.cat([state.groups_valid[level - 1], new_valid]).repeat_interleave(p))
            level_q = queries
            if self.query_mode == "coarse":
                level_q = (self._level_query_rows(state, q, level) * d ** -0.5).reshape(kv_heads, rows, d)
            logits.append(level_q @ level_keys.transpose(-1, -2))
        if self.boundary == "zero_sink":
            logits.append(queries.new_zeros(kv_heads, rows, 1))
            values.append(v.new_zeros(kv_heads, 1, d))
            slots_valid.append(state.fine_valid.new_ones(1))
        bias = self.partition.state_bias(t, c, state.num_levels, new_groups, q.dtype, q.device)
        if state.holes:
            bias = bias.masked_fill(~torch.cat(slots_valid), MASK_VALUE)
        logits = torch.cat(logits, -1).view(kv_heads, -1, c, bias.shape[-1]) + bias
        probs = torch.softmax(logits, -1).flatten(1, 2)  # (H_kv, g*c, S)
        return (probs @ torch.cat(values, 1)).reshape(heads, c, d)

    def _attend_token(self, state, q, k, v, valid):
        """:meth:`_attend_chunk` for one token in about a dozen tensor operations: the token's own group is never
        complete, so it reads the fine ring, itself and the rings of complete groups, with the cached slot bias
        of its position."""
        heads, _, d = q.shape
        kv_heads, t, m, p = k.shape[0], state.length, self.block_size, self.coarse_tokens
        levels = state.num_levels

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
        bias = self.partition.step_bias(t, levels, q.dtype, q.device)
        if state.holes:
            slots_valid = [state.fine_valid, _real(valid, k), state.groups_valid.repeat_interleave(p, 1).flatten()]
            if self.boundary == "zero_sink":
                slots_valid.append(state.fine_valid.new_ones(1))
            bias = bias.masked_fill(~torch.cat(slots_valid), MASK_VALUE)
        probs = torch.softmax(logits + bias, -1)
        return (probs @ torch.cat(values, 1)).reshape(heads, 1, d)
