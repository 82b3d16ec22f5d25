"""Shared helpers of the tests, imported as `helpers.<module>` (setup.cfg puts tests/ on the import path).

fma: small float64 FMA layers, random q/k/v and decoding drivers; reference: the plain loop-based float64 FMA of
docs/fma.md; models: tiny FMT and Llama models and token ids; lm: the scripts, tiny real documents and command
lines; transformers_common: transformers' common model tests, fetched from its sdist.
"""
