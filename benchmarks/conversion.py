"""Zero-shot conversion: a Llama checkpoint converted to FMT under several FMA settings, scored against itself.

The engine and command of ``scripts/bench_conversion.py`` (:class:`ConversionBenchArguments`,
:func:`bench_conversion`). The source is loaded once; every setting is a
:func:`fmt_hf.convert_llama_to_fmt` of it in memory (downsamplers at their average init: nothing is trained), and
the source itself is the ``dense`` row. Every row scores the same documents with the same windows as
``scripts/eval_lm.py`` (``score_documents`` and the ``lm_bits`` metric), at each context length. Each FMA row also
records the decoding state its layers would hold after ``state_tokens`` tokens: ``state_vectors`` key/value vectors
per KV head (a dense cache holds ``2 * state_tokens``), measured by prefilling one head of the converted layer.

What the grid shows for SmolLM2-135M (README, "Pretrained models to FMT"): the block size ``m`` (the near field a
query sees at full resolution, ``m..2m`` tokens) decides zero-shot quality; ``p`` hardly matters; sinks matter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import evaluate
import torch
from tqdm.auto import tqdm

from fmt_hf import convert_llama_to_fmt
from fmt_hf.toolkit.arguments import CorpusArguments, parse_config_overrides
from fmt_hf.toolkit.convert import load_llama
from fmt_hf.toolkit.evaluation import score_documents
from fmt_hf.toolkit.metrics import LM_BITS
from fmt_hf.toolkit.records import append_rows, read_rows

DENSE = "dense"
"""The setting name of the source model's own row."""

DEFAULT_SETTINGS = (
    "fma_block_size=64,fma_coarse_tokens=4",
    "fma_block_size=64,fma_coarse_tokens=4,fma_sink_tokens=64",
    "fma_block_size=64,fma_coarse_tokens=16,fma_sink_tokens=64",
    "fma_block_size=128,fma_coarse_tokens=8,fma_sink_tokens=64",
    "fma_block_size=256,fma_coarse_tokens=4,fma_sink_tokens=64",
    "fma_block_size=256,fma_coarse_tokens=16,fma_sink_tokens=64",
    "fma_block_size=384,fma_coarse_tokens=4,fma_sink_tokens=64",
    "fma_block_size=448,fma_coarse_tokens=4,fma_sink_tokens=64",
    "fma_block_size=512,fma_coarse_tokens=32,fma_sink_tokens=64",
)
"""The grid of the README's table: FMTConfig fields per setting (``fma_downsample`` defaults to ``recursive``, which
at its average init equals ``avgpool`` and has no length cap)."""


def setting_options(setting: str) -> dict:
    """The FMTConfig fields of a setting string (``"fma_block_size=256,fma_sink_tokens=64"``), recursive by default."""
    options = parse_config_overrides(setting)
    unknown = sorted(name for name in options if not name.startswith("fma_"))
    if unknown:
        raise ValueError(f"setting {setting!r}: only fma_* fields can vary, got {unknown}")
    return {"fma_downsample": "recursive", **options}


@torch.no_grad()
def state_vectors(model, tokens: int) -> int | None:
    """Key/value vectors per KV head the first layer's decoding state holds after ``tokens`` tokens (None when the
    model's downsamplers cannot reach that length)."""
    limit = getattr(model, "max_sequence_length", None)
    if limit is not None and tokens > limit:
        return None
    fma = model.model.layers[0].self_attn.fma
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, tokens, model.config.head_dim, generator=generator) for _ in range(3))
    state = fma.decoder.init_state(1, 1, torch.float32)
    fma.decoder.prefill(state, q, k, v)
    return state.num_vectors


