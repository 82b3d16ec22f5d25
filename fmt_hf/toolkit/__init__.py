"""The toolkit around the model: registry corpora (`data`), tokenizers (`tokenizer`), the bits-per-byte metric
(`metrics`), training (`training`), evaluation (`evaluation`) and model cards and Hub pushes (`hub`).

It is not part of any checkpoint and may use `datasets`, `evaluate` and the rest of the ecosystem; importing
`fmt_hf` alone does not load it.
"""
