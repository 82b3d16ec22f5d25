"""Model cards and Hub publishing for FMT checkpoints: the engine of ``scripts/push_to_hub.py``.

:func:`save_for_hub` turns a checkpoint folder written by ``scripts/train.py`` into a Hub model repository:
weights, config, tokenizer, the modelling code (so the model loads with ``trust_remote_code=True`` without
``fmt_hf``) and a ``README.md`` model card rendered through ``huggingface_hub``'s ``ModelCard``/``ModelCardData``
from a Jinja template (the repository's ``model_cards/template.md``, :data:`DEFAULT_TEMPLATE`). The card takes the
architecture and FMA settings from the config, the base model (``base_model``, its licence) from a conversion's
``conversion.json`` (``scripts/convert_llama.py``), the training data and procedure from the run's
``training_setup.json`` and ``Trainer`` files, and the evaluation results from ``eval_results.json``
(``train.py --do_eval``), ``test_results.json`` (a classifier's ``--do_predict``) and ``eval_lm_*.json``
(``scripts/eval_lm.py``). The architecture recorded in the config decides the Auto class, the pipeline tag and the
card's wording (:data:`MODEL_KINDS`). A card names checkpoints, tokenizers and datasets as a reader can find them
(:func:`public_name`), never by a local path. :func:`push_to_hub` uploads that same folder in one commit.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedConfig,
)

from ..model.fma_options import length_free, sequence_cap
from ..model.fma_partition import num_levels
from .arguments import DataArguments
from .data import corpus_package
from .records import CONVERSION_RECORD_NAME, TRAINING_SETUP_NAME
from .tokenizer import BYTE_TOKENIZER, load_tokenizer


def _find_template() -> Path:
    """``model_cards/template.md``: the repository's own in a clone or an editable install, else the copy a wheel
    installs as data files (``share/fmt_hf/model_cards/``, found through the distribution's file list, whichever
    install scheme put it there)."""
    in_repository = Path(__file__).resolve().parents[2] / "model_cards" / "template.md"
    if in_repository.is_file():
        return in_repository
    try:
        installed = importlib.metadata.files("fmt_hf") or []
    except importlib.metadata.PackageNotFoundError:
        installed = []
    for file in installed:
        if file.parts[-2:] == ("model_cards", "template.md"):
            return Path(file.locate()).resolve()
    return in_repository  # not found: save_for_hub's error names this path and --template


DEFAULT_TEMPLATE = _find_template()
"""The model-card template every card is rendered from unless ``--template`` names another."""

TAGS = ["fmt", "fast-multipole-attention", "long-context", "custom_code"]

PROJECT_LICENSE = "apache-2.0"
"""The licence of a card whose model has no base model (trained from scratch): ``fmt_hf``'s own."""


@dataclass(frozen=True)
class ModelKind:
    """What a checkpoint's architecture is published as: the Auto class that loads it, its Hub pipeline tag, and
    the words the card calls it."""

    auto_class: type
    pipeline_tag: str
    description: str


MODEL_KINDS = {
    "FMTForCausalLM": ModelKind(AutoModelForCausalLM, "text-generation", "causal language model"),
    "FMTForMaskedLM": ModelKind(AutoModelForMaskedLM, "fill-mask", "masked language model"),
    "FMTForSequenceClassification": ModelKind(
        AutoModelForSequenceClassification, "text-classification", "sequence classifier"
    ),
    "FMTForTokenClassification": ModelKind(AutoModelForTokenClassification, "token-classification", "token classifier"),
    "FMTForQuestionAnswering": ModelKind(
        AutoModelForQuestionAnswering, "question-answering", "extractive question-answering model"
    ),
    "FMTModel": ModelKind(AutoModel, "feature-extraction", "base model (hidden states, no head)"),
}
"""The FMT architectures ``push_to_hub.py`` publishes, by the name ``save_pretrained`` records in ``architectures``."""


