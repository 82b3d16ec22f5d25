"""fma_masking.py: what the decoder layers read -- the cache, checked, and FMA's aligned rows and key padding mask
(or the dense implementations' mask) -- and the cache `generate` keeps."""

import pytest
import torch
from transformers import DynamicCache

from fmt_hf import FMTCache, FMTConfig
from fmt_hf.model.fma_masking import prepare_layer_inputs, shift_rows


def config(attn_implementation="fma", **overrides):
    config = FMTConfig(
        hidden_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=64,
        fma_block_size=4,
        fma_coarse_tokens=2,
        **overrides,
    )
    config._attn_implementation = attn_implementation
    return config


def test_shift_rows_moves_each_row_and_fills_with_zeros():
    rows = torch.arange(1, 9).view(2, 4)
    assert shift_rows(rows, torch.tensor([1, 0])).tolist() == [[2, 3, 4, 0], [5, 6, 7, 8]]
    assert shift_rows(rows, torch.tensor([-2, 3])).tolist() == [[0, 0, 1, 2], [8, 0, 0, 0]]
    embeds = torch.randn(2, 4, 3)
    shift = torch.tensor([2, 1])
    moved_back = shift_rows(shift_rows(embeds, shift), -shift)
    assert torch.equal(moved_back[0, 2:], embeds[0, 2:]) and torch.equal(moved_back[1, 1:], embeds[1, 1:])


def test_left_padding_is_moved_behind_each_row_and_restored():
    embeds = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 1]])  # left padding; a hole
    inputs = prepare_layer_inputs(config(), embeds, mask, None, None, build_cache=True)
    assert inputs.shift.tolist() == [2, 0] and isinstance(inputs.cache, FMTCache)
    assert inputs.fma_lengths == [3, 5]  # the new positions of each row: its columns but the moved padding
    assert inputs.attention_mask.tolist() == [[True, True, True, False, False], [True, True, True, False, True]]
    assert torch.equal(inputs.inputs_embeds[0, :3], embeds[0, 2:]) and torch.equal(inputs.inputs_embeds[1], embeds[1])
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 4]]  # aligned rows count from their first real token
    assert torch.equal(inputs.restore(inputs.inputs_embeds)[0, 2:], embeds[0, 2:])


def test_nothing_padded_takes_fma_s_fast_path():
    embeds = torch.randn(2, 5, 16)
    inputs = prepare_layer_inputs(config(), embeds, torch.ones(2, 5), None, None, build_cache=False)
    assert inputs.attention_mask is None and inputs.shift is None and inputs.cache is None
    assert inputs.fma_lengths is None and inputs.inputs_embeds is embeds


def test_dense_implementations_get_transformers_masks_and_caches():
    embeds = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    inputs = prepare_layer_inputs(config("eager"), embeds, mask, None, None, build_cache=True)
    assert isinstance(inputs.cache, DynamicCache) and inputs.shift is None and inputs.inputs_embeds is embeds
    assert inputs.attention_mask.shape == (2, 1, 5, 5)


@pytest.mark.parametrize(
    "implementation, overrides, cache, mask, message",
    [
        ("fma", {}, DynamicCache(), None, "FMA attention keeps its own multilevel cache"),
        ("sdpa", {}, FMTCache(1), None, "FMTCache serves only FMA attention"),
        ("fma", {"is_causal": False}, FMTCache(1), None, "needs a causal model"),
        ("fma", {}, None, torch.ones(2, 1, 5, 5), "2D"),
        ("fma", {}, None, torch.ones(2, 4), r"attention_mask shape \(2, 4\) does not match the inputs \(2, 5\)"),
    ],
)
def test_bad_caches_and_masks_raise(implementation, overrides, cache, mask, message):
    with pytest.raises(ValueError, match=message):
        prepare_layer_inputs(config(implementation, **overrides), torch.randn(2, 5, 16), mask, None, cache, True)


def test_capped_models_refuse_longer_inputs_before_any_work():
    with pytest.raises(ValueError, match=r"Input length 65 \(0 cached \+ 65 new\) exceeds max_position_embeddings"):
        prepare_layer_inputs(config(), torch.randn(1, 65, 16), None, None, None, False)
    inputs = prepare_layer_inputs(config(fma_downsample="recursive"), torch.randn(1, 65, 16), None, None, None, False)
    assert inputs.position_ids.shape == (1, 65)


def test_empty_inputs_and_fma_attention_weights_are_refused_by_name():
    from fmt_hf import FMTForCausalLM

    for implementation in ("fma", "sdpa"):
        with pytest.raises(ValueError, match="empty input.*bos_token_id"):
            prepare_layer_inputs(config(implementation), torch.randn(1, 0, 16), None, None, None, build_cache=True)
    # through generate, as a user meets it
    model = FMTForCausalLM(config(vocab_size=32)).eval()
    with pytest.raises(ValueError, match="empty input"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_fma_warns_that_it_has_no_attention_weights(caplog):
    from transformers.utils import logging

    from fmt_hf import FMTForCausalLM
    from fmt_hf.model import fma_masking

    fma_masking.logger.warning_once.cache_clear()
    model = FMTForCausalLM(config(vocab_size=32)).eval()
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            assert model(torch.randint(0, 32, (1, 6)), output_attentions=True).attentions == ()
    finally:
        logging.disable_propagation()
    assert "output_attentions=True: FMA never forms" in caplog.text and 'attn_implementation="eager"' in caplog.text
    eager = FMTForCausalLM._from_config(config(vocab_size=32), attn_implementation="eager").eval()
    assert len(eager(torch.randint(0, 32, (1, 6)), output_attentions=True).attentions) == 1
