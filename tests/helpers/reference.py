"""A plain, loop-based Fast Multipole Attention written straight from docs/fma.md, for tests only.

It shares no code with fmt_hf.model: the partition is enumerated per query from the §3 formulas, coarse keys come
from torch's own conv1d / avg_pool1d (recursive levels from an explicit einsum over pairs of children), and the
joint softmax is taken over an explicit list of logits.
"""

import math

import torch
import torch.nn.functional as F

from fmt_hf.model.fma_downsample import AvgPoolDownsample, DepthwiseDownsample, RecursiveDownsample


def _conv_levels(weight, bias, flat, width, groups):
    """conv1d of ``flat`` (N, d, n) with kernel = stride = ``width``: (N, n // width, p, d); ``weight`` (d, p, ...,
    width) as the package stores it (output channel c*p + r of the conv is coarse token r of channel c)."""
    d, p = weight.shape[:2]
    out = F.conv1d(
        flat,
        weight.reshape(d * p, d // groups, width).to(flat.dtype),
        bias.reshape(-1).to(flat.dtype),
        stride=width,
        groups=groups,
    )
    return out.unflatten(1, (d, p)).permute(0, 3, 2, 1)


def downsample(module, level, x, block_size):
    """Level-``level`` coarse tokens (B, H, groups, p, d) of ``x`` (B, H, n, d) with torch's conv ops."""
    batch, heads, n, d = x.shape
    width, p = block_size * 2 ** (level - 1), module.coarse_tokens
    flat = x.reshape(batch * heads, n, d).transpose(1, 2)  # (N, d, n)
    if isinstance(module, AvgPoolDownsample):
        out = F.avg_pool1d(flat, width // p).unflatten(2, (-1, p)).permute(0, 2, 3, 1)  # (N, groups, p, d)
    elif isinstance(module, RecursiveDownsample):
        # §7a: level 1 is a depthwise conv of the fine tokens; level l+1 maps each pair of level-l children
        # (groups 2g, 2g+1: 2p summaries) to p summaries with the one shared U.
        out = _conv_levels(module.weight, module.bias, flat, block_size, d)
        pair_weight = module.combine_weight.to(x.dtype).unflatten(-1, (2, p))  # (d, r, child, s)
        for _ in range(1, level):
            children = out.unflatten(1, (-1, 2))  # (N, groups / 2, child, s, d)
            out = torch.einsum("ngjsc,crjs->ngrc", children, pair_weight) + module.combine_bias.t().to(x.dtype)
    else:
        groups = d if isinstance(module, DepthwiseDownsample) else 1
        out = _conv_levels(module.weights[level - 1], module.biases[level - 1], flat, width, groups)
    return out.reshape(batch, heads, n // width, p, d)


def fine_keys(i, n, m, capacity, causal, near=1):
    """Level-0 key positions of query i (blocks b-w .. b, up to i; bidirectional b-w .. b+w), split into positions
    inside [0, capacity) and the count outside (capacity None: no cap, only positions before 0 are outside)."""
    b = i // m
    if causal:
        positions = range((b - near) * m, i + 1)
    else:
        positions = range((b - near) * m, (b + near + 1) * m)
    inside = [j for j in positions if 0 <= j and (capacity is None or j < capacity)]
    return inside, len(positions) - len(inside)


def coarse_slot_groups(i, width, causal, near=1):
    """Level groups of query i per §3 (negative or too-large ids included): the children of the parent level's
    near field (groups 2(P-w) .. 2(P+w)+1, P the parent of the query's group G) outside this level's (G-w .. G+w),
    causal ones before G only."""
    own = i // width
    parent = own // 2
    groups = [g for g in range(2 * (parent - near), 2 * (parent + near) + 2) if not own - near <= g <= own + near]
    return [g for g in groups if g < own] if causal else groups


def sink_slots(i, n, m, causal, sink_tokens, near=1):
    """§3a: the sink tokens j < s that query i attends as extra fine slots -- those outside the blocks of its
    level-0 band (blocks b-w .. b, and up to b+w when bidirectional)."""
    b = i // m
    band = range(b - near, b + (1 if causal else near + 1))
    return [j for j in range(min(sink_tokens, n)) if j // m not in band]


def levels_needed(n, m, near=1):
    """The fewest coarse levels L whose partition covers every pair of a length-n sequence: n <= (w+1) m 2^L."""
    levels = 0
    while (near + 1) * m * 2**levels < n:
        levels += 1
    return levels


def multiplicity(n, m, levels, causal, sink_tokens=0, near=1):
    """How many times the §3 partition (with §3a's sink tokens) covers each (query, key) pair of a length-n
    sequence; a summary covers the positions of its group that are not sink tokens."""
    counts = torch.zeros(n, n, dtype=torch.long)
    capacity = (near + 1) * m * 2**levels
    for i in range(n):
        inside, _ = fine_keys(i, n, m, capacity, causal, near)
        for j in inside + sink_slots(i, n, m, causal, sink_tokens, near):
            if j < n:
                counts[i, j] += 1
        for level in range(1, levels + 1):
            width = m * 2 ** (level - 1)
            for g in coarse_slot_groups(i, width, causal, near):
                for j in range(max(g * width, sink_tokens), min((g + 1) * width, n)):
                    counts[i, j] += 1
    return counts


def reference_fma(attn, q, k, v, key_padding_mask=None):
    """FMA output per the definition; q (B, H, n, d), k/v (B, H_kv, n, d). Slow: tiny sizes only.

    A layer without a cap (max_seq_len=None, §7a) gets the levels its input needs; only slots before position 0
    are outside the sequence (zero sinks under boundary="zero_sink"). Sink tokens (§3a): positions j < s are
    extra fine slots of the queries whose band misses them, read as zeros by the downsamplers; a coarse token
    whose sub-window holds sink tokens only is not attended.
    """
    batch, heads, n, d = q.shape
    m, causal, capacity, levels = attn.block_size, attn.causal, attn.capacity, attn.num_levels
    near = attn.near_blocks
    if attn.max_seq_len is None:
        levels = levels_needed(n, m, near)  # level l exists when some query has i >= (w+1) w_l (§7)
    length = (near + 1) * m * 2**levels  # the tensors cover the whole hierarchy
    zero_sink, sink_tokens = attn.boundary == "zero_sink", attn.sink_tokens
    k_heads = k.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], 1)
    v = v.repeat_interleave(heads // v.shape[1], 1)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[:, n:] = False
    if key_padding_mask is not None:
        real[:, :n] = key_padding_mask
    keep = real[:, None, :, None].to(q.dtype)
    pad = (0, 0, 0, length - n)
    q, k, v = F.pad(q, pad) * keep, F.pad(k, pad) * keep, F.pad(v, pad) * keep
    q = q / math.sqrt(d)
    summarised = torch.ones(length, dtype=q.dtype)
    summarised[:sink_tokens] = 0  # the downsamplers read sink tokens as zeros
    coarse = []
    for level in range(1, levels + 1):
        ck = downsample(attn.k_downsample, level, k * summarised[:, None], m)
        cv = downsample(attn.v_downsample, level, v * summarised[:, None], m)
        coarse.append((m * 2 ** (level - 1), ck, cv))

    refine = getattr(attn, "refine_groups", 0)
    group_heads = heads // k_heads
    out = torch.zeros(batch, heads, n, d, dtype=q.dtype)
    for b in range(batch):
        for i in range(n):
            if refine:
                batch_coarse = [(ck[b], cv[b]) for _, ck, cv in coarse]
                out[b, :, i] = _refined_query(
                    attn, q[b, :, i], k[b], v[b], batch_coarse, real[b], i, n, levels, group_heads, refine
                )
                continue
            # per entry: (H, s) logits and (H, s, d) values
            inside, outside = fine_keys(i, n, m, capacity, causal, near)
            fine = [j for j in inside + sink_slots(i, n, m, causal, sink_tokens, near) if j < length and real[b, j]]
            logits = [torch.einsum("hd,hsd->hs", q[b, :, i], k[b, :, fine])]
            values = [v[b, :, fine]]
            sinks = outside if zero_sink else 0
            for width, ck, cv in coarse:
                p = ck.shape[3]
                if attn.query_mode == "coarse":
                    start = (i // (width // p)) * (width // p)
                    query = q[b, :, start] if causal else q[b, :, start : start + width // p].mean(1)
                else:
                    query = q[b, :, i]
                offset = math.log(width / p) if attn.scale_attn else 0.0
                for g in coarse_slot_groups(i, width, causal, near):
                    if g < 0 or (capacity is not None and g >= capacity // width):
                        sinks += p if zero_sink else 0
                    elif real[b, g * width : (g + 1) * width].any():
                        # coarse token r stands for sub-window r of the group
                        tokens = [r for r in range(p) if g * width + (r + 1) * (width // p) > sink_tokens]
                        logits.append(torch.einsum("hd,hsd->hs", query, ck[b, :, g, tokens]) + offset)
                        values.append(cv[b, :, g, tokens])
            logits, values = torch.cat(logits, 1), torch.cat(values, 1)
            if logits.shape[1] == 0:
                continue  # no real key at all (a padding query): the output is unspecified, left at zero
            if sinks:
                logits = torch.cat([logits, torch.zeros(heads, sinks, dtype=q.dtype)], -1)
                values = torch.cat([values, torch.zeros(heads, sinks, d, dtype=q.dtype)], 1)
            out[b, :, i] = torch.einsum("hs,hsd->hd", torch.softmax(logits, -1), values)
    return out


def _far_blocks(i, n_blocks, m, causal, near, levels):
    """Fine blocks wholly in query i's far field (§3c): those a coarse level covers, each with the level and group
    of the §3 slot that covers it."""
    far = {}
    for level in range(1, levels + 1):
        width = m * 2 ** (level - 1)
        for g in coarse_slot_groups(i, width, causal, near):
            for block in range(max(g, 0) * width // m, (g + 1) * width // m):
                if g >= 0 and block < n_blocks:
                    far[block] = (level, g)
    return far


def _refined_query(attn, q, k, v, coarse, real, i, n, levels, group_heads, refine):
    """§3c for one query (all heads, q (H, d) scaled, k/v (H, N, d) with N the padded length): per key/value head,
    the Quest bound selects ``refine`` far blocks, and every §3 slot holding one is split into its children down to
    the fine tokens of the selected blocks; one softmax over fine band, sinks and the refined tree."""
    m, causal, near, sink_tokens = attn.block_size, attn.causal, attn.near_blocks, attn.sink_tokens
    heads, d = q.shape
    n_blocks = -(-n // m)
    far = _far_blocks(i, n_blocks, m, causal, near, levels)
    out = torch.zeros(heads, d, dtype=q.dtype)
    for h in range(heads):
        kv = h // group_heads
        scores = {}
        for block in far:
            keys = [j for j in range(block * m, min((block + 1) * m, n)) if real[j] and j >= sink_tokens]
            if not keys:
                continue
            lo, hi = k[h, keys].min(0).values, k[h, keys].max(0).values
            bound = max(
                float(torch.maximum(q[g] * lo, q[g] * hi).sum())
                for g in range(kv * group_heads, (kv + 1) * group_heads)
            )
            scores[block] = bound
        chosen = sorted(scores, key=lambda block: -scores[block])[:refine]

        fine = [j for j in fine_keys(i, n, m, None, causal, near)[0] if j < n and real[j]]
        fine += [j for j in sink_slots(i, n, m, causal, sink_tokens, near) if real[j]]
        logits = [q[h] @ k[h, fine].T]
        values = [v[h, fine]]

        for level in range(1, levels + 1):
            width = m * 2 ** (level - 1)
            for g in coarse_slot_groups(i, width, causal, near):
                if 0 <= g and g * width < n:
                    _visit(
                        attn,
                        q[h],
                        k[h],
                        v[h],
                        [(ck[h], cv[h]) for ck, cv in coarse],
                        real,
                        n,
                        level,
                        g,
                        chosen,
                        logits,
                        values,
                    )
        logits = torch.cat(logits)
        if len(logits):  # else a padding query without a real key: left at zero
            out[h] = torch.softmax(logits, 0) @ torch.cat(values)
    return out


def _visit(attn, q, k, v, coarse, real, n, level, g, chosen, logits, values):
    """§3c's refinement of level-``level`` group ``g`` for one query head (``q`` (d,), ``k``/``v`` (N, d), ``coarse``
    per level ``(ck, cv)`` (groups, p, d)): its summaries when it holds no block of ``chosen``, the fine keys of a
    chosen block, else its two children; appends logits and values."""
    m, sink_tokens = attn.block_size, attn.sink_tokens
    width = m * 2 ** (level - 1)
    if not any(g * width <= block * m < (g + 1) * width for block in chosen):
        if not real[g * width : (g + 1) * width].any():
            return
        ck, cv = coarse[level - 1]
        p = ck.shape[1]
        tokens = [r for r in range(p) if g * width + (r + 1) * (width // p) > sink_tokens]
        offset = math.log(width / p) if attn.scale_attn else 0.0
        logits.append(q @ ck[g, tokens].T + offset)
        values.append(cv[g, tokens])
    elif level == 1:
        keys = [j for j in range(g * m, (g + 1) * m) if j < n and real[j] and j >= sink_tokens]
        logits.append(q @ k[keys].T)
        values.append(v[keys])
    else:
        for child in (2 * g, 2 * g + 1):
            _visit(attn, q, k, v, coarse, real, n, level - 1, child, chosen, logits, values)
