"""fmt_hf: the Fast Multipole Transformer for Hugging Face."""

from .fma import FastMultipoleAttention

__all__ = ["FastMultipoleAttention"]
__version__ = "0.1.0"
