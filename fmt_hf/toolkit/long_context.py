"""Synthetic long-context tasks: does a model use the context it is given? The tasks of eval_long_context.py.

Written from the task definitions of RULER (Hsieh et al., arXiv:2404.06654; templates and scoring as NVIDIA/RULER's
``scripts/data/synthetic``) and the passkey test of Landmark Attention (Mohtashami & Jaggi, arXiv:2305.16300):

=================  ====================================================================================================
task               what the model must do
=================  ====================================================================================================
passkey            repeat a 5-digit pass key hidden in repeated filler sentences
niah_single        give the 7-digit "special magic number" of a key, hidden in natural text (RULER ``niah_single_2``)
niah_multikey      the same among three distractor needles with other keys (``niah_multikey_1``)
niah_multivalue    give all four numbers of one key (``niah_multivalue``)
niah_multiquery    give the numbers of four keys (``niah_multiquery``)
variable_tracking  name every variable of a 5-step assignment chain in filler text (``vt``, one chain, four hops)
common_words       the 10 most common words of a numbered word list (``cwe``)
frequent_words     the three most frequent coded words of a Zipf-distributed text (``fwe``)
=================  ====================================================================================================

Every sample is drawn from a seed (task, length, depth, index), so a run is reproducible and resumable. Its prompt is
as long as asked: the haystack grows word by word (list item by list item) until one more would pass the budget, so
the prompt is ``length`` tokens of the given tokenizer or a word fewer -- generation comes on top. Needles go to the
sentence boundary nearest the requested depth (a fraction of the haystack); the other needles of a sample (distractors,
further values, later chain steps) to depths drawn from the seed. Natural text comes from the corpora the project
ships (:mod:`fmt_hf.toolkit.data`), never the Hub; keys and list words from its vocabulary.

Scoring is RULER's string match, the fraction of expected answers found in the greedy answer (partial credit for the
tasks with several answers), made strict where RULER's substring match is loose: an answer counts only as a whole
word or number (``123456`` does not contain ``12345``), and a task with one answer must give it in its first sentence
(a later sentence often repeats a key copied from the context). Where these tasks differ from RULER: they are
zero-shot (no in-context example for ``variable_tracking`` and ``common_words``), the natural text and vocabulary come
from the project's corpora instead of Paul Graham essays and ``wonderwords``, and the budget counts the prompt only.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""The repeated haystack of the passkey test and of RULER's ``repeat`` and variable-tracking noise."""

_WORD = re.compile(r"[a-z]{4,12}")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_ANSWER_END = re.compile(r"[.!?](?=\s|$)|\n")


@dataclass(frozen=True)
class Haystack:
    """Natural text as a list of words (whitespace normalised, documents in order) and its vocabulary: the distinct
    lowercase words of 4 to 12 letters, sorted."""

    words: tuple[str, ...]
    vocabulary: tuple[str, ...]

    @classmethod
    def from_documents(cls, documents: Iterable[str]) -> Haystack:
        text = " ".join(documents)
        words = tuple(text.split())
        if not words:
            raise ValueError("the haystack documents hold no text")
        return cls(words, tuple(sorted(set(_WORD.findall(text.lower())))))

    def passage(self, rng: random.Random, num_words: int) -> list[str]:
        """``num_words`` consecutive words from a start drawn from ``rng`` (wrapping around the end)."""
        start = rng.randrange(len(self.words))
        return [self.words[(start + i) % len(self.words)] for i in range(num_words)]


@dataclass(frozen=True)
class Parts:
    """A prompt before any chat template: what the user says, the start of the reply the model continues, the
    expected answers, and the needle placed at the requested depth ("" for tasks without depth)."""

    instruction: str
    answer_prefix: str
    answers: tuple[str, ...]
    needle: str = ""


Builder = Callable[[random.Random, int, float, Haystack | None], Parts]
"""A task: (seeded rng, haystack size in units, depth, natural text) -> Parts. It must draw everything that does not
depend on the size first, so that every size of one seed holds the same needles."""


@dataclass(frozen=True)
class Task:
    name: str
    build: Builder
    max_new_tokens: int
    needs_text: bool
    has_depth: bool


@dataclass(frozen=True)
class Sample:
    """One prompt of a task at a length (tokens requested) and depth, its expected answers and token count; the prompt
    ends with ``answer_prefix``, the start of the reply the model continues."""

    task: str
    length: int
    depth: float | None
    index: int
    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]
    num_tokens: int
    needle: str
    max_new_tokens: int
    chat_template: bool

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()[:16]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    drawn: list[str] = []
    while len(drawn) < count:
        value = draw()
        if value not in drawn:
            drawn.append(value)
    return drawn


def _filler(num_words: int) -> list[str]:
    words = FILLER.split()
    return [words[i % len(words)] for i in range(num_words)]


