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
from dataclasses import dataclass, replace

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


def _register_levels(module: nn.Module, weight_shapes: list[tuple], bias_shape: tuple) -> None:
    """Give ``module`` parameters ``weight_<l>`` and ``bias_<l>`` for levels l = 1..L, and list views of them.

    Plain attributes of the module that runs ``forward`` (not a ParameterList child) so that hooks which
    materialise a module's own parameters before its forward -- accelerate's offloading -- see them.
    """
    for level, shape in enumerate(weight_shapes, start=1):
        module.register_parameter(f"weight_{level}", nn.Parameter(torch.empty(shape)))
        module.register_parameter(f"bias_{level}", nn.Parameter(torch.empty(bias_shape)))


class _LevelParameters:
    """``weights`` and ``biases``: the per-level parameters registered by :func:`_register_levels`, in order."""

    @property
    def weights(self) -> list[nn.Parameter]:
        return [self._parameters[f"weight_{level}"] for level in range(1, len(self.widths) + 1)]

    @property
    def biases(self) -> list[nn.Parameter]:
        return [self._parameters[f"bias_{level}"] for level in range(1, len(self.widths) + 1)]


class DepthwiseDownsample(_LevelParameters, nn.Module):
    """Learned per-channel summaries of every level (§2, the paper code's "groupedconv").

    Level l maps each group of ``w_l`` vectors to ``p``: ``K~[g, r, c] = sum_t W_l[c, r, t] K[g*w_l + t, c]
    + b_l[c, r]`` (a conv1d with ``groups=d``). Starts as the average of each sub-window, so an untrained model
    behaves like H-Transformer-1D. Parameters: ``p * d * (sum_l w_l + L)`` -- they grow with the longest
    sequence (about ``p * d * max_seq_len / 2``).
    """

    def __init__(self, head_dim: int, widths: list[int], coarse_tokens: int):
        super().__init__()
        self.widths, self.coarse_tokens = list(widths), coarse_tokens
        _register_levels(self, [(head_dim, coarse_tokens, w) for w in widths], (head_dim, coarse_tokens))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for width, weight, bias in zip(self.widths, self.weights, self.biases):
                weight.copy_(average_weights(width, self.coarse_tokens).expand_as(weight))
                bias.zero_()

    def forward(self, x: torch.Tensor, levels: int | None = None, *, level: int | None = None,
                offsets: torch.Tensor | None = None):
        """Summaries of levels ``1..levels``: ``x`` (..., n, d), n a multiple of the widest group used -> per level
        (..., n // w_l, p, d).

        The incremental-decoding state (§8) sums summaries block by block instead -- a summary is the sum of its
        tokens' shares plus a bias: with ``level`` and ``offsets``, the level-``level`` shares of tokens ``x``
        (..., c, d) sitting at ``offsets`` (c,) within their groups -> ``(shares (..., c, p, d), bias (p, d))``.
        Both go through ``forward`` so that module hooks (e.g. accelerate's offloading) see every use of the weights.
        """
        if offsets is not None:
            weight = getattr(self, f"weight_{level}")[:, :, offsets].to(x.dtype)  # (d, p, c)
            return x.unsqueeze(-2) * weight.permute(2, 1, 0), getattr(self, f"bias_{level}").t().to(x.dtype)
        if levels == 0:
            return []
        # One channel-major copy serves every level: there each group is a contiguous run of w_l values, so a
        # level is a single batched matmul over channels, (groups, w_l) @ (w_l, p), on a view.
        channels = x.movedim(-1, 0).contiguous()  # (d, ..., n)
        weights = [w.to(x.dtype) for w in self.weights[:levels]]
        coarse = _DepthwiseLevels.apply(channels, *weights)
        return [c.view(channels.shape[:-1] + (-1, self.coarse_tokens)).movedim(0, -1) + b.t().to(x.dtype)
                for c, b in zip(coarse, self.biases)]