def model_kind(config: PreTrainedConfig) -> ModelKind:
    """The kind of the checkpoint with ``config``: its recorded architecture (a config without one: the causal or
    masked LM its ``is_causal`` says)."""
    architecture = (config.architectures or ["FMTForCausalLM" if config.is_causal else "FMTForMaskedLM"])[0]
    if architecture not in MODEL_KINDS:
        raise ValueError(
            f"the checkpoint's architecture {architecture!r} is not one push_to_hub.py publishes: "
            f"{', '.join(MODEL_KINDS)}"
        )
    return MODEL_KINDS[architecture]


@dataclass
class PushArguments:
    """What to publish, where, and how."""

    model_dir: str = field(metadata={"help": "Checkpoint folder written by scripts/train.py (its --output_dir)."})
    repo_id: str | None = field(
        default=None,
        metadata={"help": "Hub repository (`user/name`) to create or update. Without it, only --local_dir is written."},
    )
    local_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write the repository folder here (no network needed); with --repo_id this folder is "
            "what gets uploaded."
        },
    )
    template: str = field(default=str(DEFAULT_TEMPLATE), metadata={"help": "Jinja template of the model card."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to publish if the checkpoint has none (e.g. `bytes`)."}
    )
    private: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if needed)."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    commit_message: str = field(default="Upload FMT model", metadata={"help": "Commit message."})
    token: str | None = field(default=None, metadata={"help": "Hub token; default: the `hf auth login` one."})

    def __post_init__(self) -> None:
        if self.repo_id is None and self.local_dir is None:
            raise ValueError("nothing to do: give --repo_id (push to the Hub) and/or --local_dir (write a folder)")


def _read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def public_name(name_or_path: str, conversion: dict[str, Any] | None = None) -> str:
    """How a card names a checkpoint, tokenizer or dataset: a Hub id as it is; a local folder, whose path means
    nothing to a reader, as the base model it was converted from when ``conversion`` (its conversion record) names
    one, else by its folder name."""
    if not os.path.exists(name_or_path):
        return name_or_path
    if conversion is not None and conversion["base_model"] is not None:
        return conversion["base_model"]
    return Path(name_or_path).resolve().name


