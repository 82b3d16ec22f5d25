"""Long-document classification from the corpora: which work a long passage comes from.

The classes are works (documents) of a corpus, e.g. Shakespeare's nine history plays
(``select_documents(load_corpus("shakespeare"), "^(Henry|Richard)")``). Those plays share many characters (the Henrys,
Gloucester, Warwick, Falstaff): the speaker names in a 256-character window single out its play about a third of the
time, in a 4096-character passage nine times in ten. Telling them apart is a task for long passages.

Every work gives passages to every split, from different text: it is cut into ``regions`` contiguous regions of
equal length, and a seeded draw assigns each region to ``train``, ``validation`` or ``test``. Passages are cut within
runs of adjacent regions of one split, never across a split boundary: training passages overlap (``train_stride``),
evaluation passages do not. So evaluation passages come from held-out regions of each work, text no training passage
contains.
"""

from __future__ import annotations

import random
from itertools import groupby

import datasets

SPLITS = ("train", "validation", "test")


def passage_classification(
    documents: datasets.Dataset,
    passage_chars: int,
    *,
    regions: int = 10,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    train_stride: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Passages of ``passage_chars`` characters labelled by the work they come from, split by region.

    ``documents`` has ``title`` (one class per title) and ``text`` columns. Each work is cut into ``regions``
    regions; ``round(fraction * regions)`` of them (at least one) go to validation and to test, the rest to training,
    drawn with ``seed``. Training passages start every ``train_stride`` characters (default ``passage_chars // 2``),
    evaluation passages every ``passage_chars``. Each split comes in a seeded random order, so that its first
    passages (``--max_eval_samples``) are a sample of every work.

    Returns a ``DatasetDict`` (``train``, ``validation``, ``test``) with columns ``text`` and ``label``, a
    ``ClassLabel`` named by the titles. Raises ``ValueError`` for fewer than two works, repeated titles, impossible
    fractions, or a split that gets no passage (the regions are shorter than a passage).
    """
    if passage_chars < 1:
        raise ValueError(f"passage_chars must be at least 1, got {passage_chars}")
    titles = list(documents["title"])
    if len(titles) < 2:
        raise ValueError(f"a classifier needs at least two works, got {len(titles)}")
    if len(set(titles)) != len(titles):
        raise ValueError("each work must have its own title: the titles are the class names")
    held_out = {
        split: max(1, round(fraction * regions))
        for split, fraction in (("validation", validation_fraction), ("test", test_fraction))
    }
    n_train = regions - sum(held_out.values())
    if n_train < 1:
        raise ValueError(
            f"{regions} regions per work cannot fill train, validation ({validation_fraction}) and test "
            f"({test_fraction}) with at least one region each"
        )
    strides = {"train": train_stride or max(1, passage_chars // 2), "validation": passage_chars, "test": passage_chars}
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for label, text in enumerate(documents["text"]):
        assignment = ["train"] * n_train + ["validation"] * held_out["validation"] + ["test"] * held_out["test"]
        rng.shuffle(assignment)
        bounds = [round(i * len(text) / regions) for i in range(regions + 1)]
        for split, run in groupby(range(regions), key=assignment.__getitem__):
            run = list(run)
            start, end = bounds[run[0]], bounds[run[-1] + 1]
            for offset in range(start, end - passage_chars + 1, strides[split]):
                rows[split].append({"text": text[offset : offset + passage_chars], "label": label})
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=titles)})
    for split in SPLITS:
        if not rows[split]:
            raise ValueError(
                f"no {split} passage of {passage_chars} characters fits in a {split} region: use shorter passages "
                "or fewer regions per work"
            )
        rng.shuffle(rows[split])  # works mixed: the first N passages of a split are a sample of all of them
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows[split], features=features) for split in SPLITS})


__all__ = ["SPLITS", "passage_classification"]
