"""Fine-query FMA through PyTorch FlexAttention: one fused block-sparse kernel that reads the key bank in place.

The gather path (``FastMultipoleAttention._fine_queries``) copies every fine block's key set out of the bank and
runs one SDPA call over the copies with an additive mask. This path instead hands FlexAttention the bank itself
and says, as a block mask, which parts of it each query block reads (docs/implementation.md, "The FlexAttention
path"):

- **Keys and values** ``[fine tokens (n_fine) | level-1 summaries | level-2 | ... | zeros to a whole KV block]``:
  the gather path's bank without its zero slot. Queries are ``(B, H, n_fine, d)``; grouped-query heads go through
  ``enable_gqa``. Inputs keep their dtype (bf16 stays bf16: FlexAttention keeps the softmax in float32 itself).
- **Block lists.** Query blocks are the fine blocks (``m`` rows: all rows of a block share their coarse slots,
  §3). For each, the KV blocks (``kv_block`` keys, ``m`` by default) that hold any of its slots, split into
  *full* blocks (every key legal for every row: the kernel skips the mask) and *partial* ones, read off the slot
  plan of :meth:`Partition.plans` -- the partition is not restated here. Lists are O(blocks x (w + 1 + L))
  (2w + 1 + 2L bidirectional; w the near-field width): ``create_block_mask``, which evaluates the mask densely,
  is never called.
- **Mask.** Inside partial blocks the ``mask_mod`` decides each (query, key) pair with the partition's elementwise
  predicates (:func:`fine_member`, :func:`attends_group`, :meth:`Partition.reads_sinks` for the sink tokens of
  §3a) and per-key lookups (level, position or group, group
  width, whether the key is real). With a key padding mask every listed block is partial, so padding is masked
  everywhere.
- **Offsets.** ``log(w_l / p)`` of coarse keys (§4, ``scale_attn``) is a ``score_mod`` reading a per-key bias.

Waste: a query block reads 2p (3p) coarse keys per level but the kernel computes whole KV blocks: with m = 64,
p = 4 one KV block per level (the 2p causal keys are one aligned run) of which 8 of 64 keys are legal. Causal, at
64K (L = 9) a query block computes 2 + 9 = 11 blocks of 64 keys where 1.5 + 9/8 are useful, against 512 for dense
causal attention; the KV block size is a parameter so a GPU can measure smaller ones (16: 4x less coarse waste,
smaller tiles).

Everything is cached in the process-wide :data:`PLANS` like the slot plans. On CUDA, FlexAttention is compiled once
(``torch.compile``, lazily); elsewhere it runs eagerly, which materialises the scores (tests, small inputs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .fma_partition import MASK_VALUE, PLANS, Partition, attends_group, fine_member

try:  # PyTorch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - exercised only on older torch
    BlockMask = flex_attention = None

# kernel="gather": the per-block gathered key sets with one SDPA call (runs everywhere, supports every option);
# "flex": this module; "auto": flex on CUDA when it applies, gather elsewhere.
KERNELS = ("auto", "gather", "flex")
FLEX_AVAILABLE = flex_attention is not None
# Triton's FlexAttention tiles are at least 16 rows/keys and must divide the block sizes of the block mask.
CUDA_TILE = 16


class FlexPlan(NamedTuple):
    """The block mask and key lookups of one (partition, length, KV block) on one device (cached in PLANS).

    ``lists`` are ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices,
    full_q_num_blocks, full_q_indices)``, each ``(1, 1, rows, width)`` or ``(1, 1, rows)`` int32; ``padded_lists``
    the same with every listed block partial (for key padding masks). Per key ``level`` (0 fine, -1 filler),
    ``position`` (fine: the token; coarse: the group), ``width`` (the level's group width, m for fine keys) and
    ``real`` (the key holds some real token of the length-n input)."""

    lists: tuple
    padded_lists: tuple
    level: torch.Tensor
    position: torch.Tensor
    width: torch.Tensor
    real: torch.Tensor


def flex_plan(partition: Partition, n: int, coarse_tokens: tuple[int, ...], kv_block: int, device) -> FlexPlan:
    """:class:`FlexPlan` of a length-n input whose levels hold ``coarse_tokens[l-1]`` summaries per group, from
    :data:`PLANS`."""
    return PLANS.get(
        ("flex", partition, n, coarse_tokens, kv_block, str(device)),
        lambda: _build_flex_plan(partition, n, coarse_tokens, kv_block, device),
    )


def _build_flex_plan(partition, n, coarse_tokens, kv_block, device):
    m = partition.block_size
    n_fine = -(-n // m) * m
    widths = [partition.group_width(level) for level in range(1, len(coarse_tokens) + 1)]
    n_coarse = -(-n // widths[-1]) * widths[-1] if widths else n_fine
    counts = [n_coarse // w * p for w, p in zip(widths, coarse_tokens)]
    length = -(-(n_fine + sum(counts)) // kv_block) * kv_block  # fine tokens and summaries, whole KV blocks

    # Per-key lookups, in bank order: fine tokens, then each level's groups of p summaries, then filler.
    level = torch.full((length,), -1, dtype=torch.int32, device=device)
    position = torch.zeros(length, dtype=torch.int32, device=device)
    width = torch.full((length,), m, dtype=torch.int32, device=device)  # never 0: the mask divides by it
    real = torch.zeros(length, dtype=torch.bool, device=device)
    fine = torch.arange(n_fine, device=device)
    level[:n_fine], position[:n_fine], real[:n_fine] = 0, fine.int(), fine < n
    start = n_fine
    for lvl, (w, p, count) in enumerate(zip(widths, coarse_tokens, counts), start=1):
        group = torch.arange(count, device=device) // p
        span = slice(start, start + count)
        # A summary of sink tokens only (§3a) summarises nothing: masked like a group past the end.
        summarises = ~partition.sink_summaries(torch.arange(count // p, device=device), w, p)
        level[span], position[span], width[span], real[span] = lvl, group.int(), w, (group * w < n) & summarises
        start += count

    # Block lists from the slot plan of the fine queries: bank index - 1 is the flex key position (the zero slot,
    # index 0, is never a legal slot).
    index, bias = partition.plans(n, coarse_tokens, device, torch.float32)[0]
    legal = bias > MASK_VALUE / 2  # (blocks, m, S)
    lists = _block_lists(index - 1, legal.any(1), legal.all(1), kv_block, length // kv_block)
    return FlexPlan(lists[0], lists[1], level, position, width, real)


def _block_lists(keys, any_row, all_rows, kv_block, kv_blocks):
    """BlockMask tensors from a slot plan: ``keys`` (blocks, S) key positions, ``any_row``/``all_rows`` whether a
    slot is legal for some/every row of its block. Returns the lists with full blocks split off, and the lists
    with every block partial.

    A block's slots hold distinct keys, so a KV block is full exactly when ``kv_block`` of them are legal for
    every row.
    """
    blocks, slots = keys.shape
    beyond = kv_blocks  # sorts after every real KV block
    kv = torch.where(any_row, torch.div(keys, kv_block, rounding_mode="floor"), beyond)
    kv, order = kv.sort(1)
    every = all_rows.gather(1, order) & (kv < beyond)
    first = torch.ones_like(kv, dtype=torch.bool)
    first[:, 1:] = kv[:, 1:] != kv[:, :-1]
    first &= kv < beyond  # the first slot of each touched KV block
    run = first.cumsum(1) - 1  # which touched block a slot belongs to
    full_count = torch.zeros(blocks, slots, dtype=torch.long, device=kv.device)
    full_count.scatter_add_(1, run.clamp(min=0), every.long())
    full = first & (full_count.gather(1, run.clamp(min=0)) == kv_block)
    split = (*_rows(kv, first & ~full), *_rows(kv, full))
    split += _transposed(*split[:2], kv_blocks) + _transposed(*split[2:], kv_blocks)
    merged = _rows(kv, first)
    merged += (None, None) + _transposed(*merged, kv_blocks) + (None, None)
    return split, merged


def _rows(kv, selected):
    """``(num (1, 1, rows), indices (1, 1, rows, width))``: per row the selected entries of ``kv``, in order."""
    rows = kv.shape[0]
    num = selected.sum(1)
    width = max(int(num.max()), 1) if rows else 1
    rank = torch.where(selected, selected.cumsum(1) - 1, width)  # unselected entries go to a dropped column
    indices = torch.zeros(rows, width + 1, dtype=torch.int32, device=kv.device)
    indices.scatter_(1, rank, kv.int())
    return num.int()[None, None], indices[None, None, :, :width].contiguous()


def _transposed(num, indices, cols):
    """The same block pairs listed per column (per KV block): what the backward pass iterates over. O(pairs)."""
    if num is None:
        return None, None
    num, indices = num[0, 0], indices[0, 0]
    rows, width = indices.shape
    listed = torch.arange(width, device=num.device) < num[:, None]
    row = torch.arange(rows, device=num.device)[:, None].expand(-1, width)[listed]
    col = indices[listed].long()
    order = torch.argsort(col * rows + row)  # by column, then row
    col, row = col[order], row[order]
    col_num = torch.bincount(col, minlength=cols)
    start = torch.cumsum(col_num, 0) - col_num
    rank = torch.arange(len(col), device=num.device) - start[col]
    col_width = max(int(col_num.max()), 1) if cols else 1
    out = torch.zeros(cols, col_width, dtype=torch.int32, device=num.device)
    out[col, rank] = row.int()
    return col_num.int()[None, None], out[None, None]


def block_mask(
    plan: FlexPlan, partition: Partition, kv_block: int, n_fine: int, key_valid: torch.Tensor | None = None
) -> BlockMask:
    """The BlockMask of ``plan`` with its exact ``mask_mod``; ``key_valid`` (B, keys) marks the keys a padding mask
    leaves real (None: no padding mask; every block that can be full then is). ``key_valid`` must already be False
    where ``plan.real`` is (filler, summaries of sinks only): the caller ANDs them, because doing it here trips
    Inductor's CPU template (``test_compiled_kernel_reads_the_block_lists``)."""
    m, causal, near = partition.block_size, partition.causal, partition.near_blocks
    level, position, width = plan.level, plan.position, plan.width
    real = plan.real if key_valid is None else key_valid

    sinks = partition.sink_tokens

    def mask_mod(b, h, q_idx, kv_idx):
        key = position[kv_idx]
        fine = fine_member(q_idx, key, m, causal, near)  # §3
        if sinks:  # §3a (only when there are sinks: the term trips Inductor's CPU template even when it is False)
            fine = fine | ((key < sinks) & partition.reads_sinks(q_idx // m))
        legal = torch.where(level[kv_idx] == 0, fine, attends_group(q_idx // width[kv_idx], key, causal, near))
        return legal & (real[kv_idx] if key_valid is None else real[b, kv_idx])

    lists = plan.lists if key_valid is None else plan.padded_lists
    return BlockMask(
        seq_lengths=(n_fine, len(level)),
        kv_num_blocks=lists[0],
        kv_indices=lists[1],
        full_kv_num_blocks=lists[2],
        full_kv_indices=lists[3],
        q_num_blocks=lists[4],
        q_indices=lists[5],
        full_q_num_blocks=lists[6],
        full_q_indices=lists[7],
        BLOCK_SIZE=(m, kv_block),
        mask_mod=mask_mod,
    )


def key_offsets(partition: Partition, plan: FlexPlan, coarse_tokens: tuple[int, ...], dtype, device) -> torch.Tensor:
    """Per key the logit offset of §4: ``log(w_l / p)`` for level-l summaries, 0 for fine keys and filler."""

    def build():
        table = torch.tensor(
            [0.0] + [partition.offset(level, p) for level, p in enumerate(coarse_tokens, 1)], dtype=dtype, device=device
        )
        return table[plan.level.clamp(min=0).long()]

    return PLANS.get(("flex_offsets", partition, len(plan.level), coarse_tokens, str(device), dtype), build)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled into fused kernels, built on first use (compiling takes a while)."""
    return torch.compile(flex_attention)


def _tile(size: int, cap: int) -> int:
    """The largest power of two that divides ``size``, at most ``cap``."""
    return min(size & -size, cap)


def kernel_options(block_size: int, kv_block: int, dtype: torch.dtype) -> dict:
    """Triton tile sizes that divide the block mask's blocks (Inductor's defaults, up to 128, need not): as large as
    the defaults for 16-bit inputs (128 forward, 64 backward), smaller for float32 (more bytes per tile; its
    default backward tiles are 16). Always the main kernel: the decoding kernel Inductor picks for fewer than 128
    queries takes neither these tiles nor per-query-block lists of this shape."""
    wide = dtype != torch.float32
    backward = min(_tile(block_size, 64 if wide else 16), _tile(kv_block, 64 if wide else 16))
    return {
        "fwd_BLOCK_M": _tile(block_size, 128 if wide else 64),
        "fwd_BLOCK_N": _tile(kv_block, 128 if wide else 32),
        "bwd_BLOCK_M1": backward,
        "bwd_BLOCK_N1": backward,
        "bwd_BLOCK_M2": backward,
        "bwd_BLOCK_N2": backward,
        "FORCE_USE_FLEX_ATTENTION": True,
    }


def flex_fine_queries(
    partition: Partition,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    plan: FlexPlan,
    offsets: torch.Tensor | None,
    kv_block: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fine-query FMA in one FlexAttention call.

    ``queries`` (B, H, n_fine, d) unscaled; ``keys``/``values`` (B, H_kv, keys, d) in the layout of ``plan``;
    ``offsets`` (keys,) the §4 logit offsets (None without ``scale_attn``); ``key_valid`` (B, keys) the keys a
    padding mask leaves real. Returns (B, H, n_fine, d). Compiled on CUDA, eager elsewhere.
    """
    mask = block_mask(plan, partition, kv_block, queries.shape[2], key_valid)
    score_mod = None
    if offsets is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + offsets[kv_idx]

    if queries.is_cuda:
        return _compiled_flex_attention()(
            queries,
            keys,
            values,
            score_mod=score_mod,
            block_mask=mask,
            enable_gqa=True,
            kernel_options=kernel_options(partition.block_size, kv_block, queries.dtype),
        )
    return flex_attention(queries, keys, values, score_mod=score_mod, block_mask=mask, enable_gqa=True)


def flex_unsupported(block_size: int, kv_block: int, head_dim: int, device: torch.device) -> str | None:
    """Why the flex path cannot run these sizes on ``device`` (None: it can)."""
    if not FLEX_AVAILABLE:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (PyTorch >= 2.5 does)"
    if device.type == "cuda":
        if block_size % CUDA_TILE or kv_block % CUDA_TILE:
            return (
                f"FlexAttention's CUDA tiles need block_size ({block_size}) and the KV block ({kv_block}) to be "
                f"multiples of {CUDA_TILE}"
            )
        if head_dim < CUDA_TILE:
            return f"FlexAttention on CUDA needs head_dim >= {CUDA_TILE}, got {head_dim}"
    return None


__all__ = [
    "FLEX_AVAILABLE",
    "KERNELS",
    "FlexPlan",
    "block_mask",
    "flex_fine_queries",
    "flex_plan",
    "flex_unsupported",
    "kernel_options",
    "key_offsets",
]