def run_grid(
    model,
    tokenizer,
    texts: list[str],
    settings: list[str],
    context_lengths: list[int],
    path: str,
    max_document_tokens: int | None = None,
    state_tokens: int = 32768,
    progress: bool = True,
) -> list[dict]:
    """Score the source (``dense``) and each converted setting at each context length, appending a JSON row per
    (setting, context length) to ``path`` and skipping those already there; return every row of ``path``."""
    for setting in settings:
        if setting != DENSE:
            setting_options(setting)  # a bad setting fails before hours of scoring
    done = {(row["setting"], row["context_length"]) for row in read_rows(path)}
    todo = [(s, c) for s in settings for c in context_lengths if (s, c) not in done]
    metric = evaluate.load(LM_BITS, keep_in_memory=True)
    current, candidate, extra = None, model, {}
    for setting, context_length in tqdm(todo, desc="settings", unit="row", disable=not progress):
        if setting != current:  # todo is setting-major: one conversion (and one state count) per setting
            current, candidate, extra = setting, model, {}
            if setting != DENSE:
                candidate = convert_llama_to_fmt(model, **setting_options(setting)).eval()
                extra = {"state_tokens": state_tokens, "state_vectors": state_vectors(candidate, state_tokens)}
        start = time.perf_counter()
        scores = score_documents(
            candidate,
            tokenizer,
            texts,
            context_length,
            context_length - 1,
            batch_size=1,
            progress=progress,
            max_document_tokens=max_document_tokens,
        )
        row = {
            "setting": setting,
            "context_length": context_length,
            **metric.compute(**scores),
            **extra,
            "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
        }
        append_rows(path, [row])
    return read_rows(path)


def format_table(rows: list[dict]) -> str:
    """Markdown: perplexity per setting and context length, its excess over dense, and the decoding state's size."""
    contexts = sorted({row["context_length"] for row in rows})
    dense = {row["context_length"]: row["perplexity"] for row in rows if row["setting"] == DENSE}
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    by_key = {(row["setting"], row["context_length"]): row for row in rows}
    header = ["setting"] + [f"ppl @ {c}" for c in contexts] + ["state vectors / KV head", "dense cache / state"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        cells, state = [setting], None
        for c in contexts:
            row = by_key.get((setting, c))
            if row is None:
                cells.append("")
                continue
            excess = f" ({100 * (row['perplexity'] / dense[c] - 1):+.1f}%)" if c in dense and setting != DENSE else ""
            cells.append(f"{row['perplexity']:.2f}{excess}")
            state = row.get("state_vectors", state)
            tokens = row.get("state_tokens")
        if setting == DENSE or state is None:
            cells += ["", ""]
        else:
            cells += [str(state), f"{2 * tokens / state:.0f}x at {tokens} tokens"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class ConversionBenchArguments:
    """The command line of ``scripts/bench_conversion.py`` beside the corpus's ``CorpusArguments``."""

    model_name_or_path: str = field(
        metadata={"help": "Llama checkpoint: a local folder or Hub id, or the folder holding --gguf_file."}
    )
    output_file: str = field(metadata={"help": "JSON Lines file of the rows (appended; finished rows are skipped)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model_name_or_path."})
    settings: list[str] = field(
        default_factory=lambda: [DENSE, *DEFAULT_SETTINGS],
        metadata={
            "help": f"`{DENSE}` (the source) and FMA settings, each comma-separated FMTConfig fma_* fields "
            "(fma_downsample defaults to recursive)."
        },
    )
    context_lengths: list[int] = field(
        default_factory=lambda: [2048, 8192], metadata={"help": "Window lengths (stride: one less)."}
    )
    split: str = field(default="test", metadata={"help": "Split of the corpus to score."})
    max_documents: int = field(default=2, metadata={"help": "Score the split's first documents only."})
    max_document_tokens: int | None = field(default=8192, metadata={"help": "Tokens kept per document."})
    state_tokens: int = field(default=32768, metadata={"help": "Tokens after which the decoding state is counted."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})


def bench_conversion(args: ConversionBenchArguments, corpus_args: CorpusArguments) -> list[dict]:
    """Load the source and the documents, run the grid, print the table; return the rows."""
    splits = corpus_args.load_documents()
    if args.split not in splits:
        raise ValueError(f"--split: no split {args.split!r}; the data has {', '.join(splits)}")
    documents = splits[args.split]
    texts = documents.select(range(min(args.max_documents, len(documents))))["text"]
    model, tokenizer = load_llama(args.model_name_or_path, args.gguf_file)
    model.eval()
    rows = run_grid(
        model,
        tokenizer,
        texts,
        args.settings,
        args.context_lengths,
        args.output_file,
        args.max_document_tokens,
        args.state_tokens,
        progress=not args.no_progress,
    )
    print(format_table(rows))
    return rows


__all__ = [
    "DEFAULT_SETTINGS",
    "DENSE",
    "ConversionBenchArguments",
    "bench_conversion",
    "format_table",
    "run_grid",
    "setting_options",
    "state_vectors",
]
