"""The toolkit around the model: registry corpora (`data`), tokenizers (`tokenizer`), the bits-per-byte metric
(`metrics`), training (`training`), evaluation (`evaluation`), model cards and Hub pushes (`hub`) and the
conversion of pretrained Llama-family checkpoints (`convert`).

It is not part of any checkpoint and may use `datasets`, `evaluate` and the rest of the ecosystem; importing
`fmt_hf` alone does not load it.
"""
