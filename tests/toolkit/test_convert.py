"""fmt_hf.toolkit.convert and scripts/convert_llama.py: Llama checkpoints to FMT, on tiny random Llama models.

Exactness checks run in float64: wherever FMA is exact (at most 2 * BLOCK tokens) the converted model's logits are
the source's to rounding error, and with a dense attention implementation they are at every length.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.lm import script
from helpers.models import random_byte_ids, tiny_byte_llama
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import fmt_hf
from fmt_hf import FMTForCausalLM, convert_llama_to_fmt
from fmt_hf.toolkit.convert import gguf_base_model, gguf_metadata
from fmt_hf.toolkit.data import SMOLLM2_GGUF, fetch_smollm2
from fmt_hf.toolkit.tokenizer import byte_tokenizer

BLOCK = 8  # fma_block_size of the conversions: FMA is exact up to 16 tokens
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

SOURCES = {
    "tied-gqa": {"tie_word_embeddings": True},
    "untied-gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa-head-dim-12": {"num_key_value_heads": 1, "head_dim": 12},
    "biases": {"attention_bias": True, "mlp_bias": True},
    # transformers 4 only sliced the matmuls by it, transformers 5 ignores it: the same function
    "pretraining-tp-2": {"pretraining_tp": 2},
    "rope-theta": {"rope_parameters": {"rope_type": "default", "rope_theta": 523.0}},
    "rope-llama3": {"rope_parameters": dict(LLAMA3)},
    "rope-linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 3.0}},
    "rope-dynamic": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
    "rope-yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    },
}


def random_float64_llama(seed=0, **overrides) -> LlamaForCausalLM:
    """A float64 Llama with every weight random (biases and norms too, so that none is trivially 0 or 1)."""
    sizes = dict(intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny_byte_llama(seed, **{**sizes, **overrides}).to(torch.float64)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def convert(llama, **options) -> FMTForCausalLM:
    return convert_llama_to_fmt(llama, fma_block_size=BLOCK, fma_coarse_tokens=2, **options)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_logits_equal_the_source_where_fma_is_exact(source):
    llama = random_float64_llama(**source)
    fmt = convert(llama)
    assert fmt.dtype == torch.float64 and fmt.config._attn_implementation == "fma"
    assert fmt.config.tie_word_embeddings == llama.config.tie_word_embeddings
    assert (fmt.lm_head.weight is fmt.model.embed_tokens.weight) == llama.config.tie_word_embeddings
    for length in (1, 13, 2 * BLOCK):
        ids = random_byte_ids(2, length)
        torch.testing.assert_close(logits(fmt, ids), logits(llama, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_dense_attention_equals_the_source_at_every_length(source):
    # The same weights with dense attention: every projection, bias and rotary angle is the source's, also at
    # positions far beyond the rope scaling's original_max_position_embeddings.
    llama = random_float64_llama(**source)
    fmt = convert(llama)
    fmt.set_attn_implementation("eager")
    ids = random_byte_ids(2, 61)
    torch.testing.assert_close(logits(fmt, ids), logits(llama, ids), rtol=0, atol=1e-10)


def test_fma_differs_beyond_two_blocks_and_starts_from_average_downsamplers():
    llama = random_float64_llama()
    ids = random_byte_ids(2, 45)
    depthwise = logits(convert(llama), ids)
    assert (depthwise - logits(llama, ids)).abs().max() > 1e-3  # coarse summaries of distant tokens
    # The depthwise downsamplers start as sub-window means: exactly the parameter-free average pooling.
    torch.testing.assert_close(depthwise, logits(convert(llama, fma_downsample="avgpool"), ids), rtol=0, atol=1e-10)


def test_options_dtype_and_generation_config_carry_over():
    llama = random_float64_llama(rope_parameters=dict(LLAMA3)).to(torch.float32)
    llama.generation_config.max_new_tokens = 7
    fmt = convert(llama, max_position_embeddings=256, fma_query_mode="coarse", fma_scale_attn=False, fma_sink_tokens=1)
    assert fmt.dtype == torch.float32 and not fmt.training
    config = fmt.config
    assert (config.max_position_embeddings, config.fma_block_size, config.fma_coarse_tokens) == (256, BLOCK, 2)
    assert (config.fma_query_mode, config.fma_scale_attn, config.fma_sink_tokens) == ("coarse", False, 1)
    assert all(layer.self_attn.fma.sink_tokens == 1 for layer in fmt.model.layers)
    # The frequencies belong to the pretrained model, not to the new length.
    assert config.rope_parameters == LLAMA3 and config.rope_theta == 5e5
    assert fmt.generation_config.max_new_tokens == 7 and fmt.generation_config is not llama.generation_config
    assert convert(llama.train()).training  # the source's mode


def test_a_wider_near_field_is_exact_up_to_its_reach():
    """``fma_near_blocks`` w (docs/fma.md §3) is a conversion option: FMA is then exact up to (w+1) m tokens."""
    llama = random_float64_llama()
    fmt = convert(llama, fma_near_blocks=3)
    assert fmt.config.fma_near_blocks == 3
    assert all(layer.self_attn.fma.near_blocks == 3 for layer in fmt.model.layers)
    ids = random_byte_ids(2, 4 * BLOCK)
    torch.testing.assert_close(logits(fmt, ids), logits(llama, ids), rtol=0, atol=1e-10)
    assert (logits(convert(llama), ids) - logits(llama, ids)).abs().max() > 1e-3  # w = 1: coarse past 2m


def test_generate_equals_dense_greedy_decoding():
    llama = random_float64_llama(tie_word_embeddings=True, attention_bias=True, rope_parameters=dict(LLAMA3))
    fmt = convert(llama)
    # Prompt and new tokens within 2 blocks: greedy decoding through FMTCache sees the source's logits.
    prompt = random_byte_ids(1, 5)
    settings = dict(max_new_tokens=2 * BLOCK - 5, do_sample=False, pad_token_id=256)
    assert torch.equal(fmt.generate(prompt, **settings), llama.generate(prompt, **settings))
    # A left-padded batch as well.
    batch = random_byte_ids(2, 6, seed=5)
    mask = torch.ones_like(batch)
    batch[0, :2], mask[0, :2] = 256, 0
    settings["max_new_tokens"] = 2 * BLOCK - 6
    expected = llama.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(fmt.generate(batch, attention_mask=mask, **settings), expected)


# ----------------------------------------------------------------------------- checkpoints


def test_converted_checkpoint_round_trips(tmp_path):
    fmt = convert(random_float64_llama(attention_bias=True, mlp_bias=True, rope_parameters=dict(LLAMA3)))
    fmt.save_pretrained(tmp_path)
    ids = random_byte_ids(2, 45)
    for loader in (FMTForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path, dtype=torch.float64)
        assert loaded.config.rope_parameters == LLAMA3 and loaded.config.attention_bias
        torch.testing.assert_close(logits(loaded, ids), logits(fmt, ids), rtol=0, atol=1e-12)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM

    assert "fmt_hf" not in sys.modules
    expected = torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=0, atol=1e-12)
    print("REMOTE_OK")
    """
)