def with_needles(words: list[str], needles: list[tuple[float, str]]) -> str:
    """``words`` joined by spaces with each ``(depth, needle)`` at the sentence boundary nearest ``depth`` (a fraction
    of the words); needles at one boundary keep their order."""
    boundaries = [0] + [i + 1 for i, word in enumerate(words) if _SENTENCE_END.search(word)] + [len(words)]
    pieces = list(words)
    placed = [(min(boundaries, key=lambda b: abs(b - depth * len(words))), i) for i, (depth, _) in enumerate(needles)]
    for position, i in sorted(placed, reverse=True):
        pieces.insert(position, needles[i][1])
    return " ".join(pieces)


def _passkey(rng: random.Random, size: int, depth: float, _: Haystack | None) -> Parts:
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    context = with_needles(_filler(size), [(depth, needle)])
    instruction = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        f"I will quiz you about the important information there. {context} What is the pass key?"
    )
    return Parts(instruction, "The pass key is", (key,), needle)


def _niah(num_keys: int, num_values: int, num_queries: int) -> Builder:
    """RULER's needle in a haystack: ``num_keys`` keys with ``num_values`` 7-digit numbers each, the first
    ``num_queries`` keys asked; the first needle asked goes to the requested depth."""

    def build(rng: random.Random, size: int, depth: float, haystack: Haystack | None) -> Parts:
        keys = _distinct(lambda: "-".join(rng.sample(haystack.vocabulary, 2)), num_keys)
        values = [_distinct(lambda: _number(rng, 7), num_values) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
        depths = [depth] + [rng.random() for _ in needles[1:]]
        context = with_needles(haystack.passage(rng, size), list(zip(depths, needles)))
        asked = keys[:num_queries]
        query = asked[0] if num_queries == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        answers = tuple(v for vs in values[:num_queries] for v in vs)
        if len(answers) == 1:
            head = "A special magic number is hidden within the following text. Make sure to memorize it. "
            head += "I will quiz you about the number afterwards."
            question = f"What is the special magic number for {query} mentioned in the provided text?"
            prefix = f"The special magic number for {query} mentioned in the provided text is"
        else:
            head = "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            head += "I will quiz you about the numbers afterwards."
            question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
            prefix = f"The special magic numbers for {query} mentioned in the provided text are"
        return Parts(f"{head}\n{context}\n{question}", prefix, answers, needles[0])

    return build


def _variable_tracking(rng: random.Random, size: int, depth: float, _: Haystack | None) -> Parts:
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), 5)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in chain[1:])
    context = with_needles(_filler(size), list(zip(depths, chain)))
    instruction = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
        f"assigned the value {value}, they are:"
    )
    return Parts(instruction, prefix, tuple(names), chain[0])


def _common_words(rng: random.Random, size: int, _depth: float, haystack: Haystack | None) -> Parts:
    # RULER's repeats: 30 per common and 3 per other word in 4K tokens and more, 6 and 1 below; here the list's
    # size decides, at 1,000 items (4K tokens of one- or two-token words and their numbers).
    words = rng.sample(haystack.vocabulary, len(haystack.vocabulary))
    common_repeats, other_repeats = (30, 3) if size >= 1000 else (6, 1)
    common, others = words[:10], words[10:]
    needed = max(0, math.ceil((size - 10 * common_repeats) / other_repeats))
    if needed > len(others):
        raise ValueError(f"the haystack's vocabulary ({len(words)} words) is too small for a {size}-item word list")
    items = (common * common_repeats + others[:needed] * other_repeats)[:size]
    rng.shuffle(items)
    context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(items))
    instruction = (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        f"that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
    )
    return Parts(instruction, "Answer: The top 10 words that appear most often in the list are:", tuple(common))


def _frequent_words(rng: random.Random, size: int, _depth: float, _: Haystack | None) -> Parts:
    # A Zipf law with exponent 2 over 200 coded words (the ranks past ~sqrt(size) get no occurrence); the most
    # frequent one is "...", noise the question says to ignore.
    vocabulary = ["..."] + _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), 199)
    counts = [int(size * rank**-2.0 / (math.pi**2 / 6)) for rank in range(1, len(vocabulary) + 1)]
    text = [word for word, count in zip(vocabulary, counts) for _ in range(count)]
    rng.shuffle(text)
    instruction = (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        f"appeared coded words. {' '.join(text)}\nQuestion: Do not provide any explanation. Please ignore the dots "
        "'....'. What are the three most frequently appeared words in the above coded text?"
    )
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return Parts(instruction, prefix, tuple(vocabulary[1:4]))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("passkey", _passkey, 16, needs_text=False, has_depth=True),
        Task("niah_single", _niah(1, 1, 1), 32, needs_text=True, has_depth=True),
        Task("niah_multikey", _niah(4, 1, 1), 32, needs_text=True, has_depth=True),
        Task("niah_multivalue", _niah(1, 4, 1), 64, needs_text=True, has_depth=True),
        Task("niah_multiquery", _niah(4, 1, 4), 64, needs_text=True, has_depth=True),
        Task("variable_tracking", _variable_tracking, 30, needs_text=False, has_depth=True),
        Task("common_words", _common_words, 120, needs_text=True, has_depth=False),
        Task("frequent_words", _frequent_words, 50, needs_text=False, has_depth=False),
    )
}
"""The tasks by name; ``max_new_tokens`` is the greedy answer's budget (RULER's for its tasks)."""


