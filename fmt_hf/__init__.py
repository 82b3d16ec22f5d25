"""fmt_hf: the Fast Multipole Transformer for Hugging Face.

Importing the package registers FMT with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForMaskedLM`) under the model type ``"fmt"``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .configuration_fmt import FMTConfig
from .fma import FastMultipoleAttention
from .modeling_fmt import FMTForCausalLM, FMTForMaskedLM, FMTModel, FMTPreTrainedModel

AutoConfig.register(FMTConfig.model_type, FMTConfig)
AutoModel.register(FMTConfig, FMTModel)
AutoModelForCausalLM.register(FMTConfig, FMTForCausalLM)
AutoModelForMaskedLM.register(FMTConfig, FMTForMaskedLM)

__all__ = [
    "FastMultipoleAttention",
    "FMTConfig",
    "FMTModel",
    "FMTForCausalLM",
    "FMTForMaskedLM",
    "FMTPreTrainedModel",
]
__version__ = "0.1.0"
