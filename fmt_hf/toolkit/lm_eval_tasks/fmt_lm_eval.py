"""Datasets of fmt_hf's lm-evaluation-harness tasks (the YAML files beside this one), built from held-out documents.

lm-eval calls these `custom_dataset` functions with the model arguments and `--metadata` merged into keyword
arguments. They read these (and ignore the rest):

- `corpus` (default `"shakespeare"`), `works` (None), `split` (`"test"`), `split_seed` (0),
  `validation_fraction` (0.1), `test_fraction` (0.1): the documents of that split of a registry corpus, as
  `scripts/train.py` splits it with the same options -- by default the plays it holds out, which a model trained
  there never saw -- read from the corpus cache on disk (fetched there once, see `fmt_hf.toolkit.data`).
- `documents`: a JSON Lines file (one `{"text": ...}` per line) of held-out documents to use instead.
- `fmt_heldout_continuation` only: `context_chars` (1024), `continuation_chars` (160), `questions_per_document`
  (25), `seed` (0).
"""

import random
import re

import datasets

from fmt_hf.toolkit.data import build_corpus


def _documents(
    corpus: str = "shakespeare",
    works: str | None = None,
    documents: str | None = None,
    split: str = "test",
    split_seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    **_,
) -> datasets.Dataset:
    if documents is not None:
        return datasets.load_dataset("json", data_files=documents, split="train")
    return build_corpus(
        corpus, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=split_seed, titles=works
    )[split]


def held_out_documents(**kwargs) -> dict[str, datasets.Dataset]:
    """`fmt_heldout_perplexity`: the held-out documents, whole (`text`)."""
    return {"test": _documents(**kwargs).select_columns(["text"])}


def perplexity_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """Log-likelihood of the document with its words and bytes, for lm-eval's weighted perplexities."""
    (loglikelihood,) = results
    n_words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def _next_lines(text: str, start: int, chars: int) -> str:
    """Whole lines of `text` from `start`, at most `chars` characters (at least one line)."""
    piece = text[start : start + chars]
    end = piece.rfind("\n")
    return piece[: end + 1] if end > 0 else piece


def continuation_choices(
    context_chars: int = 1024, continuation_chars: int = 160, questions_per_document: int = 25, seed: int = 0, **kwargs
) -> dict[str, datasets.Dataset]:
    """`fmt_heldout_continuation`: per held-out document, `questions_per_document` passages of `context_chars`
    characters ending at a line break, each with four choices: the lines that follow it (at most
    `continuation_chars` characters) and three runs of lines of the same length limit from elsewhere in the held-out
    documents (away from the passage and its continuation). The draw is fixed by `seed`."""
    texts = list(_documents(**kwargs)["text"])
    rng = random.Random(seed)

    def starts(text: str) -> list[int]:  # line starts with a full passage before and a non-blank run after
        return [
            i + 1
            for i, c in enumerate(text)
            if c == "\n" and context_chars <= i + 1 < len(text) and _next_lines(text, i + 1, continuation_chars).strip()
        ]

    candidates = [starts(text) for text in texts]
    sources = [d for d, found in enumerate(candidates) if found]
    if not sources:
        raise ValueError(f"no held-out document has a line break after {context_chars} characters to ask about")
    rows = []
    for d in sources:
        text = texts[d]
        for start in sorted(rng.sample(candidates[d], min(questions_per_document, len(candidates[d])))):
            answer = _next_lines(text, start, continuation_chars)
            distractors = set()
            for _ in range(1000):
                other = rng.choice(sources)
                position = rng.choice(candidates[other])
                if other == d and start - context_chars - continuation_chars < position < start + len(answer):
                    continue  # overlaps the passage or its continuation
                distractors.add(_next_lines(texts[other], position, continuation_chars))
                distractors.discard(answer)
                if len(distractors) == 3:
                    break
            else:
                raise ValueError("the held-out documents are too short for three distinct distractors")
            choices = sorted(distractors)
            rng.shuffle(choices)
            label = rng.randrange(4)
            choices.insert(label, answer)
            rows.append({"context": text[start - context_chars : start], "choices": choices, "label": label})
    return {"test": datasets.Dataset.from_list(rows)}
