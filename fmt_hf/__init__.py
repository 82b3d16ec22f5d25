"""fmt_hf: the Fast Multipole Transformer for Hugging Face.

Importing the package registers FMT with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForMaskedLM`) under the model type ``"fmt"``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .cache_fmt import FMTCache
from .configuration_fmt import FMTConfig
from .data import CORPORA, build_corpus, load_corpus, pack_documents
from .fma import FastMultipoleAttention
from .metrics import LM_BITS
from .modeling_fmt import FMTForCausalLM, FMTForMaskedLM, FMTModel, FMTPreTrainedModel
from .tokenizer import byte_tokenizer, load_tokenizer

AutoConfig.register(FMTConfig.model_type, FMTConfig)
AutoModel.register(FMTConfig, FMTModel)
AutoModelForCausalLM.register(FMTConfig, FMTForCausalLM)
AutoModelForMaskedLM.register(FMTConfig, FMTForMaskedLM)

__all__ = [
    "CORPORA",
    "LM_BITS",
    "FastMultipoleAttention",
    "FMTCache",
    "FMTConfig",
    "FMTModel",
    "FMTForCausalLM",
    "FMTForMaskedLM",
    "FMTPreTrainedModel",
    "build_corpus",
    "byte_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "pack_documents",
]
__version__ = "0.1.0"
