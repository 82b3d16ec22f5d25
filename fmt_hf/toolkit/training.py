"""Pretraining and fine-tuning with the `Trainer`: the engine of ``scripts/train.py``.

In the style of transformers' ``run_clm.py`` / ``run_mlm.py`` / ``run_classification.py``: three argument
dataclasses parsed with ``HfArgumentParser`` (:class:`ModelArguments`, :class:`DataArguments`,
``transformers.TrainingArguments``) and one function, :func:`train`, that runs the job: the tokenizer (bytes by
default), a model built from scratch (an FMT config with overrides) or loaded from a checkpoint, the data, training
with the ``Trainer`` (checkpoints, ``resume_from_checkpoint``) and evaluation through the package's ``evaluate``
modules. Three tasks:

- ``clm`` / ``mlm``: language modelling on a corpus split by document and packed into ``seq_len``-token blocks,
  evaluated in bits per byte and perplexity (``lm_bits``).
- ``classification``: a sequence classifier telling which work a long passage comes from
  (:mod:`fmt_hf.toolkit.classification`: passages from held-out regions of every work), fine-tuned from an FMT
  causal or masked LM checkpoint or trained from scratch, evaluated in accuracy (``accuracy``) on the validation
  passages (``--do_eval``) and the test passages (``--do_predict``).

Nothing here depends on the number of processes: under ``accelerate launch`` the ``Trainer`` reads the launcher's
environment and runs DDP (over gloo on CPU); the same code scales to many GPUs or nodes by accelerate config alone.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..model import FMTConfig
from ..model.modeling_fmt import sequence_cap
from .classification import passage_classification
from .data import CORPORA, DEFAULT_CORPUS, build_corpus, load_corpus, pack_documents, select_documents
from .metrics import ACCURACY, LM_BITS
from .tokenizer import BYTE_TOKENIZER, load_tokenizer

logger = logging.getLogger(__name__)

Task = Literal["clm", "mlm", "classification"]

AUTO_MODEL_CLASSES = {
    "clm": AutoModelForCausalLM,
    "mlm": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
}
"""The Auto class that builds or loads the model of each task."""

TRAINING_SETUP_NAME = "training_setup.json"
"""File that :func:`train` writes next to the trained model: the model, data and main training arguments of the
run, read back by the model card (:mod:`fmt_hf.toolkit.hub`)."""

# TrainingArguments recorded in TRAINING_SETUP_NAME (with the number of processes) for the model card.
_RECORDED_TRAINING_ARGUMENTS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_steps",
    "num_train_epochs",
    "seed",
)


@dataclass
class ModelArguments:
    """Which model to train: an FMT built from scratch, or a checkpoint to continue from."""

    task: Task = field(
        default="clm",
        metadata={
            "help": "Causal language modelling (`clm`, next-token prediction), masked language modelling "
            "(`mlm`, bidirectional), or `classification`: which work a long passage comes from (a "
            "sequence classifier, pooled at the last token of a causal model and over all tokens of "
            "a bidirectional one)."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint (local folder or Hub id) to start from. Leave unset to train an FMT from scratch."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Only when training from scratch: comma-separated FMTConfig fields overriding the "
            "defaults, e.g. `hidden_size=128,num_hidden_layers=2,fma_block_size=32` (`is_causal=False` "
            "for a bidirectional classifier). `max_position_embeddings` defaults to --seq_len."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": f"Tokenizer folder or Hub id, or `{BYTE_TOKENIZER}` for the byte-level tokenizer. "
            "Defaults to the checkpoint's tokenizer, or bytes when training from scratch."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention implementation (`fma`, `sdpa`, `eager`); FMT models default to `fma`."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a checkpoint from the Hub to run its own modelling code."},
    )
    train_only_downsamplers: bool = field(
        default=False,
        metadata={
            "help": "Freeze every weight but the FMA downsamplers: uptraining a model converted from a dense "
            "checkpoint (scripts/convert_llama.py), whose other weights are already trained."
        },
    )

    def __post_init__(self) -> None:
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError(
                "--config_overrides only applies to a model trained from scratch; it can't be combined with "
                "--model_name_or_path"
            )


@dataclass
class CorpusArguments:
    """Which documents to use: a corpus shipped in a registry package, or a dataset on the Hub."""

    corpus: str = field(
        default=DEFAULT_CORPUS,
        metadata={"help": f"Registry corpus, one of: {', '.join(CORPORA)}. Ignored when --dataset_name is given."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset for `datasets.load_dataset` (a Hub id or a local folder) instead of --corpus; "
            "one row per document."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of --dataset_name."})
    text_column: str = field(default="text", metadata={"help": "Text column of --dataset_name."})
    works: str | None = field(
        default=None,
        metadata={
            "help": "Regular expression keeping the documents whose title it matches (default: all), e.g. "
            "`^(Henry|Richard)` for Shakespeare's nine histories, `^(?!Henry|Richard)` for the other "
            "plays. For --task classification the works kept are the classes."
        },
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the documents held out for validation."}
    )
    test_fraction: float = field(default=0.1, metadata={"help": "Fraction of the documents held out for testing."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the document-level split (kept apart from the training seed)."}
    )
    corpus_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where registry corpora are downloaded (default: $FMT_HF_CACHE/corpora or ~/.cache/fmt_hf/corpora)."
        },
    )

    @property
    def data_id(self) -> str:
        """Name of the documents in results and model cards: the dataset's, or ``fmt_hf/<corpus>``."""
        return self.dataset_name or f"fmt_hf/{self.corpus}"

    def load_works(self) -> datasets.Dataset:
        """The --works documents, unsplit, with their ``title`` and ``text``: of the corpus, or of --dataset_name's
        train split (which then needs a ``title`` column)."""
        if self.dataset_name is None:
            return select_documents(load_corpus(self.corpus, self.corpus_cache_dir), self.works)
        documents = datasets.load_dataset(self.dataset_name, self.dataset_config_name, split="train")
        if self.text_column != "text":
            documents = documents.rename_column(self.text_column, "text")
        if "title" not in documents.column_names:
            raise ValueError(f"--dataset_name {self.dataset_name}: classification needs a `title` column (the class)")
        return select_documents(documents, self.works)

    def load_documents(self) -> datasets.DatasetDict:
        """The ``train``/``validation``/``test`` splits of whole documents (see
        :func:`fmt_hf.toolkit.data.build_corpus`)."""
        return build_corpus(
            self.corpus,
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config_name,
            text_column=self.text_column,
            validation_fraction=self.validation_fraction,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
            cache_dir=self.corpus_cache_dir,
            titles=self.works,
        )