def render(tokenizer: PreTrainedTokenizerBase, parts: Parts, chat_template: bool) -> str:
    """The prompt text: the instruction and the answer prefix, or the instruction as a user turn of the tokenizer's
    chat template with the answer prefix opening the assistant's turn."""
    if not chat_template:
        return f"{parts.instruction} {parts.answer_prefix}"
    if tokenizer.chat_template is None:
        raise ValueError("chat_template=True, but the tokenizer has no chat template")
    turn = [{"role": "user", "content": parts.instruction}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) + parts.answer_prefix


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> list[int]:
    """The token ids of a prompt, as counted for its budget and fed to the model (a templated prompt already holds
    its special tokens)."""
    return tokenizer(prompt, add_special_tokens=not chat_template).input_ids


def make_sample(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float | None = None,
    index: int = 0,
    *,
    haystack: Haystack | None = None,
    seed: int = 0,
    chat_template: bool = False,
) -> Sample:
    """Sample ``index`` of ``task`` with a prompt of ``length`` tokens (the largest haystack that fits) and its needle
    at ``depth`` (0: the haystack's start, 1: its end; tasks without depth take None). ``haystack`` is the natural
    text of the tasks that need one. The same arguments always give the same sample."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    spec = TASKS[task]
    if spec.needs_text and haystack is None:
        raise ValueError(f"task {task!r} needs a natural-text haystack: pass haystack=Haystack.from_documents(...)")
    if spec.has_depth != (depth is not None):
        raise ValueError(f"task {task!r} takes {'a depth in [0, 1]' if spec.has_depth else 'no depth (None)'}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    seed_text = f"{seed}/{task}/{length}/{depth}/{index}"

    def build(size: int) -> tuple[Parts, str, int]:
        parts = spec.build(random.Random(seed_text), size, 0.0 if depth is None else depth, haystack)
        prompt = render(tokenizer, parts, chat_template)
        return parts, prompt, len(encode(tokenizer, prompt, chat_template))

    fitted = build(0)
    if fitted[2] > length:
        raise ValueError(f"length={length} tokens cannot hold task {task!r}: its prompt alone takes {fitted[2]}")
    low, high = 0, 1  # build(low) fits; grow high until build(high) does not, then bisect
    while (candidate := build(high))[2] <= length:
        low, high, fitted = high, 2 * high, candidate
    while high - low > 1:
        middle = (low + high) // 2
        candidate = build(middle)
        if candidate[2] <= length:
            low, fitted = middle, candidate
        else:
            high = middle
    parts, prompt, num_tokens = fitted
    return Sample(
        task,
        length,
        depth,
        index,
        prompt,
        parts.answer_prefix,
        parts.answers,
        num_tokens,
        parts.needle,
        spec.max_new_tokens,
        chat_template,
    )


def _cleaned(prediction: str) -> str:
    """RULER's post-processing: control characters as line breaks, surrounding white space stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction).strip()


def answer_span(prediction: str, num_answers: int) -> str:
    """The part of a greedy answer that is scored: all of it (:func:`_cleaned`), and for a task with one answer only
    its first sentence or line."""
    text = _cleaned(prediction)
    if num_answers == 1:
        end = _ANSWER_END.search(text)
        if end is not None:
            text = text[: end.end()].strip()
    return text


def answer_complete(prediction: str, num_answers: int) -> bool:
    """Whether greedy decoding can stop: a one-answer reply has ended its first sentence or line."""
    return num_answers == 1 and answer_span(prediction, 1) != _cleaned(prediction)


def score(prediction: str, answers: tuple[str, ...]) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` in the answer span (case-insensitive), each as a
    whole word or number."""
    span = answer_span(prediction, len(answers))
    found = sum(
        re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", span, re.IGNORECASE) is not None
        for answer in answers
    )
    return found / len(answers)


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96); partial credit counts as fractional successes."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


__all__ = [
    "FILLER",
    "TASKS",
    "Haystack",
    "Parts",
    "Sample",
    "Task",
    "answer_complete",
    "answer_span",
    "encode",
    "make_sample",
    "render",
    "score",
    "wilson_interval",
    "with_needles",
]
