"""scripts/push_to_hub.py and fmt_hf.toolkit.hub: the model card, the local repository folder, the push (Hub mocked)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers.lm import play_excerpts, run_fresh, script, train_argv, write_documents
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fmt_hf import FMTConfig, FMTForMaskedLM, FMTForSequenceClassification
from fmt_hf.toolkit.hub import PushArguments, push_to_hub
from fmt_hf.toolkit.tokenizer import byte_tokenizer

pytestmark = pytest.mark.download  # registry corpora

REPOSITORY_DATA = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def assert_repository_files(names):
    """The files of a Hub repository: model, tokenizer, card and FMT code; no checkpoints, logs or training state."""
    assert {n for n in names if not n.endswith(".py")} == REPOSITORY_DATA
    code = {n for n in names if n.endswith(".py")}
    assert {"configuration_fmt.py", "modeling_fmt.py", "cache_fmt.py", "fma_attention.py"} <= code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train.py run (3 steps, evaluated) followed by eval_lm.py on the test split: a complete model folder."""
    root = tmp_path_factory.mktemp("trained")
    documents = write_documents(root / "documents", play_excerpts())
    script("train").main(train_argv(root / "model", documents, "--do_train", "--do_eval", "--max_steps", "3"))
    script("eval_lm").main(
        [
            "--model_name_or_path",
            str(root / "model"),
            "--dataset_name",
            documents,
            "--context_length",
            "64",
            "--stride",
            "32",
        ]
    )
    return root / "model"


def push(*argv):
    script("push_to_hub").main([str(a) for a in argv])


REMOTE_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["fmt_hf"] = None  # as on a machine without fmt_hf: importing it raises ImportError
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, expected = sys.argv[1], torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("ROMEO. But soft", return_tensors="pt").input_ids
    assert ids.tolist() == expected["ids"].tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected["logits"], atol=1e-5)
    print("REMOTE_OK", type(model).__module__)
    """
)


def test_local_dir_is_a_hub_repository_that_loads_with_remote_code(trained, tmp_path):
    folder = tmp_path / "user-fmt-tiny"
    push("--model_dir", trained, "--local_dir", folder)

    assert_repository_files([p.name for p in folder.iterdir()])

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "custom_code" in card.data.tags and card.data.license == "apache-2.0"
    metrics = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert set(metrics) == {
        ("validation", "bits_per_byte"),
        ("validation", "perplexity"),
        ("test", "bits_per_byte"),
        ("test", "perplexity"),
    }
    assert 6 < metrics[("test", "bits_per_byte")] < 8.5
    text = card.text
    for expected in (
        "| Layers | 2 |",
        "| Hidden size / MLP size | 32 / 64",
        "| Finest block `fma_block_size` (m) | 16 |",
        "| Coarse levels at 64 tokens | 1 |",
        "| Downsampling `fma_downsample` | depthwise |",
        "for 3 steps",
        "UTF-8 bytes",
        "| test | whole documents, strided windows (stride 32) | 64 |",
        "## Intended use and limitations",
        "import fmt_hf",
        'AutoModelForCausalLM.from_pretrained("user-fmt-tiny", trust_remote_code=True)',
    ):
        assert expected in text, expected

    # Loads as a Hub download does: in a fresh interpreter that cannot import fmt_hf.
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([list(b"ROMEO. But soft")])
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    (tmp_path / "check.py").write_text(REMOTE_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "check.py"), str(folder), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "REMOTE_OK transformers_modules" in result.stdout, result.stdout + result.stderr


def test_push_uploads_the_same_folder_in_one_commit(trained, tmp_path):
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(
            repo_id=repo_id,
            files={p: open(os.path.join(folder_path, p), "rb").read() for p in os.listdir(folder_path)},
            **kwargs,
        )
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    with (
        mock.patch.object(HfApi, "create_repo", return_value=SimpleNamespace(repo_id="user/fmt-tiny")) as create,
        mock.patch.object(HfApi, "create_branch") as branch,
        mock.patch.object(HfApi, "upload_folder", upload_folder),
    ):
        push(
            "--model_dir",
            trained,
            "--repo_id",
            "user/fmt-tiny",
            "--private",
            "True",
            "--local_dir",
            tmp_path / "out",
            "--commit_message",
            "First FMT",
        )

    create.assert_called_once_with("user/fmt-tiny", private=True, exist_ok=True)
    branch.assert_not_called()
    assert uploaded["repo_id"] == "user/fmt-tiny" and uploaded["commit_message"] == "First FMT"
    assert_repository_files(uploaded["files"])
    assert uploaded["files"] == {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    readme = uploaded["files"]["README.md"].decode()
    assert 'from_pretrained("user/fmt-tiny", trust_remote_code=True)' in readme and "# fmt-tiny" in readme


def test_card_of_an_untracked_masked_lm(tmp_path):
    """A checkpoint without train.py's records still gets a card: masked-LM loading, nothing invented."""
    torch.manual_seed(0)
    FMTForMaskedLM(
        FMTConfig(
            vocab_size=259,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=256,
        )
    ).save_pretrained(tmp_path / "mlm")
    push_to_hub(PushArguments(model_dir=str(tmp_path / "mlm"), local_dir=str(tmp_path / "out"), tokenizer_name="bytes"))
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and not card.data.eval_results
    assert "AutoModelForMaskedLM.from_pretrained" in card.text and "Not recorded" in card.text
    assert "No evaluation results were recorded" in card.text and "| Coarse levels at 256 tokens | 1 |" in card.text