@dataclass
class DataArguments(CorpusArguments):
    """The documents and how they become training examples."""

    seq_len: int = field(
        default=1024,
        metadata={"help": "Tokens per packed training block; for classification, the longest passage in tokens."},
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens masked for --task mlm."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training blocks (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N validation blocks, or validation and test passages (quick runs)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize and pack the documents."}
    )
    passage_chars: int | None = field(
        default=None,
        metadata={
            "help": "Classification: characters per passage (default --seq_len; with the byte tokenizer a "
            "character of the corpora is a token). Passages are truncated to --seq_len tokens."
        },
    )
    regions_per_work: int = field(
        default=10,
        metadata={
            "help": "Classification: each work is cut into this many regions, assigned to train, validation "
            "and test by --validation_fraction and --test_fraction."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """``"hidden_size=128,fma_downsample=full"`` -> ``{"hidden_size": 128, "fma_downsample": "full"}``.

    Values are Python literals (``128``, ``0.1``, ``True``, ``None``) or else plain strings. Names that are not
    ``FMTConfig`` fields raise ``ValueError`` (a config would otherwise keep a misspelt name as an unused extra).
    """
    if not overrides:
        return {}
    known = {f.name for f in dataclasses.fields(FMTConfig)}
    parsed = {}
    for item in overrides.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"config override {item!r} is not of the form name=value")
        if name not in known:
            raise ValueError(f"config override {name!r} is not an FMTConfig field; fields: {', '.join(sorted(known))}")
        try:
            parsed[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[name] = value
    return parsed


def build_config(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, seq_len: int, labels: list[str] | None = None
) -> PreTrainedConfig:
    """The checkpoint's config, or a new ``FMTConfig`` sized for ``tokenizer`` with the overrides applied.

    A new config takes its vocabulary size and special token ids from the tokenizer and ``max_position_embeddings``
    from ``seq_len`` (FMA builds its hierarchy for that length), unless overridden. A classifier's config (either
    kind) gets one class per name in ``labels``.
    """
    classes = {}
    if labels is not None:
        classes = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    if model_args.model_name_or_path is not None:
        return AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **classes
        )
    defaults = {
        **classes,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": seq_len,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return FMTConfig(**{**defaults, **parse_config_overrides(model_args.config_overrides)})


def build_model(model_args: ModelArguments, config: PreTrainedConfig, vocab_size: int) -> PreTrainedModel:
    """The model for ``model_args.task``: loaded from the checkpoint, or freshly initialised from ``config``.

    Embeddings smaller than the tokenizer's ``vocab_size`` are resized to it, as in ``run_clm.py``.
    """
    auto_class = AUTO_MODEL_CLASSES[model_args.task]
    if model_args.model_name_or_path is not None:
        model = auto_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
        )
    else:
        model = auto_class.from_config(config, attn_implementation=model_args.attn_implementation)
        logger.info("Training a new model: %.2fM parameters", model.num_parameters() / 1e6)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def freeze_all_but_downsamplers(model: PreTrainedModel) -> int:
    """Freeze every parameter of ``model`` but those of its FMA downsamplers; return how many stay trainable.

    Raises ``ValueError`` when there are none (not an FMT model, or ``fma_downsample="avgpool"``)."""
    model.requires_grad_(False)
    for module in model.modules():
        # By class name: a model loaded as Hub code has its own copy of the class.
        if type(module).__name__ == "FastMultipoleAttention":
            module.requires_grad_(True)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    if trainable == 0:
        raise ValueError(
            "--train_only_downsamplers: the model has no FMA downsampler weights to train (not an FMT model, or "
            "fma_downsample='avgpool')"
        )
    return trainable


class LanguageModelingMetrics:
    """``preprocess_logits_for_metrics`` and ``compute_metrics`` of the ``Trainer`` for language modelling.

    Each evaluation block's logits are reduced right away to two numbers, its summed negative log-likelihood
    (nats) and its count of scored tokens, so evaluation keeps no ``seq_len x vocab`` logits. The totals then go
    through the ``lm_bits`` metric: bits per byte, bits per token and perplexity of the whole evaluation set.

    For causal LM, ``num_bytes`` holds the UTF-8 bytes that each evaluation block's predicted tokens cover (the
    ``num_bytes`` column of :func:`fmt_hf.toolkit.data.pack_documents`), in dataset order, as the evaluation loop
    gathers the blocks. Masked LM (``num_bytes=None``) scores randomly masked tokens whose byte spans are not
    recorded, so
    it reports the per-token results only (with the byte tokenizer a token is a byte).
    """

    def __init__(self, task: Task, num_bytes: list[int] | None = None) -> None:
        if (task == "clm") != (num_bytes is not None):
            raise ValueError("causal LM evaluation needs the byte count of every block; masked LM takes none")
        self.task = task
        self.num_bytes = num_bytes
        self.metric = evaluate.load(LM_BITS, keep_in_memory=True)

    def preprocess_logits(self, logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """``(batch, 2)``: summed NLL and number of scored tokens of each block."""
        if isinstance(logits, tuple):  # models that return more than the logits put them first
            logits = logits[0]
        if self.task == "clm":  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
        return torch.stack([nll.sum(-1, dtype=torch.float64), (labels != -100).sum(-1).to(torch.float64)], dim=-1)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        nll, num_tokens = prediction.predictions[:, 0], prediction.predictions[:, 1].astype(np.int64)
        if self.num_bytes is None:
            # No byte counts: the metric's per-byte outputs (computed here from token counts) are dropped.
            tokens = num_tokens.tolist()
            result = self.metric.compute(nll=nll.tolist(), num_tokens=tokens, num_bytes=tokens)
            return {key: result[key] for key in ("nll_per_token", "bits_per_token", "perplexity", "num_tokens")}
        if len(nll) != len(self.num_bytes):
            raise RuntimeError(f"evaluation returned {len(nll)} blocks for a dataset of {len(self.num_bytes)}")
        return self.metric.compute(nll=nll.tolist(), num_tokens=num_tokens.tolist(), num_bytes=self.num_bytes)


class ClassificationMetrics:
    """``preprocess_logits_for_metrics`` and ``compute_metrics`` of the ``Trainer`` for classification: each
    example's logits are reduced right away to its predicted class, scored by the package's ``accuracy`` module."""

    def __init__(self) -> None:
        self.metric = evaluate.load(ACCURACY, keep_in_memory=True)

    @staticmethod
    def preprocess_logits(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """``(batch,)``: the predicted class of each example."""
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(-1)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        return self.metric.compute(
            predictions=prediction.predictions.tolist(), references=prediction.label_ids.tolist()
        )


@dataclass
class TaskData:
    """What :func:`train` hands the ``Trainer`` for one task: the model's config, the datasets of the wanted
    splits (``train``, ``validation``, ``test``), the collator and the metrics (None without evaluation)."""

    config: PreTrainedConfig
    splits: dict[str, datasets.Dataset]
    collator: Any
    metrics: LanguageModelingMetrics | ClassificationMetrics | None


def _sequence_cap(config: PreTrainedConfig, model_args: ModelArguments) -> int | None:
    """The longest block the model trains on: an FMT model's :func:`~fmt_hf.model.modeling_fmt.sequence_cap` (none
    for the length-free FMA families, e.g. a converted model with recursive downsamplers), else the config's
    ``max_position_embeddings``."""
    if config.model_type == FMTConfig.model_type:  # also an FMTConfig of Hub code (another class)
        return sequence_cap(config, model_args.attn_implementation)
    return getattr(config, "max_position_embeddings", None)


def language_modeling_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    wanted: list[str],
) -> TaskData:
    """``clm``/``mlm``: the corpus split by document and packed into ``seq_len``-token blocks."""
    if "test" in wanted:
        raise ValueError(
            "--do_predict scores the test passages of --task classification; for a language model's test documents "
            "run scripts/eval_lm.py --split test"
        )
    config = build_config(model_args, tokenizer, data_args.seq_len)
    # The main process builds first; with a Hub dataset the others then reuse its `datasets` cache.
    with training_args.main_process_first(desc="building and packing the corpus"):
        documents = data_args.load_documents()
        blocks = pack_documents(
            datasets.DatasetDict({name: documents[name] for name in wanted}),
            tokenizer,
            data_args.seq_len,
            task=model_args.task,
            max_position_embeddings=_sequence_cap(config, model_args),
            num_proc=data_args.preprocessing_num_workers,
        )
    splits = {
        name: _first(blocks[name], data_args.max_train_samples if name == "train" else data_args.max_eval_samples)
        for name in wanted
    }
    metrics = None
    if "validation" in splits:
        metrics = LanguageModelingMetrics(
            model_args.task, splits["validation"]["num_bytes"] if model_args.task == "clm" else None
        )
    if model_args.task == "clm":
        collator = default_data_collator
    else:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
    return TaskData(config, splits, collator, metrics)


def classification_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    wanted: list[str],
) -> TaskData:
    """``classification``: passages labelled by their work, from held-out regions of every work for evaluation
    (:func:`fmt_hf.toolkit.classification.passage_classification`), tokenized up to ``seq_len`` tokens."""
    with training_args.main_process_first(desc="cutting the works into passages"):
        works = data_args.load_works()
        passages = passage_classification(
            works,
            data_args.passage_chars or data_args.seq_len,
            regions=data_args.regions_per_work,
            validation_fraction=data_args.validation_fraction,
            test_fraction=data_args.test_fraction,
            seed=data_args.split_seed,
        )
    config = build_config(model_args, tokenizer, data_args.seq_len, labels=list(works["title"]))
    max_position_embeddings = _sequence_cap(config, model_args)
    if max_position_embeddings is not None and data_args.seq_len > max_position_embeddings:
        raise ValueError(
            f"seq_len={data_args.seq_len} exceeds the model's max_position_embeddings={max_position_embeddings}"
        )
    splits = {}
    for name in wanted:
        limit = data_args.max_train_samples if name == "train" else data_args.max_eval_samples
        splits[name] = _first(passages[name], limit).map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=data_args.seq_len),
            batched=True,
            remove_columns=["text"],
            desc=f"Tokenizing the {name} passages",
        )
    metrics = ClassificationMetrics() if {"validation", "test"} & set(wanted) else None
    return TaskData(config, splits, DataCollatorWithPadding(tokenizer), metrics)


