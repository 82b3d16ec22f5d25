"""The toolkit around the model: registry corpora (`data`), tokenizers (`tokenizer`), the bits-per-byte metric
(`metrics`), training (`training`), evaluation (`evaluation`), model cards and Hub pushes (`hub`), the
conversion of pretrained Llama-family checkpoints (`convert`) and the long-context tasks (`long_context`, run by
`long_context_eval`).

It is not part of any checkpoint and may use `datasets`, `evaluate` and the rest of the ecosystem; importing
`fmt_hf` alone does not load it.
"""