def test_card_and_weights_of_a_classifier(tmp_path):
    """A sequence classifier is published as one: its head's weights, its pipeline tag, classes and accuracies."""
    torch.manual_seed(0)
    config = FMTConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
        pad_token_id=256,
        id2label={0: "Hamlet", 1: "Macbeth"},
    )
    FMTForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / "eval_results.json").write_text('{"eval_accuracy": 0.75, "eval_loss": 0.5}')
    (tmp_path / "clf" / "test_results.json").write_text('{"test_accuracy": 0.625}')
    push_to_hub(PushArguments(model_dir=str(tmp_path / "clf"), local_dir=str(tmp_path / "out"), tokenizer_name="bytes"))
    published = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    original = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert type(published).__name__ == "FMTForSequenceClassification"
    assert torch.equal(published.score.weight, original.score.weight)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert {(r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("validation", "accuracy", 0.75),
        ("test", "accuracy", 0.625),
    }
    assert "(FMT) sequence classifier" in card.text and "| Classes (2) | Hamlet, Macbeth |" in card.text
    assert "| unknown | test | 0.6250 |" in card.text
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text
    assert "language model" not in card.text and "generate(" not in card.text


def test_bad_push_input_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="give --repo_id .* and/or --local_dir"):
        PushArguments(model_dir="anything")
    LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=259)
    ).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="holds a 'llama' model; push_to_hub.py publishes FMT models"):
        push("--model_dir", tmp_path / "llama", "--local_dir", tmp_path / "out")


BASE_MODEL = "org/Tiny-Instruct"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny instruction-tuned Llama (a chat template, an MIT card) in a local folder, converted by
    convert_llama.py, then uptrained two steps (downsamplers only) by train.py: (conversion folder, uptrained
    folder, the documents' folder)."""
    root = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=259,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=256,
            bos_token_id=257,
            eos_token_id=257,
        )
    )
    llama.save_pretrained(root / "Tiny-Instruct")
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "Tiny-Instruct")
    (root / "Tiny-Instruct" / "README.md").write_text("---\nlicense: mit\n---\n# Tiny-Instruct\n")
    script("convert_llama").main(
        [
            *("--model_name_or_path", str(root / "Tiny-Instruct"), "--output_dir", str(root / "tiny-fmt")),
            *("--fma_block_size", "8", "--fma_coarse_tokens", "2", "--max_position_embeddings", "256"),
            *("--base_model", BASE_MODEL),
        ]
    )
    documents = write_documents(root / "plays", play_excerpts())
    argv = train_argv(
        root / "tiny-fmt-uptrained",
        documents,
        *("--do_train", "--max_steps", "2", "--train_only_downsamplers", "True"),
        model_name_or_path=str(root / "tiny-fmt"),
    )
    script("train").main(argv)
    return root / "tiny-fmt", root / "tiny-fmt-uptrained", root


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.M | re.S)


