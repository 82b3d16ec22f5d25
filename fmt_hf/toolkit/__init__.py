"""The toolkit around the model: registry corpora (`data`), tokenizers (`tokenizer`), the command-line arguments
(`arguments`), the bits-per-byte and accuracy metrics with the Trainer's use of them (`metrics`), training
(`training`), evaluation (`evaluation`), model cards and Hub pushes (`hub`) with what runs record for them
(`records`), the conversion of pretrained Llama-family checkpoints (`convert`), the long-context tasks
(`long_context`, run by `long_context_eval`, summarised by `long_context_report`), serving (`serve`) and the main
demo (`demo`, behind `make demo`).

It is not part of any checkpoint and may use `datasets`, `evaluate` and the rest of the ecosystem; importing
`fmt_hf` alone does not load it.
"""
