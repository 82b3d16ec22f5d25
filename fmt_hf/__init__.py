"""fmt_hf: the Fast Multipole Transformer for Hugging Face.

Importing the package registers FMT with every transformers Auto class it serves (`AutoConfig` and those of
`fmt_hf.model.auto_fmt.FMT_MODEL_CLASSES`) under the model type ``"fmt"``. It loads only the model code
(`fmt_hf.model`: torch + transformers); the toolkit names below (`build_corpus`, `byte_tokenizer`,
`convert_llama_to_fmt`, ...) import `fmt_hf.toolkit` -- and with it `datasets` and `evaluate` -- on first use.
"""

import importlib

from . import model
from .model import *  # noqa: F403 -- the model classes, the config, the cache and the FMA modules
from .model.auto_fmt import register_auto_classes

__version__ = "0.1.0"

register_auto_classes(model.FMTConfig, vars(model))

# Toolkit names, imported lazily (PEP 562): name -> module under fmt_hf.toolkit.
_TOOLKIT = {
    "CORPORA": "data",
    "build_corpus": "data",
    "convert_llama_to_fmt": "convert",
    "load_corpus": "data",
    "pack_documents": "data",
    "ACCURACY": "metrics",
    "LM_BITS": "metrics",
    "LM_EVAL_TASKS": "evaluation",
    "byte_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}


def __getattr__(name):
    if name in _TOOLKIT:
        return getattr(importlib.import_module(f".toolkit.{_TOOLKIT[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*model.__all__, *_TOOLKIT]
