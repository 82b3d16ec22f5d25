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


def without_sinks(tokens: torch.Tensor, first: int, sink_tokens: int, dim: int = 1) -> torch.Tensor:
    """``tokens`` of consecutive positions ``first ..`` along ``dim`` with the sink tokens (positions below
    ``sink_tokens``) zeroed: what the downsamplers read (§3a). ``tokens`` itself when it holds none."""
    cut = min(sink_tokens - first, tokens.shape[dim])
    if cut <= 0:
        return tokens
    rest = tokens.narrow(dim, cut, tokens.shape[dim] - cut)
    return torch.cat([torch.zeros_like(tokens.narrow(dim, 0, cut)), rest], dim)


def _real(valid: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """``valid`` (c,), or all True for the c tokens of ``tokens`` (H, c, d) when None."""
    return torch.ones(tokens.shape[1], dtype=torch.bool, device=tokens.device) if valid is None else valid


class _Tensors:
    """What both state classes do with their tensors."""

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map_tensors(self, fn, **changes):
        """A copy with ``fn`` applied to every tensor (e.g. a device move), and fields ``changes`` replaced."""
        return replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
            **changes,
        )


@dataclass(frozen=True)
class FMAState(_Tensors):
    """What causal FMA keeps of one sequence's past in one layer (§8), with ``length`` tokens consumed.

    - ``fine_k``/``fine_v`` (H_kv, 2m, d): the last ``2m`` fine keys/values, a ring (position j at slot
      ``j % 2m``), so the window ``[(floor(t/m)-1)m, t)`` is always inside.
    - ``partial_k``/``partial_v`` (L, H_kv, p, d): per level, the bias-free partial sum of the group being
      filled, over its complete fine blocks (the tokens of the block being filled wait in the fine ring). Empty
      (0 levels) for families whose levels derive from each other (``avgpool``, ``recursive``; §7a): a parent is
      computed from two stored children when the second completes.
    - ``groups_k``/``groups_v`` (L, H_kv, 3, p, d): per level, a ring of the last three complete groups (group g
      at slot ``g % 3``) -- exactly the groups a present or future query can still need.
    - ``sink_k``/``sink_v`` (H_kv, s, d): the sink tokens, positions ``0 .. s-1`` (§3a), kept once they have left
      the fine ring; ``sink_valid`` (s,) whether each is a real token. Empty without sinks.
    - ``level_queries`` (L, H, d), coarse query mode only: per level, the query that opened the current
      sub-window (the coarse query of every token in it).
    - ``fine_valid`` (2m,), ``partial_valid`` (L,), ``groups_valid`` (L, 3): which fine slots hold real tokens
      and which groups hold at least one (masked tokens -- holes in an attention mask -- are positions whose
      keys and values are zero and never attended, as in the forward pass); ``holes`` says whether any consumed
      token was masked (without holes the validity masks are all True and attending skips them).

    ``4m + 2s + 8pL`` key/value vectors per key/value head (:attr:`num_vectors`): a constant for the families with
    a level per built length; for the derived families L = L(t+1) = ``num_levels(t + 1, m)``, the levels the next
    query reads, so the state gains a level each time the length doubles (``4m + 2s + 6pL``). Frozen: updates build
    new tensors, so a state shared by several beams after reordering stays intact.
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
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_valid: torch.Tensor
    level_queries: torch.Tensor | None = None
    holes: bool = False

    @property
    def num_levels(self) -> int:
        """Coarse levels held."""
        return self.groups_k.shape[0]

    @property
    def num_vectors(self) -> int:
        """Key/value vectors of size d held per key/value head: ``4m + 2s + 8pL``."""
        kv = (
            self.fine_k,
            self.fine_v,
            self.partial_k,
            self.partial_v,
            self.groups_k,
            self.groups_v,
            self.sink_k,
            self.sink_v,
        )
        return sum(t.numel() // t.shape[-1] for t in kv) // self.fine_k.shape[0]

    def with_levels(self, levels: int) -> FMAState:
        """This state holding ``levels`` coarse levels (at least): new ones (derived families) are empty rings."""
        if levels <= self.num_levels:
            return self
        return replace(
            self,
            **{
                name: _grow_levels(getattr(self, name), levels, fill, dim=0)
                for name, fill in _NEW_LEVEL_FILL.items()
                if getattr(self, name) is not None
            },
        )


# What a level added to a state holds until its groups are computed (partial sums exist only for direct families,
# whose levels never change).
_NEW_LEVEL_FILL = {"groups_k": 0.0, "groups_v": 0.0, "groups_valid": True, "level_queries": 0.0}
_LEVEL_FIELDS = ("partial_k", "partial_v", "partial_valid", *_NEW_LEVEL_FILL)
_TENSOR_FIELDS = ("fine_k", "fine_v", "fine_valid", "sink_k", "sink_v", "sink_valid", *_LEVEL_FIELDS)


def _grow_levels(tensor: torch.Tensor, levels: int, fill, dim: int) -> torch.Tensor:
    """``tensor`` with its level dimension ``dim`` padded with ``fill`` to ``levels`` entries."""
    shape = list(tensor.shape)
    shape[dim] = levels - shape[dim]
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim) if shape[dim] > 0 else tensor


@dataclass
class FMABatchState(_Tensors):
    """The :class:`FMAState` of every row of a batch in one layer, stacked: the same tensors with a leading batch
    dimension, and per row its ``lengths``, ``levels`` (coarse levels held) and ``holes``.

    Rows have their own lengths (left padding makes rows' positions differ) and, for the derived families, their
    own number of levels. The tensors hold the most levels any row holds; a row's extra levels are empty rings it
    never reads (a row holds every level its next query reads, §7a), which the position-only bias masks anyway.
    Updated in place (as transformers' caches are): beams and ``num_return_sequences`` build new batches with
    :meth:`index_select`, a copy, so rows never share memory.
    """

    lengths: list[int]
    levels: list[int]
    holes: list[bool]
    fine_k: torch.Tensor
    fine_v: torch.Tensor
    partial_k: torch.Tensor
    partial_v: torch.Tensor
    groups_k: torch.Tensor
    groups_v: torch.Tensor
    fine_valid: torch.Tensor
    partial_valid: torch.Tensor
    groups_valid: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_valid: torch.Tensor
    level_queries: torch.Tensor | None = None

    @classmethod
    def stack(cls, states: list[FMAState], levels: int = 0) -> FMABatchState:
        """The rows ``states`` as one batch holding at least ``levels`` levels."""
        levels = max([levels] + [state.num_levels for state in states])
        held = [state.with_levels(levels) for state in states]
        tensors = {
            name: torch.stack([getattr(state, name) for state in held])
            for name in _TENSOR_FIELDS
            if getattr(held[0], name) is not None
        }
        return cls(
            [state.length for state in states],
            [state.num_levels for state in states],
            [state.holes for state in states],
            **tensors,
        )

    @property
    def num_levels(self) -> int:
        """Coarse levels the tensors hold (the most of any row)."""
        return self.groups_k.shape[1]

    def row(self, b: int) -> FMAState:
        """Row ``b`` alone, with the levels it holds (a copy: the batch is updated in place)."""

        def take(name):
            tensor = getattr(self, name)
            if tensor is None:
                return None
            return (tensor[b, : self.levels[b]] if name in _LEVEL_FIELDS else tensor[b]).clone()

        return FMAState(self.lengths[b], **{name: take(name) for name in _TENSOR_FIELDS}, holes=self.holes[b])

    def set_rows(self, rows: list[int], states: list[FMAState]) -> None:
        """Replace rows ``rows`` by ``states``, whose new levels (derived families) the batch then holds too."""
        new = FMABatchState.stack(states, self.num_levels)
        index = torch.tensor(rows, device=self.fine_k.device)
        for name in _TENSOR_FIELDS:
            tensor = getattr(self, name)
            if tensor is not None:
                fill = _NEW_LEVEL_FILL.get(name)
                if fill is not None:
                    tensor = _grow_levels(tensor, new.num_levels, fill, dim=1)
                setattr(self, name, tensor.index_copy(0, index, getattr(new, name)))
        for b, state in zip(rows, states):
            self.lengths[b], self.levels[b], self.holes[b] = state.length, state.num_levels, state.holes

    def index_select(self, rows: list[int]) -> FMABatchState:
        """A new batch of the given rows (repeated, reordered), e.g. for beams: copies."""
        index = torch.tensor(rows, device=self.fine_k.device)
        return self.map_tensors(
            lambda t: t.index_select(0, index),
            lengths=[self.lengths[b] for b in rows],
            levels=[self.levels[b] for b in rows],
            holes=[self.holes[b] for b in rows],
        )


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
                'build the layer with a max_seq_len, or use boundary="mask"'
            )
        dtype = _softmax_dtype(dtype)
        m, p, d, s = self.block_size, self.coarse_tokens, self.head_dim, self.sink_tokens
        levels = 0 if self._derives_levels else self.num_levels  # derived levels are added as they are needed

        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        def real(*shape):
            return torch.ones(*shape, dtype=torch.bool, device=device)

        return FMAState(
            0,
            zeros(kv_heads, 2 * m, d),
            zeros(kv_heads, 2 * m, d),
            zeros(levels, kv_heads, p, d),
            zeros(levels, kv_heads, p, d),
            zeros(levels, kv_heads, 3, p, d),
            zeros(levels, kv_heads, 3, p, d),
            real(2 * m),
            ~real(levels),
            real(levels, 3),
            zeros(kv_heads, s, d),
            zeros(kv_heads, s, d),
            real(s),
            zeros(levels, heads, d) if self.query_mode == "coarse" else None,
        )

    def prefill(
        self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
    ) -> FMAState:
        """Consume tokens whose attention output was computed elsewhere (e.g. by ``forward`` over a whole prompt):
        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) of one sequence; ``valid`` (c,) bool marks real tokens (None:
        all), the others are holes, as ``forward``'s ``key_padding_mask``. Only the tail the state keeps is
        summarised, in the state's precision (float32 at least)."""
        state, q, k, v, valid = self._new_tokens(state, q, k, v, valid)
        state = self._with_sinks(state, k, v, valid)
        updates = self._level_updates(state, k, v, valid, tail_only=True)
        return self._advance(state.with_levels(len(updates or [])), q, k, v, valid, updates)

    def step(
        self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, FMAState]:
        """Attend ``c`` new tokens of one sequence to its past and to each other, then consume them.

        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) at positions ``state.length + [0, c)``; ``valid`` as in
        :meth:`prefill`. Returns the output (H, c, d) -- the same as rows ``length .. length+c-1`` of ``forward``
        over the whole sequence (§8) -- and the new state. Any ``c``: a chunk of a chunked prefill (cost
        ``c * (c + 2m + 3pL)``), or one token of one row; batched decoding steps go through :meth:`step_batch`.
        """
        if self.training and self.dropout:
            raise ValueError("FastMultipoleAttention.step runs without dropout: call .eval() first")
        out_dtype = q.dtype
        state, q, k, v, valid = self._new_tokens(state, q, k, v, valid)
        state = self._with_sinks(state, k, v, valid)  # a chunk's later queries may read its sinks
        updates = self._level_updates(state, k, v, valid, tail_only=False)
        state = state.with_levels(len(updates or []))
        out = self._attend_chunk(state, q, k, v, valid, updates)
        return out.to(out_dtype), self._advance(state, q, k, v, valid, updates)

    def step_batch(
        self, state: FMABatchState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend one new token per row to that row's past, then consume it (``state`` is updated in place).

        ``q`` (B, H, 1, d), ``k``/``v`` (B, H_kv, 1, d), row b at position ``state.lengths[b]``; ``valid`` (B, 1)
        marks real tokens (None: all). Returns (B, H, 1, d), row b equal to :meth:`step` of row b alone.

        A fixed number of batched tensor operations whatever B: a token's own group is never complete, so it reads
        its row's fine ring, itself and the rings of complete groups, with the slot bias of its row's position
        (:meth:`Partition.step_bias`), and is written to slot ``t % 2m`` of its row's ring. Rows whose token
        completes a fine block (every m steps, at different steps for different rows: on average B/m rows a step)
        then update their levels: in one batched pass per level for the direct families (:meth:`_complete_blocks`),
        alone through :meth:`prefill` for the derived ones (a row may gain a level).
        """
        if self.training and self.dropout:
            raise ValueError("FastMultipoleAttention.step_batch runs without dropout: call .eval() first")
        batch, heads, _, d = q.shape
        kv_heads, m, p, levels = k.shape[1], self.block_size, self.coarse_tokens, state.num_levels
        out_dtype, dtype = q.dtype, state.fine_k.dtype
        q, k, v = q[:, :, 0].to(dtype), k[:, :, 0].to(dtype), v[:, :, 0].to(dtype)  # (B, H, d)
        valid = None if valid is None or bool(valid.all()) else valid[:, 0].bool()
        if valid is not None:  # masked tokens: zero query, key and value, as in forward
            keep = valid.to(dtype)[:, None, None]
            q, k, v = q * keep, k * keep, v * keep
        completing = [b for b, t in enumerate(state.lengths) if (t + 1) % m == 0]
        if self._derives_levels:  # these rows' whole consumption, alone, from the state before this step
            consumed = [
                self.prefill(
                    state.row(b), q[b, :, None], k[b, :, None], v[b, :, None], None if valid is None else valid[b, None]
                )
                for b in completing
            ]

        # Logits and values by part (fine ring, the token, every level's ring of groups): no concatenated copy of
        # the state. A key/value head's g query heads are rows.
        t = torch.tensor(state.lengths, device=q.device)
        queries = (q * d**-0.5).view(batch, kv_heads, heads // kv_heads, d)
        level_queries = queries[:, None].expand(-1, levels, -1, -1, -1)  # (B, L, H_kv, g, d)
        if self.query_mode == "coarse" and levels:
            level_queries = self._batch_level_queries(state, t, q)  # (B, L, H, d)
            state.level_queries = level_queries  # the queries of the sub-windows open after this token
            level_queries = (level_queries * d**-0.5).view(batch, levels, kv_heads, -1, d)
        # Levels as batch dimensions in the rings' own (B, L, H_kv) order: the rings are read in place (an einsum
        # ordering its batch dimensions by the output would copy them every step); only the small logits move.
        level_logits = level_queries @ state.groups_k.flatten(3, 4).transpose(-1, -2)  # (B, L, H_kv, g, 3p)
        logits = [
            queries @ state.fine_k.transpose(-1, -2),
            (queries * k[:, :, None]).sum(-1, keepdim=True),
            level_logits.permute(0, 2, 3, 1, 4).flatten(3),
        ]
        if self.boundary == "zero_sink":
            logits.append(logits[1].new_zeros(logits[1].shape))  # the zero-sink slot: logit 0, value 0
        if self.sink_tokens:  # the sink tokens (§3a), last
            logits.append(queries @ state.sink_k.transpose(-1, -2))
        bias = self.partition.step_bias(tuple(state.lengths), levels, dtype, q.device)  # (B, S)
        token_valid = torch.ones(batch, 1, dtype=torch.bool, device=q.device) if valid is None else valid[:, None]
        if valid is not None or any(state.holes):
            slots_valid = [state.fine_valid, token_valid, state.groups_valid.repeat_interleave(p, -1).flatten(1)]
            if self.boundary == "zero_sink":
                slots_valid.append(token_valid.new_ones(batch, 1))
            slots_valid.append(state.sink_valid)
            bias = bias.masked_fill(~torch.cat(slots_valid, 1), MASK_VALUE)
        probs = torch.softmax(torch.cat(logits, -1) + bias[:, None, None], -1)  # (B, H_kv, g, S)
        fine, own = probs[..., : 2 * m], probs[..., 2 * m : 2 * m + 1]
        coarse = probs[..., 2 * m + 1 : 2 * m + 1 + levels * 3 * p].unflatten(-1, (levels, 3 * p))
        out = (
            fine @ state.fine_v
            + own * v[:, :, None]
            + (coarse.permute(0, 3, 1, 2, 4) @ state.groups_v.flatten(3, 4)).sum(1)
        )
        if self.sink_tokens:
            out = out + probs[..., -self.sink_tokens :] @ state.sink_v
        out = out.reshape(batch, heads, 1, d)

        rows, slots = torch.arange(batch, device=q.device), t % (2 * m)
        state.fine_k[rows, :, slots] = k
        state.fine_v[rows, :, slots] = v
        state.fine_valid[rows, slots] = token_valid[:, 0]
        filling = [b for b, length in enumerate(state.lengths) if length < self.sink_tokens]
        if filling:  # these rows' tokens are sink tokens (§3a): kept for every later query
            at = t[filling]
            state.sink_k[filling, :, at] = k[filling]
            state.sink_v[filling, :, at] = v[filling]
            state.sink_valid[filling, at] = token_valid[filling, 0]
        state.holes = [holes or not real for holes, real in zip(state.holes, token_valid[:, 0].tolist())]
        state.lengths = [length + 1 for length in state.lengths]
        if completing and self._derives_levels:
            state.set_rows(completing, consumed)
        elif completing:
            self._complete_blocks(state, completing)
        return out.to(out_dtype)

    def _complete_blocks(self, state: FMABatchState, rows: list[int]) -> None:
        """Direct families, in place: rows ``rows`` whose last token completed a fine block (now wholly in their
        fine rings) add its contribution to every level's partial sum, one batched pass per level over those rows; a
        group the block completes moves, with its bias, into the level's ring of groups (§8)."""
        m, index = self.block_size, torch.tensor(rows, device=state.fine_k.device)
        ends = torch.tensor([state.lengths[b] for b in rows], device=index.device)  # positions consumed
        block_start = ends - m
        slots = block_start[:, None] % (2 * m) + torch.arange(m, device=index.device)  # (R, m): the block's slots
        blocks = {
            name: getattr(state, f"fine_{name}")[index[:, None], :, slots].permute(2, 0, 1, 3).flatten(1, 2)
            for name in ("k", "v")
        }  # (H_kv, R*m, d): the rows' blocks side by side
        block_valid = state.fine_valid[index[:, None], slots].any(1)
        if any(state.lengths[b] - m < self.sink_tokens for b in rows):  # the downsamplers read sinks as zeros (§3a)
            keep = (block_start[:, None] + torch.arange(m, device=index.device) >= self.sink_tokens).flatten()
            blocks = {name: tokens * keep[:, None] for name, tokens in blocks.items()}
        for level in range(1, state.num_levels + 1):
            width = self.partition.group_width(level)
            offsets = (block_start[:, None] + torch.arange(m, device=index.device)) % width
            complete = ends % width == 0  # (R,): the block is its group's last
            done, group_slot = index[complete], (ends[complete] // width - 1) % 3
            for name, family in (("k", self.k_downsample), ("v", self.v_downsample)):
                block_sums, bias = family(blocks[name], level=level, offsets=offsets.flatten())  # (H_kv, R, p, d)
                partial = getattr(state, f"partial_{name}")
                summed = partial[index, level - 1] + block_sums.transpose(0, 1)
                getattr(state, f"groups_{name}")[done, level - 1, :, group_slot] = summed[complete] + bias
                partial[index, level - 1] = summed.masked_fill(complete[:, None, None, None], 0)
            real = state.partial_valid[index, level - 1] | block_valid
            state.groups_valid[done, level - 1, group_slot] = real[complete]
            state.partial_valid[index, level - 1] = real & ~complete

    def _with_sinks(self, state, k, v, valid) -> FMAState:
        """``state`` holding those of the new tokens ``k``/``v`` (H_kv, c, d) that are sink tokens (positions below
        s, §3a): the fine ring will drop them, queries past the second block still read them."""
        t, take = state.length, min(self.sink_tokens - state.length, k.shape[1])
        if take <= 0:
            return state
        return replace(
            state,
            sink_k=ring_write(state.sink_k, t, k[:, :take]),
            sink_v=ring_write(state.sink_v, t, v[:, :take]),
            sink_valid=ring_write(state.sink_valid, t, _real(valid, k)[:take], dim=0),
        )

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
        # the block's earlier tokens wait in the fine ring; the downsamplers read sink tokens as zeros (§3a)
        tokens_k, tokens_v = (
            without_sinks(
                torch.cat([ring_read(ring, block_start, t), new], 1)[:, : end - block_start],
                block_start,
                self.sink_tokens,
            )
            for ring, new in ((state.fine_k, k), (state.fine_v, v))
        )
        tokens_valid = torch.cat([ring_read(state.fine_valid, block_start, t, dim=0), _real(valid, k)])
        tokens_valid = tokens_valid[: end - block_start]
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
            real.index_add_(0, positions // width - first, tokens_valid[start - block_start :].long())
            if first == t // width:
                real[0] += state.partial_valid[level - 1]
            summed = {}
            for name, family, tokens, partial in (
                ("k", self.k_downsample, tokens_k, state.partial_k[level - 1]),
                ("v", self.v_downsample, tokens_v, state.partial_v[level - 1]),
            ):
                x = tokens[:, start - block_start :]
                block_sums, bias = family(x, level=level, offsets=positions % width)  # (H_kv, c' / m, p, d)
                group_sums = x.new_zeros(x.shape[0], (end - 1) // width - first + 1, *block_sums.shape[-2:])
                group_sums.index_add_(1, positions[::m] // width - first, block_sums)
                if first == t // width:  # the group being filled when the chunk began
                    group_sums[:, 0] += partial
                new_partial = group_sums[:, n_complete] if end > end_group * width else torch.zeros_like(partial)
                summed[name] = (group_sums[:, :n_complete] + bias, new_partial)
            partial_valid = real[n_complete] > 0 if end > end_group * width else real.new_zeros((), dtype=torch.bool)
            updates.append(
                LevelUpdate(
                    first,
                    summed["k"][0],
                    summed["v"][0],
                    real[:n_complete] > 0,
                    summed["k"][1],
                    summed["v"][1],
                    partial_valid,
                )
            )
        return updates

    def _derived_updates(self, state, k, v, valid) -> list[LevelUpdate]:
        """:meth:`_level_updates` for families whose levels derive from each other (§7a): level 1 summarises each
        completed fine block, level l+1 group g is ``combine`` of level-l groups 2g, 2g+1, computed when 2g+1
        completes. The state holds the levels the next query reads, L(t+c+1): a level that becomes needed is built
        from its children, all of which are still stored then (a query first needs level l+1 when level l's
        fourth group completes, and the ring holds the three before it)."""
        t, c, m = state.length, k.shape[1], self.block_size
        levels = num_levels(t + c + 1, m) if self.num_levels is None else min(num_levels(t + c + 1, m), self.num_levels)
        levels = max(levels, state.num_levels)
        if levels == 0:
            return []
        # Level 1: every fine block completed by the chunk; a new level 1 also takes the earlier ones (t < 2m
        # then, so they are all in the fine ring).
        start = 0 if state.num_levels == 0 else t // m * m
        end = (t + c) // m * m
        blocks = {}
        for name, family, ring, new in (
            ("k", self.k_downsample, state.fine_k, k),
            ("v", self.v_downsample, state.fine_v, v),
        ):
            tokens = torch.cat([ring_read(ring, start, t), new], 1)[:, : end - start]
            blocks[name] = family(without_sinks(tokens, start, self.sink_tokens), 1)[0]  # (H_kv, blocks, p, d)
        tokens_valid = torch.cat([ring_read(state.fine_valid, start, t, dim=0), _real(valid, k)])[: end - start]
        updates = [LevelUpdate(start // m, blocks["k"], blocks["v"], tokens_valid.view(-1, m).any(1))]
        for level in range(2, levels + 1):
            children, new_level = updates[-1], level > state.num_levels
            # Children stored before the chunk (the ring, if the level existed) then those the chunk completed.
            before = t // self.partition.group_width(level - 1)
            stored = (
                ring_positions(before - 1, 3, k.device)
                if level - 1 <= state.num_levels
                else torch.zeros(0, dtype=torch.long, device=k.device)
            )
            stored = stored[(stored >= 0) & (stored < children.first_group)].sort().values
            first_child = int(stored[0]) if len(stored) else children.first_group
            merged = {}
            for name in ("k", "v", "valid"):
                ring = getattr(state, f"groups_{name}")[level - 2] if len(stored) else None
                new = getattr(children, f"complete_{name}")
                merged[name] = (
                    torch.cat(
                        [ring.index_select(1 if name != "valid" else 0, stored % 3), new], 1 if name != "valid" else 0
                    )
                    if ring is not None
                    else new
                )
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
            changed["groups_valid"] = torch.stack(
                [
                    ring_write(ring, u.first_group, u.complete_valid, dim=0)
                    for ring, u in zip(state.groups_valid, updates)
                ]
            )
            if updates[0].partial_k is not None:  # direct families keep partial sums
                changed["partial_k"] = torch.stack([u.partial_k for u in updates])
                changed["partial_v"] = torch.stack([u.partial_v for u in updates])
                changed["partial_valid"] = torch.stack([u.partial_valid for u in updates])
            changed["groups_k"] = torch.stack(
                [ring_write(ring, u.first_group, u.complete_k) for ring, u in zip(state.groups_k, updates)]
            )
            changed["groups_v"] = torch.stack(
                [ring_write(ring, u.first_group, u.complete_v) for ring, u in zip(state.groups_v, updates)]
            )
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
        queries = (q * d**-0.5).reshape(kv_heads, rows, d)

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
                level_q = (self._level_query_rows(state, q, level) * d**-0.5).reshape(kv_heads, rows, d)
            logits.append(level_q @ level_keys.transpose(-1, -2))
        if self.boundary == "zero_sink":
            logits.append(queries.new_zeros(kv_heads, rows, 1))
            values.append(v.new_zeros(kv_heads, 1, d))
            slots_valid.append(state.fine_valid.new_ones(1))
        logits.append(queries @ state.sink_k.transpose(-1, -2))  # the sink tokens (§3a), last
        values.append(state.sink_v)
        slots_valid.append(state.sink_valid)
        bias = self.partition.state_bias(t, c, state.num_levels, new_groups, q.dtype, q.device)
        if state.holes:
            bias = bias.masked_fill(~torch.cat(slots_valid), MASK_VALUE)
        logits = torch.cat(logits, -1).view(kv_heads, -1, c, bias.shape[-1]) + bias
        probs = torch.softmax(logits, -1).flatten(1, 2)  # (H_kv, g*c, S)
        return (probs @ torch.cat(values, 1)).reshape(heads, c, d)

    def _batch_level_queries(self, state, t, q):
        """Coarse query mode, one token per row at positions ``t`` (B,): per level, the query of its sub-window of
        ``w_l / p`` tokens -- its own when it opens one, else the stored one. (B, L, H, d)."""
        sub_windows = torch.tensor(
            [self.partition.group_width(level) // self.coarse_tokens for level in range(1, state.num_levels + 1)],
            device=t.device,
        )
        opens = t[:, None] % sub_windows == 0  # (B, L)
        return torch.where(opens[..., None, None], q[:, None], state.level_queries)
