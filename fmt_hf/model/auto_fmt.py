"""FMT's Auto classes, listed once, and what registering them takes in process and as Hub custom code.

`FMT_MODEL_CLASSES` is the table: the checkpoints' `auto_map` (`FMT_AUTO_MAP`), the classes marked for Hub code
(`register_for_auto_classes`), the in-process registration done by `import fmt_hf` (`register_auto_classes`) and
the package's exports all derive from it.
"""

import transformers

# Auto class -> the `modeling_fmt.py` class it builds for an FMT config.
FMT_MODEL_CLASSES = {
    "AutoModel": "FMTModel",
    "AutoModelForCausalLM": "FMTForCausalLM",
    "AutoModelForMaskedLM": "FMTForMaskedLM",
    "AutoModelForSequenceClassification": "FMTForSequenceClassification",
    "AutoModelForTokenClassification": "FMTForTokenClassification",
    "AutoModelForQuestionAnswering": "FMTForQuestionAnswering",
}

# Every FMT checkpoint names the code of every Auto class FMT serves, whichever class saved it, so that any of them
# can open it with `trust_remote_code=True` (`save_pretrained` alone records only the saved class). The module
# names are those of the flat files `save_pretrained` copies next to the weights.
FMT_AUTO_MAP = {
    "AutoConfig": "configuration_fmt.FMTConfig",
    **{auto_class: f"modeling_fmt.{name}" for auto_class, name in FMT_MODEL_CLASSES.items()},
}


def register_for_auto_classes(model_classes: dict[str, type]) -> None:
    """Marks each class of `FMT_MODEL_CLASSES` (found by name in `model_classes`) for its Auto class, so that saving
    it copies its module and the modules that imports next to the weights (Hub custom code)."""
    for auto_class, name in FMT_MODEL_CLASSES.items():
        model_classes[name].register_for_auto_class(auto_class)


def register_auto_classes(config_class: type, model_classes: dict[str, type]) -> None:
    """Registers FMT with transformers' Auto classes in this process, under `config_class.model_type`."""
    transformers.AutoConfig.register(config_class.model_type, config_class)
    for auto_class, name in FMT_MODEL_CLASSES.items():
        getattr(transformers, auto_class).register(config_class, model_classes[name])


def make_base_model_resolvable(config_class: type, base_model_class: type) -> None:
    """Lets `AutoModel.from_config` -- with which transformers' generic task heads build their stack -- resolve
    `config_class` to `base_model_class` without asking for `trust_remote_code` again.

    Needed for Hub code: transformers loads `configuration_fmt.py` alone for the config and again next to
    `modeling_fmt.py` for the model, so the config a head receives is an `FMTConfig` class AutoModel knows only
    through `auto_map`. It is registered as `from_pretrained` registers the remote classes it loads, never over an
    existing entry (such as the installed package's)."""
    if config_class not in transformers.AutoModel._model_mapping:
        transformers.AutoModel.register(config_class, base_model_class)


__all__ = ["FMT_AUTO_MAP", "FMT_MODEL_CLASSES"]
