"""FMTConfig: defaults, serialisation, Auto registration and every validation error."""

import dataclasses
import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

import fmt_hf
from fmt_hf import FMTConfig
from fmt_hf.model.configuration_fmt import FMT_AUTO_MAP, FMT_ROPE_TYPES

# Field names are an interface (other issues and users rely on them): exactly these, in this spelling.
ISSUE_FIELDS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
    "max_position_embeddings rope_theta rms_norm_eps hidden_act attention_dropout initializer_range "
    "tie_word_embeddings use_cache pad_token_id bos_token_id eos_token_id fma_block_size fma_coarse_tokens "
    "fma_downsample fma_query_mode fma_scale_attn fma_boundary"
).split()


def test_fields_and_defaults():
    config = FMTConfig()
    assert config.model_type == "fmt"
    for name in ISSUE_FIELDS + ["is_causal"]:
        assert hasattr(config, name), name
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.is_causal is True
    assert config.tie_word_embeddings is False
    assert (config.fma_downsample, config.fma_query_mode, config.fma_boundary) == ("depthwise", "fine", "mask")
    assert config.fma_sink_tokens == 0  # plain FMA
    assert config.fma_near_blocks == 1  # the paper's partition
    assert config.auto_map == FMT_AUTO_MAP


def test_docstring_documents_every_field():
    own_fields = {f.name for f in dataclasses.fields(FMTConfig)} - {
        f.name for f in dataclasses.fields(fmt_hf.model.configuration_fmt.PreTrainedConfig)
    }
    assert set(ISSUE_FIELDS) <= own_fields
    for name in own_fields:
        assert f"    {name} (`" in FMTConfig.__doc__, f"field {name} is not documented"
    # The cost that grows with the context length is spelled out.
    assert "max_position_embeddings" in FMTConfig.__doc__.split("fma_downsample (`")[1].split("fma_query_mode")[0]


def test_recursive_downsample_is_a_documented_choice(tmp_path):
    config = FMTConfig(fma_downsample="recursive", max_position_embeddings=1024)
    config.save_pretrained(tmp_path)
    assert FMTConfig.from_pretrained(tmp_path).fma_downsample == "recursive"
    entry = FMTConfig.__doc__.split("fma_downsample (`")[1].split("fma_query_mode")[0]
    assert '"recursive"' in entry and "p*d*2p + p*d" in entry and "independent of" in entry


def test_explicit_head_dim_and_kv_heads_are_kept():
    config = FMTConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert (config.head_dim, config.num_key_value_heads) == (32, 2)


def test_float_fields_accept_ints():
    # JSON files and users write integers for float fields.
    config = FMTConfig(rope_theta=500000, attention_dropout=0, rms_norm_eps=1, initializer_range=1)
    assert config.rope_theta == 500000


def test_json_and_save_pretrained_round_trip(tmp_path):
    config = FMTConfig(
        vocab_size=100,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        fma_block_size=32,
        fma_coarse_tokens=8,
        fma_downsample="full",
        fma_query_mode="coarse",
        fma_boundary="zero_sink",
        fma_scale_attn=False,
        fma_sink_tokens=5,
        fma_near_blocks=3,
        is_causal=False,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    assert FMTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "fmt" and saved["auto_map"] == FMT_AUTO_MAP
    # The config alone also carries its code.
    assert (tmp_path / "configuration_fmt.py").is_file()
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is FMTConfig
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert loaded.fma_sink_tokens == 5 and loaded.fma_near_blocks == 3


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_rope_parameters_in_the_transformers_5_form(tmp_path):
    assert FMTConfig().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert FMTConfig(rope_theta=1e5).rope_parameters == {"rope_type": "default", "rope_theta": 1e5}
    config = FMTConfig(rope_parameters=dict(LLAMA3_ROPE), attention_bias=True, mlp_bias=True)
    assert config.rope_theta == 5e5 and config.rope_parameters == LLAMA3_ROPE
    assert FMTConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}).rope_parameters == {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 10000.0,
    }
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.rope_parameters, loaded.attention_bias, loaded.mlp_bias) == (LLAMA3_ROPE, True, True)


