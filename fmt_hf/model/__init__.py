"""The code that ships inside every FMT checkpoint: configuration, modeling, cache and the FMA modules.

Plain torch + transformers, flat sibling modules importing each other with single-dot relative imports: that is
what `save_pretrained` copies next to the weights as Hub custom code (`trust_remote_code=True`).
"""

from . import configuration_fmt, modeling_fmt
from .cache_fmt import FMTCache, FMTCacheLayer, is_fmt_cache
from .configuration_fmt import *  # noqa: F403 -- FMTConfig
from .fma_attention import FastMultipoleAttention
from .fma_state import FMAState
from .modeling_fmt import *  # noqa: F403 -- FMTPreTrainedModel and the class of every Auto class (auto_fmt.py)

__all__ = [
    "FMAState",
    "FMTCache",
    "FMTCacheLayer",
    "FastMultipoleAttention",
    "is_fmt_cache",
    *configuration_fmt.__all__,
    *modeling_fmt.__all__,
]