def _setup_logging(training_args: TrainingArguments) -> None:
    """``run_clm.py``'s logging: INFO on the main process, the TrainingArguments' level on the others."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if training_args.should_log else logging.WARN,
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def _first(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _write_training_setup(
    path: str, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    all_training_args = training_args.to_dict()  # enums as their values: JSON-ready
    training = {name: all_training_args[name] for name in _RECORDED_TRAINING_ARGUMENTS}
    training["world_size"] = training_args.world_size
    setup = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "training": training}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(setup, f, indent=2)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict[str, float]:
    """Train (``--do_train``) and/or evaluate (``--do_eval``, and ``--do_predict`` for classification) a language
    model or a classifier; return the metrics.

    Training saves the model, its tokenizer and its code (Hub layout, loadable with ``trust_remote_code=True``) to
    ``output_dir``, with the ``Trainer``'s ``train_results.json``/``trainer_state.json`` and
    :data:`TRAINING_SETUP_NAME`; checkpoints follow the ``save_*`` arguments, and ``resume_from_checkpoint`` continues
    one (step count, optimizer, scheduler, data order and RNG states). Evaluation on the validation blocks adds
    ``eval_bits_per_byte`` (causal LM), ``eval_bits_per_token`` and ``eval_perplexity`` from summed NLL, saved to
    ``eval_results.json``; for classification it adds ``eval_accuracy`` on the validation passages, and
    ``--do_predict`` ``test_accuracy`` on the test passages (``test_results.json``).

    Raises ``ValueError`` for bad input: an unknown corpus, ``seq_len`` over the model's
    ``max_position_embeddings``, an empty split or one too short for a single block or passage, fewer than two
    works to classify.
    """
    _setup_logging(training_args)
    logger.warning(
        "Process rank %d of %d, device %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
    )
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or BYTE_TOKENIZER)
    wanted = [
        name
        for name, flag in (
            ("train", training_args.do_train),
            ("validation", training_args.do_eval),
            ("test", training_args.do_predict),
        )
        if flag
    ]
    build_data = classification_data if model_args.task == "classification" else language_modeling_data
    data = build_data(model_args, data_args, training_args, tokenizer, wanted)
    train_dataset = data.splits.get("train")
    eval_dataset = data.splits.get("validation")

    model = build_model(model_args, data.config, len(tokenizer))
    if model_args.train_only_downsamplers:
        trainable = freeze_all_but_downsamplers(model)
        logger.info(
            "Training only the FMA downsamplers: %.2fM of %.2fM parameters",
            trainable / 1e6,
            model.num_parameters() / 1e6,
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data.collator,
        compute_metrics=data.metrics,
        preprocess_logits_for_metrics=data.metrics.preprocess_logits if data.metrics is not None else None,
    )

    results: dict[str, float] = {}
    if train_dataset is not None:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # model, tokenizer and FMT code files, as save_pretrained lays them out
        train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            _write_training_setup(
                os.path.join(training_args.output_dir, TRAINING_SETUP_NAME), model_args, data_args, training_args
            )
        results.update(train_metrics)
    if eval_dataset is not None:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)
    if "test" in data.splits:
        test_metrics = {
            **trainer.evaluate(data.splits["test"], metric_key_prefix="test"),
            "test_samples": len(data.splits["test"]),
        }
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        results.update(test_metrics)
    return results


__all__ = [
    "AUTO_MODEL_CLASSES",
    "ClassificationMetrics",
    "CorpusArguments",
    "DataArguments",
    "LanguageModelingMetrics",
    "ModelArguments",
    "TRAINING_SETUP_NAME",
    "TaskData",
    "build_config",
    "build_model",
    "classification_data",
    "language_modeling_data",
    "freeze_all_but_downsamplers",
    "parse_config_overrides",
    "train",
]