def published_card(model_dir, out_dir) -> ModelCard:
    """The card push_to_hub.py writes for `model_dir` into `out_dir`; none of the machine's paths are in it."""
    push("--model_dir", model_dir, "--local_dir", out_dir)
    card = ModelCard.load(out_dir / "README.md")
    assert str(model_dir.parent) not in card.content and "pytest-" not in card.content
    return card


def test_conversion_records_its_source(converted):
    conversion, uptrained, root = converted
    record = json.loads((conversion / "conversion.json").read_text())
    assert record["base_model"] == BASE_MODEL and record["license"] == "mit" and record["chat_template"]
    assert record["source"] == {
        "model_name_or_path": str(root / "Tiny-Instruct"),
        "gguf_file": None,
        "sha256": None,
        "revision": None,
    }
    assert record["dtype"] == "float32"
    assert record["fma"]["fma_block_size"] == 8 and record["fma"]["max_position_embeddings"] == 256
    assert json.loads((uptrained / "conversion.json").read_text()) == record  # training carries it on


def test_card_of_a_converted_chat_model_names_its_base(converted, tmp_path):
    card = published_card(converted[0], tmp_path / "tiny-fmt")
    assert card.data.base_model == BASE_MODEL and card.data.base_model_relation == "finetune"
    assert card.data.license == "mit"
    text = card.text
    for expected in (
        f"Converted from [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL})",
        "The base model's licence, mit, applies.",
        "pretraining and instruction-tuning data",
        "The conversion trained nothing",
        "None since the conversion.",
        "chat template",
        "apply_chat_template(messages",
        f"It knows what `{BASE_MODEL}` learnt",
    ):
        assert expected in text, expected
    assert "instruction-following" not in text and "Not recorded" not in text

    # The card's snippets run as written, in fresh interpreters, on the published folder under its name.
    with_package, without_package = python_blocks(text)[:2]
    run_fresh(with_package, tmp_path)
    assert run_fresh(without_package, tmp_path, with_fmt_hf=False).strip() != ""


def test_card_of_an_uptrained_conversion_names_its_base_and_data(converted, tmp_path):
    card = published_card(converted[1], tmp_path / "tiny-fmt-uptrained")
    assert card.data.base_model == BASE_MODEL and card.data.base_model_relation == "finetune"
    assert card.data.license == "mit"
    text = card.text
    for expected in (
        "The FMT model was then uptrained on this data:",
        "The dataset `plays`",
        f"tokenized with the tokenizer of `{BASE_MODEL}`",
        f"Uptrained from the FMT conversion of `{BASE_MODEL}`, training only the FMA downsamplers,",
        "for 2 steps",
    ):
        assert expected in text, expected
    assert "outputs/" not in text and "Fine-tuned from" not in text


def test_card_snippets_of_a_trained_model_run_as_written(trained, tmp_path):
    """The card of a byte-level model without a chat template: its examples run, the tokenizer asks for nothing."""
    card = published_card(trained, tmp_path / "fmt-tiny")
    with_package, without_package = python_blocks(card.text)[:2]
    run_fresh(with_package, tmp_path)
    assert "ROMEO" in run_fresh(without_package, tmp_path, with_fmt_hf=False)
