"""Adaptive refinement of Fast Multipole Attention's far field (docs/fma.md §3c): each query selects the ``k`` far
fine blocks whose keys may match it best (Quest's per-channel bound) and reads them exactly, every coarse slot that
holds one split into its children down to the block.

The rules are stated once here, as tensor functions of positions and selections: :func:`block_bounds` (the per-block
bounds), :func:`far_candidates`, :func:`select_blocks`, :func:`covering_level`, :func:`split_slots` (which §3 slots a
selection replaces) and :func:`siblings` (the groups that replace them). The forward pass combines them in
:func:`refined_fine_queries`; decoding (``fma_decode.py``) reads the same functions over its store.
"""

from __future__ import annotations

import torch

from .fma_partition import MASK_VALUE, Partition, attends_group


def block_bounds(keys: torch.Tensor, valid: torch.Tensor | None, first_block: int, block_size: int, sink_tokens: int):
    """Quest bounds of whole fine blocks ``first_block ..``: ``keys`` (B, H_kv, nb*m, d), ``valid`` (B, nb*m) (None:
    all real). Returns ``center``, ``radius`` (B, H_kv, nb, d) -- half the sum and half the difference of the
    per-channel maximum and minimum over the block's real non-sink keys -- and ``available`` (B, nb), whether the
    block holds such a key (only those are candidates)."""
    positions = first_block * block_size + torch.arange(keys.shape[2], device=keys.device)
    use = (positions >= sink_tokens).expand(keys.shape[0], -1)
    if valid is not None:
        use = use & valid
    use_blocks = use.unflatten(1, (-1, block_size))  # (B, nb, m)
    blocks = keys.unflatten(2, (-1, block_size))  # (B, H_kv, nb, m, d)
    hidden = ~use_blocks[:, None, :, :, None]
    hi = blocks.masked_fill(hidden, float("-inf")).amax(3)
    lo = blocks.masked_fill(hidden, float("inf")).amin(3)
    available = use_blocks.any(2)
    hi = hi.masked_fill(~available[:, None, :, None], 0.0)
    lo = lo.masked_fill(~available[:, None, :, None], 0.0)
    return (hi + lo) / 2, (hi - lo) / 2, available


