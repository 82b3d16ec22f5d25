"""FMT models: Auto classes, checkpoints and Hub code, FMA against dense attention, masking, training paths.

Exactness checks run in float64, where FMA's agreement with dense attention (n <= 2 * block size) and the
causality of the FMA partition hold to rounding error.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.models import BLOCK, MAX_LEN, random_ids, tiny_config, tiny_fmt, with_attn
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    LlamaConfig,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fmt_hf import (
    FastMultipoleAttention,
    FMTConfig,
    FMTForCausalLM,
    FMTForMaskedLM,
    FMTModel,
)
from fmt_hf.model.configuration_fmt import FMT_AUTO_MAP
from fmt_hf.model.modeling_fmt import FMTRotaryEmbedding

CODE_FILES = (
    "configuration_fmt.py",
    "modeling_fmt.py",
    "cache_fmt.py",
    "fma_attention.py",
    "fma_partition.py",
    "fma_downsample.py",
    "fma_state.py",
    "fma_decode.py",
    "fma_refine.py",
    "fma_flex.py",
    "fma_options.py",
    "fma_masking.py",
    "auto_fmt.py",
)


# ----------------------------------------------------------------------------- Auto classes and checkpoints

AUTO_CASES = [
    (FMTModel, AutoModel),
    (FMTForCausalLM, AutoModelForCausalLM),
    (FMTForMaskedLM, AutoModelForMaskedLM),
]


def first_output(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_class, auto_class", AUTO_CASES, ids=lambda c: c.__name__)
def test_auto_round_trip(model_class, auto_class, tmp_path):
    model = tiny_fmt(model_class)
    ids = random_ids(2, 40)
    model.save_pretrained(tmp_path)

    assert type(AutoConfig.from_pretrained(tmp_path)) is FMTConfig
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is model_class
    assert loaded.config._attn_implementation == "fma"
    assert torch.equal(first_output(loaded, ids), first_output(model, ids))
    assert type(auto_class.from_config(tiny_config())) is model_class


@pytest.mark.parametrize("model_class", [FMTModel, FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_checkpoint_carries_code_and_complete_auto_map(model_class, tmp_path):
    tiny_fmt(model_class).save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert set(CODE_FILES) <= files
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == FMT_AUTO_MAP
    assert config["architectures"] == [model_class.__name__]
    # Flat sibling modules that import each other only relatively: what the Hub loader can resolve.
    for name in CODE_FILES:
        source = (tmp_path / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+fmt_hf", source, re.MULTILINE), f"{name} imports fmt_hf"


def test_causal_lm_checkpoint_opens_with_auto_model(tmp_path):
    clm = tiny_fmt(FMTForCausalLM)
    clm.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is FMTModel and base.config.is_causal
    ids = random_ids(2, 40)
    assert torch.equal(base(ids).last_hidden_state, clm.model(ids).last_hidden_state)


def test_mlm_checkpoint_opens_bidirectional_with_auto_model(tmp_path):
    mlm = tiny_fmt(FMTForMaskedLM)
    mlm.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert not base.config.is_causal and not base.layers[0].self_attn.fma.causal
    ids = random_ids(2, 40)
    assert torch.equal(base(ids).last_hidden_state, mlm.model(ids).last_hidden_state)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys

    # `-I` keeps the repository off sys.path, but an editable install stays importable: block the package.
    sys.modules["fmt_hf"] = None
    try:
        import fmt_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("fmt_hf is importable: the check below would not test the Hub code")

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    clm_path, mlm_path, expected_path = sys.argv[1:4]
    expected = torch.load(expected_path)
    ids = expected["ids"]

    config = AutoConfig.from_pretrained(clm_path, trust_remote_code=True)
    assert type(config).__name__ == "FMTConfig", type(config)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__

    clm = AutoModelForCausalLM.from_pretrained(clm_path, trust_remote_code=True).eval()
    assert type(clm).__name__ == "FMTForCausalLM" and type(clm).__module__.startswith("transformers_modules")
    assert clm.config._attn_implementation == "fma"
    assert torch.equal(clm(ids).logits, expected["clm_logits"])

    base = AutoModel.from_pretrained(clm_path, trust_remote_code=True).eval()
    assert type(base).__name__ == "FMTModel" and base.config.is_causal
    assert torch.equal(base(ids).last_hidden_state, expected["clm_hidden"])

    mlm = AutoModelForMaskedLM.from_pretrained(mlm_path, trust_remote_code=True).eval()
    assert type(mlm).__name__ == "FMTForMaskedLM" and not mlm.config.is_causal
    assert torch.equal(mlm(ids).logits, expected["mlm_logits"])
    mlm_base = AutoModel.from_pretrained(mlm_path, trust_remote_code=True).eval()
    assert not mlm_base.config.is_causal
    assert torch.equal(mlm_base(ids).last_hidden_state, expected["mlm_hidden"])

    dense = AutoModelForCausalLM.from_pretrained(clm_path, trust_remote_code=True, attn_implementation="sdpa")
    assert dense.config._attn_implementation == "sdpa"
    print("REMOTE_OK")
    """
)


