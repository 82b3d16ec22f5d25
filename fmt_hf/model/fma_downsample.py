"""The downsampler families of Fast Multipole Attention: how a group of tokens becomes ``p`` coarse summaries
(docs/fma.md §2).

Every family serves two callers: the forward pass (all levels of a whole sequence at once) and incremental
decoding. ``depthwise`` and ``full`` give decoding one level's contributions of a few whole fine blocks at known
offsets in their groups (a summary is the sum of its blocks' contributions plus a bias); the length-free families
give it ``combine`` instead. Both go through ``forward`` so that module hooks (e.g. accelerate's offloading) see
every use of the weights.

``depthwise`` and ``full`` hold weights per level, so they are built for a fixed number of levels (a longest
sequence); ``recursive`` and ``avgpool`` are *length-free* (§7a): any number of levels from the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DOWNSAMPLE_MODES = ("depthwise", "full", "avgpool", "recursive")
# Families whose parameters do not depend on the number of levels: they serve any sequence length (§7a).
LENGTH_FREE_MODES = ("recursive", "avgpool")


def without_sinks(tokens: torch.Tensor, first: int, sink_tokens: int, dim: int = 1) -> torch.Tensor:
    """``tokens`` of consecutive positions ``first ..`` along ``dim`` with the sink tokens (positions below
    ``sink_tokens``) zeroed: what the downsamplers read (§3a). ``tokens`` itself when it holds none."""
    cut = min(sink_tokens - first, tokens.shape[dim])
    if cut <= 0:
        return tokens
    rest = tokens.narrow(dim, cut, tokens.shape[dim] - cut)
    return torch.cat([torch.zeros_like(tokens.narrow(dim, 0, cut)), rest], dim)


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

    def forward(
        self,
        x: torch.Tensor,
        levels: int | None = None,
        *,
        level: int | None = None,
        offsets: torch.Tensor | None = None,
    ):
        """Summaries of levels ``1..levels``: ``x`` (..., n, d), n a multiple of the widest group used -> per level
        (..., n // w_l, p, d).

        The incremental-decoding state (§8) sums summaries fine block by fine block instead -- a summary is the sum
        of its blocks' contributions plus a bias: with ``level`` and ``offsets``, the level-``level`` contributions
        of the whole fine blocks of tokens ``x`` (..., c, d), c a multiple of m, sitting at ``offsets`` (c,) within
        their groups -> ``(block sums (..., c // m, p, d), bias (p, d))``, contracted without forming per-token
        shares. Both go through ``forward`` so that module hooks (e.g. accelerate's offloading) see every use of
        the weights.
        """
        if offsets is not None:
            weight = getattr(self, f"weight_{level}")[:, :, offsets].to(x.dtype)  # (d, p, c)
            blocks, weight = x.unflatten(-2, (-1, self.widths[0])), weight.unflatten(-1, (-1, self.widths[0]))
            return (torch.einsum("...btc,crbt->...brc", blocks, weight), getattr(self, f"bias_{level}").t().to(x.dtype))
        if levels == 0:
            return []
        # One channel-major copy serves every level: there each group is a contiguous run of w_l values, so a
        # level is a single batched matmul over channels, (groups, w_l) @ (w_l, p), on a view.
        channels = x.movedim(-1, 0).contiguous()  # (d, ..., n)
        weights = [w.to(x.dtype) for w in self.weights[:levels]]
        coarse = _DepthwiseLevels.apply(channels, *weights)
        return [
            c.view(channels.shape[:-1] + (-1, self.coarse_tokens)).movedim(0, -1) + b.t().to(x.dtype)
            for c, b in zip(coarse, self.biases)
        ]


class _DepthwiseLevels(torch.autograd.Function):
    """All levels of :class:`DepthwiseDownsample` (level 1 of :class:`RecursiveDownsample`) on one channel-major
    tensor (d, ..., n).

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

    def forward(
        self,
        x: torch.Tensor,
        levels: int | None = None,
        *,
        level: int | None = None,
        offsets: torch.Tensor | None = None,
    ):
        """As :meth:`DepthwiseDownsample.forward`."""
        if offsets is not None:
            weight = getattr(self, f"weight_{level}")[..., offsets].to(x.dtype)  # (d_out, p, d_in, c)
            blocks, weight = x.unflatten(-2, (-1, self.widths[0])), weight.unflatten(-1, (-1, self.widths[0]))
            return (
                torch.einsum("...btk,orkbt->...bro", blocks, weight),
                getattr(self, f"bias_{level}").t().to(x.dtype),
            )
        d = x.shape[-1]
        out = []
        for width, weight, bias in zip(self.widths[:levels], self.weights, self.biases):
            # (groups, w_l * d) @ (w_l * d, p * d): one dense matmul per level
            matrix = weight.to(x.dtype).permute(3, 2, 1, 0).reshape(width * d, -1)
            coarse = (x.unflatten(-2, (-1, width)).flatten(-2) @ matrix).unflatten(-1, (self.coarse_tokens, d))
            out.append(coarse + bias.t().to(x.dtype))
        return out


class _LengthFree(nn.Module):
    """A length-free family (§7a): level l groups ``w_l = m * 2**(l-1)`` tokens for any l, and a level-(l+1) group
    is a function of its two level-l children alone, so a state can build a new level from stored children:
    decoding summarises each completed fine block with ``forward(x, 1)`` and derives every higher level with
    :meth:`combine` (``derives_levels``) instead of summing per-token shares."""

    derives_levels = True

    def __init__(self, block_size: int, coarse_tokens: int):
        super().__init__()
        self.block_size, self.coarse_tokens = block_size, coarse_tokens

    def combine(self, children: torch.Tensor) -> torch.Tensor:
        """The level-(l+1) summaries (..., p, d) of a group from the ``2p`` level-l summaries of its two children,
        ``children`` (..., 2p, d), the first child's ``p`` first (bias included). Through ``forward``, so that
        module hooks see the weights."""
        return self(children, combine=True)


class AvgPoolDownsample(_LengthFree):
    """Parameter-free: the mean of each of the ``p`` consecutive sub-windows of a group (§2)."""

    def forward(self, x: torch.Tensor, levels: int | None = None, *, combine: bool = False):
        """Summaries of levels ``1..levels`` as :meth:`DepthwiseDownsample.forward`; with ``combine``, as
        :meth:`combine`."""
        p = self.coarse_tokens
        if combine:
            # A parent's sub-window r is its children's (equal-sized) sub-windows 2r and 2r + 1.
            return x.unflatten(-2, (p, 2)).mean(-2)
        widths = [self.block_size << shift for shift in range(levels)]  # w_1 .. w_levels
        return [x.unflatten(-2, (-1, p, width // p)).mean(-2) for width in widths]


class RecursiveDownsample(_LengthFree):
    """Learned and length-free (§7a): level 1 as :class:`DepthwiseDownsample`, every higher level from the one below.

    ``K~_1[g, r, c] = sum_{t<m} W[c, r, t] K[g*m + t, c] + b[c, r]`` and, for l >= 1,
    ``K~_{l+1}[g, r, c] = sum_{t<2p} U[c, r, t] K~_l[2g + t//p, t%p, c] + b'[c, r]``: one depthwise map of the two
    children's ``2p`` summaries to ``p``, shared by all levels >= 2. Parameters ``weight`` W (d, p, m), ``bias`` b
    (d, p), ``combine_weight`` U (d, p, 2p) and ``combine_bias`` b' (d, p): ``p * d * (m + 2p + 2)`` whatever the
    length. Average init (W sub-window means, U the mean of children summaries 2r and 2r + 1, biases 0) makes an
    untrained module equal :class:`AvgPoolDownsample` at every level.
    """

    def __init__(self, head_dim: int, block_size: int, coarse_tokens: int):
        super().__init__(block_size, coarse_tokens)
        self.weight = nn.Parameter(torch.empty(head_dim, coarse_tokens, block_size))
        self.bias = nn.Parameter(torch.empty(head_dim, coarse_tokens))
        self.combine_weight = nn.Parameter(torch.empty(head_dim, coarse_tokens, 2 * coarse_tokens))
        self.combine_bias = nn.Parameter(torch.empty(head_dim, coarse_tokens))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(average_weights(self.block_size, self.coarse_tokens).expand_as(self.weight))
            # pairs of children summaries (2r, 2r + 1) are averaged: the sub-window means of the parent
            self.combine_weight.copy_(
                average_weights(2 * self.coarse_tokens, self.coarse_tokens).expand_as(self.combine_weight)
            )
            self.bias.zero_()
            self.combine_bias.zero_()

    def forward(self, x: torch.Tensor, levels: int | None = None, *, combine: bool = False):
        """Summaries of levels ``1..levels`` as :meth:`DepthwiseDownsample.forward`, any number of levels; with
        ``combine``, as :meth:`combine`."""
        p, d = self.coarse_tokens, x.shape[-1]
        if combine:
            channels = x.movedim(-1, 0)  # (d, ..., 2p)
            parents = self._combine(channels.reshape(d, -1, 2 * p))
            return parents.view(channels.shape[:-1] + (p,)).movedim(0, -1)
        if not levels:
            return []
        # Level 1 is the depthwise path (one pass over the fine tokens). Every level is then kept channel-major and
        # contiguous, (d, groups over the batch, p): there a group's two children are one row of 2p, so each higher
        # level is a single batched matmul over channels, (groups / 2, 2p) @ (2p, p), on a view. Returning views
        # of these tensors makes the gradients that come back contiguous too (the view's backward reshapes), so
        # every backward matmul is a plain strided-batched GEMM rather than a loop over channels.
        channels = x.movedim(-1, 0).contiguous()  # (d, ..., n)
        (coarse,) = _DepthwiseLevels.apply(channels, self.weight.to(x.dtype))
        summaries = coarse + self.bias.to(x.dtype).unsqueeze(1)  # (d, groups, p)
        out = [summaries.view(channels.shape[:-1] + (-1, p)).movedim(0, -1)]
        for _ in range(1, levels):
            summaries = self._combine(summaries.view(d, -1, 2 * p))
            out.append(summaries.view(channels.shape[:-1] + (-1, p)).movedim(0, -1))
        return out

    def _combine(self, children):
        """Parents (d, groups, p) of children summaries (d, groups, 2p), channel-major: the first child's p, then
        the second's, in each row."""
        weight, bias = self.combine_weight.to(children.dtype), self.combine_bias.to(children.dtype)
        return torch.baddbmm(bias.unsqueeze(1), children, weight.transpose(1, 2))


def make_downsampler(family: str, head_dim: int, block_size: int, levels: int | None, coarse_tokens: int) -> nn.Module:
    """A downsampler of the given family (one of :data:`DOWNSAMPLE_MODES`) for groups of ``block_size * 2**(l-1)``
    tokens at levels ``l = 1..levels``; ``levels`` is ignored (may be None) for the length-free families."""
    if family == "avgpool":
        return AvgPoolDownsample(block_size, coarse_tokens)
    if family == "recursive":
        return RecursiveDownsample(head_dim, block_size, coarse_tokens)
    widths = [block_size << (level - 1) for level in range(1, levels + 1)]
    if family == "depthwise":
        return DepthwiseDownsample(head_dim, widths, coarse_tokens)
    if family == "full":
        return FullDownsample(head_dim, widths, coarse_tokens)
    raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {family!r}")
