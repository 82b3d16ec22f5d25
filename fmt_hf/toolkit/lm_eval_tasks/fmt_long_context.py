"""Datasets of fmt_hf's long-context lm-evaluation-harness tasks (the `fmt_lc_*` YAML files beside this one): the tasks
of `fmt_hf.toolkit.long_context` (passkey, needle in a haystack, variable tracking, common and frequent words), with
its exact token budgets, depths and strict RULER scoring, as lm-eval `generate_until` tasks.

lm-eval calls these `custom_dataset` functions with the model arguments and `--metadata` merged into keyword
arguments. They read these (and ignore the rest):

- `tokenizer` (else `pretrained`, the model's folder or Hub id; `"bytes"` is the byte tokenizer): the tokenizer the
  budgets are counted in.
- `max_seq_lengths` (`[4096]`): prompt lengths in tokens; `depths` (`[0, 0.25, 0.5, 0.75, 1]`): needle depths, sample
  i taking depth i mod len; `num_samples` (50 per length); `seed` (0).
- `corpus` (`"shakespeare"`, a registry corpus read from the cache on disk) or `documents` (a JSON Lines file of
  `{"text": ...}`): the natural text of the tasks with a natural haystack.

Prompts are plain (no chat template: pass lm-eval's `--apply_chat_template` for that); the answer prefix is the
task's `gen_prefix`. `score` is the mean over samples of the fraction of expected answers found.
"""

from functools import partial

import datasets

from fmt_hf.toolkit.data import load_corpus
from fmt_hf.toolkit.long_context import TASKS, Haystack, make_sample, score
from fmt_hf.toolkit.tokenizer import load_tokenizer


def samples(
    task: str,
    tokenizer: str | None = None,
    pretrained: str | None = None,
    max_seq_lengths: list[int] = (4096,),
    depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    num_samples: int = 50,
    seed: int = 0,
    corpus: str = "shakespeare",
    documents: str | None = None,
    **_,
) -> dict[str, datasets.Dataset]:
    """The `test` split of `task`: per length, `num_samples` prompts split into their instruction (`input`) and
    answer prefix (`gen_prefix`), with the expected `answers`, `length` and `depth`."""
    name = tokenizer or pretrained
    if name is None:
        raise ValueError(f"fmt_lc_{task} counts its budget in tokens: pass --metadata '{{\"tokenizer\": ...}}'")
    tok = load_tokenizer(name)
    haystack = None
    if TASKS[task].needs_text:
        if documents is not None:
            texts = datasets.load_dataset("json", data_files=documents, split="train")["text"]
        else:
            texts = load_corpus(corpus)["text"]
        haystack = Haystack.from_documents(texts)
    rows = []
    for length in max_seq_lengths:
        for index in range(num_samples):
            depth = depths[index % len(depths)] if TASKS[task].has_depth else None
            sample = make_sample(task, tok, length, depth, index, haystack=haystack, seed=seed)
            rows.append(
                {
                    # make_sample joins the instruction and the answer prefix with a space, as lm-eval does.
                    "input": sample.prompt[: -len(sample.answer_prefix) - 1],
                    "gen_prefix": sample.answer_prefix,
                    "answers": list(sample.answers),
                    "length": length,
                    "depth": depth,
                }
            )
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    (prediction,) = results
    return {"score": score(prediction, tuple(doc["answers"]))}


passkey = partial(samples, "passkey")
niah_single = partial(samples, "niah_single")
niah_multikey = partial(samples, "niah_multikey")
niah_multivalue = partial(samples, "niah_multivalue")
niah_multiquery = partial(samples, "niah_multiquery")
variable_tracking = partial(samples, "variable_tracking")
common_words = partial(samples, "common_words")
frequent_words = partial(samples, "frequent_words")
