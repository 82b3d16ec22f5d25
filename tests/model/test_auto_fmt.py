"""auto_fmt.py: the one table of FMT's Auto classes, and everything derived from it."""

import pathlib

import transformers
from setuptools.config.setupcfg import read_configuration

import fmt_hf
from fmt_hf.model import modeling_fmt
from fmt_hf.model.auto_fmt import FMT_AUTO_MAP, FMT_MODEL_CLASSES
from fmt_hf.model.configuration_fmt import FMTConfig


def test_every_auto_class_is_in_the_auto_map_registered_and_exported():
    assert FMT_AUTO_MAP == {
        "AutoConfig": "configuration_fmt.FMTConfig",
        **{auto_class: f"modeling_fmt.{name}" for auto_class, name in FMT_MODEL_CLASSES.items()},
    }
    config = FMTConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=64)
    assert type(transformers.AutoConfig.for_model("fmt")) is FMTConfig
    for auto_class, name in FMT_MODEL_CLASSES.items():
        model_class = getattr(modeling_fmt, name)
        assert model_class._auto_class == auto_class  # saving it copies the Hub code
        assert type(getattr(transformers, auto_class).from_config(config)) is model_class
        assert getattr(fmt_hf, name) is model_class and name in fmt_hf.__all__ and name in modeling_fmt.__all__


def test_the_version_is_stated_once():
    setup_cfg = pathlib.Path(__file__).resolve().parents[2] / "setup.cfg"
    assert "version = attr: fmt_hf.__version__" in setup_cfg.read_text()  # read, not restated
    assert read_configuration(setup_cfg)["metadata"]["version"] == fmt_hf.__version__
