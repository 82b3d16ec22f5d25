"""Fast Multipole Attention (FMA; Kang, Tran, De Sterck, arXiv:2310.11960) in plain PyTorch: the forward pass.

Each query attends to the keys of its own and neighbouring fine blocks at full resolution (level 0) and to
coarse summaries of farther groups whose width doubles with every level l = 1..L, all in one softmax.
Every (query, key) pair is covered exactly once. The definition this module implements, including each
choice the paper leaves open, is `docs/fma.md`; section numbers (§) below refer to it. The partition itself
lives in `fma_partition.py`, the downsamplers in `fma_downsample.py`, incremental decoding in `fma_decode.py`
(its state in `fma_state.py`).

Layout trick used throughout: queries are kept as (batch, kv_head, position, group_head, dim), so any run of
consecutive positions -- a fine block, a level-l group -- is one contiguous row block that shares a single key
set, and grouped-query heads ride along as extra rows instead of repeated keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fma_decode import FMADecoder, softmax_dtype
from .fma_downsample import make_downsampler, without_sinks
from .fma_flex import FLEX_AVAILABLE, flex_fine_queries, flex_plan, flex_unsupported, key_offsets
from .fma_options import check_fma_options
from .fma_partition import MASK_VALUE, Partition, num_levels, slots_per_level
from .fma_refine import refined_fine_queries

# Device kinds on which kernel="auto" takes the FlexAttention path: those where `scripts/check_gpu.py` (exactness
# against the gather path, then timings) has passed. None yet -- until a GPU run passes, "flex" is opt-in everywhere.
FLEX_VERIFIED_DEVICES: tuple[str, ...] = ()


def _merge(lse_a, out_a, lse_b, out_b):
    """Combine two partial softmax results (log-sum-exp, normalised output) over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    return lse, out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)


