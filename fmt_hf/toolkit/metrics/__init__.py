"""``evaluate`` metric modules shipped inside ``fmt_hf`` (the Hub's metric scripts cannot be fetched offline).

Load one with ``evaluate.load(LM_BITS)``.
"""

from pathlib import Path

LM_BITS: str = str(Path(__file__).parent / "lm_bits")
"""Folder of the ``lm_bits`` metric (bits per byte, bits per token, perplexity from summed NLL)."""

__all__ = ["LM_BITS"]
