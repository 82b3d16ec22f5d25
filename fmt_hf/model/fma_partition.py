"""Who attends to what in Fast Multipole Attention: the §3 partition, stated once (docs/fma.md §1, §3, §4, §7).

Everything here depends only on the hyperparameters and on positions, never on data. The forward pass reads it as
*slot plans* (per query unit: which bank entries form its key set, and their additive logit bias); incremental
decoding reads it as *state biases* (per new query: the bias over the fine ring and the rings of complete groups).
Both are built from :func:`coarse_groups` and :func:`slot_bias`. FlexAttention's fused path (``fma_flex.py``) reads
the same rules elementwise, per (query, key) pair: :func:`fine_member` and :func:`attends_group`, which share
:func:`interaction_list` with :func:`coarse_groups`.

Plans and state biases are cached in one process-wide, byte-bounded, thread-safe cache shared by every layer and
model (:data:`PLANS`): they are keyed by the partition, the shape, the device and the dtype.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch

# Finite rather than -inf: a row whose every slot is masked (a padding query) stays finite instead of NaN,
# and exp(MASK_VALUE - max) is exactly 0 in float32, so real rows are unaffected.
MASK_VALUE = -1e30


def num_levels(seq_len: int, block_size: int, near_blocks: int = 1) -> int:
    """Number of coarse levels L a sequence of ``seq_len`` tokens needs (§1, §3, §7): the fewest with which the
    partition of near-field width ``near_blocks`` (w) covers every pair, ``seq_len <= (w+1) * block_size * 2**L``.

    Level l (group width ``w_l = block_size * 2**(l-1)``) is used only by queries at ``i >= (w+1) * w_l``, so it
    exists when ``seq_len > (w+1) * w_l``.
    """
    levels = 0
    while (near_blocks + 1) * block_size * 2**levels < seq_len:
        levels += 1
    return levels


def slots_per_level(causal: bool, near_blocks: int = 1) -> int:
    """Groups in a level's interaction list (§3): w + 1 causal (w of them for an even child), 2w + 1 bidirectional."""
    return near_blocks + 1 if causal else 2 * near_blocks + 1


