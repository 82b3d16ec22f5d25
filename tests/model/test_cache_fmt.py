"""The multilevel coarse KV cache (docs/fma.md §8) through transformers' generate()."""

import copy

import pytest
import torch
from helpers.models import random_ids
from transformers import DynamicCache

from fmt_hf import FMTCache, FMTConfig, FMTForCausalLM, FMTModel


def perturbed_fmt(layers=2, query_mode="fine", downsample="depthwise", dtype=torch.float64, **overrides):
    """A float64 FMT language model over 40 tokens with 4-token FMA blocks, its learned downsamplers perturbed."""
    options = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        fma_block_size=4,
        fma_coarse_tokens=2,
        fma_query_mode=query_mode,
        fma_downsample=downsample,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    options.update(overrides)
    torch.manual_seed(0)
    model = FMTForCausalLM(FMTConfig(**options)).to(dtype).eval()
    with torch.no_grad():  # move learned downsamplers off their average init so their weights matter
        for name, param in model.named_parameters():
            if "downsample" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def prompt(length, batch=1, seed=1):
    return random_ids(batch, length, seed, vocab=40)


def recompute_greedy(model, ids, steps):
    """Greedy continuation by full forward passes without any cache: the reference."""
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize(
    "layers,query_mode,downsample",
    [(1, "fine", "depthwise"), (2, "fine", "avgpool"), (2, "coarse", "depthwise"), (3, "coarse", "full")],
)
def test_greedy_generate_equals_recomputation(layers, query_mode, downsample):
    model = perturbed_fmt(layers, query_mode, downsample)
    for length in (1, 8, 13, 32, 45):  # block 4, group widths 4, 8, 16, 32
        ids = prompt(length)
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, recompute_greedy(model, ids, 20))


@pytest.mark.parametrize(
    "query_mode,downsample,sink_tokens", [("fine", "depthwise", 1), ("coarse", "avgpool", 4), ("fine", "recursive", 3)]
)
def test_greedy_generate_with_sink_tokens_equals_recomputation(query_mode, downsample, sink_tokens):
    """Sink tokens (§3a) through generate: prompts shorter and longer than s, and a left-padded batch whose rows
    fill their sinks at different steps."""
    model = perturbed_fmt(2, query_mode, downsample, fma_sink_tokens=sink_tokens)
    for length in (1, 2, 13, 45):
        ids = prompt(length)
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, recompute_greedy(model, ids, 20))
    rows = [prompt(30, seed=3)[0], prompt(2, seed=4)[0], prompt(9, seed=5)[0]]
    ids, mask = torch.zeros(3, 30, dtype=torch.long), torch.zeros(3, 30, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 30 - len(row) :], mask[i, 30 - len(row) :] = row, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    for i, row in enumerate(rows):
        assert torch.equal(batched[i, 30:], recompute_greedy(model, row[None], 15)[0, len(row) :])


@pytest.mark.parametrize("near_blocks", [2, 3])
@pytest.mark.parametrize("query_mode,downsample", [("fine", "depthwise"), ("coarse", "recursive")])
def test_greedy_generate_with_a_wider_near_field_equals_recomputation(near_blocks, query_mode, downsample):
    """A near field of w blocks (docs/fma.md §3b) through generate, with sink tokens: single prompts and a
    left-padded batch whose rows gain levels at different steps."""
    model = perturbed_fmt(2, query_mode, downsample, fma_sink_tokens=2, fma_near_blocks=near_blocks)
    for length in (1, 13, 45):
        ids = prompt(length)
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, recompute_greedy(model, ids, 20))
    ids, mask = left_padded([29, 17, 6])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=21, do_sample=False)
    assert torch.equal(batched, model.generate(ids, attention_mask=mask, max_new_tokens=21, use_cache=False))


