"""fmt_hf.toolkit.arguments: the scripts' argument dataclasses reject bad values naming the flag, fill in their
defaults."""

import pytest

from fmt_hf.toolkit.arguments import (
    DataArguments,
    EvalArguments,
    LongContextArguments,
    MainDemoArguments,
    ModelArguments,
    parse_config_overrides,
)


def test_parse_config_overrides():
    parsed = parse_config_overrides("hidden_size=128, fma_downsample=full,rope_theta=1e5,fma_scale_attn=False")
    assert parsed == {"hidden_size": 128, "fma_downsample": "full", "rope_theta": 1e5, "fma_scale_attn": False}
    assert parse_config_overrides(None) == {}
    with pytest.raises(ValueError, match="'hiden_size' is not an FMTConfig field"):
        parse_config_overrides("hiden_size=128")
    with pytest.raises(ValueError, match="not of the form name=value"):
        parse_config_overrides("hidden_size")


def test_config_overrides_need_a_model_from_scratch():
    with pytest.raises(ValueError, match="can't be combined with --model_name_or_path"):
        ModelArguments(model_name_or_path="some/checkpoint", config_overrides="hidden_size=64")


@pytest.mark.parametrize("name", ["max_train_samples", "max_eval_samples"])
def test_sample_limits_must_be_positive(name):
    with pytest.raises(ValueError, match=f"--{name} must be at least 1, got 0"):
        DataArguments(**{name: 0})


def test_eval_arguments_reject_bad_values():
    with pytest.raises(ValueError, match="--max_document_tokens must be at least 2"):
        EvalArguments(model_name_or_path="m", max_document_tokens=1)
    for buckets in ([32, 16], [1], [64], [0, 8]):
        with pytest.raises(
            ValueError, match="--position_buckets must increase strictly between 1 and --context_length=64"
        ):
            EvalArguments(model_name_or_path="m", context_length=64, position_buckets=buckets)
    for stride in (0, 64):
        with pytest.raises(ValueError, match="--stride must be at least 1 and less than --context_length=64"):
            EvalArguments(model_name_or_path="m", context_length=64, stride=stride)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"systems": ["dense", "kvpress"]},
            r"--systems: unknown \['kvpress'\]; valid: dense, fmt, fmt_refined, streaming, kvpress_streaming, "
            "kvpress_snapkv, "
            "kvpress_expected_attention",
        ),
        ({"tasks": ["passkey", "haystack"]}, r"--tasks: unknown \['haystack'\]"),
        ({"num_samples": 0}, "--num_samples must be at least 1, got 0"),
        ({"depths": []}, r"--depths must be fractions in \[0, 1\], got \[\]"),
        ({"depths": [0.5, 1.5]}, r"--depths must be fractions in \[0, 1\], got \[0.5, 1.5\]"),
        ({"lengths": [2048, 0]}, r"--lengths must be positive, got \[2048, 0\]"),
        ({"refine_groups": 0}, r"--refine_groups must be at least 1 \(the fmt system is the one without\), got 0"),
    ],
)
def test_long_context_arguments_reject_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        LongContextArguments(**options)


def test_main_demo_arguments_leave_room_for_a_prompt():
    for max_new_tokens in (0, 128):
        with pytest.raises(ValueError, match="--max_new_tokens must be at least 1 and less than --seq_len=128"):
            MainDemoArguments(seq_len=128, max_new_tokens=max_new_tokens)


def test_eval_arguments_defaults(tmp_path):
    hub = EvalArguments(model_name_or_path="user/model", context_length=64)
    assert hub.stride == 32 and hub.output_file is None  # nowhere to write beside a Hub id
    local = EvalArguments(model_name_or_path=str(tmp_path), split="validation", context_length=64)
    assert local.output_file == str(tmp_path / "eval_lm_validation_64.json")
