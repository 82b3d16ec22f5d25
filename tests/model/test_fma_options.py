"""fma_options.py: FMA's option rules, stated once for `FastMultipoleAttention` and `FMTConfig`, and the config's
length cap."""

import pytest
from huggingface_hub.errors import StrictDataclassError

from fmt_hf import FastMultipoleAttention, FMTConfig
from fmt_hf.model.fma_options import CONFIG_FIELDS, check_fma_options, fma_layer_options, sequence_cap

LAYER = dict(head_dim=8, max_seq_len=64, block_size=4, coarse_tokens=2)
BROKEN = [  # one broken rule each, in layer arguments
    dict(coarse_tokens=3),
    dict(coarse_tokens=8),
    dict(block_size=0),
    dict(sink_tokens=5),
    dict(sink_tokens=-1),
    dict(kernel="flex", query_mode="coarse"),
    dict(kernel="flex", boundary="zero_sink"),
    dict(dropout=1.0),
    dict(near_blocks=0),
    dict(near_blocks=-1),
    dict(refine_groups=-1),
    dict(refine_groups=2, query_mode="coarse"),
    dict(refine_groups=2, boundary="zero_sink"),
    dict(refine_groups=2, kernel="flex"),
]


@pytest.mark.parametrize("broken", BROKEN, ids=str)
def test_layer_and_config_break_one_rule_with_one_message_in_their_own_names(broken):
    with pytest.raises(ValueError) as layer_error:
        FastMultipoleAttention(**{**LAYER, **broken})
    fields = {
        CONFIG_FIELDS[argument]: value for argument, value in {**LAYER, **broken}.items() if argument != "head_dim"
    }
    with pytest.raises(StrictDataclassError) as config_error:
        FMTConfig(**fields)
    expected = str(layer_error.value)
    for argument, field in CONFIG_FIELDS.items():
        expected = expected.replace(f"`{argument}`", f"`{field}`")
    assert str(config_error.value.__cause__) == expected


def test_check_names_the_arguments_it_is_given_names_for():
    options = fma_layer_options(FMTConfig(fma_block_size=4, fma_coarse_tokens=2))
    check_fma_options(**options)
    with pytest.raises(ValueError, match="^`coarse_tokens` "):
        check_fma_options(**{**options, "coarse_tokens": 3})
    with pytest.raises(ValueError, match="^`fma_coarse_tokens` "):
        check_fma_options(**{**options, "coarse_tokens": 3}, names=CONFIG_FIELDS)


@pytest.mark.parametrize(
    "downsample, boundary, cap",
    [
        ("depthwise", "mask", 64),
        ("full", "mask", 64),
        ("recursive", "mask", None),
        ("avgpool", "mask", None),
        ("recursive", "zero_sink", 64),
        ("avgpool", "zero_sink", 64),
    ],
)
def test_length_free_families_lift_the_cap_under_mask_only(downsample, boundary, cap):
    config = FMTConfig(
        max_position_embeddings=64,
        fma_block_size=4,
        fma_coarse_tokens=2,
        fma_downsample=downsample,
        fma_boundary=boundary,
    )
    assert sequence_cap(config) == sequence_cap(config, "fma") == cap
    assert sequence_cap(config, "sdpa") is None and sequence_cap(config, "eager") is None
    options = fma_layer_options(config)
    assert options["max_seq_len"] == cap and options["block_size"] == 4 and options["causal"] is True
    assert FastMultipoleAttention(**options).max_seq_len == cap
