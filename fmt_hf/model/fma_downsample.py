"""The downsampler families of Fast Multipole Attention: how a group of tokens becomes ``p`` coarse summaries
(docs/fma.md §2).

Every family serves two callers: the forward pass (all levels of a whole sequence at once) and incremental
decoding (one level's *shares* of a few tokens at known offsets in their groups: a summary is the sum of its
tokens' shares plus a bias). Both go through ``forward`` so that module hooks (e.g. accelerate's offloading) see
every use of the weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DOWNSAMPLE_MODES = ("depthwise", "full", "avgpool")


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
    """Parameter-free: the mean of each of the ``p`` consecutive sub-windows of a group (§2).

    A level-(l+1) summary is also the mean of two level-l summaries (its sub-window is theirs, side by side), so
    decoding builds the levels above the first from each other (:meth:`combine`, ``derives_levels``) as for the
    recursive family (§7a).
    """

    derives_levels = True

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

    def combine(self, children: torch.Tensor) -> torch.Tensor:
        """A parent's ``p`` summaries from the ``2p`` of its two children, (..., 2p, d) -> (..., p, d): summary r
        is the mean of children's summaries 2r and 2r + 1."""
        return children.unflatten(-2, (self.coarse_tokens, 2)).mean(-2)


def make_downsampler(family: str, head_dim: int, widths: list[int], coarse_tokens: int) -> nn.Module:
    """A downsampler of the given family (one of :data:`DOWNSAMPLE_MODES`) for groups of the given widths."""
    if family == "avgpool":
        return AvgPoolDownsample(widths, coarse_tokens)
    if family == "depthwise":
        return DepthwiseDownsample(head_dim, widths, coarse_tokens)
    if family == "full":
        return FullDownsample(head_dim, widths, coarse_tokens)
    raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {family!r}")
