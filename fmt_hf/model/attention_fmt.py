"""The attention functions FMT layers dispatch to by `config._attn_implementation`: `"eager"` (dense, plain
PyTorch) and `"fma"` (the layer's own `FastMultipoleAttention`), registered with transformers' `AttentionInterface`;
`"sdpa"` is transformers' own.
"""

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging

from .fma_options import FMA_ATTN_IMPLEMENTATION

logger = logging.get_logger(__name__)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq_len, head_dim) -> (batch, kv_heads * n_rep, seq_len, head_dim), each head repeated."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in plain PyTorch (`attn_implementation="eager"`); also returns the attention weights."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    # At least float32 for the softmax (as Llama), without rounding float64 inputs down to it.
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def fma_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, None]:
    """Fast Multipole Attention (`attn_implementation="fma"`) through the calling layer's `module.fma`.

    `attention_mask` is the 2D (batch, seq_len) boolean key padding mask (True = real token) or None. `scaling`
    and `dropout` are not used: FMA applies `1/sqrt(head_dim)` itself and owns its dropout (active in training
    mode only), both set from the same config as the dense path's.
    """
    is_causal = kwargs.get("is_causal")
    if is_causal is not None and is_causal != module.fma.causal:
        raise ValueError(
            f"This FMA layer was built {'causal' if module.fma.causal else 'bidirectional'} (config.is_causal="
            f"{module.fma.causal}) and cannot switch per call; got is_causal={is_causal}. Build the model with the "
            "other mode, or use a dense attn_implementation (`sdpa`, `eager`)."
        )
    if kwargs.get("output_attentions", False):
        logger.warning_once(
            "FMA does not compute attention weights (it never forms the n x n matrix): `attentions` stays empty. "
            'Load the model with attn_implementation="eager" to get them.'
        )
    attn_output = module.fma(query, key, value, key_padding_mask=attention_mask)
    return attn_output.transpose(1, 2), None


# Registered globally so that `attn_implementation="fma"` passes transformers' validity checks; the function only
# runs inside FMT layers, the only modules with an `fma` attribute.
AttentionInterface.register(FMA_ATTN_IMPLEMENTATION, fma_attention_forward)


__all__ = ["eager_attention_forward", "fma_attention_forward", "repeat_kv"]
