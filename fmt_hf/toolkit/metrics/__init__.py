"""``evaluate`` metric modules shipped inside ``fmt_hf`` (the Hub's metric scripts cannot be fetched offline).

Load one with ``evaluate.load(LM_BITS)`` or ``evaluate.load(ACCURACY)``; :mod:`.trainer_metrics` wraps them as
the ``Trainer``'s metrics.
"""

from pathlib import Path

LM_BITS: str = str(Path(__file__).parent / "lm_bits")
"""Folder of the ``lm_bits`` metric (bits per byte, bits per token, perplexity from summed NLL)."""

ACCURACY: str = str(Path(__file__).parent / "accuracy")
"""Folder of the ``accuracy`` metric (fraction of correct predictions; the Hub's ``accuracy`` offline)."""

__all__ = ["ACCURACY", "LM_BITS"]
