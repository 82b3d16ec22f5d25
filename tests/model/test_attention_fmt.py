"""attention_fmt.py: the attention functions FMT layers dispatch to."""

import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fmt_hf import FastMultipoleAttention
from fmt_hf.model.attention_fmt import eager_attention_forward, fma_attention_forward


def layer(causal=True):
    module = nn.Module()
    module.num_key_value_groups, module.fma = (
        2,
        FastMultipoleAttention(8, 64, block_size=4, coarse_tokens=2, causal=causal),
    )
    return module.double().eval()


def test_fma_is_registered_and_equals_dense_attention_within_two_blocks():
    assert ALL_ATTENTION_FUNCTIONS["fma"] is fma_attention_forward
    q, k, v = torch.randn(1, 4, 8, 8, dtype=torch.float64), *torch.randn(2, 1, 2, 8, 8, dtype=torch.float64)
    causal = torch.full((8, 8), float("-inf"), dtype=torch.float64).triu(1)
    dense, weights = eager_attention_forward(layer(), q, k, v, causal, scaling=8**-0.5)
    assert dense.dtype == torch.float64 and weights.shape == (1, 4, 8, 8)  # float64 is not rounded to float32
    fma, none = fma_attention_forward(layer(), q, k, v, None)
    assert none is None
    torch.testing.assert_close(fma, dense, rtol=0, atol=1e-12)


def test_fma_layers_refuse_switching_causality_per_call():
    q = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="built causal"):
        fma_attention_forward(layer(), q, q, q, None, is_causal=False)