def test_remote_code_loads_without_fmt_hf(tmp_path):
    clm, mlm = tiny_fmt(FMTForCausalLM), tiny_fmt(FMTForMaskedLM, seed=3)
    ids = random_ids(2, 40)
    clm.save_pretrained(tmp_path / "saved_clm")
    mlm.save_pretrained(tmp_path / "saved_mlm")
    # Copies: what a Hub download gives a user, away from the repository.
    shutil.copytree(tmp_path / "saved_clm", tmp_path / "hub" / "clm")
    shutil.copytree(tmp_path / "saved_mlm", tmp_path / "hub" / "mlm")
    with torch.no_grad():
        expected = {
            "ids": ids,
            "clm_logits": clm(ids).logits,
            "clm_hidden": clm.model(ids).last_hidden_state,
            "mlm_logits": mlm(ids).logits,
            "mlm_hidden": mlm.model(ids).last_hidden_state,
        }
    torch.save(expected, tmp_path / "expected.pt")
    (tmp_path / "check.py").write_text(REMOTE_SCRIPT)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        # -I: no PYTHONPATH, no user site, no script or working directory on sys.path.
        [
            sys.executable,
            "-I",
            str(tmp_path / "check.py"),
            str(tmp_path / "hub" / "clm"),
            str(tmp_path / "hub" / "mlm"),
            str(tmp_path / "expected.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def test_push_to_hub_uploads_weights_code_and_auto_map(tmp_path, monkeypatch):
    # No network here: a stand-in Hub API stores each commit in a local folder.
    import types

    import huggingface_hub
    import transformers.utils.hub

    hub = tmp_path / "hub"

    class LocalHub:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            for operation in operations:
                target = hub / repo_id / operation.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(operation.path_or_fileobj, target)

    def no_remote_card(cls, repo_id, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no README.md")

    monkeypatch.setattr(transformers.utils.hub, "hf_api", LocalHub)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(no_remote_card))
    model = tiny_fmt(FMTForMaskedLM)
    model.push_to_hub("someone/fmt-tiny", commit_message="tiny FMT")

    uploaded = hub / "someone" / "fmt-tiny"
    assert {"README.md", "config.json", "model.safetensors", *CODE_FILES} <= set(os.listdir(uploaded))
    assert json.loads((uploaded / "config.json").read_text())["auto_map"] == FMT_AUTO_MAP
    ids = random_ids(2, 40)
    assert torch.equal(AutoModelForMaskedLM.from_pretrained(uploaded)(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- attention implementations


def test_fma_is_the_default_and_dense_is_opt_in(tmp_path):
    model = tiny_fmt(FMTForCausalLM)
    assert model.config._attn_implementation == "fma"
    model.save_pretrained(tmp_path)
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    for implementation in ("sdpa", "eager"):
        dense = FMTForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
        assert dense.config._attn_implementation == implementation
    dense.set_attn_implementation("fma")
    assert dense.config._attn_implementation == "fma"
    with pytest.raises(ValueError):
        FMTForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
@pytest.mark.parametrize("length", [1, 5, 2 * BLOCK])
def test_fma_equals_dense_where_exact(model_class, query_mode, length):
    # n <= 2 * block size: no coarse level is needed, FMA is dense attention (fma.md §6).
    fma = tiny_fmt(model_class, fma_query_mode=query_mode)
    ids = random_ids(3, length)
    expected = fma(ids).logits
    for implementation in ("sdpa", "eager"):
        torch.testing.assert_close(with_attn(fma, implementation)(ids).logits, expected, rtol=0, atol=1e-10)


def test_fma_equals_dense_where_exact_with_padding():
    mlm = tiny_fmt(FMTForMaskedLM)
    ids = random_ids(2, 2 * BLOCK)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    expected = mlm(ids, attention_mask=mask).logits
    dense = with_attn(mlm, "sdpa")(ids, attention_mask=mask).logits
    torch.testing.assert_close(dense[0, :11], expected[0, :11], rtol=0, atol=1e-10)
    torch.testing.assert_close(dense[1], expected[1], rtol=0, atol=1e-10)


def test_fma_differs_from_dense_beyond_two_blocks():
    # Guards the test above: longer inputs really go through FMA's coarse levels.
    clm = tiny_fmt(FMTForCausalLM)
    ids = random_ids(1, 6 * BLOCK)
    assert (clm(ids).logits - with_attn(clm, "sdpa")(ids).logits).abs().max() > 1e-6


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
@pytest.mark.parametrize("attn", ["fma", "sdpa"])
def test_causal_lm_is_causal(query_mode, attn):
    model = tiny_fmt(FMTForCausalLM, fma_query_mode=query_mode)
    if attn != "fma":
        model = with_attn(model, attn)
    length = MAX_LEN
    ids = random_ids(1, length)
    logits = model(ids).logits
    for j in (1, BLOCK, 2 * BLOCK + 3, 4 * BLOCK, 8 * BLOCK - 1, length - 1):
        perturbed = ids.clone()
        perturbed[0, j] = (perturbed[0, j] % 60) + 1
        changed = model(perturbed).logits
        torch.testing.assert_close(changed[:, :j], logits[:, :j], rtol=0, atol=1e-12)
        assert (changed[:, j:] - logits[:, j:]).abs().amax(-1).min() > 0, f"position >= {j} did not see token {j}"


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
def test_masked_lm_sees_later_tokens(query_mode):
    mlm = tiny_fmt(FMTForMaskedLM, fma_query_mode=query_mode)
    ids = random_ids(1, MAX_LEN)
    logits = mlm(ids).logits
    perturbed = ids.clone()
    perturbed[0, -1] = (perturbed[0, -1] % 60) + 1
    # Every position, including the first (through the coarsest level), depends on the last token.
    assert (mlm(perturbed).logits - logits).abs().amax(-1).min() > 0


@pytest.mark.parametrize("query_mode", ["fine", "coarse"])
@pytest.mark.parametrize("attn", ["fma", "sdpa"])
def test_padded_mlm_batch_equals_unpadded_rows(query_mode, attn):
    mlm = tiny_fmt(FMTForMaskedLM, fma_query_mode=query_mode)
    if attn != "fma":
        mlm = with_attn(mlm, attn)
    lengths = (MAX_LEN, 75, 37, 9)  # mixed numbers of coarse levels; 75 and 37 end inside a group
    ids = random_ids(len(lengths), MAX_LEN)
    mask = (torch.arange(MAX_LEN)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # pad id 0 after the end of each row
    batched = mlm(ids, attention_mask=mask).logits
    for row, length in enumerate(lengths):
        alone = mlm(ids[row : row + 1, :length]).logits
        torch.testing.assert_close(batched[row : row + 1, :length], alone, rtol=0, atol=1e-10)


def test_padding_mask_changes_fma_outputs():
    # Guards the test above: the mask is honoured, not ignored -- padded keys would otherwise be attended.
    mlm = tiny_fmt(FMTForMaskedLM)
    ids = random_ids(1, 40)
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    assert (mlm(ids, attention_mask=mask).logits[0, :30] - mlm(ids).logits[0, :30]).abs().max() > 1e-6


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_heads(model_class, kv_heads):
    # A GQA model is the multi-head model whose K/V projections repeat each KV head for its query group.
    gqa = tiny_fmt(model_class, num_key_value_heads=kv_heads)
    mha = tiny_fmt(model_class, num_key_value_heads=4)
    state = gqa.state_dict()
    head_dim, group = gqa.config.head_dim, 4 // kv_heads
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(kv_heads, head_dim, -1).repeat_interleave(group, 0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape[0] == kv_heads * head_dim
    ids = random_ids(2, 6 * BLOCK)
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_bf16_forward_and_backward(model_class):
    model = tiny_fmt(model_class, dtype=torch.bfloat16)
    ids = random_ids(2, 6 * BLOCK)
    out = model.train()(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # bf16 costs FMA no more accuracy than it costs dense attention with the same weights.
    reference = tiny_fmt(model_class, dtype=torch.float32)
    model.eval()
    fma_error = (model(ids).logits.float() - reference(ids).logits).abs().max()
    dense_error = (with_attn(model, "sdpa")(ids).logits.float() - with_attn(reference, "sdpa")(ids).logits).abs().max()
    assert fma_error <= 2 * dense_error, (fma_error, dense_error)


# ----------------------------------------------------------------------------- rotary embeddings

DYNAMIC_ROPE = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}


def test_dynamic_rope_rescales_as_llama_beyond_max_position_embeddings():
    """rope_type="dynamic" (NTK scaling): Llama's angles at every length -- the original frequencies up to
    max_position_embeddings, rescaled for longer inputs, and back to the original ones for a short input after."""
    ours = FMTRotaryEmbedding(tiny_config(rope_parameters=dict(DYNAMIC_ROPE)))
    llama = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=32, num_attention_heads=4, max_position_embeddings=MAX_LEN, rope_parameters=dict(DYNAMIC_ROPE)
        )
    )
    default = FMTRotaryEmbedding(tiny_config())
    x = torch.ones(1, dtype=torch.float64)
    for length in (MAX_LEN, 3 * MAX_LEN, MAX_LEN // 2, 5 * MAX_LEN):
        positions = torch.arange(length).unsqueeze(0)
        cos, sin = ours(x, positions)
        for mine, theirs in zip((cos, sin), llama(x, positions)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        assert torch.equal(cos, default(x, positions)[0]) == (length <= MAX_LEN)


@pytest.mark.parametrize("downsample", ["recursive", "avgpool"])
def test_length_free_model_with_dynamic_rope_runs_and_generates_past_its_training_length(downsample):
    dynamic = tiny_fmt(FMTForCausalLM, fma_downsample=downsample, rope_parameters=dict(DYNAMIC_ROPE))
    default = tiny_fmt(FMTForCausalLM, fma_downsample=downsample)
    default.load_state_dict(dynamic.state_dict())
    short, long = random_ids(2, MAX_LEN), random_ids(2, 2 * MAX_LEN)
    with torch.no_grad():
        assert torch.equal(dynamic(short).logits, default(short).logits)  # no rescaling up to the training length
        assert not torch.allclose(dynamic(long).logits, default(long).logits)
    out = dynamic.generate(random_ids(1, MAX_LEN - 4), max_new_tokens=12, do_sample=False)
    assert out.shape == (1, MAX_LEN + 8)


# ----------------------------------------------------------------------------- outputs and training


def test_output_hidden_states():
    model = tiny_fmt(FMTModel)
    ids = random_ids(2, 40)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.embed_tokens(ids))
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    clm_out = tiny_fmt(FMTForCausalLM)(ids, output_hidden_states=True)
    assert len(clm_out.hidden_states) == 3 and type(clm_out.cache).__name__ == "FMTCache"
    assert tiny_fmt(FMTForCausalLM)(ids, return_dict=False)[0].shape == (2, 40, 61)


def test_output_attentions_with_eager():
    model = with_attn(tiny_fmt(FMTForCausalLM), "eager")
    out = model(random_ids(2, 20), output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 20, 20)


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_activation_checkpointing_gives_same_gradients(model_class):
    model = tiny_fmt(model_class).train()
    ids = random_ids(2, 6 * BLOCK)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    # The downsamplers of every level are trained, with and without checkpointing.
    assert any("k_downsample" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-12, msg=name)


TEXT = "the quick brown fox jumps over the lazy dog. " * 3


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_tiny_model_overfits_short_text(model_class):
    alphabet = sorted(set(TEXT))
    ids = torch.tensor([[alphabet.index(c) + 1 for c in TEXT[:96]]])
    model = tiny_fmt(model_class, dtype=torch.float32, vocab_size=len(alphabet) + 2, initializer_range=0.02).train()
    if model_class is FMTForMaskedLM:
        mask_id = len(alphabet) + 1
        masked = torch.zeros_like(ids, dtype=torch.bool)
        masked[:, ::4] = True
        inputs, labels = ids.masked_fill(masked, mask_id), ids.masked_fill(~masked, -100)
    else:
        inputs, labels = ids, ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model(inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_generate_left_padded_batch_matches_single_prompts():
    # Within two blocks FMA is exact, so a left-padded batch must reproduce each prompt generated alone: the
    # padding mask reaches the causal FMA kernel and positions follow the mask.
    model = tiny_fmt(FMTForCausalLM, eos_token_id=None)
    prompts = [random_ids(1, 9, seed=4)[0], random_ids(1, 5, seed=5)[0]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt) :] = prompt
        mask[row, 9 - len(prompt) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, -6:], alone[0, -6:])


# ----------------------------------------------------------------------------- heads, tying, initialisation


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_tied_embeddings(model_class, tmp_path):
    tied = tiny_fmt(model_class, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, tied.lm_head.weight)
    untied = tiny_fmt(model_class)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_heads_force_their_attention_mode_without_touching_the_callers_config():
    config = tiny_config()
    mlm = FMTForMaskedLM(config)
    assert config.is_causal and not mlm.config.is_causal and not mlm.model.layers[0].self_attn.fma.causal
    clm = FMTForCausalLM(mlm.config)
    assert clm.config.is_causal and not mlm.config.is_causal
    assert not FMTModel(tiny_config(is_causal=False)).layers[0].self_attn.fma.causal


def fma_reference_state(config: FMTConfig) -> dict:
    """The parameters a freshly built FastMultipoleAttention starts with (its own initialisation)."""
    return FastMultipoleAttention(
        config.head_dim,
        config.max_position_embeddings,
        block_size=config.fma_block_size,
        coarse_tokens=config.fma_coarse_tokens,
        causal=config.is_causal,
        downsample=config.fma_downsample,
    ).state_dict()


@pytest.mark.parametrize("downsample", ["depthwise", "full", "recursive"])
def test_fresh_model_keeps_fma_initialisation(downsample):
    # transformers' generic init draws every Linear/Conv weight from a normal: the downsamplers must not be.
    model = tiny_fmt(FMTModel, dtype=torch.float32, fma_downsample=downsample)
    reference = fma_reference_state(model.config)
    assert reference, "the downsamplers hold parameters"
    for layer in model.layers:
        state = layer.self_attn.fma.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[key], reference[key]) for key in reference)


def test_missing_downsamplers_and_buffers_are_initialised_on_load(tmp_path):
    # E.g. a dense (Llama) checkpoint: downsamplers start with FMA's own init, rotary buffers are recomputed.
    trained = tiny_fmt(FMTForCausalLM, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "downsample" in name:
                parameter.add_(1.0)
    trained.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "downsample" not in k}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = FMTForCausalLM.from_pretrained(tmp_path)
    reference = fma_reference_state(loaded.config)
    for layer in loaded.model.layers:
        state = layer.self_attn.fma.state_dict()
        assert all(torch.equal(state[key], reference[key]) for key in reference)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, FMTModel(tiny_config()).rotary_emb.inv_freq)
    assert torch.equal(loaded.model.embed_tokens.weight, trained.model.embed_tokens.weight)


def test_device_map_with_disk_offload(tmp_path):
    model = tiny_fmt(FMTForCausalLM, dtype=torch.float32)
    ids = random_ids(2, 40)
    model.save_pretrained(tmp_path / "model")
    offloaded = FMTForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    torch.testing.assert_close(offloaded(ids).logits, model(ids).logits)


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "downsample,boundary",
    [("depthwise", "mask"), ("full", "mask"), ("avgpool", "zero_sink"), ("recursive", "zero_sink")],
)
def test_too_long_input_raises_under_fma_with_a_capped_hierarchy(downsample, boundary):
    model = tiny_fmt(FMTForCausalLM, fma_downsample=downsample, fma_boundary=boundary)
    assert model.max_sequence_length == MAX_LEN
    with pytest.raises(ValueError, match=r'exceeds max_position_embeddings \(128\).*fma_downsample="recursive"'):
        model(random_ids(1, MAX_LEN + 1))
    cache = model(random_ids(1, MAX_LEN - 1)).cache  # the cap counts cached tokens too
    with pytest.raises(ValueError, match=r"Input length 129 \(127 cached \+ 2 new\)"):
        model(random_ids(1, 2), cache=cache)


