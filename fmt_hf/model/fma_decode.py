"""Incremental decoding with Fast Multipole Attention (docs/fma.md §8): :class:`FMADecoder`
(``FastMultipoleAttention.decoder``) creates an :class:`~fma_state.FMAState`, fills it from a prompt and attends new
tokens to it. Exact: a step sees the logits and values of the full forward pass, up to float summation order.
"""

from __future__ import annotations

import torch

from .fma_downsample import without_sinks
from .fma_partition import MASK_VALUE, ring_positions
from .fma_refine import block_bounds, covering_level, far_candidates, select_blocks, siblings, split_slots
from .fma_state import FMAState, LevelUpdate, ring_read, ring_write


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics need float32 at least: bf16/fp16 inputs are computed (and states kept) in float32."""
    return torch.promote_types(dtype, torch.float32)


def _new_tokens(state, q, k, v, valid):
    """New tokens ``q`` (B, H, c, d), ``k``/``v`` (B, H_kv, c, d) in the state's precision, masked ones zeroed (as
    in ``forward``) and their rows marked as holding holes; and ``valid`` (B, c), all True when None."""
    dtype = state.fine_k.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if valid is None or bool(valid.all()):
        return q, k, v, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    valid = valid.bool()
    keep = valid.to(dtype)[:, None, :, None]
    state.holes = [holes or not bool(real.all()) for holes, real in zip(state.holes, valid)]
    return q * keep, k * keep, v * keep, valid


class FMADecoder:
    """``init_state`` / ``prefill`` / ``step`` of a causal ``FastMultipoleAttention`` (§8).

    Reads the layer's partition, downsamplers and options. Families with ``derives_levels`` build level 1 from fine
    blocks and every higher level from two children (§7a); the others sum every level's shares from the fine tokens.
    """

    def __init__(self, fma):
        self.fma, self.partition = fma, fma.partition
        self.k_downsample, self.v_downsample = fma.k_downsample, fma.v_downsample
        self.m, self.p, self.s = fma.block_size, fma.coarse_tokens, fma.sink_tokens
        self.derives_levels = getattr(fma.k_downsample, "derives_levels", False)

    def init_state(self, heads: int, kv_heads: int, dtype: torch.dtype, device=None, batch_size: int = 1) -> FMAState:
        """The state of ``batch_size`` empty sequences: nothing consumed, every buffer zero. Half-precision inputs
        get a float32 state: partial sums add up thousands of shares."""
        if not self.fma.causal:
            raise ValueError("incremental decoding needs a causal FastMultipoleAttention (causal=True)")
        if self.partition.num_levels is None and self.partition.zero_sink:
            raise ValueError(
                'boundary="zero_sink" without a length cap (max_seq_len=None) counts sinks for the levels the whole '
                "input needs, so an output depends on the input's length and no decoding state can reproduce it: "
                'build the layer with a max_seq_len, or use boundary="mask"'
            )
        levels = 0 if self.derives_levels else self.partition.num_levels  # derived levels come as they are needed
        coarse_queries = heads if self.fma.query_mode == "coarse" else None
        return FMAState.empty(
            batch_size,
            kv_heads,
            levels,
            coarse_queries,
            softmax_dtype(dtype),
            device,
            self.partition,
            self.fma.head_dim,
        )

    def prefill(self, state: FMAState, q, k, v, valid=None, lengths: list[int] | None = None) -> None:
        """Consume, in place, tokens whose output was computed elsewhere (``forward`` over a prompt): ``q``
        (B, H, c, d), ``k``/``v`` (B, H_kv, c, d), row b's first ``lengths[b]`` columns (default: all) its next
        positions; ``valid`` (B, c) bool marks real tokens (None: all), the others are holes, as ``forward``'s
        ``key_padding_mask``. Only the tail the state keeps is summarised, in its precision (float32 at least)."""
        self._by_position(
            state, q.shape[2], lengths, lambda part, rows, n: self._consume(part, q, k, v, valid, rows, n)
        )

    def step(self, state: FMAState, q, k, v, valid=None, lengths: list[int] | None = None) -> torch.Tensor:
        """Attend new tokens to their rows' past and to each other, then consume them (``state`` is updated in place).

        ``q`` (B, H, c, d), ``k``/``v`` (B, H_kv, c, d); row b's first ``lengths[b]`` columns (default: all) are its
        positions ``state.lengths[b] + [0, n)``, the rest is ignored (its output zero); ``valid`` as in
        :meth:`prefill`. Returns (B, H, c, d), row b equal to its rows of ``forward`` over its whole sequence (§8).

        One token per row (a decoding step, rows at any positions): a fixed number of batched tensor operations
        whatever B. Other chunks (chunked prefill, continuing with several tokens) attend the union of the state,
        the new tokens and the groups they complete, ``O(c (c + (w+1)m + (2w+1)pL))``, rows at one position together.
        """
        if self.fma.training and self.fma.dropout:
            raise ValueError("FastMultipoleAttention decoding runs without dropout: call .eval() first")
        if q.shape[2] == 1 and (lengths is None or all(n == 1 for n in lengths)):
            return self._step_tokens(state, q, k, v, valid)
        out = torch.zeros_like(q)

        def attend(part, rows, n):
            out[rows, :, :n] = self._consume(part, q, k, v, valid, rows, n, attend=True).to(q.dtype)

        self._by_position(state, q.shape[2], lengths, attend)
        return out

    def _by_position(self, state, c, lengths, consume) -> None:
        """``consume(part, rows, n)`` for each group of rows at one position taking the same ``n > 0`` tokens: the
        whole state when every row is in it, else a copy of those rows (:meth:`FMAState.select`) written back."""
        lengths = [c] * state.batch_size if lengths is None else list(lengths)
        groups: dict[tuple[int, int], list[int]] = {}
        for b, (t, n) in enumerate(zip(state.lengths, lengths)):
            if n:
                groups.setdefault((t, n), []).append(b)
        for (_, n), rows in groups.items():
            if len(rows) == state.batch_size:
                consume(state, slice(None), n)
            else:
                part = state.select(rows)
                consume(part, rows, n)
                state.put(rows, part)

    # ------------------------------------------------------------------ chunks of rows at one position

    def _consume(self, state, q, k, v, valid, rows, n, attend=False):
        """Consume columns ``:n`` of rows ``rows`` of the new tokens into ``state`` (those rows, all at one
        position), in place; with ``attend``, first their output (B', H, n, d)."""
        q, k, v, valid = _new_tokens(
            state, *(x[rows, :, :n] for x in (q, k, v)), None if valid is None else valid[rows, :n]
        )
        self._keep_sinks(state, k, v, valid)  # a chunk's later queries read the sinks it brings
        refine = bool(self.fma.refine_groups)
        updates = self._level_updates(state, k, v, valid, tail_only=not (attend or refine))
        if updates is not None:
            state.grow_levels(len(updates))
        if refine:
            self._store(state, k, v, valid, updates)
        out = self._attend_chunk(state, q, k, v, valid, updates) if attend else None
        self._advance(state, q, k, v, valid, updates)
        return out

    def _store(self, state, k, v, valid, updates) -> None:
        """Refinement (§3c): write the fine blocks and the groups the new tokens complete into the state's store,
        with the blocks' bounds, before the chunk attends (its later queries may select its earlier blocks)."""
        t, c, m = state.lengths[0], k.shape[2], self.m
        first_block, end = t // m, (t + c) // m
        rows = torch.arange(state.batch_size, device=k.device)
        if end > first_block:
            keys, values, tokens_valid = self._chunk_tokens(state, k, v, valid, first_block * m, end * m)
            blocks = torch.arange(first_block, end, device=k.device)
            by_block = [x.unflatten(2, (-1, m)).transpose(1, 2).flatten(0, 1) for x in (keys, values)]  # (B nb, ..)
            self._store_blocks(
                state,
                rows.repeat_interleave(len(blocks)),
                blocks.repeat(len(rows)),
                *by_block,
                tokens_valid.reshape(-1, m),
            )
        for level, update in enumerate(updates or [], start=1):
            count = update.complete_valid.shape[1]
            groups = torch.arange(update.first_group, update.first_group + count, device=k.device)
            state.write_store_groups(
                level,
                rows.repeat_interleave(count),
                groups.repeat(len(rows)),
                *(x.transpose(1, 2).flatten(0, 1) for x in (update.complete_k, update.complete_v)),
                update.complete_valid.flatten(),
            )

    def _store_blocks(self, state, rows, blocks, keys, values, valid) -> None:
        """Refinement (§3c): store fine blocks ``blocks`` (R,) of rows ``rows`` (R,) -- ``keys``/``values`` (R, H_kv,
        m, d) with sink tokens read as zeros, ``valid`` (R, m) -- with their Quest bounds."""
        real = valid & (blocks[:, None] * self.m + torch.arange(self.m, device=valid.device) >= self.s)
        center, radius, available = block_bounds(keys, real, 0, self.m, 0)
        state.write_store_blocks(rows, blocks, keys, values, valid, center[:, :, 0], radius[:, :, 0], available[:, 0])

    def _refinement(self, state, queries, positions, slot_groups):
        """Refinement (§3c) of queries ``queries`` (B, H_kv, g, c, d), scaled, at positions ``positions`` (B or 1,
        c), from the store. ``slot_groups`` (B or 1, L, S) names the group of each of the caller's S slots per level
        (-1: none). Returns ``split`` (B, H_kv, c, L, S), which of those slots the selection replaces, and the
        logits (B, H_kv, g, c, E) and values (B, H_kv, c, E, d) of the replacing summaries and the selected fine
        keys."""
        partition, m, p, levels = self.partition, self.m, self.p, state.num_levels
        device, dtype = queries.device, queries.dtype
        query_blocks = positions // m
        candidate = far_candidates(partition, query_blocks, state.store_blocks) & state.store_available[:, None]
        chosen, used = select_blocks(queries, state.store_center, state.store_radius, candidate, self.fma.refine_groups)
        cover = covering_level(partition, query_blocks[:, None], chosen, levels)
        split = split_slots(slot_groups[:, None, None], chosen, used)
        rows = torch.arange(chosen.shape[0], device=device)[:, None, None, None]
        heads = torch.arange(chosen.shape[1], device=device)[None, :, None, None]

        # The summaries replacing split slots, every level at once: (B, H_kv, c, k', L-1, p, d).
        groups, use = siblings(chosen, used, cover, levels)  # (B, H_kv, c, k', L-1)
        groups = groups.clamp(0, max(state.store_blocks - 1, 0))
        at = torch.arange(max(levels - 1, 0), device=device)
        sibling_k = state.store_groups_k[rows[..., None], at, heads[..., None], groups]
        sibling_v = state.store_groups_v[rows[..., None], at, heads[..., None], groups]
        only_sinks = partition.sink_summaries(groups, m << at, p).unflatten(-1, (-1, p))  # w_l of levels 1 .. L-1
        ok = (use & state.store_groups_valid[rows[..., None], at, groups])[..., None] & ~only_sinks
        offsets = torch.tensor([partition.offset(level) for level in range(1, levels)], dtype=dtype, device=device)
        sibling_bias = torch.where(ok, offsets[:, None], torch.tensor(MASK_VALUE, dtype=dtype, device=device))

        # The selected blocks' fine keys: (B, H_kv, c, k'm, d), read a block at a time.
        fine_k = state.store_k.unflatten(2, (-1, m))[rows, heads, chosen].flatten(3, 4)
        fine_v = state.store_v.unflatten(2, (-1, m))[rows, heads, chosen].flatten(3, 4)
        ok = state.store_valid.unflatten(1, (-1, m))[rows, chosen] & used[..., None]  # (B, H_kv, c, k', m)
        if self.s:  # sink tokens keep their own slots
            ok = ok & ((chosen[..., None] * m + torch.arange(m, device=device)) >= self.s)
        fine_bias = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, MASK_VALUE).flatten(3)

        sibling_logits = torch.einsum("bhgcd,bhced->bhgce", queries, sibling_k.flatten(3, 5))
        fine_logits = torch.einsum("bhgcd,bhced->bhgce", queries, fine_k)
        logits = torch.cat(
            [sibling_logits + sibling_bias.flatten(3)[:, :, None], fine_logits + fine_bias[:, :, None]], -1
        )
        return split, logits, (sibling_v.flatten(3, 5), fine_v)

    @staticmethod
    def _refined_output(probs, values):
        """The output (B, H_kv, g, c, d) of refinement's slots: ``probs`` (B, H_kv, g, c, E) over the slots of
        ``values``, a tuple of (B, H_kv, c, E_i, d) parts side by side."""
        out, start = 0, 0
        for part in values:
            out = out + torch.einsum("bhgce,bhced->bhgcd", probs[..., start : start + part.shape[3]], part)
            start += part.shape[3]
        return out

    def _keep_sinks(self, state, k, v, valid) -> None:
        """Keep those of the new tokens ``k``/``v`` (B, H_kv, c, d) that are sink tokens (positions below s, §3a):
        the fine ring will drop them, queries past the second block still read them."""
        t = state.lengths[0]
        take = min(self.s - t, k.shape[2])
        if take > 0:
            state.sink_k = ring_write(state.sink_k, t, k[:, :, :take], dim=2)
            state.sink_v = ring_write(state.sink_v, t, v[:, :, :take], dim=2)
            state.sink_valid = ring_write(state.sink_valid, t, valid[:, :take])

    def _level_updates(self, state, k, v, valid, tail_only) -> list[LevelUpdate] | None:
        """Per level, the :class:`LevelUpdate` of consuming ``k``/``v`` (B, H_kv, c, d); None when no fine block
        completes (the levels take new tokens once per fine block: group widths are multiples of m, so no group
        can complete before its last block does). With ``tail_only``, at most the last 2w+1 complete groups (what a
        level's ring keeps)."""
        t, c, m = state.lengths[0], k.shape[2], self.m
        block_start, end = t // m * m, (t + c) // m * m  # shares are summed over positions [block_start, end)
        if end == block_start or self.partition.num_levels == 0:
            return None
        if self.derives_levels:
            return self._derived_updates(state, k, v, valid)
        tokens_k, tokens_v, tokens_valid = self._chunk_tokens(state, k, v, valid, block_start, end)
        updates = []
        for level in range(1, state.num_levels + 1):
            width = self.partition.group_width(level)
            end_group = (t + c) // width  # groups before this one are complete after the chunk
            start = max(block_start, (end_group - self.partition.group_ring) * width) if tail_only else block_start
            positions = torch.arange(start, end, device=k.device)
            first = start // width
            n_complete, n_groups = end_group - first, (end - 1) // width - first + 1
            filling = end > end_group * width  # the chunk ends inside a group
            # a group is valid when it holds a real token: count them like the sums below
            real = positions.new_zeros(k.shape[0], n_groups)
            real.index_add_(1, positions // width - first, tokens_valid[:, start - block_start :].long())
            if first == t // width:
                real[:, 0] += state.partial_valid[:, level - 1]
            summed = {}
            for name, family, tokens, partial in (
                ("k", self.k_downsample, tokens_k, state.partial_k[:, level - 1]),
                ("v", self.v_downsample, tokens_v, state.partial_v[:, level - 1]),
            ):
                x = tokens[:, :, start - block_start :]
                block_sums, bias = family(x, level=level, offsets=positions % width)  # (B, H_kv, c' / m, p, d)
                group_sums = x.new_zeros(*x.shape[:2], n_groups, *block_sums.shape[-2:])
                group_sums.index_add_(2, positions[::m] // width - first, block_sums)
                if first == t // width:  # the group being filled when the chunk began
                    group_sums[:, :, 0] += partial
                new_partial = group_sums[:, :, n_complete] if filling else torch.zeros_like(partial)
                summed[name] = (group_sums[:, :, :n_complete] + bias, new_partial)
            partial_valid = real[:, n_complete] > 0 if filling else real.new_zeros(k.shape[0], dtype=torch.bool)
            (complete_k, partial_k), (complete_v, partial_v) = summed["k"], summed["v"]
            complete_valid = real[:, :n_complete] > 0
            updates.append(
                LevelUpdate(first, complete_k, complete_v, complete_valid, partial_k, partial_v, partial_valid)
            )
        return updates

    def _derived_updates(self, state, k, v, valid) -> list[LevelUpdate]:
        """:meth:`_level_updates` for families whose levels derive from each other (§7a): level 1 summarises each
        completed fine block, level l+1 group g is ``combine`` of level-l groups 2g, 2g+1, computed when 2g+1
        completes. The state holds the levels the next query reads, L(t+c+1): a level that becomes needed is built
        from its children, all of which are still stored then (a query first needs level l+1 when level l's group
        2w+1 completes, and the ring holds the 2w+1 before it)."""
        t, c, m = state.lengths[0], k.shape[2], self.m
        levels = max(self._levels_needed(t + c), state.num_levels)
        if levels == 0:
            return []
        # Level 1: every fine block completed by the chunk; a new level 1 also takes the earlier ones (t < 2m
        # then, so they are all in the fine ring).
        start = 0 if state.num_levels == 0 else t // m * m
        end = (t + c) // m * m
        *tokens, tokens_valid = self._chunk_tokens(state, k, v, valid, start, end)
        blocks = [family(x, 1)[0] for family, x in zip((self.k_downsample, self.v_downsample), tokens)]
        updates = [LevelUpdate(start // m, *blocks, tokens_valid.unflatten(1, (-1, m)).any(2))]  # (B, H_kv, n, p, d)
        for level in range(2, levels + 1):
            children, new_level = updates[-1], level > state.num_levels
            # Children stored before the chunk (the ring, if the level existed) then those the chunk completed.
            before = t // self.partition.group_width(level - 1)
            ring = state.group_ring
            stored = ring_positions(before - 1, ring, k.device)[: ring if level - 1 <= state.num_levels else 0]
            stored = stored[(stored >= 0) & (stored < children.first_group)].sort().values
            first_child = int(stored[0]) if len(stored) else children.first_group
            merged = {}
            for name, dim in (("k", 2), ("v", 2), ("valid", 1)):
                new = getattr(children, f"complete_{name}")
                if len(stored):
                    new = torch.cat(
                        [getattr(state, f"groups_{name}")[:, level - 2].index_select(dim, stored % ring), new], dim
                    )
                merged[name] = new
            last_child = first_child + merged["valid"].shape[1] - 1
            # Parents g whose children 2g, 2g+1 are both at hand; an existing level takes only those completed now.
            lowest = first_child if new_level else max(first_child, before - before % 2)
            first_parent, end_parent = -(-lowest // 2), (last_child + 1) // 2
            pairs = slice(2 * first_parent - first_child, 2 * end_parent - first_child)
            combined = {}
            for name, family in (("k", self.k_downsample), ("v", self.v_downsample)):
                pair = merged[name][:, :, pairs].unflatten(2, (-1, 2)).flatten(3, 4)  # (B, H_kv, parents, 2p, d)
                combined[name] = family.combine(pair)
            valid_pairs = merged["valid"][:, pairs].unflatten(1, (-1, 2)).any(2)
            updates.append(LevelUpdate(first_parent, combined["k"], combined["v"], valid_pairs))
        return updates

    def _chunk_tokens(self, state, k, v, valid, start, end):
        """Keys, values (B, H_kv, end - start, d) and validity (B, end - start) of positions ``start .. end-1``: those
        before the chunk ``k``/``v`` from the fine ring, sink tokens read as zeros (§3a: what the downsamplers
        read)."""
        t = state.lengths[0]
        tokens = [
            without_sinks(torch.cat([ring_read(ring, start, t, 2), new], 2)[:, :, : end - start], start, self.s, 2)
            for ring, new in ((state.fine_k, k), (state.fine_v, v))
        ]
        return (*tokens, torch.cat([ring_read(state.fine_valid, start, t), valid], 1)[:, : end - start])

    def _levels_needed(self, length: int) -> int:
        """Derived families: the levels held after ``length`` tokens, L(length + 1) (the next query's), capped."""
        levels = self.partition.levels_for(length + 1)
        return levels if self.partition.num_levels is None else min(levels, self.partition.num_levels)

    def _advance(self, state, q, k, v, valid, updates) -> None:
        """Consume ``q``/``k``/``v`` (c tokens per row) with the given level updates, in place."""
        t, c = state.lengths[0], k.shape[2]
        state.fine_k, state.fine_v = ring_write(state.fine_k, t, k, 2), ring_write(state.fine_v, t, v, 2)
        if any(state.holes):  # without holes every flag stays True
            state.fine_valid = ring_write(state.fine_valid, t, valid)
        if updates:
            for name, dim in (("k", 2), ("v", 2), ("valid", 1)):
                rings, field = getattr(state, f"groups_{name}"), f"complete_{name}"
                written = [
                    ring_write(rings[:, i], u.first_group, getattr(u, field), dim) for i, u in enumerate(updates)
                ]
                setattr(state, f"groups_{name}", torch.stack(written, 1))
            if updates[0].partial_k is not None:  # direct families keep partial sums
                for name in ("partial_k", "partial_v", "partial_valid"):
                    setattr(state, name, torch.stack([getattr(u, name) for u in updates], 1))
        if state.level_queries is not None and state.num_levels:
            level_queries = []
            for level in range(1, state.num_levels + 1):
                sub_window = self.partition.group_width(level) // self.p
                opener = (t + c - 1) // sub_window * sub_window  # first position of the last sub-window touched
                level_queries.append(q[:, :, opener - t] if opener >= t else state.level_queries[:, level - 1])
            state.level_queries = torch.stack(level_queries, 1)
        state.lengths = [t + c] * state.batch_size
        state.levels = [state.num_levels] * state.batch_size

    def _level_query_rows(self, state, q, level):
        """Coarse query mode: the level-l query of each new token -- the query that opened its sub-window of
        ``w_l / p`` tokens, new (in ``q``) or stored in the state."""
        t, c = state.lengths[0], q.shape[2]
        sub_window = self.partition.group_width(level) // self.p
        opener = torch.arange(t, t + c, device=q.device) // sub_window * sub_window
        fresh = q[:, :, (opener - t).clamp(min=0)]  # (B, H, c, d)
        stored = state.level_queries[:, level - 1, :, None].expand_as(fresh)
        return torch.where((opener >= t)[:, None], fresh, stored)

    def _attend_chunk(self, state, q, k, v, valid, updates):
        """The §3/§4 partition for queries at ``t .. t+c-1`` over the state and the new tokens, one softmax."""
        batch, heads, c, d = q.shape
        kv_heads, t, p = k.shape[1], state.lengths[0], self.p
        rows = heads // kv_heads * c  # (g heads, c positions) per key/value head
        queries = (q * d**-0.5).reshape(batch, kv_heads, rows, d)

        logits = [queries @ torch.cat([state.fine_k, k], 2).transpose(-1, -2)]
        values = [torch.cat([state.fine_v, v], 2)]
        slots_valid = [state.fine_valid, valid]
        new_groups = []
        for level in range(1, state.num_levels + 1):
            update = updates[level - 1] if updates else None  # None: the chunk completes no group
            new_k = update.complete_k if update else k.new_zeros(batch, kv_heads, 0, p, d)
            new_v, new_valid = (update.complete_v, update.complete_valid) if update else (new_k, valid[:, :0])
            first = update.first_group if update else t // self.partition.group_width(level)
            new_groups.append((first, new_k.shape[2]))
            level_keys = torch.cat([state.groups_k[:, level - 1], new_k], 2).flatten(2, 3)
            values.append(torch.cat([state.groups_v[:, level - 1], new_v], 2).flatten(2, 3))
            slots_valid.append(torch.cat([state.groups_valid[:, level - 1], new_valid], 1).repeat_interleave(p, 1))
            level_q = queries
            if self.fma.query_mode == "coarse":
                level_q = (self._level_query_rows(state, q, level) * d**-0.5).reshape(batch, kv_heads, rows, d)
            logits.append(level_q @ level_keys.transpose(-1, -2))
        if self.partition.zero_sink:
            logits.append(queries.new_zeros(batch, kv_heads, rows, 1))
            values.append(v.new_zeros(batch, kv_heads, 1, d))
            slots_valid.append(state.fine_valid[:, :1].new_ones(batch, 1))
        logits.append(queries @ state.sink_k.transpose(-1, -2))  # the sink tokens (§3a), last
        values.append(state.sink_v)
        slots_valid.append(state.sink_valid)
        bias = self.partition.state_bias(t, c, state.num_levels, new_groups, q.dtype, q.device)[None]  # (1, c, S)
        if any(state.holes):
            bias = bias.masked_fill(~torch.cat(slots_valid, 1)[:, None], MASK_VALUE)
        logits = torch.cat(logits, -1).view(batch, kv_heads, -1, c, bias.shape[-1]) + bias[:, None, None]
        if not self.fma.refine_groups:
            probs = torch.softmax(logits, -1).flatten(2, 3)  # (B, H_kv, g*c, S)
            return (probs @ torch.cat(values, 2)).reshape(batch, heads, c, d)
        slot_groups = [  # per level: its ring's groups, then those the chunk adds, p slots each
            torch.cat(
                [
                    ring_positions(t // self.partition.group_width(level) - 1, state.group_ring, q.device),
                    first + torch.arange(count, device=q.device),
                ]
            ).repeat_interleave(p)
            for level, (first, count) in enumerate(new_groups, start=1)
        ]
        widest = max((len(ids) for ids in slot_groups), default=0)
        padded = torch.full((1, len(slot_groups), widest), -1, device=q.device)  # (1, L, S): -1 names no group
        for level, ids in enumerate(slot_groups):
            padded[0, level, : len(ids)] = ids
        positions = torch.arange(t, t + c, device=q.device)[None]
        split, extra_logits, extra_values = self._refinement(
            state, queries.view(batch, kv_heads, -1, c, d), positions, padded
        )
        split = torch.cat([split[..., level, : len(ids)] for level, ids in enumerate(slot_groups)], -1)
        fine_slots = state.fine_ring + c  # the slots before the levels': the fine ring and the new tokens
        logits[..., fine_slots : fine_slots + split.shape[-1]].masked_fill_(split[:, :, None], MASK_VALUE)
        probs = torch.softmax(torch.cat([logits, extra_logits], -1), -1)  # (B, H_kv, g, c, S + E)
        slots = logits.shape[-1]
        out = probs[..., :slots].flatten(2, 3) @ torch.cat(values, 2)
        out = out + self._refined_output(probs[..., slots:], extra_values).flatten(2, 3)
        return out.reshape(batch, heads, c, d)

    # ------------------------------------------------------------------ one token per row, rows at any positions

    def _step_tokens(self, state, q, k, v, valid):
        """:meth:`step` of one token per row, row b at position ``state.lengths[b]``; ``valid`` (B, 1) or None.

        A token's own group is never complete, so it reads its row's fine ring, itself and the rings of complete
        groups, with the slot bias of its row's position (:meth:`Partition.step_bias`), and is written to slot
        ``t % (w+1)m`` of its row's ring. Rows whose token completes a fine block (on average B/m rows a step) then
        update their levels, one batched pass per level over those rows.
        """
        batch, heads, _, d = q.shape
        kv_heads, m, p, levels = k.shape[1], self.m, self.p, state.num_levels
        fine_ring, group_slots = state.fine_ring, state.group_ring * p
        out_dtype, dtype = q.dtype, state.fine_k.dtype
        q, k, v, valid = _new_tokens(state, q, k, v, valid)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, H, d)

        # Logits and values by part (fine ring, the token, every level's ring of groups): no concatenated copy of
        # the state. A key/value head's g query heads are rows.
        t = torch.tensor(state.lengths, device=q.device)
        queries = (q * d**-0.5).view(batch, kv_heads, heads // kv_heads, d)
        level_queries = queries[:, None].expand(-1, levels, -1, -1, -1)  # (B, L, H_kv, g, d)
        if self.fma.query_mode == "coarse" and levels:
            level_queries = self._batch_level_queries(state, t, q)  # (B, L, H, d)
            state.level_queries = level_queries  # the queries of the sub-windows open after this token
            level_queries = (level_queries * d**-0.5).view(batch, levels, kv_heads, -1, d)
        # Levels as batch dimensions in the rings' own (B, L, H_kv) order: the rings are read in place (an einsum
        # ordering its batch dimensions by the output would copy them every step); only the small logits move.
        level_logits = level_queries @ state.groups_k.flatten(3, 4).transpose(-1, -2)  # (B, L, H_kv, g, Rp)
        logits = [
            queries @ state.fine_k.transpose(-1, -2),
            (queries * k[:, :, None]).sum(-1, keepdim=True),
            level_logits.permute(0, 2, 3, 1, 4).flatten(3),
        ]
        if self.partition.zero_sink:
            logits.append(logits[1].new_zeros(logits[1].shape))  # the zero-sink slot: logit 0, value 0
        if self.s:  # the sink tokens (§3a), last
            logits.append(queries @ state.sink_k.transpose(-1, -2))
        bias = self.partition.step_bias(tuple(state.lengths), levels, dtype, q.device)  # (B, S)
        if any(state.holes):  # this token's row included, when it is masked
            slots_valid = [state.fine_valid, valid, state.groups_valid.repeat_interleave(p, -1).flatten(1)]
            if self.partition.zero_sink:
                slots_valid.append(valid.new_ones(batch, 1))
            slots_valid.append(state.sink_valid)
            bias = bias.masked_fill(~torch.cat(slots_valid, 1), MASK_VALUE)
        logits = torch.cat(logits, -1) + bias[:, None, None]  # (B, H_kv, g, S)
        if self.fma.refine_groups:  # §3c: the split ring slots masked, the picks' slots appended
            widths = self.m << torch.arange(levels, device=q.device)
            slot_groups = ring_positions(t[:, None] // widths - 1, state.group_ring, q.device)  # (B, L, R)
            split, extra_logits, extra_values = self._refinement(
                state, queries[:, :, :, None], t[:, None], slot_groups.repeat_interleave(p, -1)
            )
            split = split.flatten(-2)[:, :, 0]  # (B, H_kv, L*R*p)
            logits[..., fine_ring + 1 : fine_ring + 1 + split.shape[-1]].masked_fill_(split[:, :, None], MASK_VALUE)
            logits = torch.cat([logits, extra_logits[:, :, :, 0]], -1)
        probs = torch.softmax(logits, -1)
        if self.fma.refine_groups:
            probs, extra = probs[..., : bias.shape[-1]], probs[..., bias.shape[-1] :]  # (B, H_kv, g, E)
        fine, own = probs[..., :fine_ring], probs[..., fine_ring : fine_ring + 1]
        coarse = probs[..., fine_ring + 1 : fine_ring + 1 + levels * group_slots].unflatten(-1, (levels, group_slots))
        out = (
            fine @ state.fine_v
            + own * v[:, :, None]
            + (coarse.permute(0, 3, 1, 2, 4) @ state.groups_v.flatten(3, 4)).sum(1)
        )
        if self.s:
            out = out + probs[..., -self.s :] @ state.sink_v
        if self.fma.refine_groups:
            out = out + self._refined_output(extra[:, :, :, None], extra_values)[:, :, :, 0]
        out = out.reshape(batch, heads, 1, d)

        rows, slots = torch.arange(batch, device=q.device), t % fine_ring
        state.fine_k[rows, :, slots] = k
        state.fine_v[rows, :, slots] = v
        state.fine_valid[rows, slots] = valid[:, 0]
        filling = [b for b, length in enumerate(state.lengths) if length < self.s]
        if filling:  # these rows' tokens are sink tokens (§3a): kept for every later query
            at = t[filling]
            state.sink_k[filling, :, at] = k[filling]
            state.sink_v[filling, :, at] = v[filling]
            state.sink_valid[filling, at] = valid[filling, 0]
        state.lengths = [length + 1 for length in state.lengths]
        completing = [b for b, length in enumerate(state.lengths) if length % m == 0]
        if completing and self.derives_levels:
            self._complete_derived_blocks(state, completing)
        elif completing and self.partition.num_levels:
            self._complete_blocks(state, completing)
        return out.to(out_dtype)

    def _batch_level_queries(self, state, t, q):
        """Coarse query mode, one token per row at positions ``t`` (B,): per level, the query of its sub-window of
        ``w_l / p`` tokens -- its own when it opens one, else the stored one. (B, L, H, d)."""
        sub_windows = torch.tensor(
            [self.partition.group_width(level) // self.p for level in range(1, state.num_levels + 1)], device=t.device
        )
        opens = t[:, None] % sub_windows == 0  # (B, L)
        return torch.where(opens[..., None, None], q[:, None], state.level_queries)

    def _block_tokens(self, state, rows, blocks):
        """The fine keys and values of fine blocks ``blocks`` (R,) of rows ``rows`` (R,), all in their fine rings,
        side by side: (H_kv, R*m, d) each, sink tokens read as zeros (§3a); and whether each block holds a real
        token (R,)."""
        m = self.m
        positions = blocks[:, None] * m + torch.arange(m, device=blocks.device)  # (R, m)
        slots = positions % state.fine_ring
        tokens = [
            ring[rows[:, None], :, slots].permute(2, 0, 1, 3).flatten(1, 2) for ring in (state.fine_k, state.fine_v)
        ]
        if self.s and bool((positions < self.s).any()):
            keep = (positions >= self.s).flatten()[:, None]
            tokens = [x * keep for x in tokens]
        return tokens, state.fine_valid[rows[:, None], slots].any(1)

    def _store_block_tokens(self, state, rows, blocks, tokens_k, tokens_v) -> None:
        """:meth:`_store_blocks` of fine blocks ``blocks`` of rows ``rows`` (R,) read by :meth:`_block_tokens`
        (``tokens_k``/``tokens_v`` (H_kv, R*m, d)), their validity from the fine rings."""
        keys, values = (x.unflatten(1, (len(rows), self.m)).transpose(0, 1) for x in (tokens_k, tokens_v))
        positions = blocks[:, None] * self.m + torch.arange(self.m, device=blocks.device)
        valid = state.fine_valid[rows[:, None], positions % state.fine_ring]
        self._store_blocks(state, rows, blocks, keys, values, valid)

    def _complete_blocks(self, state, rows: list[int]) -> None:
        """Direct families, in place: rows ``rows`` whose last token completed a fine block (now wholly in their
        fine rings) add its contribution to every level's partial sum, one batched pass per level over those rows; a
        group the block completes moves, with its bias, into the level's ring of groups (§8)."""
        m, index = self.m, torch.tensor(rows, device=state.fine_k.device)
        ends = torch.tensor([state.lengths[b] for b in rows], device=index.device)  # positions consumed
        block_start = ends - m
        (tokens_k, tokens_v), block_valid = self._block_tokens(state, index, block_start // m)
        if self.fma.refine_groups:
            self._store_block_tokens(state, index, block_start // m, tokens_k, tokens_v)
        for level in range(1, state.num_levels + 1):
            width = self.partition.group_width(level)
            offsets = (block_start[:, None] + torch.arange(m, device=index.device)) % width
            complete = ends % width == 0  # (R,): the block is its group's last
            done, group_slot = index[complete], (ends[complete] // width - 1) % state.group_ring
            summaries = []
            for name, family, tokens in (("k", self.k_downsample, tokens_k), ("v", self.v_downsample, tokens_v)):
                block_sums, bias = family(tokens, level=level, offsets=offsets.flatten())  # (H_kv, R, p, d)
                partial = getattr(state, f"partial_{name}")
                summed = partial[index, level - 1] + block_sums.transpose(0, 1)
                summaries.append(summed[complete] + bias)
                getattr(state, f"groups_{name}")[done, level - 1, :, group_slot] = summaries[-1]
                partial[index, level - 1] = summed.masked_fill(complete[:, None, None, None], 0)
            real = state.partial_valid[index, level - 1] | block_valid
            state.groups_valid[done, level - 1, group_slot] = real[complete]
            if self.fma.refine_groups:
                state.write_store_groups(level, done, ends[complete] // width - 1, *summaries, real[complete])
            state.partial_valid[index, level - 1] = real & ~complete

    def _complete_derived_blocks(self, state, rows: list[int]) -> None:
        """Derived families (§7a), in place: rows ``rows`` whose last token completed a fine block summarise it
        (level 1) and every group it completes (level l+1: ``combine`` of two level-l children), one batched pass
        per level over those rows. A row whose next query reads a new level l gains it here, at t = (w+1) w_l: groups
        0 .. w, from level l-1's groups 0 .. 2w+1 (2w+1 still in its ring, one completed now; level 1: blocks 0 .. w,
        all in the fine ring)."""
        ends, held = [state.lengths[b] for b in rows], [state.levels[b] for b in rows]
        needed = [self._levels_needed(end) for end in ends]
        state.grow_levels(max(needed))
        families, device = (self.k_downsample, self.v_downsample), state.fine_k.device
        writes = []  # applied once every level is computed: a gained level reads rings the levels below overwrite
        below, below_summaries = {}, ()  # the level below: each row's place in its new groups, and those groups
        for level in range(1, max(needed) + 1):
            width = self.partition.group_width(level)
            # (row, group) pairs: the group each row's block completes, then groups 0 .. w-1 of a level a row gains now
            completed = [
                (b, end // width - 1) for b, end, n in zip(rows, ends, needed) if end % width == 0 and level <= n
            ]
            if not completed:  # then no level above completes a group either
                break
            gained = [
                (b, g)
                for b, n, h in zip(rows, needed, held)
                if n == level > h
                for g in range(self.partition.near_blocks)
            ]
            pairs = torch.tensor(completed + gained, device=device)
            pair_rows, groups = pairs[:, 0], pairs[:, 1]
            if level == 1:
                tokens, valid = self._block_tokens(state, pair_rows, groups)
                summaries = [family(x, 1)[0].transpose(0, 1) for family, x in zip(families, tokens)]
                if self.fma.refine_groups:
                    self._store_block_tokens(state, pair_rows, groups, *tokens)
            else:
                # Children 2g are stored; children 2g+1 are the groups the level below completes now, except for
                # gained groups g < w, whose children 2g+1 are stored too.
                first = state.stored_groups(level - 1, pair_rows, 2 * groups)
                n_new = len(completed)
                second_stored = state.stored_groups(level - 1, pair_rows[n_new:], 2 * groups[n_new:] + 1)
                new = torch.tensor([below[b] for b, _ in completed], device=device)
                second = [torch.cat([x[new], y]) for x, y in zip(below_summaries, second_stored)]
                pair_summaries = [torch.cat([a, b], -2) for a, b in zip(first[:2], second[:2])]  # (P, H_kv, 2p, d)
                summaries = [family.combine(x) for family, x in zip(families, pair_summaries)]
                valid = first[2] | second[2]
            writes.append((level, pair_rows, groups, summaries, valid))
            below = {b: i for i, (b, _) in enumerate(completed)}
            below_summaries = (*summaries, valid)
        for level, pair_rows, groups, (summary_k, summary_v), valid in writes:
            slots = groups % state.group_ring
            state.groups_k[pair_rows, level - 1, :, slots] = summary_k
            state.groups_v[pair_rows, level - 1, :, slots] = summary_v
            state.groups_valid[pair_rows, level - 1, slots] = valid
            if self.fma.refine_groups:
                state.write_store_groups(level, pair_rows, groups, summary_k, summary_v, valid)
        for b, n in zip(rows, needed):
            state.levels[b] = n