def test_config_json_of_earlier_checkpoints_loads(tmp_path):
    # Checkpoints saved before `rope_parameters`, `attention_bias` and `mlp_bias` existed: a top-level rope_theta.
    saved = FMTConfig(rope_theta=1e5).to_dict()
    for name in ("rope_parameters", "attention_bias", "mlp_bias"):
        del saved[name]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": 1e5}
    assert (loaded.rope_theta, loaded.attention_bias, loaded.mlp_bias) == (1e5, False, False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, r"rope_parameters\['rope_type'\]"),
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, "disagree"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ],
)
def test_invalid_rope_parameters_raise_naming_the_field(kwargs, message):
    with pytest.raises(StrictDataclassError, match=message):
        FMTConfig(**kwargs)


def test_dynamic_rope_is_a_supported_type(tmp_path):
    config = FMTConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic" in FMT_ROPE_TYPES and config.rope_parameters == {
        "rope_type": "dynamic",
        "factor": 2.0,
        "rope_theta": 10000.0,
    }
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "dynamic"


def test_rope_type_without_its_keys_raises():
    with pytest.raises(KeyError, match="rope_parameters"):  # transformers' own check of the keys a type needs
        FMTConfig(rope_parameters={"rope_type": "llama3", "factor": 8.0})


def test_auto_config_registration():
    assert type(AutoConfig.for_model("fmt", hidden_size=64, num_attention_heads=4)) is FMTConfig


def test_auto_map_keeps_other_entries():
    config = FMTConfig(auto_map={"AutoTokenizer": ["tokenization_fmt.FMTTokenizer", None]})
    assert config.auto_map["AutoTokenizer"] == ["tokenization_fmt.FMTTokenizer", None]
    assert all(config.auto_map[k] == v for k, v in FMT_AUTO_MAP.items())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hidden_size": 100, "num_attention_heads": 3}, "hidden_size"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"fma_block_size": 64, "fma_coarse_tokens": 128}, "fma_coarse_tokens"),
        ({"fma_block_size": 64, "fma_coarse_tokens": 5}, "fma_coarse_tokens"),
        ({"fma_block_size": 0}, "fma_block_size"),
        ({"fma_coarse_tokens": 0}, "fma_coarse_tokens"),
        ({"fma_downsample": "conv"}, "fma_downsample"),
        ({"fma_query_mode": "sparse"}, "fma_query_mode"),
        ({"fma_boundary": "pad"}, "fma_boundary"),
        ({"fma_kernel": "triton"}, "fma_kernel"),
        ({"fma_kernel": "flex", "fma_query_mode": "coarse"}, "fma_kernel"),
        ({"fma_kernel": "flex", "fma_boundary": "zero_sink"}, "fma_kernel"),
        ({"head_dim": 7}, "head_dim"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"fma_scale_attn": "yes"}, "fma_scale_attn"),
        ({"fma_sink_tokens": -1}, "fma_sink_tokens"),
        ({"fma_block_size": 64, "fma_sink_tokens": 65}, "fma_sink_tokens"),
        ({"fma_sink_tokens": 1.5}, "fma_sink_tokens"),
        ({"fma_near_blocks": 0}, "fma_near_blocks"),
        ({"fma_near_blocks": 2.0}, "fma_near_blocks"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(StrictDataclassError, match=field):
        FMTConfig(**kwargs)


def test_validation_runs_again_at_save(tmp_path):
    config = FMTConfig(fma_block_size=64, fma_coarse_tokens=4)
    config.fma_coarse_tokens = 6  # int-typed, so assignment passes; the cross-field check runs at save
    with pytest.raises(StrictDataclassError, match="fma_coarse_tokens"):
        config.save_pretrained(tmp_path)
    config = FMTConfig(fma_block_size=64, fma_sink_tokens=4)
    config.fma_sink_tokens = 65
    with pytest.raises(StrictDataclassError, match="fma_sink_tokens"):
        config.save_pretrained(tmp_path)