class FastMultipoleAttention(nn.Module):
    """Fast Multipole Attention over ``(batch, heads, seq_len, head_dim)`` tensors.

    Args:
        head_dim: ``d``, size of each query/key/value vector.
        max_seq_len: longest sequence the layer accepts; the hierarchy is built for it (rounded up to
            ``block_size * 2**(L+1)``). ``depthwise`` and ``full`` hold parameters for every level it needs. None
            (length-free families ``recursive`` and ``avgpool`` only, §7a): no cap -- every input gets the levels
            it needs, ``num_levels(n, block_size, near_blocks)``.
        block_size: ``m``, the finest block; keys within one block of a query are attended exactly.
        coarse_tokens: ``p``, summaries per group at every coarse level; must divide ``block_size``.
        causal: autoregressive partition (a query sees only its past) or bidirectional.
        downsample: ``"depthwise"`` (learned per-channel conv, default), ``"full"`` (learned, channel mixing),
            ``"avgpool"`` (fixed averages) or ``"recursive"`` (learned; level 1 as depthwise, every higher level
            one shared map of its two children's summaries: parameters independent of length, §7a).
        query_mode: ``"fine"`` -- every query attends its coarse slots, O(n log n); ``"coarse"`` -- one query
            per coarse-key resolution at each level, O(n) (§5).
        scale_attn: add ``log(w_l / p)`` to coarse logits so each summary weighs as the tokens it stands for.
        boundary: ``"mask"`` drops slots outside the sequence; ``"zero_sink"`` gives them a zero key and value
            with logit 0, as the authors' released kernels do (reproduction only). Outside means before position
            0 or beyond the hierarchy built for ``max_seq_len``; without a cap only the former, in the hierarchy
            the input needs -- so a causal output then depends on the input's length (how many levels add sinks),
            though never on later tokens.
        dropout: dropout probability on the joint attention probabilities (training mode only).
        kernel: how fine queries are computed. ``"gather"`` -- each fine block's key set gathered from the bank,
            one fused SDPA call over all blocks (every option, every device); ``"flex"`` -- one FlexAttention call
            over the bank in place with a block mask built from the partition (``fma_flex.py``): compiled on CUDA,
            eager elsewhere (materialises the scores: tests only); fine queries and ``boundary="mask"`` only, and in
            training with ``dropout > 0`` it falls back to ``"gather"`` (FlexAttention has no dropout);
            ``"auto"`` (default) -- ``"gather"``, and ``"flex"`` only on the device kinds in
            ``FLEX_VERIFIED_DEVICES`` (none yet: the flex path has not run on a GPU; ``scripts/check_gpu.py`` is
            the check that admits CUDA). Both paths compute the same function; ``"flex"`` keeps bf16/fp16 inputs
            in their dtype, ``"gather"`` computes in float32.
        sink_tokens: ``s`` (``0 <= s <= block_size``), the *sink tokens* of §3a: every query whose level-0 band
            misses position ``j < s`` attends it exactly, as an extra fine slot, and the downsamplers read these
            positions as zeros. For models that park attention on their first tokens (pretrained LLMs: §3a).
            0: plain FMA.
        near_blocks: ``w >= 1``, the near-field width (§3): level 0 holds the ``w`` previous blocks and the own one
            (bidirectional: and the ``w`` next ones) exactly, and at every coarse level the near field is ``w``
            groups wide, so each level reads ``w + 1`` (bidirectional ``2w + 1``) groups. 1: the partition of the
            paper's kernels. Wider fields see more tokens exactly, at ``(w+1)m`` fine keys per query and decoding
            state.
        refine_groups: ``k >= 0``, adaptive refinement (§3c): each query reads the ``k`` far fine blocks with the
            best Quest bound exactly, every coarse slot that holds one split into its children. 0: pure FMA. Fine
            queries and ``boundary="mask"`` only; the forward pass reads each query's picks block by block
            (``fma_refine.py``, O(n k m d)), decoding from a store of the past.

    Attributes:
        flex_kv_block: keys per KV block of the flex path's block mask (``block_size`` by default; a multiple of 16
            on CUDA). Smaller blocks compute fewer masked coarse keys with smaller tiles: a tuning knob.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int | None,
        block_size: int = 64,
        coarse_tokens: int = 4,
        causal: bool = True,
        downsample: str = "depthwise",
        query_mode: str = "fine",
        scale_attn: bool = True,
        boundary: str = "mask",
        dropout: float = 0.0,
        sink_tokens: int = 0,
        kernel: str = "auto",
        near_blocks: int = 1,
        refine_groups: int = 0,
    ):
        super().__init__()
        check_fma_options(
            head_dim=head_dim,
            max_seq_len=max_seq_len,
            block_size=block_size,
            coarse_tokens=coarse_tokens,
            causal=causal,
            downsample=downsample,
            query_mode=query_mode,
            scale_attn=scale_attn,
            boundary=boundary,
            dropout=dropout,
            sink_tokens=sink_tokens,
            kernel=kernel,
            near_blocks=near_blocks,
            refine_groups=refine_groups,
        )
        if kernel == "flex" and not FLEX_AVAILABLE:
            raise ImportError(
                f"kernel='flex' needs torch.nn.attention.flex_attention, which torch "
                f"{torch.__version__} lacks (PyTorch >= 2.5 has it); use kernel='gather' or 'auto'"
            )
        self.head_dim, self.max_seq_len = head_dim, max_seq_len
        self.block_size, self.coarse_tokens = block_size, coarse_tokens
        self.causal, self.query_mode, self.scale_attn, self.boundary = causal, query_mode, scale_attn, boundary
        self.dropout, self.sink_tokens, self.near_blocks = dropout, sink_tokens, near_blocks
        self.refine_groups = refine_groups
        self.kernel, self.flex_kv_block = kernel, block_size
        # None: length-free, each input gets the levels it needs (§7a).
        self.num_levels = None if max_seq_len is None else num_levels(max_seq_len, block_size, near_blocks)
        # Slots beyond the hierarchy built for max_seq_len are "outside the sequence" (zero sinks); slots between
        # the actual length and that capacity are padding (always masked). Without a cap there is no capacity.
        self.partition = Partition(
            block_size,
            coarse_tokens,
            causal,
            self.num_levels,
            query_mode == "fine",
            scale_attn,
            boundary == "zero_sink",
            sink_tokens,
            near_blocks,
        )
        self.capacity = self.partition.capacity
        # One downsampler for keys and one for values, each serving every level; shared by all heads.
        self.k_downsample = make_downsampler(downsample, head_dim, block_size, self.num_levels, coarse_tokens)
        self.v_downsample = make_downsampler(downsample, head_dim, block_size, self.num_levels, coarse_tokens)

    @property
    def decoder(self) -> FMADecoder:
        """Incremental decoding (§8) with this causal layer: ``init_state``, ``prefill``, ``step``."""
        return FMADecoder(self)

    def group_width(self, level: int) -> int:
        """``w_l = m * 2**(l-1)``; level 0 is the fine level with blocks of ``m``."""
        return self.partition.group_width(level)

    def extra_repr(self) -> str:
        levels = "per input" if self.num_levels is None else self.num_levels
        return (
            f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, block_size={self.block_size}, "
            f"coarse_tokens={self.coarse_tokens}, levels={levels}, causal={self.causal}, "
            f"query_mode={self.query_mode!r}, scale_attn={self.scale_attn}, boundary={self.boundary!r}, "
            f"sink_tokens={self.sink_tokens}, near_blocks={self.near_blocks}, refine_groups={self.refine_groups}, "
            f"kernel={self.kernel!r}"
        )

    # ------------------------------------------------------------------ validation

    def _check_inputs(self, q, k, v, key_padding_mask):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(
                    f"{name} must be a 4-d tensor (batch, heads, seq_len, head_dim), got {getattr(t, 'shape', type(t))}"
                )
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        batch, heads, seq_len, dim = q.shape
        if dim != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"head_dim is {self.head_dim}, got q {dim} and k/v {k.shape[-1]}")
        if k.shape[0] != batch or k.shape[2] != seq_len:
            raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch or seq_len")
        if heads % k.shape[1]:
            raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})")
        if seq_len < 1:
            raise ValueError("seq_len must be at least 1")
        if self.max_seq_len is not None and seq_len > self.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds max_seq_len {self.max_seq_len} this layer was built for")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq_len):
                raise ValueError(
                    f"key_padding_mask must be a bool tensor of shape {(batch, seq_len)}, got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )

    # ------------------------------------------------------------------ forward

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend ``q`` (B, H, n, d) to ``k``, ``v`` (B, H_kv, n, d); returns (B, H, n, d).

        ``q`` is not pre-scaled. ``key_padding_mask`` (B, n), True for real tokens, excludes the others as keys
        and treats them like the internal zero padding of a shorter sequence.
        """
        self._check_inputs(q, k, v, key_padding_mask)
        batch, heads, n, d = q.shape
        input_dtype = q.dtype
        kv_heads = k.shape[1]
        m = self.block_size
        levels = self.partition.levels_for(n)
        n_fine = -(-n // m) * m  # queries and fine keys: whole blocks
        n_coarse = -(-n // self.group_width(levels)) * self.group_width(levels)  # whole groups at every level

        # Softmax statistics need float32 at least: the gather path computes bf16/fp16 inputs in float32
        # throughout; FlexAttention keeps its softmax in float32 itself, so the flex path keeps the input dtype.
        flex = self._runs_flex(q.device)
        dtype = q.dtype if flex else softmax_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        key_valid = None  # (B, n_coarse) True for real keys; None when the user gave no padding
        if key_padding_mask is not None:
            # Masked tokens behave exactly like the internal zero padding of a shorter sequence.
            keep = key_padding_mask[:, None, :, None].to(dtype)
            q, k, v = q * keep, k * keep, v * keep
            key_valid = F.pad(key_padding_mask, (0, n_coarse - n), value=False)
        if n_coarse > n:
            q, k, v = (F.pad(t, (0, 0, 0, n_coarse - n)) for t in (q, k, v))
        # Sink tokens are attended exactly (§3a): the downsamplers read them as zeros, the bank's fine part as is.
        coarse_k = self.k_downsample(without_sinks(k, 0, self.sink_tokens, dim=2), levels)
        coarse_v = self.v_downsample(without_sinks(v, 0, self.sink_tokens, dim=2), levels)
        if flex:
            out = self._flex_fine_queries(
                q[:, :, :n_fine], k[:, :, :n_fine], v[:, :, :n_fine], coarse_k, coarse_v, key_valid, n
            )
            return out[:, :, :n].to(input_dtype)
        # (B, H_kv, positions, group_heads, d): see the module docstring.
        queries = q.unflatten(1, (kv_heads, -1)).transpose(2, 3)
        bank_k, bank_v = self._bank(k[:, :, :n_fine], coarse_k), self._bank(v[:, :, :n_fine], coarse_v)
        bank_valid = None
        if key_valid is not None:
            bank_valid = self._bank_valid(key_valid, n_fine, coarse_k)
        plans = self.partition.plans(n, tuple(c.shape[3] for c in coarse_k), k.device, dtype)
        if self.refine_groups:
            bases = [1 + n_fine]
            for c in coarse_k[:-1]:
                bases.append(bases[-1] + c.shape[2] * c.shape[3])
            fine_k, fine_v = k[:, :, :n_fine], v[:, :, :n_fine]
            out = refined_fine_queries(
                self,
                queries[:, :, :n_fine],
                fine_k,
                fine_v,
                bank_k,
                bank_v,
                *plans[0],
                bank_valid,
                key_valid,
                n,
                bases[: len(coarse_k)],
            )
        elif self.query_mode == "fine":
            out = self._fine_queries(queries[:, :, :n_fine], bank_k, bank_v, *plans[0], bank_valid)
        else:
            out = self._coarse_queries(queries * d**-0.5, bank_k, bank_v, plans, bank_valid, n_fine)
        # (B, H_kv, n_fine, g, d) -> (B, H, n, d)
        return out.transpose(2, 3).flatten(1, 2)[:, :, :n].to(input_dtype)

    # ------------------------------------------------------------------ key sets

    @staticmethod
    def _bank(fine, coarse, zero_slot: bool = True, length: int | None = None):
        """Every key (or value) any query can read, in one tensor: [zero slot | fine tokens | level 1 | ...].

        Each query unit's key set is then a single ``index_select`` from it; the zero slot serves zero sinks
        and masked slots. The flex path reads the bank in place: no zero slot, zeros appended up to ``length``.
        """
        parts = ([fine.new_zeros(fine.shape[:2] + (1, fine.shape[-1]))] if zero_slot else []) + [fine]
        parts += [c.flatten(2, 3) for c in coarse]
        filled = sum(part.shape[2] for part in parts)
        if length is not None and length > filled:
            parts.append(fine.new_zeros(fine.shape[:2] + (length - filled, fine.shape[-1])))
        return torch.cat(parts, 2)

    def _bank_valid(self, key_valid, n_fine, coarse):
        """Which bank slots hold real keys: fine tokens by the padding mask, summaries if any token of the
        group is real."""
        parts = [key_valid.new_ones(key_valid.shape[0], 1), key_valid[:, :n_fine]]
        for level, c in enumerate(coarse, start=1):
            groups = key_valid.unflatten(1, (-1, self.group_width(level)))[:, : c.shape[2]].any(-1)
            parts.append(groups.repeat_interleave(c.shape[3], 1))
        return torch.cat(parts, 1)

    # ------------------------------------------------------------------ attention

    def _runs_flex(self, device: torch.device) -> bool:
        """Whether this call takes the FlexAttention path (see ``kernel``); a forced ``"flex"`` that cannot run
        these sizes on ``device`` is an error rather than a silent fallback."""
        if self.kernel == "gather" or self.query_mode != "fine" or self.partition.zero_sink or self.refine_groups:
            return False
        if self.training and self.dropout:  # FlexAttention has no dropout
            return False
        why = flex_unsupported(self.block_size, self.flex_kv_block, self.head_dim, device)
        if self.kernel == "auto":  # only a path that has run on this kind of device
            return device.type in FLEX_VERIFIED_DEVICES and why is None
        if why is not None:
            raise ValueError(f"kernel='flex': {why}; use kernel='auto' or 'gather'")
        return True

    def _flex_fine_queries(self, q, k, v, coarse_k, coarse_v, key_valid, n):
        """Fine queries through FlexAttention (``fma_flex.py``): ``q`` (B, H, n_fine, d), ``k``/``v`` the fine
        keys (B, H_kv, n_fine, d), their summaries per level, ``key_valid`` (B, n_coarse) or None. Returns
        (B, H, n_fine, d)."""
        coarse_tokens = tuple(c.shape[3] for c in coarse_k)
        plan = flex_plan(self.partition, n, coarse_tokens, self.flex_kv_block, q.device)
        length = len(plan.level)
        keys = self._bank(k, coarse_k, zero_slot=False, length=length)
        values = self._bank(v, coarse_v, zero_slot=False, length=length)
        valid = None
        if key_valid is not None:  # the bank's validity without its zero slot, filler keys never valid
            valid = self._bank_valid(key_valid, q.shape[2], coarse_k)[:, 1:]
            valid = F.pad(valid, (0, length - valid.shape[1]), value=False) & plan.real  # + sink-only summaries (§3a)
        offsets = (
            key_offsets(
                self.partition, plan, coarse_tokens, q.dtype if q.dtype == torch.float64 else torch.float32, q.device
            )
            if self.scale_attn
            else None
        )
        return flex_fine_queries(self.partition, q, keys, values, plan, offsets, self.flex_kv_block, valid)

    def _fine_queries(self, queries, bank_k, bank_v, index, bias, bank_valid):
        """O(n log n): each fine block's m queries share one key set -- the fine band plus (w+1)p ((2w+1)p) slots
        per level -- so the whole layer is one fused attention call with a block-batched additive mask (one call per
        sequence when sequences carry padding).

        ``queries`` (B, H_kv, n_fine, g, d) unscaled; ``index`` (blocks, S) into the banks; ``bias``
        (blocks, m, S). Returns (B, H_kv, n_fine, g, d).
        """
        batch, kv_heads, positions, heads, dim = queries.shape
        blocks, slots = index.shape
        block_rows = positions // blocks * heads  # the m positions x g heads of a block
        # The fused CPU kernel works in a (batch, length, heads, dim) layout, here (batch, rows or slots, blocks,
        # dim): build the operands in it and hand over transposed views, sparing the kernel its own copies.
        slot_major = index.t().flatten()
        keys = bank_k.index_select(2, slot_major).view(batch * kv_heads, slots, blocks, dim).transpose(1, 2)
        values = bank_v.index_select(2, slot_major).view(batch * kv_heads, slots, blocks, dim).transpose(1, 2)
        query_rows = (
            queries.unflatten(2, (blocks, -1))
            .permute(0, 1, 3, 4, 2, 5)
            .reshape(batch * kv_heads, block_rows, blocks, dim)
            .transpose(1, 2)
        )
        mask = bias[:, :, None, :].expand(-1, -1, heads, -1).reshape(1, blocks, block_rows, slots)
        dropout = self.dropout if self.training else 0.0
        if bank_valid is None:
            out = F.scaled_dot_product_attention(
                query_rows, keys, values, attn_mask=mask, dropout_p=dropout, scale=dim**-0.5
            )
        else:
            # Padding differs per sequence: one call per sequence, its key/value heads sharing one mask, so the
            # mask is never materialised for every sequence and key/value head at once.
            padding = torch.where(bank_valid[:, index], 0.0, MASK_VALUE).to(mask.dtype)  # (B, blocks, S)
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        query_rows[rows],
                        keys[rows],
                        values[rows],
                        dropout_p=dropout,
                        attn_mask=mask + padding[b, :, None, :],
                        scale=dim**-0.5,
                    )
                    for b, rows in enumerate(slice(b * kv_heads, (b + 1) * kv_heads) for b in range(batch))
                ]
            )
        return out.reshape(batch, kv_heads, positions, heads, dim)

    def _attend_with_lse(self, queries, rows, bank_k, bank_v, index, bias, bank_valid):
        """Softmax over each unit's key set, also returning the log-sum-exp, for merging partial results.

        ``queries`` (B, H_kv, units*rows, g, d), already scaled: each run of ``rows`` positions shares the key
        set ``bank[index[unit]]``; ``bias`` (units, rows|1, S). Returns the normalised output
        (B, H_kv, units*rows, g, d) and the log-sum-exp (B, H_kv, units*rows, g).
        """
        batch, kv_heads, positions, heads, dim = queries.shape
        units, slots = index.shape
        keys = bank_k.index_select(2, index.flatten()).view(batch, kv_heads, units, slots, dim)
        values = bank_v.index_select(2, index.flatten()).view(batch, kv_heads, units, slots, dim)
        logits = queries.reshape(batch, kv_heads, units, rows * heads, dim) @ keys.transpose(-1, -2)
        logits = logits.view(batch, kv_heads, units, rows, heads, slots)
        logits.add_(bias[:, :, None, :])  # in place: the matmul's output is not needed for its backward
        if bank_valid is not None:
            padding = torch.where(bank_valid[:, index], 0.0, MASK_VALUE).to(logits.dtype)  # (B, units, S)
            logits.add_(padding[:, None, :, None, None, :])
        lse = torch.logsumexp(logits, -1)
        probs = torch.exp(logits - lse.unsqueeze(-1))
        if self.training and self.dropout:
            probs = F.dropout(probs, self.dropout)
        out = probs.view(batch, kv_heads, units, rows * heads, slots) @ values
        return out.reshape(batch, kv_heads, positions, heads, dim), lse.reshape(batch, kv_heads, positions, heads)

    def _coarse_queries(self, queries, bank_k, bank_v, plans, bank_valid, n_fine):
        """O(n): at level l one query per sub-window of w_l/p_l tokens (§5).

        Causal uses the sub-window's first query (a mean would leak the future), bidirectional the mean.
        Partial softmax results are merged from the top level down, doubling the resolution at each step,
        so only the last merge touches every token.
        """
        merged, resolution = None, None  # (lse, out) at the resolution of the level last merged
        for level in range(len(plans) - 1, 0, -1):
            index, bias = plans[level]
            p = index.shape[1] // slots_per_level(self.causal, self.near_blocks)
            sub_window = self.group_width(level) // p
            if self.causal:
                level_queries = queries[:, :, ::sub_window]
            else:
                level_queries = queries.unflatten(2, (-1, sub_window)).mean(3)
            out, lse = self._attend_with_lse(level_queries, p, bank_k, bank_v, index, bias, bank_valid)
            if merged is not None:
                factor = resolution // sub_window
                merged = _merge(
                    merged[0].repeat_interleave(factor, 2), merged[1].repeat_interleave(factor, 2), lse, out
                )
            else:
                merged = (lse, out)
            resolution = sub_window
        index, bias = plans[0]
        out, lse = self._attend_with_lse(
            queries[:, :, :n_fine], self.block_size, bank_k, bank_v, index, bias, bank_valid
        )
        if merged is None:
            return out
        coarse_lse = merged[0].repeat_interleave(resolution, 2)[:, :, :n_fine]
        coarse_out = merged[1].repeat_interleave(resolution, 2)[:, :, :n_fine]
        return _merge(lse, out, coarse_lse, coarse_out)[1]


__all__ = ["FastMultipoleAttention", "num_levels"]
