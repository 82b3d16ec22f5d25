"""Fast Multipole Attention (FMA; Kang, Tran, De Sterck, arXiv:2310.11960) in plain PyTorch.

Each query attends to the keys of its own and neighbouring fine blocks at full resolution (level 0) and to
coarse summaries of farther groups whose width doubles with every level l = 1..L, all in one softmax.
Every (query, key) pair is covered exactly once. The definition this module implements, including each
choice the paper leaves open, is `shared/design/fma.md`; section numbers (§) below refer to it.

Layout trick used throughout: queries are kept as (batch, kv_head, position, group_head, dim), so any run of
consecutive positions -- a fine block, a level-l group -- is one contiguous row block that shares a single key
set, and grouped-query heads ride along as extra rows instead of repeated keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DOWNSAMPLE_MODES = ("depthwise", "full", "avgpool")
QUERY_MODES = ("fine", "coarse")
BOUNDARY_MODES = ("mask", "zero_sink")

# Finite rather than -inf: a row whose every slot is masked (a padding query) stays finite instead of NaN,
# and exp(MASK_VALUE - max) is exactly 0 in float32, so real rows are unaffected.
MASK_VALUE = -1e30


def num_levels(seq_len: int, block_size: int) -> int:
    """Number of coarse levels L a sequence of ``seq_len`` tokens needs (§1, §7).

    Level l (group width ``block_size * 2**(l-1)``) is used only by queries at ``i >= 2 * width``, so it exists
    when ``seq_len > block_size * 2**l``.
    """
    levels = 0
    while block_size * 2 ** (levels + 1) < seq_len:
        levels += 1
    return levels


def average_weights(width: int, coarse_tokens: int) -> torch.Tensor:
    """(coarse_tokens, width) matrix whose row r averages the r-th sub-window of ``width // coarse_tokens``."""
    sub_window = width // coarse_tokens
    rows = torch.arange(coarse_tokens).unsqueeze(1)
    return (torch.arange(width).unsqueeze(0) // sub_window == rows).float() * (coarse_tokens / width)


class DepthwiseDownsample(nn.Module):
    """Learned per-channel summaries of every level (§2, the paper code's "groupedconv").

    Level l maps each group of ``w_l`` vectors to ``p``: ``K~[g, r, c] = sum_t W_l[c, r, t] K[g*w_l + t, c]
    + b_l[c, r]`` (a conv1d with ``groups=d``). Starts as the average of each sub-window, so an untrained model
    behaves like H-Transformer-1D. Parameters: ``p * d * (sum_l w_l + L)`` -- they grow with the longest
    sequence (about ``p * d * max_seq_len / 2``).
    """

    def __init__(self, head_dim: int, widths: list[int], coarse_tokens: int):
        super().__init__()
        self.widths, self.coarse_tokens = list(widths), coarse_tokens
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(head_dim, coarse_tokens, w)) for w in widths)
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(head_dim, coarse_tokens)) for _ in widths)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for width, weight, bias in zip(self.widths, self.weights, self.biases):
                weight.copy_(average_weights(width, self.coarse_tokens).expand_as(weight))
                bias.zero_()

    def forward(self, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
        """``x`` (..., n, d), n a multiple of the widest group used -> per level (..., n // w_l, p, d)."""
        # One channel-major copy serves every level: there each group is a contiguous run of w_l values, so a
        # level is a single batched matmul over channels, (groups, w_l) @ (w_l, p), on a view.
        channels = x.movedim(-1, 0).contiguous()  # (d, ..., n)
        out = []
        for width, weight, bias in zip(self.widths[:levels], self.weights, self.biases):
            coarse = torch.matmul(channels.view(x.shape[-1], -1, width), weight.to(x.dtype).transpose(1, 2))
            coarse = coarse.view(channels.shape[:-1] + (-1, self.coarse_tokens)).movedim(0, -1)
            out.append(coarse + bias.t().to(x.dtype))
        return out


class FullDownsample(nn.Module):
    """Like :class:`DepthwiseDownsample` with full channel mixing, ``W_l[c_out, r, c_in, t]`` (§2).

    ``p * d * d * w_l`` weights per level: an option for small models and short contexts.
    """

    def __init__(self, head_dim: int, widths: list[int], coarse_tokens: int):
        super().__init__()
        self.widths, self.coarse_tokens = list(widths), coarse_tokens
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(head_dim, coarse_tokens, head_dim, w)) for w in widths)
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(head_dim, coarse_tokens)) for _ in widths)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for width, weight, bias in zip(self.widths, self.weights, self.biases):
                average = average_weights(width, self.coarse_tokens)
                weight.copy_(torch.einsum("ck,rt->crkt", torch.eye(weight.shape[0]), average))
                bias.zero_()

    def forward(self, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
        d = x.shape[-1]
        out = []
        for width, weight, bias in zip(self.widths[:levels], self.weights, self.biases):
            # (groups, w_l * d) @ (w_l * d, p * d): one dense matmul per level
            matrix = weight.to(x.dtype).permute(3, 2, 1, 0).reshape(width * d, -1)
            coarse = (x.unflatten(-2, (-1, width)).flatten(-2) @ matrix).unflatten(-1, (self.coarse_tokens, d))
            out.append(coarse + bias.t().to(x.dtype))
        return out


class AvgPoolDownsample(nn.Module):
    """Parameter-free: the mean of each of the ``p`` consecutive sub-windows of a group (§2)."""

    def __init__(self, widths: list[int], coarse_tokens: int):
        super().__init__()
        self.widths, self.coarse_tokens = list(widths), coarse_tokens

    def forward(self, x: torch.Tensor, levels: int) -> list[torch.Tensor]:
        return [x.unflatten(-2, (-1, self.coarse_tokens, w // self.coarse_tokens)).mean(-2)
                for w in self.widths[:levels]]


def coarse_groups(own_group: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The level-l groups a query in level-l group ``own_group`` attends to (§3).

    Returns ``(groups, member)``, each ``own_group.shape + (k,)`` with k = 2 (causal) or 3 (bidirectional).
    ``member`` is False for a slot that is not part of the partition (the causal second group of an even
    child); a member group may still lie outside the sequence -- the caller decides what that means.
    """
    g = own_group.unsqueeze(-1)
    if causal:
        first = (g >> 1) * 2 - 2  # group 2P - 2, P the parent pair; 2P - 1 only when the query is an odd child
        groups = torch.cat([first, first + 1], -1)
        member = torch.cat([torch.ones_like(g, dtype=torch.bool), (g & 1) == 1], -1)
        return groups, member
    odd = (g & 1) == 1
    groups = torch.cat([torch.where(odd, g - 3, g - 2), torch.where(odd, g - 2, g + 2), torch.where(odd, g + 2, g + 3)], -1)
    return groups, torch.ones_like(groups, dtype=torch.bool)


def _slot_bias(member, in_range, real, offset: float, zero_sink: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive logit bias: ``offset`` for real slots, 0 for zero sinks, MASK_VALUE for everything else."""
    use = member & in_range & real
    bias = torch.full(use.shape, MASK_VALUE, dtype=dtype, device=use.device).masked_fill(use, offset)
    return bias.masked_fill(member & ~in_range, 0.0) if zero_sink else bias


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _merge(lse_a, out_a, lse_b, out_b):
    """Combine two partial softmax results (log-sum-exp, normalised output) over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    return lse, out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)


class FastMultipoleAttention(nn.Module):
    """Fast Multipole Attention over ``(batch, heads, seq_len, head_dim)`` tensors.

    Args:
        head_dim: ``d``, size of each query/key/value vector.
        max_seq_len: longest sequence the layer accepts; the hierarchy is built for it (rounded up to
            ``block_size * 2**(L+1)``). Learned downsamplers hold parameters for every level it needs.
        block_size: ``m``, the finest block; keys within one block of a query are attended exactly.
        coarse_tokens: ``p``, summaries per group at every coarse level; must divide ``block_size``.
        causal: autoregressive partition (a query sees only its past) or bidirectional.
        downsample: ``"depthwise"`` (learned per-channel conv, default), ``"full"`` (learned, channel mixing)
            or ``"avgpool"`` (fixed averages).
        query_mode: ``"fine"`` -- every query attends its coarse slots, O(n log n); ``"coarse"`` -- one query
            per coarse-key resolution at each level, O(n) (§5).
        scale_attn: add ``log(w_l / p)`` to coarse logits so each summary weighs as the tokens it stands for.
        boundary: ``"mask"`` drops slots outside the sequence; ``"zero_sink"`` gives them a zero key and value
            with logit 0, as the authors' released kernels do (reproduction only).
        dropout: dropout probability on the joint attention probabilities (training mode only).
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        block_size: int = 64,
        coarse_tokens: int = 4,
        causal: bool = True,
        downsample: str = "depthwise",
        query_mode: str = "fine",
        scale_attn: bool = True,
        boundary: str = "mask",
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("head_dim", head_dim), ("max_seq_len", max_seq_len), ("block_size", block_size),
                            ("coarse_tokens", coarse_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if coarse_tokens > block_size or block_size % coarse_tokens:
            raise ValueError(f"coarse_tokens ({coarse_tokens}) must divide block_size ({block_size})")
        for name, value, allowed in (("downsample", downsample, DOWNSAMPLE_MODES),
                                     ("query_mode", query_mode, QUERY_MODES), ("boundary", boundary, BOUNDARY_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.head_dim, self.max_seq_len = head_dim, max_seq_len
        self.block_size, self.coarse_tokens = block_size, coarse_tokens
        self.causal, self.query_mode, self.scale_attn, self.boundary = causal, query_mode, scale_attn, boundary
        self.dropout = dropout
        self.num_levels = num_levels(max_seq_len, block_size)
        # Slots beyond the hierarchy built for max_seq_len are "outside the sequence" (zero sinks); slots between
        # the actual length and that capacity are padding (always masked).
        self.capacity = block_size * 2 ** (self.num_levels + 1)

        widths = [self.group_width(level) for level in range(1, self.num_levels + 1)]

        def make():
            if downsample == "avgpool":
                return AvgPoolDownsample(widths, coarse_tokens)
            family = DepthwiseDownsample if downsample == "depthwise" else FullDownsample
            return family(head_dim, widths, coarse_tokens)

        # One downsampler for keys and one for values, each holding every level; shared by all heads.
        self.k_downsample, self.v_downsample = make(), make()

    def group_width(self, level: int) -> int:
        """``w_l = m * 2**(l-1)``; level 0 is the fine level with blocks of ``m``."""
        return self.block_size if level == 0 else self.block_size << (level - 1)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, block_size={self.block_size}, "
                f"coarse_tokens={self.coarse_tokens}, levels={self.num_levels}, causal={self.causal}, "
                f"query_mode={self.query_mode!r}, scale_attn={self.scale_attn}, boundary={self.boundary!r}")

    # ------------------------------------------------------------------ validation

    def _check_inputs(self, q, k, v, key_padding_mask):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-d tensor (batch, heads, seq_len, head_dim), got "
                                 f"{getattr(t, 'shape', type(t))}")
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
        if seq_len > self.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds max_seq_len {self.max_seq_len} this layer was built for")
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq_len):
                raise ValueError(f"key_padding_mask must be a bool tensor of shape {(batch, seq_len)}, got "
                                 f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")

    # ------------------------------------------------------------------ forward

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend ``q`` (B, H, n, d) to ``k``, ``v`` (B, H_kv, n, d); returns (B, H, n, d).

        ``q`` is not pre-scaled. ``key_padding_mask`` (B, n), True for real tokens, excludes the others as keys
        and treats them like the internal zero padding of a shorter sequence.
        """
        self._check_inputs(q, k, v, key_padding_mask)
        batch, heads, n, d = q.shape
        kv_heads = k.shape[1]
        m = self.block_size
        levels = num_levels(n, m)
        n_fine = -(-n // m) * m  # queries and fine keys: whole blocks
        widest = self.group_width(levels) if levels else m
        n_coarse = -(-n // widest) * widest  # downsampling: whole groups at every level used

        if key_padding_mask is not None:
            # Masked tokens behave exactly like internal padding: zero q/k/v, never a key.
            keep = key_padding_mask[:, None, :, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        # Real keys are those before n; key_valid additionally marks the user's padding (None when there is none).
        key_valid = None
        if key_padding_mask is not None:
            key_valid = F.pad(key_padding_mask, (0, n_coarse - n), value=False)

        k = F.pad(k, (0, 0, 0, n_coarse - n))
        v = F.pad(v, (0, 0, 0, n_coarse - n))
        # (B, H_kv, positions, group_heads, d): see the module docstring.
        queries = F.pad(q * d ** -0.5, (0, 0, 0, n_coarse - n)).unflatten(1, (kv_heads, -1)).transpose(2, 3)
        coarse_k, coarse_v = self.k_downsample(k, levels), self.v_downsample(v, levels)
        fine = self._fine_level(k[:, :, :n_fine], v[:, :, :n_fine], n, key_valid, levels)
        if self.query_mode == "fine":
            out = self._fine_queries(queries[:, :, :n_fine], fine, coarse_k, coarse_v, n, key_valid)
        else:
            out = self._coarse_queries(queries, fine, coarse_k, coarse_v, n, key_valid)
        # (B, H_kv, n_fine, g, d) -> (B, H, n, d)
        return out.transpose(2, 3).flatten(1, 2)[:, :, :n].to(q.dtype)

    # ------------------------------------------------------------------ key sets

    def _fine_level(self, k, v, n, key_valid, levels):
        """Level 0 of every fine block: the neighbour blocks' keys/values and their bias (§3, §4).

        Returns keys, values (B, H_kv, blocks, K0, d) and bias (B|1, blocks, m, K0) with K0 = 2m causal / 3m.
        With ``boundary="zero_sink"`` one more zero slot carries the sinks of the levels this length does not
        materialise (see :meth:`_missing_level_sinks`).
        """
        m = self.block_size
        n_blocks = k.shape[2] // m
        offsets = (-1, 0) if self.causal else (-1, 0, 1)
        padded_k = F.pad(k.unflatten(2, (n_blocks, m)), (0, 0, 0, 0, 1, 1))  # a zero block on either side
        padded_v = F.pad(v.unflatten(2, (n_blocks, m)), (0, 0, 0, 0, 1, 1))
        keys = torch.cat([padded_k[:, :, 1 + o:1 + o + n_blocks] for o in offsets], 3)
        values = torch.cat([padded_v[:, :, 1 + o:1 + o + n_blocks] for o in offsets], 3)

        device = k.device
        blocks = torch.arange(n_blocks, device=device)
        slot = torch.arange(len(offsets) * m, device=device)
        neighbour = blocks[:, None] + torch.tensor(offsets, device=device)[slot // m]  # (blocks, K0)
        key_pos = neighbour * m + slot % m
        in_range = (neighbour >= 0) & (neighbour < self.capacity // m)
        if self.causal:
            query_pos = blocks[:, None] * m + torch.arange(m, device=device)  # (blocks, m)
            member = key_pos[:, None, :] <= query_pos[:, :, None]
        else:
            member = torch.ones(n_blocks, m, len(slot), dtype=torch.bool, device=device)
        bias = _slot_bias(member, in_range[:, None], (key_pos < n)[:, None], 0.0, self.boundary == "zero_sink",
                          _softmax_dtype(k.dtype))
        bias = bias.unsqueeze(0)
        if key_valid is not None:
            valid = F.pad(key_valid.unflatten(1, (-1, m))[:, :n_blocks], (0, 0, 1, 1), value=True)
            valid = torch.cat([valid[:, 1 + o:1 + o + n_blocks] for o in offsets], 2)  # (B, blocks, K0)
            bias = bias + torch.where(valid, 0.0, MASK_VALUE)[:, :, None, :]
        if self.boundary == "zero_sink" and levels < self.num_levels:
            sinks = self._missing_level_sinks(blocks, levels)  # (blocks,)
            keys = torch.cat([keys, keys.new_zeros(keys.shape[:3] + (1, keys.shape[-1]))], 3)
            values = torch.cat([values, values.new_zeros(values.shape[:3] + (1, values.shape[-1]))], 3)
            sink_bias = torch.where(sinks > 0, sinks.clamp(min=1).log(), MASK_VALUE).to(bias.dtype)
            bias = torch.cat([bias, sink_bias[None, :, None, None].expand(bias.shape[0], -1, m, 1)], 3)
        return keys, values, bias

    def _missing_level_sinks(self, blocks, levels):
        """Zero-sink slots that levels ``levels+1 .. L`` would give each fine block at the full hierarchy.

        With the released kernels every query sees every level of ``max_seq_len``; a level a short sequence
        does not need holds only out-of-range groups there, each of which adds ``p`` logit-0 zero slots.
        """
        count = torch.zeros(len(blocks), dtype=torch.float64, device=blocks.device)
        for level in range(levels + 1, self.num_levels + 1):
            groups, member = coarse_groups(blocks >> (level - 1), self.causal)
            outside = member & ((groups < 0) | (groups >= self.capacity // self.group_width(level)))
            count += self.coarse_tokens * outside.sum(-1)
        return count

    def _coarse_level(self, level, own_group, coarse_k, coarse_v, n, key_valid):
        """Level-l slots of queries whose level-l group is ``own_group`` (§3): gathered summaries and bias.

        ``coarse_k``/``coarse_v`` are (B, H_kv, groups, p_l, d). Returns keys, values (B, H_kv, q, k*p_l, d)
        and bias (B|1, q, 1, k*p_l), where q = len(own_group) and k = 2 (causal) or 3 (bidirectional) groups.
        """
        width = self.group_width(level)
        n_groups, p = coarse_k.shape[2], coarse_k.shape[3]
        groups, member = coarse_groups(own_group, self.causal)
        in_range = (groups >= 0) & (groups < self.capacity // width)
        offset = math.log(width / p) if self.scale_attn else 0.0
        bias = _slot_bias(member, in_range, groups * width < n, offset, self.boundary == "zero_sink",
                          _softmax_dtype(coarse_k.dtype)).unsqueeze(0)
        # Slot 0 of the padded summaries is a zero group: out-of-range and non-member slots read it.
        index = torch.where(member & (groups >= 0) & (groups < n_groups), groups + 1, 0)
        if key_valid is not None:
            valid = F.pad(key_valid.unflatten(1, (n_groups, width)).any(-1), (1, 0), value=True)
            bias = bias + torch.where(valid[:, index], 0.0, MASK_VALUE)
        shape = coarse_k.shape[:2] + (len(own_group), groups.shape[-1] * p, coarse_k.shape[-1])
        keys = F.pad(coarse_k, (0, 0, 0, 0, 1, 0)).index_select(2, index.flatten()).view(shape)
        values = F.pad(coarse_v, (0, 0, 0, 0, 1, 0)).index_select(2, index.flatten()).view(shape)
        return keys, values, bias.repeat_interleave(p, -1).unsqueeze(2)

    # ------------------------------------------------------------------ the two query variants

    def _attend(self, queries, keys, values, bias, return_lse=False):
        """One softmax per row over a shared key set.

        queries (B, H_kv, q, R, g, d) -- R positions x g heads share the q-th key set keys/values
        (B, H_kv, q, S, d); bias (B|1, q, R|1, S). Returns the output (B, H_kv, q*R, g, d) and, with
        ``return_lse``, the log-sum-exp (B, H_kv, q*R, g) in float32.
        """
        batch, kv_heads, n_sets, rows, heads, dim = queries.shape
        logits = queries.flatten(3, 4) @ keys.transpose(-1, -2)
        # Softmax statistics in float32 at least (bf16/fp16 inputs), float64 stays float64.
        logits = logits.unflatten(3, (rows, heads)).to(_softmax_dtype(logits.dtype)) + bias.unsqueeze(1).unsqueeze(4)
        if return_lse:
            lse = torch.logsumexp(logits, -1)
            probs = torch.exp(logits - lse.unsqueeze(-1))
        else:
            probs = torch.softmax(logits, -1)
        probs = F.dropout(probs, self.dropout, self.training)
        out = probs.flatten(3, 4).to(values.dtype) @ values
        out = out.view(batch, kv_heads, n_sets * rows, heads, dim)
        return (out, lse.flatten(2, 3)) if return_lse else out

    def _fine_queries(self, queries, fine, coarse_k, coarse_v, n, key_valid):
        """O(n log n): every query attends the fine neighbourhood and 2p (3p) slots per level, one softmax.

        All queries of a fine block share their coarse slots, so each block's whole key set is gathered once
        and attended with a single batched matmul.
        """
        keys, values, bias = fine
        n_blocks, m = keys.shape[2], self.block_size
        blocks = torch.arange(n_blocks, device=keys.device)
        key_parts, value_parts, bias_parts = [keys], [values], [bias]
        for level, (ck, cv) in enumerate(zip(coarse_k, coarse_v), start=1):
            k_l, v_l, b_l = self._coarse_level(level, blocks >> (level - 1), ck, cv, n, key_valid)
            key_parts.append(k_l)
            value_parts.append(v_l)
            bias_parts.append(b_l.expand(-1, -1, m, -1))
        out = self._attend(queries.unflatten(2, (n_blocks, m)), torch.cat(key_parts, 3), torch.cat(value_parts, 3),
                           torch.cat(bias_parts, 3))
        return out

    def _coarse_queries(self, queries, fine, coarse_k, coarse_v, n, key_valid):
        """O(n): at level l one query per sub-window of w_l/p_l tokens (§5).

        Causal uses the sub-window's first query (a mean would leak the future), bidirectional the mean.
        Partial softmax results are merged from the top level down, doubling the resolution at each step,
        so no level's result is ever expanded to every token but the last.
        """
        keys, values, bias = fine
        n_blocks, m = keys.shape[2], self.block_size
        merged = None  # (lse, out) at the resolution of the level last merged
        resolution = None
        for level in range(len(coarse_k), 0, -1):
            ck, cv = coarse_k[level - 1], coarse_v[level - 1]
            n_groups, p = ck.shape[2], ck.shape[3]
            sub_window = self.group_width(level) // p
            if self.causal:
                level_queries = queries[:, :, ::sub_window]
            else:
                level_queries = queries.unflatten(2, (-1, sub_window)).mean(3)
            own_group = torch.arange(n_groups, device=queries.device)
            k_l, v_l, b_l = self._coarse_level(level, own_group, ck, cv, n, key_valid)
            out, lse = self._attend(level_queries.unflatten(2, (n_groups, p)), k_l, v_l, b_l, return_lse=True)
            if merged is not None:
                factor = resolution // sub_window
                merged = _merge(merged[0].repeat_interleave(factor, 2), merged[1].repeat_interleave(factor, 2),
                                lse, out.to(lse.dtype))
            else:
                merged = (lse, out.to(lse.dtype))
            resolution = sub_window
        out, lse = self._attend(queries[:, :, :n_blocks * m].unflatten(2, (n_blocks, m)), keys, values, bias,
                                return_lse=True)
        if merged is None:
            return out
        n_fine = n_blocks * m
        coarse_lse = merged[0].repeat_interleave(resolution, 2)[:, :, :n_fine]
        coarse_out = merged[1].repeat_interleave(resolution, 2)[:, :, :n_fine]
        return _merge(lse, out.to(lse.dtype), coarse_lse, coarse_out)[1]