def interaction_list(
    own_group: torch.Tensor, causal: bool, near_blocks: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The level-l slots of a query in level-l group ``own_group`` G (§3) with near-field width ``near_blocks`` w,
    one ``(group, member)`` pair per slot: the level-l children of the parent level's near field (groups
    ``2(P-w) .. 2(P+w)+1``, P = G // 2 the parent) that are not in this level's (``G-w .. G+w``), causal ones in
    the past only.

    ``member`` is None for a slot every query has, else a bool tensor that is False where the slot is not part of
    the partition (the causal last group of an even child). Elementwise operations only, so the same statement
    serves the slot plans (:func:`coarse_groups`) and FlexAttention's mask, which is evaluated per (query, key)
    inside a compiled kernel (:func:`attends_group`).
    """
    g, w = own_group, near_blocks
    if causal:
        first = (g >> 1) * 2 - 2 * w  # groups 2P-2w .. G-w-1: 2P-w only when the query is an odd child
        return [(first + j, None) for j in range(w)] + [(first + w, (g & 1) == 1)]
    odd = (g & 1) == 1
    # even G: G-2w .. G-w-1 and G+w+1 .. G+2w+1; odd G: G-2w-1 .. G-w-1 and G+w+1 .. G+2w (w = 1: even G-2, G+2,
    # G+3; odd G-3, G-2, G+2, the 1D fast-multipole interaction list)
    return (
        [(torch.where(odd, g - 2 * w - 1 + j, g - 2 * w + j), None) for j in range(w)]
        + [(torch.where(odd, g - w - 1, g + w + 1), None)]
        + [(torch.where(odd, g + j, g + j + 1), None) for j in range(w + 1, 2 * w + 1)]
    )


def coarse_groups(own_group: torch.Tensor, causal: bool, near_blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The level-l groups a query in level-l group ``own_group`` attends to (§3).

    Returns ``(groups, member)``, each ``own_group.shape + (k,)`` with k = :func:`slots_per_level`. ``member`` is
    False for a slot that is not part of the partition (the causal last group of an even child); a member group
    may still lie outside the sequence -- the caller decides what that means.
    """
    slots = interaction_list(own_group, causal, near_blocks)
    groups = torch.stack([group for group, _ in slots], -1)
    member = torch.stack(
        [torch.ones_like(own_group, dtype=torch.bool) if member is None else member for _, member in slots], -1
    )
    return groups, member


def attends_group(own_group: torch.Tensor, group: torch.Tensor, causal: bool, near_blocks: int = 1) -> torch.Tensor:
    """Whether a query in level-l group ``own_group`` reads level-l group ``group`` (§3), elementwise (broadcast)."""
    hit = None
    for slot, member in interaction_list(own_group, causal, near_blocks):
        match = group == slot if member is None else (group == slot) & member
        hit = match if hit is None else hit | match
    return hit


def fine_member(
    query: torch.Tensor, key: torch.Tensor, block_size: int, causal: bool, near_blocks: int = 1
) -> torch.Tensor:
    """Whether query position ``query`` reads fine key position ``key`` at level 0 (§3), elementwise (broadcast):
    causal, the ``near_blocks`` (w) previous blocks and its own block up to itself; bidirectional, the band of
    ``2w + 1`` blocks. ``key`` may be negative (a block before the sequence); whether such a key exists is the
    caller's business."""
    query_block, key_block = query // block_size, key // block_size
    if causal:
        return (key_block >= query_block - near_blocks) & (key <= query)
    return (key_block >= query_block - near_blocks) & (key_block <= query_block + near_blocks)


def slot_bias(member, in_range, real, offset: float, zero_sink: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive logit bias: ``offset`` for real slots, 0 for zero sinks, MASK_VALUE for everything else."""
    use = member & in_range & real
    bias = torch.full(use.shape, MASK_VALUE, dtype=dtype, device=use.device).masked_fill(use, offset)
    return bias.masked_fill(member & ~in_range, 0.0) if zero_sink else bias


def ring_positions(newest, size: int, device=None) -> torch.Tensor:
    """What a ring buffer of ``size`` slots holds once item ``newest`` was written to slot ``newest % size``:
    slot s holds item ``newest - ((newest - s) mod size)`` (negative: never written). ``newest`` an int gives
    ``(size,)``; a tensor of rows' newest items ``(B,)`` gives ``(B, size)``."""
    slots = torch.arange(size, device=device)
    newest = torch.as_tensor(newest, device=device)[..., None]
    return newest - (newest - slots) % size


class PlanCache:
    """A process-wide cache of partition tensors, bounded in bytes (oldest entries go first) and safe to use from
    several threads.

    One instance (:data:`PLANS`) serves every FMA layer: plans depend only on the partition and the shape, so a
    30-layer model holds one copy, not thirty. Hits are a plain dict lookup (atomic in CPython, and on every
    decoding step); misses build under a lock, so each entry is built once.
    """

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._entries: dict = {}
        self._nbytes = 0
        self._lock = threading.RLock()  # re-entrant: a build may read other entries (the flex plan reads the slot plan)

    @staticmethod
    def _size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(PlanCache._size(v) for v in value)
        return 0

    def get(self, key, build):
        """The value cached under ``key``, built by ``build()`` on a miss."""
        value = self._entries.get(key)
        if value is not None:
            return value
        with self._lock:
            if key not in self._entries:
                value = build()
                self._entries[key] = value
                self._nbytes += self._size(value)
                while self._nbytes > self.max_bytes and len(self._entries) > 1:
                    oldest = next(iter(self._entries))
                    self._nbytes -= self._size(self._entries.pop(oldest))
            return self._entries[key]

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0


PLANS = PlanCache()


@dataclass(frozen=True)
class Partition:
    """The §3 partition of one FMA configuration (hashable: it keys the shared plan cache).

    ``num_levels`` is the number of coarse levels of the hierarchy the layer was built for; ``capacity`` the
    length that hierarchy covers (slots beyond it are "outside the sequence", zero sinks under ``zero_sink``).
    ``num_levels=None`` is a length-free layer (§7a): every input gets the hierarchy it needs, there is no
    capacity, and only groups before position 0 are outside the sequence. ``sink_tokens`` s (§3a): positions
    ``j < s`` are attended exactly by every query whose level-0 band misses them, and summarised by no group.
    ``near_blocks`` w (§3): level 0 holds the w previous blocks and the own one (bidirectional: and the w next), and
    at every coarse level the near field is the w groups on either side of the query's own.
    """

    block_size: int
    coarse_tokens: int
    causal: bool
    num_levels: int | None
    fine_queries: bool
    scale_attn: bool
    zero_sink: bool
    sink_tokens: int = 0
    near_blocks: int = 1

    @property
    def capacity(self) -> int | None:
        """The longest sequence the hierarchy covers, ``(w+1) m 2**L`` (:func:`num_levels`)."""
        return None if self.num_levels is None else (self.near_blocks + 1) * self.block_size * 2**self.num_levels

    @property
    def fine_ring(self) -> int:
        """Fine positions the decoding state keeps (§8): the w blocks before the one being filled and that one."""
        return (self.near_blocks + 1) * self.block_size

    @property
    def group_ring(self) -> int:
        """Complete groups a level of the decoding state keeps (§8): ``2w + 1``, the groups ``2(P-w) .. G-1`` a
        present or future query can still need."""
        return 2 * self.near_blocks + 1

    def levels_for(self, seq_len: int) -> int:
        """:func:`num_levels` of this partition's block size and near field."""
        return num_levels(seq_len, self.block_size, self.near_blocks)

    def coarse_groups(self, own_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`coarse_groups` under this partition."""
        return coarse_groups(own_group, self.causal, self.near_blocks)

    def inside(self, groups: torch.Tensor, width: int) -> torch.Tensor:
        """Whether groups of ``width`` tokens lie inside the sequence the hierarchy covers: from position 0 up to
        the capacity, or without end when there is none (outside ones are zero sinks under ``zero_sink``)."""
        if self.capacity is None:
            return groups >= 0
        return (groups >= 0) & (groups < self.capacity // width)

    def reads_sinks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Whether queries of fine blocks ``blocks`` attend the sinks through their sink slots (§3a): the level-0
        band of block b holds blocks b-w .. (b+w), so it holds block 0, and with it every sink (s <= m), exactly
        when b <= w -- causal and bidirectional alike."""
        return blocks > self.near_blocks

    def sink_summaries(self, groups: torch.Tensor, width, p: int) -> torch.Tensor:
        """Whether each of the ``p`` coarse tokens of groups ``groups`` (``groups.shape + (p,)``, flattened into the
        last dimension) of ``width`` positions (an int, or a tensor broadcast against ``groups``) stands for sink
        tokens only (§3a): coarse token r stands for the r-th sub-window of ``width / p`` positions (the resolution
        of §4's offset and §5's coarse queries), and the downsamplers read sinks as zeros, so such a token summarises
        nothing and is masked."""
        width = torch.as_tensor(width, device=groups.device)
        ends = (groups * width)[..., None] + (torch.arange(p, device=groups.device) + 1) * (width // p)[..., None]
        return ((groups[..., None] >= 0) & (ends <= self.sink_tokens)).flatten(-2)

    def group_width(self, level: int) -> int:
        """``w_l = m * 2**(l-1)``; level 0 is the fine level with blocks of ``m``."""
        return self.block_size if level == 0 else self.block_size << (level - 1)

    def offset(self, level: int, coarse_tokens: int | None = None) -> float:
        """The coarse logit offset ``log(w_l / p)`` of §4 (0 without ``scale_attn``)."""
        p = coarse_tokens or self.coarse_tokens
        return math.log(self.group_width(level) / p) if self.scale_attn else 0.0

    # ------------------------------------------------------------------ forward: slot plans

    def plans(self, n: int, coarse_tokens: tuple[int, ...], device, dtype) -> list:
        """Static slot plans of a length-n sequence whose levels ``1..len(coarse_tokens)`` hold
        ``coarse_tokens[l-1]`` summaries per group (``p`` for every family; the §6 identity check uses ``w_l``),
        from the shared cache.

        Returns ``[fine_plan, level_1_plan, ...]``; each plan is ``(index (units, S), bias (units, R, S))`` with
        index into the key bank ``[zero slot | fine tokens | level 1 | level 2 | ...]`` and R the rows sharing a
        unit's key set (m for a fine block, 1 for a coarse query group). With fine queries the first plan
        already includes every level's slots.
        """
        return PLANS.get(
            ("plans", self, n, coarse_tokens, str(device), dtype),
            lambda: self._build_plans(n, coarse_tokens, device, dtype),
        )

    def _build_plans(self, n, coarse_tokens, device, dtype):
        m, levels = self.block_size, len(coarse_tokens)
        n_fine = -(-n // m) * m
        n_blocks = n_fine // m
        blocks = torch.arange(n_blocks, device=device)

        # Level 0 (§3): the w previous blocks and the own one (causal, own up to the query), or the 2w+1-block band.
        w = self.near_blocks
        offsets = torch.arange(-w, 1 if self.causal else w + 1, device=device)
        slot = torch.arange(len(offsets) * m, device=device)
        neighbour = blocks[:, None] + offsets[slot // m]  # (blocks, K0)
        key_pos = neighbour * m + slot % m
        in_range = self.inside(neighbour, m)
        query_pos = blocks[:, None] * m + torch.arange(m, device=device)
        member = fine_member(query_pos[:, :, None], key_pos[:, None, :], m, self.causal, w)  # (blocks, m, K0)
        fine_bias = slot_bias(member, in_range[:, None], (key_pos < n)[:, None], 0.0, self.zero_sink, dtype)
        fine_index = torch.where(in_range & (key_pos < n_fine), key_pos + 1, 0)
        if self.zero_sink and self.num_levels is not None and levels < self.num_levels:
            # Levels this length does not need hold only out-of-range groups; their logit-0 zero slots are
            # counted into one extra slot with logit log(count) (see _missing_level_sinks).
            sinks = self._missing_level_sinks(blocks, levels)
            sinks = sinks.to(dtype)
            sink_bias = torch.where(sinks > 0, sinks.clamp(min=1).log(), MASK_VALUE)
            fine_bias = torch.cat([fine_bias, sink_bias[:, None, None].expand(-1, m, 1)], 2)
            fine_index = torch.cat([fine_index, torch.zeros_like(fine_index[:, :1])], 1)
        if self.sink_tokens:
            # §3a: the sinks, fine tokens 0 .. s-1 of the bank, as extra fine slots of the blocks whose band misses
            # them (every sink is a real position there: such a block starts past m >= s).
            sink_index = torch.arange(1, self.sink_tokens + 1, device=device).expand(n_blocks, -1)
            sink_use = self.reads_sinks(blocks)[:, None, None].expand(-1, m, self.sink_tokens)
            fine_bias = torch.cat([fine_bias, slot_bias(sink_use, True, True, 0.0, False, dtype)], 2)
            fine_index = torch.cat([fine_index, sink_index], 1)

        # Level l's summaries sit in the bank after the fine tokens and the levels before it.
        n_coarse = -(-n // self.group_width(levels)) * self.group_width(levels)
        bases = [1 + n_fine]
        for level, p in enumerate(coarse_tokens[:-1], start=1):
            bases.append(bases[-1] + n_coarse // self.group_width(level) * p)
        if self.fine_queries:
            # All queries of a fine block share their coarse slots: one key set per block.
            index, bias = [fine_index], [fine_bias]
            for level, (p, base) in enumerate(zip(coarse_tokens, bases), start=1):
                level_index, level_bias = self._level_slots(level, p, blocks >> (level - 1), n, n_coarse, base, dtype)
                index.append(level_index)
                bias.append(level_bias[:, None, :].expand(-1, m, -1))
            return [(torch.cat(index, 1), torch.cat(bias, 2))]
        plans = [(fine_index, fine_bias)]
        for level, (p, base) in enumerate(zip(coarse_tokens, bases), start=1):
            own_group = torch.arange(n_coarse // self.group_width(level), device=device)
            index, bias = self._level_slots(level, p, own_group, n, n_coarse, base, dtype)
            plans.append((index, bias[:, None, :]))
        return plans

    def _level_slots(self, level, p, own_group, n, n_coarse, base, dtype):
        """Bank index (q, k*p) and bias (q, k*p) of the level-l slots of queries in level-l groups ``own_group``."""
        width = self.group_width(level)
        groups, member = self.coarse_groups(own_group)
        in_range = self.inside(groups, width)
        bias = slot_bias(member, in_range, groups * width < n, self.offset(level, p), self.zero_sink, dtype)
        available = member & (groups >= 0) & (groups < n_coarse // width)
        slots = torch.arange(p, device=own_group.device)
        index = torch.where(available[..., None], (base + groups * p)[..., None] + slots, 0).flatten(-2)
        return index, bias.repeat_interleave(p, -1).masked_fill(self.sink_summaries(groups, width, p), MASK_VALUE)

    def _missing_level_sinks(self, blocks, levels):
        """Zero-sink slots that levels ``levels+1 .. L`` would give each fine block at the full hierarchy.

        With the released kernels every query sees every level of ``max_seq_len``; a level a short sequence
        does not need holds only out-of-range groups there, each of which adds ``p`` logit-0 zero slots.
        """
        count = torch.zeros(len(blocks), dtype=torch.float32, device=blocks.device)
        for level in range(levels + 1, self.num_levels + 1):
            groups, member = self.coarse_groups(blocks >> (level - 1))
            outside = member & ~self.inside(groups, self.group_width(level))
            count += self.coarse_tokens * outside.sum(-1)
        return count

    # ------------------------------------------------------------------ decoding: state biases (§8)

    def state_bias(self, t: int, c: int, levels: int, new_groups: list[tuple[int, int]], dtype, device) -> torch.Tensor:
        """Bias (c, S) of queries at ``t .. t+c-1`` over ``[fine ring ((w+1)m) | the c new tokens | per level: its
        ring of 2w+1 complete groups and the groups ``first .. first+count-1`` the chunk adds (``new_groups[l-1]
        = (first, count)``), p slots each | the zero-sink slot (boundary="zero_sink") | the s sink tokens (§3a)]``:
        the §3 partition seen from the decoding state. Ring slots at or past ``first`` are empty (a level added by
        this chunk)."""
        return self._state_bias(torch.tensor([t], device=device), c, levels, new_groups, dtype, device)[0]

    def step_bias(self, lengths: tuple[int, ...], levels: int, dtype, device) -> torch.Tensor:
        """:meth:`state_bias` (B, S) of one new token per row, row b at position ``lengths[b]`` (no group
        completes): each row gathered from per-position parts cached in :data:`PLANS`, and the stacked result
        memoised for the last few steps, since every layer of a model decodes the same positions."""
        return _step_bias(self, lengths, levels, dtype, torch.device(device))

    def _state_bias(self, t, c, levels, new_groups, dtype, device):
        """:meth:`state_bias` (B, c, S) of rows at lengths ``t`` (B,), each taking c tokens."""
        return torch.cat(
            [
                self._fine_state_bias(t, c, dtype, device),
                self._coarse_state_bias(t, c, levels, new_groups, dtype, device),
                self._sink_state_bias(t, c, dtype, device),
            ],
            -1,
        )

    def _sink_state_bias(self, t, c, dtype, device):
        """Sink part (B, c, s) for rows at lengths ``t`` (B,): the state's ``s`` sink tokens, read by queries whose
        level-0 band misses them (§3a)."""
        i = t[:, None] + torch.arange(c, device=device)  # (B, c)
        use = self.reads_sinks(i // self.block_size)[..., None].expand(-1, -1, self.sink_tokens)
        return slot_bias(use, True, True, 0.0, False, dtype)

    def _fine_state_bias(self, t, c, dtype, device):
        """Level-0 part (B, c, (w+1)m + c) for rows at lengths ``t`` (B,): ring slot s holds position
        ``ring_positions(t-1, (w+1)m)[s]``; query i sees [(floor(i/m)-w)m, i] (§3)."""
        m = self.block_size
        i = t[:, None] + torch.arange(c, device=device)  # (B, c)
        positions = torch.cat([ring_positions(t - 1, self.fine_ring, device), i], 1)[:, None, :]
        use = fine_member(i[..., None], positions, m, True, self.near_blocks) & (positions >= 0)
        return slot_bias(use, True, True, 0.0, False, dtype)

    def _coarse_state_bias(self, t, c, levels, new_groups, dtype, device):
        """Coarse part (B, c, S') for rows at lengths ``t`` (B,): per level, its ring of three complete groups
        (slot u holds group ``ring_positions(G-1, 2w+1)[u]``, G = t // w_l) and the groups the chunk completes
        (``first`` an int or per row), p slots each; then, with ``zero_sink``, one slot carrying the sinks (§3,
        §4)."""
        p = self.coarse_tokens
        i = t[:, None] + torch.arange(c, device=device)  # (B, c)
        parts = []
        # the fine blocks before position 0 in the band of the first w blocks
        sinks = (self.near_blocks - i // self.block_size).clamp(min=0).float() * self.block_size
        # Sinks count every level of the built hierarchy, also those the state does not hold yet (derived levels
        # are added when first needed; until then all their groups lie before position 0).
        for level in range(1, max(levels, self.num_levels if self.zero_sink and self.num_levels else 0) + 1):
            width = self.group_width(level)
            wanted, member = self.coarse_groups(i // width)  # (B, c, w+1)
            sinks += p * (member & (wanted < 0)).sum(-1)
            if level > levels:
                continue
            first, count = new_groups[level - 1]
            first = torch.as_tensor(first, device=device).view(-1, 1)
            ring = ring_positions(t // width - 1, self.group_ring, device)  # (B, 2w+1)
            ids = torch.cat([ring, (first + torch.arange(count, device=device)).expand(len(t), -1)], 1)
            stored = torch.cat([(ring >= 0) & (ring < first), ids.new_ones(len(t), count, dtype=torch.bool)], 1)
            use = ((ids[:, None, :, None] == wanted[:, :, None, :]) & member[:, :, None, :]).any(-1)  # (B, c, slots)
            bias = slot_bias(use, stored[:, None], True, self.offset(level), False, dtype).repeat_interleave(p, -1)
            parts.append(bias.masked_fill(self.sink_summaries(ids, width, p)[:, None], MASK_VALUE))
        if self.zero_sink:
            sinks = sinks.to(dtype)
            parts.append(torch.where(sinks > 0, sinks.clamp(min=1).log(), MASK_VALUE)[..., None])
        return torch.cat(parts, -1) if parts else torch.zeros(len(t), c, 0, dtype=dtype, device=device)


@functools.lru_cache(maxsize=8)
def _step_bias(partition: Partition, lengths: tuple[int, ...], levels: int, dtype, device) -> torch.Tensor:
    """:meth:`Partition.step_bias`, memoised here (not in :data:`PLANS`): a step's entry is needed by the layers
    of that step only."""
    m = partition.block_size

    def fine_part(t):  # ((w+1)m + 1,) of one token at position t
        return partition._fine_state_bias(torch.tensor([t], device=device), 1, dtype, device)[0, 0]

    def coarse_part(t):  # the levels' slots, then the sink tokens' (§3a)
        position = torch.tensor([t], device=device)
        new_groups = [(position // partition.group_width(level), 0) for level in range(1, levels + 1)]
        return torch.cat(
            [
                partition._coarse_state_bias(position, 1, levels, new_groups, dtype, device)[0, 0],
                partition._sink_state_bias(position, 1, dtype, device)[0, 0],
            ]
        )

    # Rows are gathered from per-position parts cached in PLANS, so a step costs lookups, not a computation: the
    # fine part repeats with period (w+1)m once t >= (w+1)m, the coarse part (with the sinks') is constant within a
    # block.
    fine = [
        PLANS.get(
            (
                "fine_step",
                partition,
                t % partition.fine_ring,
                min(t // m, partition.near_blocks + 1),
                str(device),
                dtype,
            ),
            functools.partial(fine_part, t),
        )
        for t in lengths
    ]
    coarse = [
        PLANS.get(("coarse_step", partition, t // m, levels, str(device), dtype), functools.partial(coarse_part, t))
        for t in lengths
    ]
    return torch.cat([torch.stack(fine), torch.stack(coarse)], 1)
