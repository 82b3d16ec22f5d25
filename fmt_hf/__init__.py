"""fmt_hf: the Fast Multipole Transformer for Hugging Face.

Importing the package registers FMT with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForMaskedLM`, `AutoModelForSequenceClassification`,
`AutoModelForTokenClassification`, `AutoModelForQuestionAnswering`) under the model type ``"fmt"``. It loads only
the model code (`fmt_hf.model`: torch + transformers); the toolkit names below (`build_corpus`, `byte_tokenizer`,
`convert_llama_to_fmt`, ...) import `fmt_hf.toolkit` -- and with it `datasets` and `evaluate` -- on first use.
"""

import importlib

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .model import (
    FastMultipoleAttention,
    FMAState,
    FMTCache,
    FMTConfig,
    FMTForCausalLM,
    FMTForMaskedLM,
    FMTForQuestionAnswering,
    FMTForSequenceClassification,
    FMTForTokenClassification,
    FMTModel,
    FMTPreTrainedModel,
)

AutoConfig.register(FMTConfig.model_type, FMTConfig)
AutoModel.register(FMTConfig, FMTModel)
AutoModelForCausalLM.register(FMTConfig, FMTForCausalLM)
AutoModelForMaskedLM.register(FMTConfig, FMTForMaskedLM)
AutoModelForSequenceClassification.register(FMTConfig, FMTForSequenceClassification)
AutoModelForTokenClassification.register(FMTConfig, FMTForTokenClassification)
AutoModelForQuestionAnswering.register(FMTConfig, FMTForQuestionAnswering)

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


__all__ = [
    "FMAState",
    "FastMultipoleAttention",
    "FMTCache",
    "FMTConfig",
    "FMTModel",
    "FMTForCausalLM",
    "FMTForMaskedLM",
    "FMTForSequenceClassification",
    "FMTForTokenClassification",
    "FMTForQuestionAnswering",
    "FMTPreTrainedModel",
    *_TOOLKIT,
]
__version__ = "0.1.0"