class _DepthwiseLevels(torch.autograd.Function):
    """All levels of :class:`DepthwiseDownsample` on one channel-major tensor (d, ..., n).

    Autograd would give every level's input gradient its own full-size buffer and add them up; here they
    accumulate in place into a single buffer with ``baddbmm_``.
    """

    @staticmethod
    def forward(ctx, channels, *weights):
        ctx.save_for_backward(channels, *weights)
        d = channels.shape[0]
        return tuple(torch.bmm(channels.view(d, -1, w.shape[-1]), w.transpose(1, 2)) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        channels, *weights = ctx.saved_tensors
        d = channels.shape[0]
        grad_channels = None
        grad_weights = []
        for grad, weight, needed in zip(grads, weights, ctx.needs_input_grad[1:]):
            width = weight.shape[-1]
            if ctx.needs_input_grad[0]:
                if grad_channels is None:
                    grad_channels = torch.bmm(grad, weight).view_as(channels)
                else:
                    grad_channels.view(d, -1, width).baddbmm_(grad, weight)
            grad_weights.append(torch.bmm(grad.transpose(1, 2), channels.view(d, -1, width)) if needed else None)
        return (grad_channels, *grad_weights)


class FullDownsample(_LevelParameters, nn.Module):
    """Like :class:`DepthwiseDownsample` with full channel mixing, ``W_l[c_out, r, c_in, t]`` (§2).

    ``p * d * d * w_l`` weights per level: an option for small models and short contexts.
    """

    def __init__(self, head_dim: int, widths: list[int], coarse_tokens: int):
        super().__init__()
        self.widths, self.coarse_tokens = list(widths), coarse_tokens
        _register_levels(self, [(head_dim, coarse_tokens, head_dim, w) for w in widths], (head_dim, coarse_tokens))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for width, weight, bias in zip(self.widths, self.weights, self.biases):
                average = average_weights(width, self.coarse_tokens)
                weight.copy_(torch.einsum("ck,rt->crkt", torch.eye(weight.shape[0]), average))
                bias.zero_()

    def forward(self, x: torch.Tensor, levels: int | None = None, *, level: int | None = None,
                offsets: torch.Tensor | None = None):
        """As :meth:`DepthwiseDownsample.forward`."""
        if offsets is not None:
            weight = getattr(self, f"weight_{level}")[..., offsets].to(x.dtype)  # (d_out, p, d_in, c)
            return torch.einsum("...ck,orkc->...cro", x, weight), getattr(self, f"bias_{level}").t().to(x.dtype)
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

    def forward(self, x: torch.Tensor, levels: int | None = None, *, level: int | None = None,
                offsets: torch.Tensor | None = None):
        """As :meth:`DepthwiseDownsample.forward`; a token's share is 1/sub_window of it, in its own sub-window."""
        if offsets is not None:
            width = self.widths[level - 1]
            share = F.one_hot(offsets // (width // self.coarse_tokens), self.coarse_tokens).to(x.dtype)
            return x.unsqueeze(-2) * (share * (self.coarse_tokens / width)).unsqueeze(-1), x.new_zeros(1, 1)
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
    # even G: G-2, G+2, G+3; odd G: G-3, G-2, G+2 (the 1D fast-multipole interaction list)
    groups = torch.cat([torch.where(odd, g - 3, g - 2), torch.where(odd, g - 2, g + 2),
                        torch.where(odd, g + 2, g + 3)], -1)
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


@dataclass(frozen=True)
class FMAState:
    """What causal FMA keeps of one sequence's past in one layer for incremental decoding (§8).

    With ``length`` tokens consumed, it holds the fine keys/values of the last ``2m`` positions (a ring: position
    j at slot ``j % 2m``, so the window ``[(floor(t/m)-1)m, t)`` is always inside), and per level l the bias-free
    partial sum of the group being filled -- over its complete fine blocks; the tokens of the block being filled
    wait in the ring -- and a ring of the last three complete groups (group g at slot ``g % 3``): exactly the
    groups a present or future query can still need. ``4m + 8pL`` vectors per key/value
    head, whatever the length. In ``query_mode="coarse"`` it also keeps, per level, the query that opened the
    current sub-window (the coarse query of every token in it).

    Frozen: updates build new tensors, so a state shared by several beams after reordering stays intact.
    """

    length: int
    fine_k: torch.Tensor  # (H_kv, 2m, d)
    fine_v: torch.Tensor
    partial_k: torch.Tensor  # (L, H_kv, p, d)
    partial_v: torch.Tensor
    groups_k: torch.Tensor  # (L, H_kv, 3, p, d)
    groups_v: torch.Tensor
    level_queries: torch.Tensor | None = None  # (L, H, d), coarse query mode only

    def tensors(self) -> list[torch.Tensor]:
        kv = [self.fine_k, self.fine_v, self.partial_k, self.partial_v, self.groups_k, self.groups_v]
        return kv + ([self.level_queries] if self.level_queries is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


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
        self._plan_cache: dict = {}  # static slot plans per sequence shape, see _plans
        self._decode_bias_cache: dict = {}  # decoding-step biases, see _decode_bias

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
        input_dtype = q.dtype
        kv_heads = k.shape[1]
        m = self.block_size
        levels = num_levels(n, m)
        n_fine = -(-n // m) * m  # queries and fine keys: whole blocks
        n_coarse = -(-n // self.group_width(levels)) * self.group_width(levels)  # whole groups at every level

        # Softmax statistics need float32 at least: bf16/fp16 inputs are computed in float32 throughout.
        dtype = _softmax_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        key_valid = None  # (B, n_coarse) True for real keys; None when the user gave no padding
        if key_padding_mask is not None:
            # Masked tokens behave exactly like the internal zero padding of a shorter sequence.
            keep = key_padding_mask[:, None, :, None].to(dtype)
            q, k, v = q * keep, k * keep, v * keep
            key_valid = F.pad(key_padding_mask, (0, n_coarse - n), value=False)
        if n_coarse > n:
            q, k, v = (F.pad(t, (0, 0, 0, n_coarse - n)) for t in (q, k, v))
        # (B, H_kv, positions, group_heads, d): see the module docstring.
        queries = q.unflatten(1, (kv_heads, -1)).transpose(2, 3)
        coarse_k, coarse_v = self.k_downsample(k, levels), self.v_downsample(v, levels)
        bank_k, bank_v = self._bank(k[:, :, :n_fine], coarse_k), self._bank(v[:, :, :n_fine], coarse_v)
        bank_valid = None
        if key_valid is not None:
            bank_valid = self._bank_valid(key_valid, n_fine, coarse_k)
        plans = self._plans(n, n_fine, [c.shape[3] for c in coarse_k], k.device, dtype)
        if self.query_mode == "fine":
            out = self._fine_queries(queries[:, :, :n_fine], bank_k, bank_v, *plans[0], bank_valid)
        else:
            out = self._coarse_queries(queries * d ** -0.5, bank_k, bank_v, plans, bank_valid, n_fine)
        # (B, H_kv, n_fine, g, d) -> (B, H, n, d)
        return out.transpose(2, 3).flatten(1, 2)[:, :, :n].to(input_dtype)

    # ------------------------------------------------------------------ key sets

    @staticmethod
    def _bank(fine, coarse):
        """Every key (or value) any query can read, in one tensor: [zero slot | fine tokens | level 1 | ...].

        Each query unit's key set is then a single ``index_select`` from it; the zero slot serves zero sinks
        and masked slots.
        """
        parts = [fine.new_zeros(fine.shape[:2] + (1, fine.shape[-1])), fine]
        return torch.cat(parts + [c.flatten(2, 3) for c in coarse], 2)

    def _bank_valid(self, key_valid, n_fine, coarse):
        """Which bank slots hold real keys: fine tokens by the padding mask, summaries if any token of the
        group is real."""
        parts = [key_valid.new_ones(key_valid.shape[0], 1), key_valid[:, :n_fine]]
        for level, c in enumerate(coarse, start=1):
            groups = key_valid.unflatten(1, (-1, self.group_width(level)))[:, :c.shape[2]].any(-1)
            parts.append(groups.repeat_interleave(c.shape[3], 1))
        return torch.cat(parts, 1)

    def _plans(self, n, n_fine, coarse_tokens, device, dtype):
        """Static slot plans for a length-n sequence: per query unit, the bank index of every slot and its bias.

        Returns ``[fine_plan, level_1_plan, ...]``; each plan is ``(index (units, S), bias (units, R, S))``
        with R the rows sharing a unit's key set (m for a fine block, 1 for a coarse query group). In "fine"
        query mode the first plan already includes every level's slots. Plans depend only on shapes, so
        they are cached.
        """
        key = (n, tuple(coarse_tokens), str(device), dtype)
        if key not in self._plan_cache:
            if len(self._plan_cache) >= 8:
                self._plan_cache.pop(next(iter(self._plan_cache)))
            self._plan_cache[key] = self._build_plans(n, n_fine, coarse_tokens, device, dtype)
        return self._plan_cache[key]

    def _build_plans(self, n, n_fine, coarse_tokens, device, dtype):
        m, zero_sink = self.block_size, self.boundary == "zero_sink"
        n_blocks = n_fine // m
        blocks = torch.arange(n_blocks, device=device)

        # Level 0 (§3): the previous and own block (causal, own up to the query), or the three-block band.
        offsets = torch.tensor((-1, 0) if self.causal else (-1, 0, 1), device=device)
        slot = torch.arange(len(offsets) * m, device=device)
        neighbour = blocks[:, None] + offsets[slot // m]  # (blocks, K0)
        key_pos = neighbour * m + slot % m
        in_range = (neighbour >= 0) & (neighbour < self.capacity // m)
        if self.causal:
            member = key_pos[:, None, :] <= (blocks[:, None] * m + torch.arange(m, device=device))[:, :, None]
        else:
            member = torch.ones(n_blocks, m, len(slot), dtype=torch.bool, device=device)
        fine_bias = _slot_bias(member, in_range[:, None], (key_pos < n)[:, None], 0.0, zero_sink, dtype)
        fine_index = torch.where(in_range & (key_pos < n_fine), key_pos + 1, 0)
        levels = len(coarse_tokens)
        if zero_sink and levels < self.num_levels:
            # Levels this length does not need hold only out-of-range groups; their logit-0 zero slots are
            # counted into one extra slot with logit log(count) (see _missing_level_sinks).
            sinks = self._missing_level_sinks(blocks, levels)
            sink_bias = torch.where(sinks > 0, sinks.clamp(min=1).log(), MASK_VALUE).to(dtype)
            fine_bias = torch.cat([fine_bias, sink_bias[:, None, None].expand(-1, m, 1)], 2)
            fine_index = torch.cat([fine_index, torch.zeros_like(fine_index[:, :1])], 1)

        # Level l's summaries sit in the bank after the fine tokens and the levels before it.
        n_coarse = -(-n // self.group_width(levels)) * self.group_width(levels)
        bases = [1 + n_fine]
        for level, p in enumerate(coarse_tokens[:-1], start=1):
            bases.append(bases[-1] + n_coarse // self.group_width(level) * p)
        if self.query_mode == "fine":
            # All queries of a fine block share their coarse slots: one key set per block.
            index, bias = [fine_index], [fine_bias]
            for level, (p, base) in enumerate(zip(coarse_tokens, bases), start=1):
                level_index, level_bias = self._level_slots(level, p, blocks >> (level - 1), n, n_coarse, base,
                                                            dtype)
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
        groups, member = coarse_groups(own_group, self.causal)
        in_range = (groups >= 0) & (groups < self.capacity // width)
        offset = math.log(width / p) if self.scale_attn else 0.0
        bias = _slot_bias(member, in_range, groups * width < n, offset, self.boundary == "zero_sink", dtype)
        available = member & (groups >= 0) & (groups < n_coarse // width)
        slots = torch.arange(p, device=own_group.device)
        index = torch.where(available[..., None], (base + groups * p)[..., None] + slots, 0).flatten(-2)
        return index, bias.repeat_interleave(p, -1)

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

    # ------------------------------------------------------------------ attention

    def _fine_queries(self, queries, bank_k, bank_v, index, bias, bank_valid):
        """O(n log n): each fine block's m queries share one key set -- the fine band plus 2p (3p) slots per
        level -- so the whole layer is one fused attention call with a block-batched additive mask.

        ``queries`` (B, H_kv, n_fine, g, d) unscaled; ``index`` (blocks, S) into the banks; ``bias``
        (blocks, m, S). Returns (B, H_kv, n_fine, g, d).
        """
        batch, kv_heads, positions, heads, dim = queries.shape
        blocks, slots = index.shape
        rows = positions // blocks * heads  # the m positions x g heads of a block
        # The fused CPU kernel works in a (batch, length, heads, dim) layout, here (batch, rows or slots, blocks,
        # dim): build the operands in it and hand over transposed views, sparing the kernel its own copies.
        slot_major = index.t().flatten()
        keys = bank_k.index_select(2, slot_major).view(batch * kv_heads, slots, blocks, dim).transpose(1, 2)
        values = bank_v.index_select(2, slot_major).view(batch * kv_heads, slots, blocks, dim).transpose(1, 2)
        query_rows = (queries.unflatten(2, (blocks, -1)).permute(0, 1, 3, 4, 2, 5)
                      .reshape(batch * kv_heads, rows, blocks, dim).transpose(1, 2))
        mask = bias[:, :, None, :].expand(-1, -1, heads, -1).reshape(1, blocks, rows, slots)
        if bank_valid is not None:
            padding = torch.where(bank_valid[:, index], 0.0, MASK_VALUE).to(mask.dtype)  # (B, blocks, S)
            mask = mask + padding.repeat_interleave(kv_heads, 0)[:, :, None, :]
        out = F.scaled_dot_product_attention(query_rows, keys, values, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0, scale=dim ** -0.5)
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
            p = index.shape[1] // (2 if self.causal else 3)
            sub_window = self.group_width(level) // p
            if self.causal:
                level_queries = queries[:, :, ::sub_window]
            else:
                level_queries = queries.unflatten(2, (-1, sub_window)).mean(3)
            out, lse = self._attend_with_lse(level_queries, p, bank_k, bank_v, index, bias, bank_valid)
            if merged is not None:
                factor = resolution // sub_window
                merged = _merge(merged[0].repeat_interleave(factor, 2), merged[1].repeat_interleave(factor, 2),
                                lse, out)
            else:
                merged = (lse, out)
            resolution = sub_window
        index, bias = plans[0]
        out, lse = self._attend_with_lse(queries[:, :, :n_fine], self.block_size, bank_k, bank_v, index, bias,
                                         bank_valid)
        if merged is None:
            return out
        coarse_lse = merged[0].repeat_interleave(resolution, 2)[:, :, :n_fine]
        coarse_out = merged[1].repeat_interleave(resolution, 2)[:, :, :n_fine]
        return _merge(lse, out, coarse_lse, coarse_out)[1]

    # ------------------------------------------------------------------ incremental decoding (§8)

    def init_state(self, heads: int, kv_heads: int, dtype: torch.dtype, device=None) -> FMAState:
        """The state of an empty sequence: nothing consumed, every buffer zero. Half-precision inputs get a
        float32 state: partial sums add up thousands of shares."""
        if not self.causal:
            raise ValueError("incremental decoding needs a causal FastMultipoleAttention (causal=True)")
        dtype = _softmax_dtype(dtype)
        m, p, d, levels = self.block_size, self.coarse_tokens, self.head_dim, self.num_levels

        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return FMAState(0, zeros(kv_heads, 2 * m, d), zeros(kv_heads, 2 * m, d), zeros(levels, kv_heads, p, d),
                        zeros(levels, kv_heads, p, d), zeros(levels, kv_heads, 3, p, d),
                        zeros(levels, kv_heads, 3, p, d),
                        zeros(levels, heads, d) if self.query_mode == "coarse" else None)

    def prefill(self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> FMAState:
        """Consume tokens whose attention output was computed elsewhere (e.g. by :meth:`forward` over a whole
        prompt): ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) of one sequence. Only the tail the state keeps is
        summarised."""
        return self._advance(state, q, k, v, self._level_sums(state, k, v, tail_only=True))

    def step(self, state: FMAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[torch.Tensor, FMAState]:
        """Attend ``c`` new tokens of one sequence to its past and to each other, then consume them.

        ``q`` (H, c, d), ``k``/``v`` (H_kv, c, d) at positions ``state.length + [0, c)``. Returns the output
        (H, c, d) -- the same as rows ``length .. length+c-1`` of :meth:`forward` over the whole sequence (§8) --
        and the new state. ``c = 1`` is a decoding step; larger ``c`` is one chunk of a chunked prefill, whose
        cost grows like ``c * (c + 2m + 3pL)``.
        """
        if self.training and self.dropout:
            raise ValueError("FastMultipoleAttention.step runs without dropout: call .eval() first")
        dtype = _softmax_dtype(q.dtype)
        if q.shape[1] == 1:
            return self._decode_token(state, q.to(dtype), k.to(dtype), v.to(dtype), q.dtype)
        sums = self._level_sums(state, k.to(dtype), v.to(dtype), tail_only=False)
        out = self._attend_state(state, q.to(dtype), k.to(dtype), v.to(dtype), sums)
        return out.to(q.dtype), self._advance(state, q, k, v, sums)

    def _level_sums(self, state, k, v, tail_only):
        """Per level: summaries of the groups the new tokens complete, and the new partial sums.

        Partial sums take whole fine blocks only: the tokens of the block being filled wait in the fine ring until
        it completes (group widths are multiples of m, so no group can complete before its last block does). A
        decoding step thus touches the levels once every m tokens.

        Returns ``[(first_group, complete_k, complete_v, partial_k, partial_v)]`` with complete (H_kv, n, p, d)
        for groups ``first_group .. first_group+n-1`` (with ``tail_only`` at most the last three), or None when
        no fine block completes.
        """
        t, c, m = state.length, k.shape[1], self.block_size
        block_start, end = t // m * m, (t + c) // m * m  # shares are summed over positions [block_start, end)
        if end == block_start or not self.num_levels:
            return None
        waiting = torch.arange(block_start, t, device=k.device) % (2 * m)  # the block's earlier tokens, in the ring
        tokens = {"k": torch.cat([state.fine_k[:, waiting].to(k.dtype), k], 1)[:, :end - block_start],
                  "v": torch.cat([state.fine_v[:, waiting].to(v.dtype), v], 1)[:, :end - block_start]}
        sums = []
        for level in range(1, self.num_levels + 1):
            width = self.group_width(level)
            end_group = (t + c) // width  # groups before this one are complete after the chunk
            start = max(block_start, (end_group - 3) * width) if tail_only else block_start
            positions = torch.arange(start, end, device=k.device)
            first = start // width
            result = [first]
            for name, family in (("k", self.k_downsample), ("v", self.v_downsample)):
                x, partial = tokens[name][:, start - block_start:], getattr(state, f"partial_{name}")[level - 1]
                shares, bias = family(x, level=level, offsets=positions % width)  # (H_kv, c', p, d)
                group_sums = x.new_zeros(x.shape[0], (end - 1) // width - first + 1, shares.shape[-2], x.shape[-1])
                group_sums.index_add_(1, positions // width - first, shares)
                if first == t // width:  # the group being filled when the chunk began
                    group_sums[:, 0] += partial
                n_complete = end_group - first
                complete = group_sums[:, :n_complete] + bias
                new_partial = group_sums[:, n_complete] if end > end_group * width else torch.zeros_like(partial)
                result += [complete, new_partial]
            sums.append((result[0], result[1], result[3], result[2], result[4]))
        return sums

    def _advance(self, state, q, k, v, sums):
        t, c, m = state.length, k.shape[1], self.block_size
        keep = min(c, 2 * m)
        slots = torch.arange(t + c - keep, t + c, device=k.device) % (2 * m)
        updated = {"fine_k": state.fine_k.index_copy(1, slots, k[:, c - keep:].to(state.fine_k.dtype)),
                   "fine_v": state.fine_v.index_copy(1, slots, v[:, c - keep:].to(state.fine_v.dtype))}
        if sums is not None:
            parts = {name: [] for name in ("partial_k", "partial_v", "groups_k", "groups_v")}
            for level, (first, complete_k, complete_v, partial_k, partial_v) in enumerate(sums, start=1):
                n_complete = complete_k.shape[1]
                n_keep = min(n_complete, 3)
                ring = torch.arange(first + n_complete - n_keep, first + n_complete, device=k.device) % 3
                for name, complete in (("groups_k", complete_k), ("groups_v", complete_v)):
                    groups = getattr(state, name)[level - 1]
                    parts[name].append(groups.index_copy(1, ring, complete[:, n_complete - n_keep:].to(groups.dtype)))
                parts["partial_k"].append(partial_k)
                parts["partial_v"].append(partial_v)
            updated.update({name: torch.stack(values).to(getattr(state, name).dtype) for name, values in parts.items()})
        if state.level_queries is not None and self.num_levels:
            level_queries = []
            for level in range(1, self.num_levels + 1):
                sub_window = self.group_width(level) // self.coarse_tokens
                opener = (t + c - 1) // sub_window * sub_window  # first position of the last sub-window touched
                level_queries.append(q[:, opener - t] if opener >= t else state.level_queries[level - 1])
            updated["level_queries"] = torch.stack(level_queries).to(state.level_queries.dtype)
        return replace(state, length=t + c, **updated)

    def _attend_state(self, state, q, k, v, sums):
        """The §3/§4 partition for queries at ``t .. t+c-1`` over the state and the new tokens, one softmax."""
        heads, c, d = q.shape
        kv_heads, t, p = k.shape[0], state.length, self.coarse_tokens
        dtype = q.dtype
        i = torch.arange(t, t + c, device=q.device)  # query positions
        queries = (q * d ** -0.5).reshape(kv_heads, heads // kv_heads * c, d)  # rows: (g heads, c positions)

        new = [(k.new_zeros(kv_heads, 0, p, d), v.new_zeros(kv_heads, 0, p, d))] * self.num_levels \
            if sums is None else [level_sums[1:3] for level_sums in sums]  # groups the chunk completes
        keys, value_parts = [torch.cat([state.fine_k.to(dtype), k], 1)], [torch.cat([state.fine_v.to(dtype), v], 1)]
        logits = [queries @ keys[0].transpose(-1, -2)]
        for level, (complete_k, complete_v) in enumerate(new, start=1):
            level_keys = torch.cat([state.groups_k[level - 1].to(dtype), complete_k], 1).flatten(1, 2)
            value_parts.append(torch.cat([state.groups_v[level - 1].to(dtype), complete_v], 1).flatten(1, 2))
            level_q = queries
            if self.query_mode == "coarse":
                sub_window = self.group_width(level) // p
                opener = i // sub_window * sub_window
                fresh = q[:, (opener - t).clamp(min=0)]  # (H, c, d): the opener's query when it is new
                stored = state.level_queries[level - 1].to(dtype)[:, None].expand_as(fresh)
                level_q = torch.where((opener >= t)[None, :, None], fresh, stored) * d ** -0.5
                level_q = level_q.reshape(queries.shape)
            logits.append(level_q @ level_keys.transpose(-1, -2))
        if self.boundary == "zero_sink":
            logits.append(queries.new_zeros(kv_heads, queries.shape[1], 1))
            value_parts.append(v.new_zeros(kv_heads, 1, d))
        bias = torch.cat([self._fine_state_bias(t, c, dtype, q.device),
                          self._coarse_state_bias(t, c, [n.shape[1] for n, _ in new], dtype, q.device)], 1)
        logits = torch.cat(logits, -1).view(kv_heads, -1, c, bias.shape[-1]) + bias
        probs = torch.softmax(logits, -1).flatten(1, 2)  # (H_kv, g*c, S)
        return (probs @ torch.cat(value_parts, 1)).reshape(heads, c, d)

    def _fine_state_bias(self, t, c, dtype, device):
        """Level-0 bias (c, 2m + c) of queries at ``t .. t+c-1`` over [fine ring | the c new tokens]: ring slot s
        holds position (t-1) - ((t-1-s) mod 2m); query i sees [(floor(i/m)-1)m, i] (§3)."""
        m = self.block_size
        i = torch.arange(t, t + c, device=device)
        ring = torch.arange(2 * m, device=device)
        positions = torch.cat([(t - 1) - (t - 1 - ring) % (2 * m), i])
        use = (positions >= (i // m - 1)[:, None] * m) & (positions <= i[:, None]) & (positions >= 0)
        return _slot_bias(use, True, True, 0.0, False, dtype)

    def _coarse_state_bias(self, t, c, new_groups, dtype, device):
        """Coarse bias (c, S) of queries at ``t .. t+c-1`` over, per level l, its ring of three complete groups
        (slot u holds group (G-1) - ((G-1-u) mod 3), G = t // w_l) and the ``new_groups[l-1]`` groups the chunk
        completes, p slots each -- then, with ``boundary="zero_sink"``, one slot carrying the sinks (§3, §4)."""
        p = self.coarse_tokens
        i = torch.arange(t, t + c, device=device)
        parts = []
        sinks = (i < self.block_size).double() * self.block_size  # block -1 of the first block
        for level, n_new in enumerate(new_groups, start=1):
            width = self.group_width(level)
            last = t // width - 1  # newest group complete before the chunk
            ids = torch.cat([last - (last - torch.arange(3, device=device)) % 3,
                             t // width + torch.arange(n_new, device=device)])
            wanted, member = coarse_groups(i // width, causal=True)  # (c, 2)
            use = ((ids[None, :, None] == wanted[:, None, :]) & member[:, None, :]).any(-1)  # (c, slots)
            offset = math.log(width / p) if self.scale_attn else 0.0
            parts.append(_slot_bias(use, ids >= 0, True, offset, False, dtype).repeat_interleave(p, 1))
            sinks += p * (member & (wanted < 0)).sum(-1)
        if self.boundary == "zero_sink":
            parts.append(torch.where(sinks > 0, sinks.clamp(min=1).log(), MASK_VALUE).to(dtype)[:, None])
        return torch.cat(parts, 1) if parts else torch.zeros(c, 0, dtype=dtype, device=device)

    def _decode_bias(self, t, dtype, device):
        """The step bias of one token at position t (see :meth:`_attend_state`), cached: its fine part repeats
        with period 2m once t >= 2m, its coarse part is constant within a fine block."""
        m, cache = self.block_size, self._decode_bias_cache
        if len(cache) > 4096:  # one coarse entry per fine block of a long generation
            cache.clear()
        fine_key, coarse_key = ("fine", t % (2 * m), min(t // m, 2), dtype, device), ("coarse", t // m, dtype, device)
        if fine_key not in cache:
            cache[fine_key] = self._fine_state_bias(t, 1, dtype, device)[0]
        if coarse_key not in cache:
            cache[coarse_key] = self._coarse_state_bias(t, 1, [0] * self.num_levels, dtype, device)[0]
        return torch.cat([cache[fine_key], cache[coarse_key]])

    def _decode_token(self, state, q, k, v, out_dtype):
        """:meth:`step` for one token in about a dozen tensor operations: the token's own group is never
        complete, so it reads the fine ring, itself and the ring of complete groups (§8), with the cached slot
        bias of its position; the levels take new tokens once every m steps."""
        heads, _, d = q.shape
        kv_heads, t, m, p = k.shape[0], state.length, self.block_size, self.coarse_tokens
        levels, dtype, device = self.num_levels, q.dtype, q.device

        bias = self._decode_bias(t, dtype, device)
        keys = [state.fine_k.to(dtype), k, state.groups_k.to(dtype).transpose(0, 1).reshape(kv_heads, -1, d)]
        values = [state.fine_v.to(dtype), v, state.groups_v.to(dtype).transpose(0, 1).reshape(kv_heads, -1, d)]
        if self.boundary == "zero_sink":
            keys.append(k.new_zeros(kv_heads, 1, d))
            values.append(v.new_zeros(kv_heads, 1, d))

        queries = (q * d ** -0.5).reshape(kv_heads, heads // kv_heads, d)
        keys, values = torch.cat(keys, 1), torch.cat(values, 1)
        logits = queries @ keys.transpose(-1, -2)  # (H_kv, g, S): the g heads of a key/value head are rows
        if self.query_mode == "coarse" and levels:
            # the token opens its level-l sub-window of w_l / p tokens
            opens = [t % (self.group_width(level) // p) == 0 for level in range(1, levels + 1)]
            # Level l uses the query that opened the token's sub-window: this token's, or the stored one.
            level_queries = torch.stack([q[:, 0] if o else stored for o, stored in
                                         zip(opens, state.level_queries.to(dtype))]) * d ** -0.5  # (L, H, d)
            coarse_keys = state.groups_k.to(dtype).flatten(2, 3)  # (L, H_kv, 3p, d)
            coarse_logits = torch.einsum("lkgd,lksd->kgls", level_queries.view(levels, kv_heads, -1, d),
                                         coarse_keys).flatten(2)
            fine_slots = 2 * m + 1
            logits = torch.cat([logits[..., :fine_slots], coarse_logits, logits[..., fine_slots + levels * 3 * p:]],
                               -1)
        probs = torch.softmax(logits + bias, -1)
        out = (probs @ values).reshape(heads, 1, d)

        # Consume the token: the ring, and once every m tokens the levels (see _level_sums).
        return out.to(out_dtype), self._advance(state, q, k, v, self._level_sums(state, k, v, tail_only=True))
