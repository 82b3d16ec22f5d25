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
import torch.nn.functional as F

from .fma_partition import MASK_VALUE, Partition, attends_group, slots_per_level


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
    ``query_blocks`` (..., c): outside their level-0 band (§3: causal, before it). (..., c, n_blocks)."""
    blocks = torch.arange(n_blocks, device=query_blocks.device)
    gap = query_blocks[..., None] - blocks
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
    ``query_blocks`` (broadcast against (..., c)); 0 for a block in the level-0 band."""
    shifts = torch.arange(levels, device=blocks.device)  # level l shifts by l-1
    own, group = query_blocks[..., None, None] >> shifts, blocks[..., None] >> shifts  # (..., c, 1|k, L)
    hit = attends_group(own, group, partition.causal, partition.near_blocks)
    return (hit * (shifts + 1)).amax(-1) if levels else torch.zeros_like(blocks)


def split_slots(slot_groups: torch.Tensor, blocks: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Whether a caller's coarse slots hold a selected block (``blocks``/``used`` (..., k)), so that the selection
    replaces them by their refinement: ``slot_groups`` (broadcast against (..., L, S)) names the group of each of S
    slots per level, level l in row l-1 (-1: none). (..., L, S)."""
    held = blocks[..., None] >> torch.arange(slot_groups.shape[-2], device=blocks.device)  # (..., k, L)
    match = slot_groups[..., None] == held.transpose(-1, -2)[..., None, :]  # (..., L, S, k)
    return (match & used[..., None, None, :]).any(-1)


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


def picks_by_block(chosen: torch.Tensor, used: torch.Tensor):
    """The used picks ``chosen`` (B, H_kv, c, k) grouped by the block they select, so that each block's keys meet
    the queries that picked it in one matrix product: per (row, key/value head, block), ``(b, h, block, queries,
    picks)``, the positions (in c) of the queries that picked it and which of their k picks it is."""
    segments = []
    k = chosen.shape[-1]
    for b in range(chosen.shape[0]):
        for h in range(chosen.shape[1]):
            flat, real = chosen[b, h].flatten(), used[b, h].flatten()
            picks = real.nonzero()[:, 0]
            order = flat[picks].argsort(stable=True)
            picks = picks[order]
            blocks, counts = flat[picks].unique_consecutive(return_counts=True)
            for block, group in zip(blocks.tolist(), picks.split(counts.tolist())):
                segments.append((b, h, block, group // k, group % k))
    return segments


def refined_fine_queries(fma, queries, fine_k, fine_v, bank_k, bank_v, index, bias, bank_valid, key_valid, n, bases):
    """Fine queries with adaptive refinement (§3c), one joint softmax per query over its §3 slots (those the
    selection splits masked), the replacing summaries and the selected blocks' fine keys.

    ``queries`` (B, H_kv, n_fine, g, d) unscaled; ``fine_k``/``fine_v`` (B, H_kv, n_fine, d); the bank, the
    fine-query plan ``index`` (blocks, S) and ``bias`` (blocks, m, S) and ``bank_valid`` as in
    ``FastMultipoleAttention._fine_queries``; ``key_valid`` (B, >= n_fine) or None; ``bases[l-1]`` the bank offset
    of level l. Query blocks are taken in chunks; a chunk's picks are grouped by the block they select
    (:func:`picks_by_block`), one matrix product per block: O(n k m d) for the fine keys of all picks.
    Returns (B, H_kv, n_fine, g, d)."""
    partition, m, p = fma.partition, fma.block_size, fma.coarse_tokens
    batch, kv_heads, n_fine, heads, d = queries.shape

    def dropout(weights):  # on the joint probabilities, here their unnormalised terms (the sum is taken before)
        return F.dropout(weights, fma.dropout) if fma.training and fma.dropout else weights

    n_blocks, levels, k = n_fine // m, len(bases), fma.refine_groups
    queries = queries * d**-0.5
    real = torch.arange(n_fine, device=queries.device) < n
    real = real.expand(batch, -1) if key_valid is None else real & key_valid[:, :n_fine]
    center, radius, available = block_bounds(fine_k, real, 0, m, partition.sink_tokens)
    fine_real = real & (torch.arange(n_fine, device=real.device) >= partition.sink_tokens)

    # The plan's coarse slots come last, level by level, each level's groups p slots each (§3).
    per_level = slots_per_level(partition.causal, partition.near_blocks) * p
    first_coarse = index.shape[1] - levels * per_level
    fine_real_blocks = fine_real.view(batch, n_blocks, m)
    whole_blocks = fine_real_blocks.all(-1).tolist()  # per row and block: no position to mask

    out = torch.empty_like(queries)
    slots = index.shape[1] + k * max(levels - 1, 0) * p + k * m
    chunk = max(1, 2**25 // (batch * kv_heads * m * heads * slots))
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
        base_logits.add_(bias[blocks][:, :, None, :])  # (B, H_kv, cb, m, g, S)
        if bank_valid is not None:
            base_logits.add_(torch.where(bank_valid[:, idx], 0.0, MASK_VALUE).to(q.dtype)[:, None, :, None, None])
        if levels:
            shifts = torch.arange(levels, device=blocks.device)
            slot_groups = partition.coarse_groups(blocks[:, None] >> shifts)[0].repeat_interleave(p, -1)  # (cb, L, S')
            per_query = (batch, kv_heads, len(blocks), m, -1)
            split = split_slots(slot_groups[:, None], chosen.view(per_query), used.view(per_query)).flatten(-2)
            base_logits[..., first_coarse:].masked_fill_(split[:, :, :, :, None], MASK_VALUE)

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
        rows_at = torch.arange(batch, device=q.device)[:, None, None, None]
        heads_at = torch.arange(kv_heads, device=q.device)[None, :, None, None]
        sibling_k = bank_k[rows_at, heads_at, sibling_index]  # (B, H_kv, c, E, d)
        sibling_v = bank_v[rows_at, heads_at, sibling_index]
        sibling_logits = torch.einsum("bhcgd,bhced->bhcge", q, sibling_k) + sibling_bias[:, :, :, None]

        # The selected blocks' fine keys, block by block (picks_by_block): a block's keys meet the queries that
        # picked it in one product, so no tensor of every pick's logits is built (a chunk holds its segments').
        segments = []
        for b, h, block, rows_of, _ in picks_by_block(chosen, used):
            logits = q[b, h, rows_of] @ fine_k[b, h, block * m : (block + 1) * m].T  # (s, g, m)
            if not whole_blocks[b][block]:  # sink or padding positions
                logits.masked_fill_(~fine_real_blocks[b, block], MASK_VALUE)
            segments.append((b, h, block, rows_of, logits))

        base_logits = base_logits.flatten(2, 3)  # (B, H_kv, c, g, S)
        # The softmax's shift, a constant (detached: its gradient cancels), the largest logit of each query.
        top = base_logits.detach().amax(-1)  # (B, H_kv, c, g)
        if sibling_logits.shape[-1]:
            top = torch.maximum(top, sibling_logits.detach().amax(-1))
        for b, h, _, rows_of, logits in segments:
            top[b, h, rows_of] = torch.maximum(top[b, h, rows_of], logits.detach().amax(-1))
        base_weights = torch.exp(base_logits - top[..., None])
        sibling_weights = torch.exp(sibling_logits - top[..., None])
        total = base_weights.sum(-1) + sibling_weights.sum(-1)
        base_weights = dropout(base_weights).unflatten(2, (len(blocks), m))
        result = torch.einsum("bhkrgs,bhksd->bhkrgd", base_weights, values).flatten(2, 3)
        result += torch.einsum("bhcge,bhced->bhcgd", dropout(sibling_weights), sibling_v)
        for b, h, block, rows_of, logits in segments:
            weights = logits.sub_(top[b, h, rows_of, :, None]).exp_()
            total[b, h].index_add_(0, rows_of, weights.sum(-1))
            result[b, h].index_add_(0, rows_of, dropout(weights) @ fine_v[b, h, block * m : (block + 1) * m])
        out[:, :, rows] = result / total[..., None]
    return out