def test_dense_attention_has_no_length_cap():
    """As transformers' Llama: rotary embeddings take any position, so the dense implementations run past
    max_position_embeddings (only FMA's per-level hierarchy is built for a length)."""
    model = with_attn(tiny_fmt(FMTForCausalLM), "sdpa")
    assert model.max_sequence_length is None
    assert model(random_ids(1, MAX_LEN + 5)).logits.shape == (1, MAX_LEN + 5, 61)


@pytest.mark.parametrize("model_class", [FMTForCausalLM, FMTForMaskedLM], ids=lambda c: c.__name__)
def test_recursive_model_runs_at_four_times_its_training_length_and_reloads(model_class, tmp_path):
    """fma_downsample="recursive" has no length cap (docs/fma.md §7a): a model built for 64 tokens runs at 256, and
    so does its checkpoint; the parameter count does not depend on max_position_embeddings."""
    model = tiny_fmt(model_class, fma_downsample="recursive", max_position_embeddings=64)
    with torch.no_grad():  # move the downsamplers off their average init so a reload has weights to keep
        for name, parameter in model.named_parameters():
            if "downsample" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    assert model.max_sequence_length is None and model.model.layers[0].self_attn.fma.max_seq_len is None
    assert (
        model.num_parameters()
        == tiny_fmt(model_class, fma_downsample="recursive", max_position_embeddings=8192).num_parameters()
    )
    options = {"use_cache": False} if model.config.is_causal else {}
    ids = random_ids(2, 4 * 64)  # 4 coarse levels at block 8; 2 at the training length
    logits = model(ids, **options).logits
    assert logits.shape == (2, 256, 61) and torch.isfinite(logits).all()
    if model.config.is_causal:  # the levels follow each input: a prefix gives the same outputs alone
        torch.testing.assert_close(model(ids[:, :64], **options).logits, logits[:, :64], rtol=0, atol=1e-12)
    model.save_pretrained(tmp_path)
    auto_class = AutoModelForCausalLM if model.config.is_causal else AutoModelForMaskedLM
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is model_class and loaded.config.fma_downsample == "recursive"
    assert torch.equal(loaded(ids, **options).logits, logits)


def test_input_errors():
    model = tiny_fmt(FMTForCausalLM)
    ids = random_ids(2, 20)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.model.embed_tokens(ids))
    with pytest.raises(ValueError, match="2D"):
        model(ids, attention_mask=torch.ones(2, 1, 20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        model(ids, attention_mask=torch.ones(2, 19))
    with pytest.raises(ValueError, match="FMTCache"):
        from transformers import DynamicCache

        model(ids, cache=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="cannot switch per call"):
        model(ids, is_causal=False)


def test_dense_implementations_honour_per_call_causality():
    model = with_attn(tiny_fmt(FMTModel), "sdpa")
    ids = random_ids(1, 20)
    bidirectional = model(ids, is_causal=False).last_hidden_state
    reference = with_attn(tiny_fmt(FMTModel, is_causal=False), "sdpa")(ids).last_hidden_state
    torch.testing.assert_close(bidirectional, reference, rtol=0, atol=1e-12)
    assert model.config.is_causal  # restored after the call


def test_inputs_embeds_equal_input_ids():
    model = tiny_fmt(FMTForCausalLM)
    ids = random_ids(2, 40)
    assert torch.equal(model(inputs_embeds=model.model.embed_tokens(ids)).logits, model(ids).logits)
