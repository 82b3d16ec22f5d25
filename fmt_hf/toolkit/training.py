"""Pretraining and fine-tuning with the `Trainer`: the engine of ``scripts/train.py``.

In the style of transformers' ``run_clm.py`` / ``run_mlm.py`` / ``run_classification.py``: three argument
dataclasses parsed with ``HfArgumentParser`` (:class:`~fmt_hf.toolkit.arguments.ModelArguments`,
:class:`~fmt_hf.toolkit.arguments.DataArguments`, ``transformers.TrainingArguments``) and one function,
:func:`train`, that runs the job: the tokenizer (bytes by default), a model built from scratch (an FMT config with
overrides) or loaded from a checkpoint, the data, training with the ``Trainer`` (checkpoints,
``resume_from_checkpoint``) and evaluation through the package's ``evaluate`` modules. Three tasks:

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

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..model import FMTConfig
from ..model.fma_options import sequence_cap
from .arguments import DataArguments, ModelArguments, parse_config_overrides
from .classification import passage_classification
from .data import pack_documents
from .metrics.trainer_metrics import ClassificationMetrics, LanguageModelingMetrics
from .records import CONVERSION_RECORD_NAME, TRAINING_SETUP_NAME, write_training_setup
from .tokenizer import BYTE_TOKENIZER, load_tokenizer

logger = logging.getLogger(__name__)

AUTO_MODEL_CLASSES = {
    "clm": AutoModelForCausalLM,
    "mlm": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
}
"""The Auto class that builds or loads the model of each task."""


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
    model_args: ModelArguments, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, wanted: list[str]
) -> TaskData:
    """``clm``/``mlm``: the corpus split by document and packed into ``seq_len``-token blocks."""
    if "test" in wanted:
        raise ValueError(
            "--do_predict scores the test passages of --task classification; for a language model's test documents "
            "run scripts/eval_lm.py --split test"
        )
    config = build_config(model_args, tokenizer, data_args.seq_len)
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
    model_args: ModelArguments, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, wanted: list[str]
) -> TaskData:
    """``classification``: passages labelled by their work, from held-out regions of every work for evaluation
    (:func:`fmt_hf.toolkit.classification.passage_classification`), tokenized up to ``seq_len`` tokens."""
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


def carry_conversion_record(model_name_or_path: str | None, output_dir: str) -> None:
    """Copy the :data:`CONVERSION_RECORD_NAME` of the local checkpoint ``model_name_or_path`` (if it has one) into
    ``output_dir``: a model trained from a conversion still has the converted model as its base."""
    if model_name_or_path is None or os.path.abspath(model_name_or_path) == os.path.abspath(output_dir):
        return
    record = os.path.join(model_name_or_path, CONVERSION_RECORD_NAME)
    if os.path.isfile(record):
        shutil.copy(record, output_dir)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict[str, float]:
    """Train (``--do_train``) and/or evaluate (``--do_eval``, and ``--do_predict`` for classification) a language
    model or a classifier; return the metrics.

    Training saves the model, its tokenizer and its code (Hub layout, loadable with ``trust_remote_code=True``) to
    ``output_dir``, with the ``Trainer``'s ``train_results.json``/``trainer_state.json``, :data:`TRAINING_SETUP_NAME`
    and the start checkpoint's :data:`CONVERSION_RECORD_NAME` if it has one; checkpoints follow the ``save_*``
    arguments, and ``resume_from_checkpoint`` continues one (step count, optimizer, scheduler, data order and RNG
    states). Evaluation on the validation blocks adds
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
    # The main process builds first; the others then reuse what it downloaded and cached (corpora, Hub datasets and
    # configs, the `datasets` cache of the packed blocks).
    with training_args.main_process_first(desc=f"preparing the {model_args.task} data"):
        data = build_data(model_args, data_args, tokenizer, wanted)
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
            write_training_setup(
                os.path.join(training_args.output_dir, TRAINING_SETUP_NAME), model_args, data_args, training_args
            )
            carry_conversion_record(model_args.model_name_or_path, training_args.output_dir)
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
    "TaskData",
    "build_config",
    "build_model",
    "carry_conversion_record",
    "classification_data",
    "language_modeling_data",
    "freeze_all_but_downsamplers",
    "train",
]