@pytest.mark.parametrize("downsample", ["depthwise", "recursive"])
def test_greedy_generate_with_refinement_equals_recomputation(downsample):
    """Adaptive refinement (docs/fma.md §3c) through generate: single prompts, a left-padded batch, beams."""
    model = perturbed_fmt(2, "fine", downsample, fma_sink_tokens=2, fma_refine_groups=2)
    for length in (13, 45):
        ids = prompt(length)
        assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), recompute_greedy(model, ids, 20))
    ids, mask = left_padded([29, 17, 6])
    for mode in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=15, **mode)
        assert torch.equal(
            batched, model.generate(ids, attention_mask=mask, max_new_tokens=15, use_cache=False, **mode)
        )


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_decoding_logits_equal_full_forward(dtype, tolerance, query_mode):
    model = perturbed_fmt(query_mode=query_mode, dtype=dtype)
    ids = prompt(90)
    out = model(ids[:, :29], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(29, 90):
        out = model(ids[:, t : t + 1], cache=cache)
        cache, logits = out.cache, logits + [out.logits]
    assert isinstance(cache, FMTCache) and cache.get_seq_length() == 90
    torch.testing.assert_close(torch.cat(logits, 1), model(ids, use_cache=False).logits, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoding_follows_the_full_forward(dtype):
    model = perturbed_fmt(dtype=dtype)
    ids = prompt(70)
    out = model(ids[:, :20], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(20, 70):  # crosses block (4) and group (8, 16, 32) boundaries: partial sums and completions
        out = model(ids[:, t : t + 1], cache=cache)
        cache, logits = out.cache, logits + [out.logits]
    assert cache.layers[0].state.partial_k.dtype == torch.float32  # sums of shares kept in float32
    full = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1).float(), full.float(), rtol=0, atol=0.05)


def test_chunked_prefill_equals_one_shot():
    model = perturbed_fmt()
    ids = prompt(77)
    one_shot = model.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for chunk in (16, 25):
        chunked = model.generate(
            ids,
            max_new_tokens=10,
            do_sample=False,
            prefill_chunk_size=chunk,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(chunked.sequences, one_shot.sequences)
        torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(one_shot.logits), rtol=0, atol=1e-12)
        for a, b in zip(chunked.cache.layers, one_shot.cache.layers):
            for x, y in zip(a.state.tensors(), b.state.tensors()):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_cache_size_is_bounded_and_reaches_the_bound(sink_tokens):
    model = perturbed_fmt(
        max_position_embeddings=1024, fma_block_size=8, fma_coarse_tokens=2, fma_sink_tokens=sink_tokens
    )
    config, fma = model.config, model.model.layers[0].self_attn.fma
    vectors = 4 * 8 + 2 * sink_tokens + 8 * 2 * fma.num_levels  # 4m + 2s + 8pL per key/value head (§8)
    # one validity byte per fine slot, sink token, partial sum and stored group
    flags = 2 * 8 + sink_tokens + 4 * fma.num_levels
    bound = (vectors * config.num_key_value_heads * config.head_dim * 8 + flags) * config.num_hidden_layers  # float64
    cache = model(prompt(3), use_cache=True).cache
    sizes = [cache.nbytes]
    for token in prompt(300, seed=2)[0]:
        cache = model(token.view(1, 1), cache=cache).cache
        sizes.append(cache.nbytes)
    assert max(sizes) == bound == sizes[-1]
    dense = 2 * 303 * config.num_key_value_heads * config.head_dim * 8 * config.num_hidden_layers
    assert dense > 2 * bound  # already at 303 tokens; the bound does not grow with length


def test_left_padded_batch_equals_rows_alone():
    model = perturbed_fmt()
    rows = [prompt(37, seed=3)[0], prompt(21, seed=4)[0], prompt(8, seed=5)[0]]
    ids = torch.zeros(3, 37, dtype=torch.long)
    mask = torch.zeros(3, 37, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 37 - len(row) :] = row
        mask[i, 37 - len(row) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=15, do_sample=False)
        assert torch.equal(batched[i, 37:], alone[0, len(row) :])


def test_beam_search_sampling_and_return_sequences_run():
    model = perturbed_fmt()
    ids = prompt(30, batch=2)
    beams = model.generate(ids, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 38)
    # Beam search with one beam is greedy search: the reordering must keep every beam's own state.
    assert torch.equal(
        model.generate(ids, max_new_tokens=8, num_beams=1, do_sample=False), recompute_greedy(model, ids, 8)
    )
    torch.manual_seed(0)
    samples = model.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert samples.shape == (6, 38)


def test_beam_search_equals_beam_search_without_cache():
    model = perturbed_fmt()
    ids = prompt(26)
    with_cache = model.generate(ids, max_new_tokens=10, num_beams=4, do_sample=False)
    without = model.generate(ids, max_new_tokens=10, num_beams=4, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_continue_from_returned_cache_and_reset():
    model = perturbed_fmt()
    ids = prompt(40)
    first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    more = model.generate(first.sequences, cache=first.cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(more, recompute_greedy(model, ids, 10))
    first.cache.reset()
    assert first.cache.get_seq_length() == 0 and first.cache.nbytes == 0


def test_dense_baseline_uses_dynamic_cache():
    model = perturbed_fmt()
    model.set_attn_implementation("sdpa")
    ids = prompt(30)
    out = model(ids, use_cache=True)
    assert isinstance(out.cache, DynamicCache)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), recompute_greedy(model, ids, 8))


def test_generate_from_inputs_embeds():
    model = perturbed_fmt()
    ids = prompt(20)
    from_embeds = model.generate(inputs_embeds=model.model.embed_tokens(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, recompute_greedy(model, ids, 6)[:, 20:])


def test_unsupported_uses_raise_clear_errors():
    model = perturbed_fmt()
    ids = prompt(20)
    with pytest.raises(ValueError, match="FMTCache"):
        model.generate(ids, cache=DynamicCache(config=model.config), max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, cache_implementation="static", max_new_tokens=2)
    with pytest.raises(ValueError, match="Assisted and prompt-lookup"):
        model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=2)
    cache = model(ids, use_cache=True).cache
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    bidirectional = copy.deepcopy(model.config)
    bidirectional.is_causal = False
    with pytest.raises(ValueError, match="bidirectional"):
        FMTModel(bidirectional)(ids, cache=FMTCache(2))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(prompt(9), cache=model(prompt(120), use_cache=True).cache)


def test_generate_checks_the_length_before_any_work(monkeypatch):
    model = perturbed_fmt(max_position_embeddings=64)
    calls = []
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: calls.append(1))
    with pytest.raises(ValueError, match=r"a prompt of 50 tokens plus max_new_tokens=20.*max_position_embeddings=64"):
        model.generate(prompt(50), max_new_tokens=20)
    assert not calls  # refused before the prompt went through the model
    model = perturbed_fmt(max_position_embeddings=64)
    assert model.generate(prompt(50), max_new_tokens=15, do_sample=False).shape[1] == 65  # 64 positions run


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_holes_in_the_mask_under_a_cache_equal_recomputation(query_mode):
    """Pad ids inside prompts (holes after a row's first token), with left padding too: cached greedy decoding
    equals recomputation with the same mask, and cached logits equal the full forward's."""
    model = perturbed_fmt(query_mode=query_mode)
    ids = prompt(41, batch=3)
    mask = torch.ones_like(ids)
    mask[0, [3, 4, 17, 40]] = 0  # holes, one at the end
    mask[1, :6] = 0  # left padding ...
    mask[1, [9, 30]] = 0  # ... and holes
    mask[2, 8:24] = 0  # a hole as wide as two level-1 groups
    ids = ids.masked_fill(mask == 0, 0)  # the pad id, as a tokenizer would put it
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)

    # logits, step by step with a cache against one full forward pass, holes in the new tokens too
    full_mask = torch.cat([mask, torch.ones(3, 25, dtype=mask.dtype)], 1)
    full_mask[0, 50] = 0
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)  # as generate() derives them
    out = model(cached[:, :41], attention_mask=full_mask[:, :41], position_ids=positions[:, :41], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(41, 66):
        out = model(
            cached[:, t : t + 1],
            attention_mask=full_mask[:, : t + 1],
            position_ids=positions[:, t : t + 1],
            cache=cache,
        )
        cache, logits = out.cache, logits + [out.logits]
    reference = model(cached, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    real = full_mask.bool()
    real[1, :6] = False  # left padding gives no meaningful output
    torch.testing.assert_close(torch.cat(logits, 1)[real], reference[real], rtol=0, atol=1e-10)


def test_bf16_decoding_after_a_long_prompt_follows_the_full_forward():
    """Prompt of 2600 tokens: the widest groups span 1024 tokens, whose float32 partial sums a bf16 state would
    round away. Cached bf16 logits stay as close to the float64 model as the bf16 full forward is."""
    model = perturbed_fmt(layers=1, fma_block_size=64, fma_coarse_tokens=4, max_position_embeddings=4096)
    ids = prompt(2640)
    reference = model(ids, use_cache=False).logits[:, 2600:]  # float64
    bf16 = model.to(torch.bfloat16)
    out = bf16(ids[:, :2600], use_cache=True)
    cache, logits = out.cache, []
    for t in range(2600, 2640):
        out = bf16(ids[:, t : t + 1], cache=cache)
        cache, logits = out.cache, logits + [out.logits]
    full_error = (bf16(ids, use_cache=False).logits[:, 2600:].double() - reference).abs().max()
    cached_error = (torch.cat(logits, 1).double() - reference).abs().max()
    assert cached_error <= 2 * full_error, (cached_error, full_error)


def test_decoding_runs_without_float64():
    """Half- and single-precision decoding never creates a float64 tensor (Apple MPS has none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                    raise AssertionError(f"{func} made a float64 tensor")
            return out

    for query_mode, boundary in (("fine", "mask"), ("coarse", "zero_sink")):
        model = perturbed_fmt(query_mode=query_mode, fma_boundary=boundary, dtype=torch.bfloat16)
        with NoFloat64():
            model.generate(
                prompt(45), attention_mask=torch.ones(1, 45, dtype=torch.long), max_new_tokens=12, do_sample=False
            )


@pytest.mark.parametrize("downsample,query_mode", [("recursive", "fine"), ("recursive", "coarse"), ("avgpool", "fine")])
def test_length_free_models_generate_past_max_position_embeddings(downsample, query_mode):
    """fma_downsample="recursive" (or "avgpool") has no cap (docs/fma.md §7a): generate continues far past
    max_position_embeddings, its state gaining a level each time the length doubles, and equals recomputation;
    left padding and beams as for any model."""
    model = perturbed_fmt(downsample=downsample, query_mode=query_mode, max_position_embeddings=32)  # block 4
    assert model.max_sequence_length is None
    ids = prompt(27, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=110, do_sample=False)
    recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=110, do_sample=False, use_cache=False)
    assert cached.shape[1] == 137 and torch.equal(cached, recomputed)
    cache = model(cached, attention_mask=torch.cat([mask, torch.ones(2, 110, dtype=mask.dtype)], 1)).cache
    levels = cache.layers[0].state.levels
    assert levels == [5, 5]  # L(138) and L(133) at block 4: 4 * 2**5 < n
    beams = model.generate(ids[:1], max_new_tokens=40, num_beams=3, do_sample=False)
    assert torch.equal(beams, model.generate(ids[:1], max_new_tokens=40, num_beams=3, do_sample=False, use_cache=False))


def left_padded(lengths, seed=6):
    """A left-padded batch of random prompts of the given lengths, with its attention mask."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, width - length :] = prompt(length, seed=seed + i)[0]
        mask[i, width - length :] = 1
    return ids, mask


@pytest.mark.parametrize("downsample", ["depthwise", "recursive"])
def test_batched_generate_modes_equal_recomputation(downsample):
    """Rows at different positions (left padding) through every generate mode that reorders or repeats rows:
    sampling with a seed, num_return_sequences, beams -- cached equals recomputed without a cache."""
    model = perturbed_fmt(downsample=downsample)
    ids, mask = left_padded([29, 17, 6])
    for options in (
        dict(do_sample=True, num_return_sequences=2),
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=False),
    ):
        outputs = []
        for use_cache in (True, False):
            torch.manual_seed(5)
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=21, use_cache=use_cache, **options))
        assert torch.equal(*outputs), options


def test_chunked_prefill_of_a_left_padded_batch_equals_one_shot():
    model = perturbed_fmt()
    ids, mask = left_padded([45, 30, 11])
    one_shot = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    chunked = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        prefill_chunk_size=16,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(chunked.sequences, one_shot.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(one_shot.logits), rtol=0, atol=1e-12)
