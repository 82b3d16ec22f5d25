"""The decoding state of causal Fast Multipole Attention (docs/fma.md §8): what a layer keeps of each row's past.

:class:`FMAState` holds the rows of a batch (a single sequence is a batch of one); ``fma_decode.py`` fills it from a
prompt and attends new tokens to it. This module only stores it: ring reads and writes, row selection for beam
search and batch operations, growing the level count, its size, and what consuming tokens changes in each level
(:class:`LevelUpdate`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .fma_partition import Partition


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


@dataclass(frozen=True)
class LevelUpdate:
    """One level's part of consuming a chunk of new tokens: the summaries of the groups they complete
    (``first_group`` .., bias included) and the new partial sums (bias-free) of the group then being filled."""

    first_group: int
    complete_k: torch.Tensor  # (B, H_kv, groups, p, d)
    complete_v: torch.Tensor
    complete_valid: torch.Tensor  # (B, groups): the group holds a real token
    partial_k: torch.Tensor | None = None  # (B, H_kv, p, d); None for derived levels, which keep no partial sums
    partial_v: torch.Tensor | None = None
    partial_valid: torch.Tensor | None = None  # (B,)


# The fields with a level dimension (dim 1), and what a level added to a state holds until its groups are computed.
# Partial sums exist only for the direct families, which hold all their levels from the start.
NEW_LEVEL_FILL = {
    "groups_k": 0.0,
    "groups_v": 0.0,
    "groups_valid": True,
    "level_queries": 0.0,
    "store_groups_k": 0.0,
    "store_groups_v": 0.0,
    "store_groups_valid": False,
}
# The refinement store (§3c), empty without refinement; its fields grow along the block dimension (the last of
# the position-like ones).
STORE_FIELDS = {
    "store_k": 2,
    "store_v": 2,
    "store_valid": 1,
    "store_center": 2,
    "store_radius": 2,
    "store_available": 1,
    "store_groups_k": 3,
    "store_groups_v": 3,
    "store_groups_valid": 2,
}
LEVEL_FIELDS = ("partial_k", "partial_v", "partial_valid", *NEW_LEVEL_FILL)


@dataclass
class FMAState:
    """What causal FMA keeps of the past of each row of a batch in one layer (§8); row b has consumed
    ``lengths[b]`` tokens. Every tensor is batch-first (B rows); m, p, s, d, H, H_kv as in ``FastMultipoleAttention``,
    w its ``near_blocks``, F = (w+1)m and R = 2w+1 (:attr:`Partition.fine_ring`, :attr:`Partition.group_ring`).

    - ``fine_k``/``fine_v`` (B, H_kv, F, d): the last ``F`` fine keys/values, a ring (position j at slot
      ``j % F``), so the window ``[(floor(t/m)-w)m, t)`` is always inside.
    - ``partial_k``/``partial_v`` (B, L, H_kv, p, d): per level, the bias-free partial sum of the group being
      filled, over its complete fine blocks (the tokens of the block being filled wait in the fine ring). Empty
      (0 levels) for families whose levels derive from each other (``avgpool``, ``recursive``; §7a): a parent is
      computed from two stored children when the second completes.
    - ``groups_k``/``groups_v`` (B, L, H_kv, R, p, d): per level, a ring of the last R complete groups (group g
      at slot ``g % R``) -- exactly the groups a present or future query can still need.
    - ``sink_k``/``sink_v`` (B, H_kv, s, d): the sink tokens, positions ``0 .. s-1`` (§3a), kept once they have
      left the fine ring; ``sink_valid`` (B, s) whether each is a real token. Empty without sinks.
    - the refinement store (§3c; empty, with no blocks, without refinement), for NB complete fine blocks:
      ``store_k``/``store_v`` (B, H_kv, NB*m, d) and ``store_valid`` (B, NB*m) every past fine key and value (sink
      tokens read as zeros); ``store_center``/``store_radius`` (B, H_kv, NB, d) and ``store_available`` (B, NB) the
      Quest bounds of every complete block; ``store_groups_k``/``store_groups_v`` (B, L, H_kv, NB, p, d) and
      ``store_groups_valid`` (B, L, NB) the summaries of every complete group (level l: groups ``0 ..
      NB / 2**(l-1) - 1``). Rows at different positions share the tensors, sized by the furthest.
    - ``level_queries`` (B, L, H, d), coarse query mode only: per level, the query that opened the current
      sub-window (the coarse query of every token in it).
    - ``fine_valid`` (B, F), ``partial_valid`` (B, L), ``groups_valid`` (B, L, R): which fine slots hold real
      tokens and which groups hold at least one (masked tokens -- holes in an attention mask -- are positions whose
      keys and values are zero and never attended, as in the forward pass); ``holes[b]`` says whether row b has
      consumed a masked token (without holes its validity flags are all True and attending skips them).
    - ``levels[b]``: the coarse levels row b holds. For the families with a level per built length that is every
      level; for the derived ones L(t+1) = ``num_levels(t + 1, m, w)``, the levels the next query reads, so rows gain
      levels at different steps. The tensors hold the most any row holds (:attr:`num_levels`); a row's extra levels
      are empty rings its queries never read, which the position-only bias masks.

    ``2F + 2s + 2(R+1)pL`` key/value vectors per row and key/value head (:attr:`num_vectors`; ``2F + 2s + 2RpL`` for
    the derived families; w = 1: ``4m + 2s + 8pL`` and ``4m + 2s + 6pL``). Updated in place, as transformers' caches
    are: beams and ``num_return_sequences`` build new states with :meth:`select`, a copy, so rows never share memory.
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
    store_k: torch.Tensor
    store_v: torch.Tensor
    store_valid: torch.Tensor
    store_center: torch.Tensor
    store_radius: torch.Tensor
    store_available: torch.Tensor
    store_groups_k: torch.Tensor
    store_groups_v: torch.Tensor
    store_groups_valid: torch.Tensor
    level_queries: torch.Tensor | None = None

    @classmethod
    def empty(
        cls,
        batch_size,
        kv_heads,
        levels,
        coarse_queries,
        dtype,
        device,
        partition: Partition,
        head_dim: int,
    ) -> FMAState:
        """The state of ``batch_size`` empty sequences holding ``levels`` levels of ``partition``'s rings: nothing
        consumed, every buffer zero; ``coarse_queries`` the query heads whose level queries it keeps (coarse query
        mode), else None."""
        f, r, p = partition.fine_ring, partition.group_ring, partition.coarse_tokens
        s, d = partition.sink_tokens, head_dim

        def zeros(*shape):
            return torch.zeros(batch_size, *shape, dtype=dtype, device=device)

        def real(*shape):
            return torch.ones(batch_size, *shape, dtype=torch.bool, device=device)

        return cls(
            *([0] * batch_size, [levels] * batch_size, [False] * batch_size),
            *(zeros(kv_heads, f, d), zeros(kv_heads, f, d)),
            *(zeros(levels, kv_heads, p, d), zeros(levels, kv_heads, p, d)),
            *(zeros(levels, kv_heads, r, p, d), zeros(levels, kv_heads, r, p, d)),
            *(real(f), ~real(levels), real(levels, r)),
            *(zeros(kv_heads, s, d), zeros(kv_heads, s, d), real(s)),
            *(zeros(kv_heads, 0, d), zeros(kv_heads, 0, d), real(0)),
            *(zeros(kv_heads, 0, d), zeros(kv_heads, 0, d), real(0)),
            *(zeros(levels, kv_heads, 0, p, d), zeros(levels, kv_heads, 0, p, d), ~real(levels, 0)),
            None if coarse_queries is None else zeros(levels, coarse_queries, d),
        )

    def tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.tensor_fields()]

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def num_levels(self) -> int:
        """Coarse levels the tensors hold (the most of any row)."""
        return self.groups_k.shape[1]

    @property
    def fine_ring(self) -> int:
        """Fine positions the ring holds, (w+1)m."""
        return self.fine_k.shape[2]

    @property
    def group_ring(self) -> int:
        """Complete groups each level's ring holds, 2w+1."""
        return self.groups_k.shape[3]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def store_blocks(self) -> int:
        """Complete fine blocks the refinement store holds (§3c; 0 without refinement)."""
        return self.store_available.shape[1]

    @property
    def store_nbytes(self) -> int:
        """Bytes of the refinement store (§3c), part of :attr:`nbytes`."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in STORE_FIELDS)

    @property
    def store_vectors(self) -> int:
        """Vectors of size d the refinement store holds per row and key/value head (keys, values, bounds and
        summaries), apart from :attr:`num_vectors`."""
        names = ("store_k", "store_v", "store_center", "store_radius", "store_groups_k", "store_groups_v")
        vectors = sum(getattr(self, name).numel() // self.fine_k.shape[-1] for name in names)
        return vectors // (self.batch_size * self.fine_k.shape[1])

    def grow_store(self, blocks: int, block_size: int) -> None:
        """Let the store hold ``blocks`` fine blocks of ``block_size`` positions (at least), in place: new ones are
        empty."""
        missing = blocks - self.store_blocks
        if missing <= 0:
            return
        for name, dim in STORE_FIELDS.items():
            tensor = getattr(self, name)
            shape = list(tensor.shape)
            shape[dim] = missing * (block_size if name in ("store_k", "store_v", "store_valid") else 1)
            setattr(self, name, torch.cat([tensor, tensor.new_zeros(shape)], dim))

    def write_store_blocks(self, rows, blocks, keys, values, valid, center, radius, available) -> None:
        """Store complete fine blocks ``blocks`` (R,) of rows ``rows`` (R,), in place: ``keys``/``values`` (R, H_kv,
        m, d), ``valid`` (R, m), their bounds ``center``/``radius`` (R, H_kv, d) and ``available`` (R,)."""
        m = keys.shape[2]
        self.grow_store(int(blocks.max()) + 1, m)
        positions = blocks[:, None] * m + torch.arange(m, device=blocks.device)  # (R, m)
        self.store_k[rows[:, None], :, positions] = keys.transpose(1, 2)
        self.store_v[rows[:, None], :, positions] = values.transpose(1, 2)
        self.store_valid[rows[:, None], positions] = valid
        self.store_center[rows, :, blocks], self.store_radius[rows, :, blocks] = center, radius
        self.store_available[rows, blocks] = available

    def write_store_groups(self, level: int, rows, groups, keys, values, valid) -> None:
        """Store complete level-``level`` groups ``groups`` (R,) of rows ``rows`` (R,), in place: ``keys``/``values``
        (R, H_kv, p, d), ``valid`` (R,). The store must hold their blocks (written first)."""
        self.store_groups_k[rows, level - 1, :, groups] = keys
        self.store_groups_v[rows, level - 1, :, groups] = values
        self.store_groups_valid[rows, level - 1, groups] = valid

    @property
    def num_vectors(self) -> int:
        """Key/value vectors of size d held per row and key/value head: ``2F + 2s + 2(R+1)pL``."""
        kv = ("fine_k", "fine_v", "partial_k", "partial_v", "groups_k", "groups_v", "sink_k", "sink_v")
        vectors = sum(getattr(self, name).numel() // self.fine_k.shape[-1] for name in kv)
        return vectors // (self.batch_size * self.fine_k.shape[1])

    def map_tensors(self, fn, **changes) -> FMAState:
        """A copy with ``fn`` applied to every tensor (e.g. a device move), and fields ``changes`` replaced."""
        return replace(self, **{name: fn(getattr(self, name)) for name in self.tensor_fields()}, **changes)

    def stored_groups(self, level: int, rows: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keys (R, H_kv, p, d), values and validity (R,) of level-``level`` groups ``groups`` (R,) of rows ``rows``
        (R,), read from their rings."""
        at, slots = level - 1, groups % self.group_ring
        return self.groups_k[rows, at, :, slots], self.groups_v[rows, at, :, slots], self.groups_valid[rows, at, slots]

    def grow_levels(self, levels: int) -> None:
        """Let the tensors hold ``levels`` coarse levels (at least), in place: new ones are empty rings."""
        for name, fill in NEW_LEVEL_FILL.items():
            if getattr(self, name) is not None:
                setattr(self, name, _with_levels(getattr(self, name), levels, fill))

    def select(self, rows: list[int]) -> FMAState:
        """A new state of the given rows (repeated, reordered: beams; or a group of rows that take the same
        positions), holding the most levels those rows hold: copies."""
        index = torch.tensor(rows, device=self.fine_k.device)
        levels = max((self.levels[b] for b in rows), default=0)

        def take(name, tensor):
            tensor = tensor.index_select(0, index)
            return tensor[:, :levels] if name in LEVEL_FIELDS else tensor

        return replace(
            self,
            lengths=[self.lengths[b] for b in rows],
            levels=[self.levels[b] for b in rows],
            holes=[self.holes[b] for b in rows],
            **{name: take(name, getattr(self, name)) for name in self.tensor_fields()},
        )

    def put(self, rows: list[int], other: FMAState) -> None:
        """Write the rows of ``other`` over rows ``rows``, in place (the inverse of :meth:`select`); the tensors
        then hold the levels ``other`` holds too."""
        levels = max(self.num_levels, other.num_levels)
        self.grow_levels(levels)
        if other.store_blocks > self.store_blocks:
            self.grow_store(other.store_blocks, other.store_k.shape[2] // other.store_blocks)
        elif other.store_blocks < self.store_blocks:
            other.grow_store(self.store_blocks, self.store_k.shape[2] // self.store_blocks)
        index = torch.tensor(rows, device=self.fine_k.device)
        for name in self.tensor_fields():
            source = getattr(other, name)
            if name in NEW_LEVEL_FILL:
                source = _with_levels(source, levels, NEW_LEVEL_FILL[name])
            getattr(self, name).index_copy_(0, index, source)
        for b, length, held, holes in zip(rows, other.lengths, other.levels, other.holes):
            self.lengths[b], self.levels[b], self.holes[b] = length, held, holes


def _with_levels(tensor: torch.Tensor, levels: int, fill) -> torch.Tensor:
    """``tensor`` with its level dimension (1) padded with ``fill`` to ``levels`` entries."""
    missing = levels - tensor.shape[1]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), fill)], 1)