def _training_summary(model_dir: str, conversion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's recorded setup (``training_setup.json``) with descriptions and results for the card, if any;
    ``conversion``, the checkpoint's conversion record, names a local start checkpoint."""
    setup = _read_json(os.path.join(model_dir, TRAINING_SETUP_NAME))
    if setup is None:
        return None
    data = setup["data"]
    start = setup["model"]["model_name_or_path"]
    if data["dataset_name"] is not None:
        config_name = f" (configuration `{data['dataset_config_name']}`)" if data["dataset_config_name"] else ""
        data_description = f"The dataset `{public_name(data['dataset_name'])}`{config_name}"
    else:
        data_description = (
            f"The `{data['corpus']}` corpus of `fmt_hf.toolkit.data`, read from the registry package "
            f"`{corpus_package(data['corpus'])}`"
        )
    tokenizer = setup["model"]["tokenizer_name"] or start or BYTE_TOKENIZER
    tokenizer_description = (
        "UTF-8 bytes (`fmt_hf`'s byte-level tokenizer, one token per byte)"
        if tokenizer == BYTE_TOKENIZER
        else f"tokenized with the tokenizer of `{public_name(tokenizer, conversion if tokenizer == start else None)}`"
    )
    train_results = _read_json(os.path.join(model_dir, "train_results.json")) or {}
    state = _read_json(os.path.join(model_dir, "trainer_state.json")) or {}
    return {
        **setup,
        "start_checkpoint": public_name(start, conversion) if start is not None else None,
        "data_id": public_name(DataArguments(**data).data_id),
        "data_description": data_description,
        "tokenizer_description": tokenizer_description,
        "steps": state.get("global_step"),
        "train_loss": train_results.get("train_loss"),
        "train_runtime": train_results.get("train_runtime"),
    }


def _evaluations(model_dir: str, training: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Language-model evaluation rows for the card: the Trainer's validation blocks, then every ``eval_lm_*.json``."""
    rows = []
    trainer_eval = _read_json(os.path.join(model_dir, "eval_results.json"))
    if trainer_eval is not None and "eval_perplexity" in trainer_eval:
        seq_len = training["data"]["seq_len"] if training else None
        rows.append(
            {
                "data": training["data_id"] if training else "unknown",
                "split": "validation",
                "protocol": "packed blocks" if seq_len is None else f"packed {seq_len}-token blocks",
                "context_length": seq_len if seq_len is not None else "–",
                "bits_per_byte": trainer_eval.get("eval_bits_per_byte"),
                "bits_per_token": trainer_eval["eval_bits_per_token"],
                "perplexity": trainer_eval["eval_perplexity"],
            }
        )
    for path in sorted(glob.glob(os.path.join(glob.escape(model_dir), "eval_lm_*.json"))):
        result = _read_json(path)
        rows.append(
            {
                "data": public_name(result["data"]),
                "split": result["split"],
                "protocol": f"whole documents, strided windows (stride {result['stride']})",
                "context_length": result["context_length"],
                "bits_per_byte": result["bits_per_byte"],
                "bits_per_token": result["bits_per_token"],
                "perplexity": result["perplexity"],
            }
        )
    return rows


def _accuracies(model_dir: str, training: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Classification rows for the card: ``train.py --task classification``'s validation (``--do_eval``) and test
    (``--do_predict``) accuracy."""
    rows = []
    for split, file in (("validation", "eval_results.json"), ("test", "test_results.json")):
        result = _read_json(os.path.join(model_dir, file))
        prefix = "eval" if split == "validation" else "test"
        if result is not None and f"{prefix}_accuracy" in result:
            rows.append(
                {
                    "data": training["data_id"] if training else "unknown",
                    "split": split,
                    "accuracy": result[f"{prefix}_accuracy"],
                }
            )
    return rows


def base_model(conversion: dict[str, Any] | None, training: dict[str, Any] | None) -> str | None:
    """The Hub id of the model a checkpoint derives from: its conversion's base model, else the Hub checkpoint its
    training started from; None for a model trained from scratch (or of unknown origin)."""
    if conversion is not None:
        return conversion["base_model"]
    start = training["model"]["model_name_or_path"] if training else None
    return start if start is not None and not os.path.exists(start) else None


def build_model_card(
    model_dir: str,
    config: PreTrainedConfig,
    num_parameters: int,
    repo_id: str,
    template_path: str | os.PathLike[str] = DEFAULT_TEMPLATE,
    chat_template: bool = False,
) -> ModelCard:
    """The model card of the FMT checkpoint in ``model_dir`` (with ``config`` and ``num_parameters``; a tokenizer
    with a chat template if ``chat_template``), published as ``repo_id``, rendered from the Jinja template at
    ``template_path``."""
    if not os.path.isfile(template_path):
        raise FileNotFoundError(f"model card template {template_path} not found: pass --template")
    conversion = _read_json(os.path.join(model_dir, CONVERSION_RECORD_NAME))
    training = _training_summary(model_dir, conversion)
    base = base_model(conversion, training)
    evaluations = _evaluations(model_dir, training)
    accuracies = _accuracies(model_dir, training)
    kind = model_kind(config)
    model_name = repo_id.split("/")[-1]
    dataset_name = training["data"]["dataset_name"] if training else None
    # A Hub dataset goes in the card's metadata; a local folder is none.
    hub_dataset = dataset_name if dataset_name is not None and not os.path.exists(dataset_name) else None
    eval_results = [
        EvalResult(
            task_type=kind.pipeline_tag,
            dataset_type=row["data"],
            dataset_name=row["data"],
            dataset_split=row["split"],
            metric_type=metric,
            metric_name=f"{metric.replace('_', ' ').capitalize()} ({row['protocol']}, context {row['context_length']})",
            metric_value=round(row[metric], 4),
        )
        for row in evaluations
        for metric in ("bits_per_byte", "perplexity")
        if row[metric] is not None
    ] + [
        EvalResult(
            task_type=kind.pipeline_tag,
            dataset_type=row["data"],
            dataset_name=row["data"],
            dataset_split=row["split"],
            metric_type="accuracy",
            metric_value=round(row["accuracy"], 4),
        )
        for row in accuracies
    ]
    if conversion is not None:  # a derivative carries its base model's licence, or says it is not known
        license_ = conversion["license"] or "other"
    else:
        license_ = PROJECT_LICENSE
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base,
        # A conversion (weights copied, FMA's downsamplers added) with or without uptraining changes the base's
        # weights and architecture: a finetune in the Hub's terms (not an adapter, a quantization or a merge).
        base_model_relation="finetune" if base is not None else None,
        license=license_,
        language=conversion["languages"] if conversion else None,
        library_name="transformers",
        pipeline_tag=kind.pipeline_tag,
        tags=TAGS,
        datasets=[hub_dataset] if hub_dataset else None,
        eval_results=eval_results or None,
    )
    classifies = kind.pipeline_tag in ("text-classification", "token-classification")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=model_name,
        config=config,
        kind=kind,
        is_causal=config.is_causal,
        auto_class=kind.auto_class.__name__,
        labels=list(config.id2label.values()) if classifies else None,
        num_parameters=f"{num_parameters / 1e6:.2f}M ({num_parameters:,})",
        fma_levels=num_levels(config.max_position_embeddings, config.fma_block_size, config.fma_near_blocks),
        length_free=length_free(config),
        base_model=base,
        conversion=conversion,
        chat_template=chat_template,
        max_new_tokens=_example_new_tokens(config),
        training=training,
        evaluations=evaluations,
        accuracies=accuracies,
    )


EXAMPLE_NEW_TOKENS = 200
"""New tokens of the card's generation example, where the model's length allows them."""


def _example_new_tokens(config: PreTrainedConfig) -> int:
    """``max_new_tokens`` of the card's generation example: :data:`EXAMPLE_NEW_TOKENS`, or half the longest sequence
    of a model that caps it (``generate`` refuses prompt plus new tokens over the cap), leaving the rest to the
    prompt."""
    cap = sequence_cap(config)  # the example loads the model with its default attention, FMA
    return EXAMPLE_NEW_TOKENS if cap is None else min(EXAMPLE_NEW_TOKENS, cap // 2)


def save_for_hub(
    model_dir: str,
    out_dir: str,
    repo_id: str | None = None,
    template_path: str | os.PathLike[str] = DEFAULT_TEMPLATE,
    tokenizer_name: str | None = None,
) -> str:
    """Write the Hub repository of the FMT checkpoint in ``model_dir`` to ``out_dir``; return ``out_dir``.

    The folder holds what ``save_pretrained`` writes for the model (weights, config with the full ``auto_map``,
    modelling code) and its tokenizer, and the model card as ``README.md``; training checkpoints and logs stay
    behind. ``repo_id`` names the model in the card's loading examples (default: the folder name of ``out_dir``).
    """
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "fmt":
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model; push_to_hub.py publishes FMT models")
    model = model_kind(config).auto_class.from_pretrained(model_dir)
    tokenizer = load_tokenizer(tokenizer_name or model_dir)
    card = build_model_card(
        model_dir,
        model.config,
        model.num_parameters(),
        repo_id or Path(out_dir).resolve().name,
        template_path,
        chat_template=tokenizer.chat_template is not None,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    card.save(os.path.join(out_dir, "README.md"))
    return out_dir


def push_to_hub(args: PushArguments) -> CommitInfo | None:
    """Write the repository folder (:func:`save_for_hub`) to ``args.local_dir`` and/or upload it as
    ``args.repo_id`` in one commit; return the commit (``None`` without ``repo_id``)."""
    if args.repo_id is None:
        save_for_hub(args.model_dir, args.local_dir, None, args.template, args.tokenizer_name)
        return None
    api = HfApi(token=args.token)
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
    if args.revision is not None:
        api.create_branch(repo_id, branch=args.revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_for_hub(args.model_dir, args.local_dir or tmp, repo_id, args.template, args.tokenizer_name)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=args.commit_message,
            revision=args.revision,
            create_pr=args.create_pr,
        )


__all__ = [
    "DEFAULT_TEMPLATE",
    "MODEL_KINDS",
    "ModelKind",
    "PushArguments",
    "base_model",
    "build_model_card",
    "model_kind",
    "public_name",
    "push_to_hub",
    "save_for_hub",
]