def test_converted_checkpoint_loads_as_hub_code(tmp_path):
    fmt = convert(random_float64_llama(attention_bias=True, mlp_bias=True, rope_parameters=dict(LLAMA3)))
    fmt.save_pretrained(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", tmp_path / "hub")  # what a Hub download gives a user
    ids = random_byte_ids(2, 45)
    torch.save({"ids": ids, "logits": logits(fmt, ids)}, tmp_path / "expected.pt")
    (tmp_path / "check.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        # -I: no PYTHONPATH, no user site, no script or working directory on sys.path.
        [sys.executable, "-I", str(tmp_path / "check.py"), str(tmp_path / "hub"), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def test_convert_llama_script(tmp_path):
    llama = random_float64_llama(rope_parameters=dict(LLAMA3)).to(torch.float32)
    llama.save_pretrained(tmp_path / "llama")
    byte_tokenizer().save_pretrained(tmp_path / "llama")
    fmt = script("convert_llama").main(
        [
            "--model_name_or_path",
            str(tmp_path / "llama"),
            "--output_dir",
            str(tmp_path / "fmt"),
            "--dense_output_dir",
            str(tmp_path / "dense"),
            "--fma_block_size",
            str(BLOCK),
            "--fma_coarse_tokens",
            "2",
            "--max_position_embeddings",
            "128",
            "--fma_options",
            "fma_query_mode=coarse,fma_sink_tokens=1,fma_near_blocks=2",
        ]
    )
    assert (fmt.config.max_position_embeddings, fmt.config.fma_query_mode) == (128, "coarse")
    assert fmt.config.fma_sink_tokens == 1 and fmt.config.fma_near_blocks == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fmt")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(loaded) is FMTForCausalLM and type(dense) is LlamaForCausalLM
    for folder in ("fmt", "dense"):
        assert (tmp_path / folder / "tokenizer.json").is_file()
        assert "quantization_config" not in (tmp_path / folder / "config.json").read_text()
    ids = random_byte_ids(1, 3 * BLOCK)  # exact up to (w+1) m with w = 2
    torch.testing.assert_close(logits(loaded, ids), logits(llama, ids), rtol=1e-5, atol=1e-5)  # float32
    torch.testing.assert_close(logits(dense, ids), logits(llama, ids), rtol=0, atol=0)
    # A local folder with no card and no --base_model: nothing about the base is guessed.
    record = json.loads((tmp_path / "fmt" / "conversion.json").read_text())
    assert (record["base_model"], record["license"], record["chat_template"]) == (None, None, False)
    assert record["fma"]["fma_query_mode"] == "coarse" and record["fma"]["fma_sink_tokens"] == 1
    assert not (tmp_path / "dense" / "conversion.json").exists()


def test_a_gguf_file_names_its_hub_model():
    assert gguf_base_model({"general.source.repo_url": "https://huggingface.co/org/Model-7B"}, "x.gguf") == (
        "org/Model-7B"
    )
    assert gguf_base_model({"general.organization": "org"}, "Model-7B-Chat.Q4_K_M.gguf") == "org/Model-7B-Chat"
    assert gguf_base_model({}, "Model.gguf") is None


@pytest.mark.download
def test_smollm2_gguf_names_smollm2_and_its_licence():
    metadata = gguf_metadata(str(fetch_smollm2() / SMOLLM2_GGUF))
    assert gguf_base_model(metadata, SMOLLM2_GGUF) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["general.license"] == "apache-2.0" and metadata["general.languages"] == ["en"]


# ----------------------------------------------------------------------------- errors


def test_unsupported_sources_fail_naming_the_feature():
    with pytest.raises(TypeError, match="LlamaForCausalLM; got FMTForCausalLM"):
        convert(convert(random_float64_llama()))
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\] is 'longrope'"):
        convert(random_float64_llama(rope_parameters={**longrope, "original_max_position_embeddings": 32}))
    sliding = random_float64_llama()
    sliding.config.sliding_window = 32
    with pytest.raises(ValueError, match="sliding_window=32"):
        convert(sliding)
    with pytest.raises(ValueError, match=r"unknown FMA options \['fma_levels', 'hidden_size'\]"):
        convert(random_float64_llama(), fma_levels=3, hidden_size=64)
    with pytest.raises(StrictDataclassError, match="fma_coarse_tokens"):  # FMTConfig's own validation
        convert_llama_to_fmt(random_float64_llama(), fma_block_size=8, fma_coarse_tokens=3)
    quantized = random_float64_llama()
    quantized.model.register_buffer("packed", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="quantized.*model.packed is torch.uint8"):
        convert(quantized)


def test_lazy_toolkit_export():
    assert fmt_hf.convert_llama_to_fmt is convert_llama_to_fmt
