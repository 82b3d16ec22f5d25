"""The code that ships inside every FMT checkpoint: configuration, modeling, cache and the FMA modules.

Plain torch + transformers, flat sibling modules importing each other with single-dot relative imports: that is
what `save_pretrained` copies next to the weights as Hub custom code (`trust_remote_code=True`).
"""

from .cache_fmt import FMTCache, FMTCacheLayer, is_fmt_cache
from .configuration_fmt import FMTConfig
from .fma_attention import FastMultipoleAttention
from .fma_state import FMAState
from .modeling_fmt import (
    FMTForCausalLM,
    FMTForMaskedLM,
    FMTForQuestionAnswering,
    FMTForSequenceClassification,
    FMTForTokenClassification,
    FMTModel,
    FMTPreTrainedModel,
)

__all__ = [
    "FMAState",
    "FMTCache",
    "FMTCacheLayer",
    "FMTConfig",
    "FMTForCausalLM",
    "FMTForMaskedLM",
    "FMTForQuestionAnswering",
    "FMTForSequenceClassification",
    "FMTForTokenClassification",
    "FMTModel",
    "FMTPreTrainedModel",
    "FastMultipoleAttention",
    "is_fmt_cache",
]