def far_candidates(partition: Partition, query_blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Whether each fine block ``0 .. n_blocks-1`` lies wholly in the far field of queries of fine blocks
    ``query_blocks`` (c,): outside their level-0 band (§3: causal, before it). (c, n_blocks)."""
    blocks = torch.arange(n_blocks, device=query_blocks.device)
    gap = query_blocks[:, None] - blocks
    w = partition.near_blocks
    return gap > w if partition.causal else gap.abs() > w


def select_blocks(queries, center, radius, candidate, k: int):
    """The selection of §3c: ``queries`` (B, H_kv, g, c, d), the bounds (B, H_kv, nb, d) and ``candidate``
    (B, c, nb). Returns ``blocks`` (B, H_kv, c, k') and ``used`` (B, H_kv, c, k'), k' = min(k, nb): each query's best
    candidates by the largest bound over the key/value head's g query heads; ``used`` is False where it has fewer."""
    bound = queries @ center.transpose(-1, -2)[:, :, None] + queries.abs() @ radius.transpose(-1, -2)[:, :, None]
    score = bound.amax(2).masked_fill(~candidate[:, None], float("-inf"))  # (B, H_kv, c, nb)
    top = score.topk(min(k, score.shape[-1]), -1)
    return top.indices, top.values > float("-inf")


def covering_level(partition: Partition, query_blocks: torch.Tensor, blocks: torch.Tensor, levels: int):
    """The coarse level whose §3 slot holds fine block ``blocks`` (..., c, k) for queries of fine blocks
    ``query_blocks`` (c,); 0 for a block in the level-0 band."""
    query_blocks = query_blocks[:, None]
    cover = torch.zeros_like(blocks)
    for level in range(1, levels + 1):
        own, group = query_blocks >> (level - 1), blocks >> (level - 1)
        cover = torch.where(attends_group(own, group, partition.causal, partition.near_blocks), level, cover)
    return cover


def split_slots(slot_groups: torch.Tensor, level: int, blocks: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Whether level-``level`` slots of groups ``slot_groups`` (broadcast against (..., S)) hold a selected block
    (``blocks``/``used`` (..., k)): those slots are replaced by their refinement. (..., S)."""
    held = blocks >> (level - 1)
    return ((slot_groups[..., None] == held[..., None, :]) & used[..., None, :]).any(-1)


def siblings(blocks: torch.Tensor, used: torch.Tensor, cover: torch.Tensor, levels: int):
    """The summaries that replace split slots (§3c): for each selected block and level ``l = 1 .. levels-1``
    below its covering level, the sibling of its level-l ancestor, unless that sibling holds a selected block
    (it is split too) or another selected block listed earlier shares the ancestor (it is listed once).
    ``blocks``/``used``/``cover`` (..., k). Returns ``groups`` and ``use`` (..., k, levels-1), level l in column
    l-1."""
    shifts = torch.arange(max(levels - 1, 0), device=blocks.device)
    ancestors = blocks[..., None] >> shifts  # (..., k, L-1)
    groups = ancestors ^ 1
    use = used[..., None] & (shifts + 1 < cover[..., None])
    # ... (k, L-1) against (k', L-1): another used block under the sibling, or sharing the ancestor earlier in the list
    other = used[..., None, :, None]
    under_sibling = ((ancestors[..., None, :, :] == groups[..., :, None, :]) & other).any(-2)
    order = torch.arange(blocks.shape[-1], device=blocks.device)
    earlier = (order[None, :] < order[:, None])[..., None]  # (k, k', 1): k' listed before k
    shared = ((ancestors[..., None, :, :] == ancestors[..., :, None, :]) & other & earlier).any(-2)
    return groups, use & ~under_sibling & ~shared


def refined_fine_queries(fma, queries, fine_k, fine_v, bank_k, bank_v, index, bias, bank_valid, key_valid, n, bases):
    """Fine queries with adaptive refinement (§3c), one joint softmax per query over its §3 slots (those the
    selection splits masked), the replacing summaries and the selected blocks' fine keys.

    ``queries`` (B, H_kv, n_fine, g, d) unscaled; ``fine_k``/``fine_v`` (B, H_kv, n_fine, d); the bank, the
    fine-query plan ``index`` (blocks, S) and ``bias`` (blocks, m, S) and ``bank_valid`` as in
    ``FastMultipoleAttention._fine_queries``; ``key_valid`` (B, >= n_fine) or None; ``bases[l-1]`` the bank offset
    of level l. Query blocks are taken in chunks of about 1024 queries; a chunk reads the selected fine keys as
    masked logits over the blocks any of its queries selects (a matrix product: O(n^2 d) at worst, when a chunk's
    queries select every block between them). Returns (B, H_kv, n_fine, g, d)."""
    partition, m, p = fma.partition, fma.block_size, fma.coarse_tokens
    batch, kv_heads, n_fine, heads, d = queries.shape
    n_blocks, levels, k = n_fine // m, len(bases), fma.refine_groups
    queries = queries * d**-0.5
    real = torch.arange(n_fine, device=queries.device) < n
    real = real.expand(batch, -1) if key_valid is None else real & key_valid[:, :n_fine]
    center, radius, available = block_bounds(fine_k, real, 0, m, partition.sink_tokens)
    fine_real = real & (torch.arange(n_fine, device=real.device) >= partition.sink_tokens)

    # Which (level, group) each plan slot reads: the bank holds [zero | fine | level 1 | level 2 | ...].
    slot_level = torch.zeros_like(index)
    for level, base in enumerate(bases, start=1):
        slot_level = torch.where(index >= base, level, slot_level)
    slot_group = (index - torch.tensor([0, *bases], device=index.device)[slot_level]) // p

    out = torch.empty_like(queries)
    # About 1024 queries a chunk: fewer queries select fewer distinct blocks, whose keys the chunk then reads.
    slots = index.shape[1] + k * max(levels - 1, 0) * p + k * m
    chunk = max(1, min(1024 // m, 2**24 // (batch * kv_heads * m * heads * slots)))
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        blocks = torch.arange(start, stop, device=index.device)
        rows = slice(start * m, stop * m)
        query_blocks = (torch.arange(rows.start, rows.stop, device=index.device)) // m  # (c,)
        q = queries[:, :, rows]  # (B, H_kv, c, g, d)
        candidate = far_candidates(partition, query_blocks, n_blocks)[None] & available[:, None]
        chosen, used = select_blocks(q.transpose(2, 3), center, radius, candidate, k)  # (B, H_kv, c, k')
        cover = covering_level(partition, query_blocks, chosen, levels)

        # The plan's slots, those the selection splits masked.
        idx = index[blocks]  # (cb, S)
        keys, values = bank_k[:, :, idx], bank_v[:, :, idx]  # (B, H_kv, cb, S, d)
        base_logits = torch.einsum("bhkrgd,bhksd->bhkrgs", q.unflatten(2, (len(blocks), m)), keys)
        base_bias = bias[blocks][None, None].expand(batch, kv_heads, -1, -1, -1).clone()  # (B, H_kv, cb, m, S)
        per_query = (batch, kv_heads, len(blocks), m, -1)
        for level in range(1, levels + 1):
            at_level = (slot_level[blocks] == level)[:, None]  # (cb, 1, S)
            split = split_slots(slot_group[blocks][:, None], level, chosen.view(per_query), used.view(per_query))
            base_bias.masked_fill_(split & at_level, MASK_VALUE)
        if bank_valid is not None:
            base_bias += torch.where(bank_valid[:, idx], 0.0, MASK_VALUE).to(base_bias.dtype)[:, None, :, None]
        base_logits = base_logits + base_bias[:, :, :, :, None]

        # The summaries that replace split slots, p bank entries each.
        groups, use = siblings(chosen, used, cover, levels)  # (B, H_kv, c, k', L-1)
        sibling_index, sibling_bias = [], []
        for level in range(1, levels):
            width, g = partition.group_width(level), groups[..., level - 1]
            entry = (bases[level - 1] + g * p)[..., None] + torch.arange(p, device=g.device)  # (..., k', p)
            ok = (use[..., level - 1] & (g * width < n))[..., None] & ~partition.sink_summaries(g, width, p).unflatten(
                -1, (-1, p)
            )
            if bank_valid is not None:
                ok = ok & bank_valid.gather(1, entry.flatten(1)).view(entry.shape)
            sibling_index.append(torch.where(ok, entry, 0).flatten(-2))
            bias_of = torch.full(ok.shape, MASK_VALUE, dtype=q.dtype, device=q.device).masked_fill(
                ok, partition.offset(level)
            )
            sibling_bias.append(bias_of.flatten(-2))
        if sibling_index:
            sibling_index, sibling_bias = torch.cat(sibling_index, -1), torch.cat(sibling_bias, -1)  # (B, H_kv, c, E)
        else:
            sibling_index = chosen.new_zeros(*chosen.shape[:3], 0)
            sibling_bias = q.new_zeros(*chosen.shape[:3], 0)
        gather = sibling_index.flatten(2)[..., None].expand(-1, -1, -1, d)
        sibling_k = bank_k.gather(2, gather).view(*sibling_index.shape, d)  # (B, H_kv, c, E, d)
        sibling_v = bank_v.gather(2, gather).view(*sibling_index.shape, d)
        sibling_logits = torch.einsum("bhcgd,bhced->bhcge", q, sibling_k) + sibling_bias[:, :, :, None]

        # The selected blocks' fine keys: masked logits over the keys of the blocks any query of the chunk selects.
        selected = torch.zeros(*chosen.shape[:3], n_blocks, dtype=torch.bool, device=q.device)
        selected.scatter_(-1, chosen, used)  # scatter of False onto unused picks leaves them False
        union = selected.flatten(0, 2).any(0).nonzero()[:, 0]  # (u,) blocks
        positions = (union[:, None] * m + torch.arange(m, device=q.device)).flatten()  # (u*m,)
        selected = selected[..., union].repeat_interleave(m, -1) & fine_real[:, None, None, positions]
        union_k, union_v = fine_k[:, :, positions], fine_v[:, :, positions]  # (B, H_kv, u*m, d)
        fine_logits = torch.einsum("bhcgd,bhnd->bhcgn", q, union_k)
        fine_logits = fine_logits.masked_fill(~selected[:, :, :, None], MASK_VALUE)

        base_slots, sibling_slots = base_logits.shape[-1], sibling_logits.shape[-1]
        probs = torch.softmax(
            torch.cat([base_logits.flatten(2, 3), sibling_logits, fine_logits], -1), -1
        )  # (B, H_kv, c, g, S + E + n_fine)
        base_probs = probs[..., :base_slots].unflatten(2, (len(blocks), m))
        result = torch.einsum("bhkrgs,bhksd->bhkrgd", base_probs, values).flatten(2, 3)
        result = result + torch.einsum(
            "bhcge,bhced->bhcgd", probs[..., base_slots : base_slots + sibling_slots], sibling_v
        )
        result = result + torch.einsum("bhcgn,bhnd->bhcgd", probs[..., base_slots + sibling_slots :], union_v)
        out[:, :, rows] = result
    return out
