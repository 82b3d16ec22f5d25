"""Long-document classification data: passages labelled by their work, evaluation passages from held-out regions."""

import datasets
import pytest

from fmt_hf.toolkit.classification import passage_classification
from fmt_hf.toolkit.data import select_documents


def traceable_works(count=3, length=2000):
    """Works whose text says, at every character, which work and which offset it is (so overlaps can be traced)."""
    rows = []
    for w in range(count):
        text = "".join(f"<{w}:{i:05d}>" for i in range(length // 9 + 1))[:length]
        rows.append({"title": f"Work {w}", "text": text})
    return datasets.Dataset.from_list(rows)


def test_every_split_has_every_work_and_evaluation_text_is_held_out():
    passages = passage_classification(
        traceable_works(), 90, regions=10, validation_fraction=0.2, test_fraction=0.1, seed=3
    )
    assert passages["train"].features["label"].names == ["Work 0", "Work 1", "Work 2"]
    for split in ("train", "validation", "test"):
        assert set(passages[split]["label"]) == {0, 1, 2}
        for row in passages[split]:
            assert len(row["text"]) == 90 and f"<{row['label']}:" in row["text"]  # the label is the source work

    # No evaluation character sits inside any training passage, nor validation inside test.
    def offsets(split):
        return {(row["label"], chunk) for row in passages[split] for chunk in row["text"].split("<")[1:-1]}

    train, validation, test = offsets("train"), offsets("validation"), offsets("test")
    assert not (train & validation) and not (train & test) and not (validation & test)


def test_training_passages_overlap_evaluation_passages_do_not():
    passages = passage_classification(traceable_works(count=2), 100, regions=5, train_stride=25)
    for split, stride in (("train", 25), ("test", 100)):
        texts = passages[split].filter(lambda label: label == 0, input_columns="label")["text"]
        starts = sorted(traceable_works()[0]["text"].index(text) for text in texts)
        assert min(b - a for a, b in zip(starts, starts[1:])) == stride


def test_the_draw_is_seeded():
    first, again = (passage_classification(traceable_works(), 90, seed=1) for _ in range(2))
    other = passage_classification(traceable_works(), 90, seed=2)
    assert first["test"]["text"] == again["test"]["text"] and first["test"]["text"] != other["test"]["text"]
    # Works are mixed within each split: any first passages are a sample of all works.
    assert len(set(first["validation"]["label"][:6])) > 1


def test_works_are_chosen_by_title():
    chosen = select_documents(traceable_works(count=4), "Work [13]")
    assert list(chosen["title"]) == ["Work 1", "Work 3"]
    assert (
        len(select_documents(traceable_works(count=4), "^(?!Work 2)")) == 3
        and len(select_documents(traceable_works(), None)) == 3
    )
    with pytest.raises(ValueError, match="no document title matches 'Work 9'"):
        select_documents(traceable_works(count=4), "Work 9")
    with pytest.raises(ValueError, match="a classifier needs at least two works, got 1"):
        passage_classification(select_documents(traceable_works(count=4), "Work 2"), 90)


@pytest.mark.parametrize(
    "documents, kwargs, message",
    [
        (traceable_works(), {"passage_chars": 0}, "passage_chars must be at least 1"),
        (traceable_works(), {"passage_chars": 90, "regions": 2}, "2 regions per work cannot fill"),
        (traceable_works(), {"passage_chars": 500}, "no validation passage of 500 characters fits"),
        (
            datasets.Dataset.from_list([{"title": "A", "text": "x" * 900}] * 2),
            {"passage_chars": 9},
            "each work must have its own title",
        ),
    ],
)
def test_bad_input_fails_clearly(documents, kwargs, message):
    with pytest.raises(ValueError, match=message):
        passage_classification(documents, **kwargs)
