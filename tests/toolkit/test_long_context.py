"""The long-context suite: task generators (budgets, depths, determinism), RULER scoring, the systems at equal decode
memory, and scripts/eval_long_context.py end to end on a tiny model, resuming its JSON lines."""

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers.lm import play_excerpts, script
from transformers import LlamaConfig, LlamaForCausalLM

import fmt_hf
from fmt_hf import convert_llama_to_fmt
from fmt_hf.toolkit import long_context_eval
from fmt_hf.toolkit.long_context import TASKS, Haystack, answer_span, encode, make_sample, score, wilson_interval
from fmt_hf.toolkit.long_context_eval import StreamingLLM, System, cache_size, fmt_cache_vectors
from fmt_hf.toolkit.tokenizer import byte_tokenizer

BYTES = byte_tokenizer()


@functools.cache
def haystack() -> Haystack:
    return Haystack.from_documents(play_excerpts())


@functools.cache
def smollm2_tokenizer():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from fmt_hf.toolkit.data import SMOLLM2_GGUF, fetch_smollm2

    return AutoTokenizer.from_pretrained(fetch_smollm2(), gguf_file=SMOLLM2_GGUF)


def depth_of(task: str) -> float | None:
    return 0.5 if TASKS[task].has_depth else None


@pytest.mark.download
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [2048, 5000])
def test_every_task_fills_its_budget_in_bytes(task, length):
    sample = make_sample(task, BYTES, length, depth_of(task), haystack=haystack())
    assert sample.num_tokens == len(sample.prompt.encode("utf-8"))
    assert length - 16 <= sample.num_tokens <= length  # one haystack unit (a word, a numbered list item) at most
    assert all(answer in sample.prompt for answer in sample.answers)


@pytest.mark.download
@pytest.mark.parametrize("task", TASKS)
def test_every_task_fills_its_budget_in_smollm2_tokens(task):
    tokenizer = smollm2_tokenizer()
    for chat_template in (False, True):
        sample = make_sample(task, tokenizer, 3000, depth_of(task), haystack=haystack(), chat_template=chat_template)
        assert sample.num_tokens == len(encode(tokenizer, sample.prompt, chat_template))
        assert 3000 - 8 <= sample.num_tokens <= 3000
        assert sample.prompt.startswith("<|im_start|>") == chat_template


@pytest.mark.download
@pytest.mark.parametrize("task", [name for name, spec in TASKS.items() if spec.has_depth])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_needle_sits_at_the_requested_depth(task, depth):
    sample = make_sample(task, BYTES, 6000, depth, index=3, haystack=haystack())
    assert sample.prompt.count(sample.needle) == 1
    # Bytes before the needle over the prompt: the haystack is all of it but ~300 bytes of instructions.
    at = len(sample.prompt[: sample.prompt.index(sample.needle)].encode("utf-8")) / sample.num_tokens
    assert abs(at - depth) < 0.06, (at, depth)


@pytest.mark.download
def test_samples_are_seeded():
    def draw(**changes):
        options = dict(task="niah_multikey", tokenizer=BYTES, length=1500, depth=0.5, index=0, haystack=haystack())
        return make_sample(**{**options, **changes})

    assert draw() == draw()
    assert draw().prompt_hash != draw(index=1).prompt_hash != draw(seed=1).prompt_hash
    assert draw().answers != draw(index=1).answers


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="unknown task 'passkeys'"):
        make_sample("passkeys", BYTES, 1000, 0.5)
    with pytest.raises(ValueError, match="needs a natural-text haystack"):
        make_sample("niah_single", BYTES, 1000, 0.5)
    with pytest.raises(ValueError, match="takes no depth"):
        make_sample("frequent_words", BYTES, 1000, 0.5)
    with pytest.raises(ValueError, match=r"depth must lie in \[0, 1\]"):
        make_sample("passkey", BYTES, 1000, 1.5)
    with pytest.raises(ValueError, match="cannot hold task 'passkey'"):
        make_sample("passkey", BYTES, 100, 0.5)


def test_the_scorer_rejects_near_misses():
    key = ("12345",)
    for right in ("12345", " 12345.", "12345. Remember it.", ": 12345\nThe pass key is 99999.", "is 12345!"):
        assert score(right, key) == 1.0, right
    for wrong in (
        "12346",  # a wrong digit
        "123456",  # an extra digit
        "012345.",
        "1234",  # a missing one
        "not known. The pass key is 12345.",  # the answer only in a later sentence
        "unknown\n12345",  # or on a later line
    ):
        assert score(wrong, key) == 0.0, wrong
    # Several answers: partial credit (RULER's string_match_all), over the whole reply, whole numbers only.
    values = ("1111111", "2222222", "3333333", "4444444")
    assert score("1111111, 2222222. Also 3333333 and 4444444.", values) == 1.0
    assert score("1111111, 22222220, 3333333", values) == 0.5
    assert answer_span("\x00 12345. More.", 1) == "12345."
    assert score("Words: Apple, pear", ("apple", "pear", "plum")) == pytest.approx(2 / 3)


def test_wilson_interval():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(25, 50) == pytest.approx((0.3664, 0.6336), abs=1e-4)
    with pytest.raises(ValueError, match="trials"):
        wilson_interval(0, 0)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(BYTES),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        eos_token_id=BYTES.eos_token_id,
        bos_token_id=BYTES.bos_token_id,
        pad_token_id=BYTES.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


TINY_CONVERSION = "fma_block_size=16,fma_coarse_tokens=4,fma_downsample=recursive,fma_sink_tokens=4"


@torch.no_grad()
def test_systems_at_equal_decode_memory():
    model = tiny_llama()
    fmt = convert_llama_to_fmt(
        model, fma_block_size=16, fma_coarse_tokens=4, fma_downsample="recursive", fma_sink_tokens=4
    )
    sample = make_sample("passkey", BYTES, 700, 0.5)
    ids = torch.tensor([encode(BYTES, sample.prompt, False)])
    # The FMT cache after the prompt holds what fmt_cache_vectors says (4m + 2s + 6pL at L = 5 levels).
    logits, cache = System("fmt", fmt, BYTES).prefill(ids)
    assert cache_size(cache)[0] == fmt_cache_vectors(fmt, ids.shape[1]) == 4 * 16 + 2 * 4 + 6 * 4 * 5
    dense_logits, dense_cache = System("dense", model, BYTES).prefill(ids)
    assert cache_size(dense_cache)[0] == 2 * ids.shape[1]
    # A window wider than the prompt is dense attention, read in chunks: the chunked prefill keeps positions and masks.
    wide = StreamingLLM("wide", model, BYTES, 4, lambda n: 2 * n, chunk_size=64)
    torch.testing.assert_close(wide.prefill(ids)[0], dense_logits, rtol=1e-4, atol=1e-5)
    # At FMT's size it keeps the sinks and the window, and the same first answers need the right positions.
    streaming = StreamingLLM("streaming", model, BYTES, 4, lambda n: fmt_cache_vectors(fmt, n), chunk_size=32)
    _, small = streaming.prefill(ids)
    assert cache_size(small)[0] == fmt_cache_vectors(fmt, ids.shape[1])
    answer = streaming.answer(sample)
    assert answer.cache_vectors == fmt_cache_vectors(fmt, ids.shape[1])
    assert cache_size(small)[0] == answer.cache_vectors and answer.prefill_seconds > 0
    assert System("wide", model, BYTES).answer(sample).prediction == wide.answer(sample).prediction


@pytest.mark.download
def test_script_end_to_end_and_resume(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    BYTES.save_pretrained(model_dir)
    eval_long_context = script("eval_long_context")
    argv = [
        "--model_name_or_path",
        str(model_dir),
        "--conversion",
        TINY_CONVERSION,
        "--tasks",
        "passkey",
        "niah_single",
        "common_words",
        "--lengths",
        "600",
        "--depths",
        "0.2",
        "0.8",
        "--num_samples",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    calls = []
    answer = long_context_eval.System.answer

    def counted(self, sample):
        calls.append((self.name, sample.prompt_hash))
        return answer(self, sample)

    monkeypatch.setattr(long_context_eval.System, "answer", counted)
    table = eval_long_context.main(argv)
    assert len(calls) == 4 * 3 * 2 and len(set(calls)) == len(calls)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert {"prompt_hash", "answers", "prediction", "correct", "seconds", "cache_vectors"} <= set(rows[0])
    assert {row["system"] for row in rows} == {"dense", "fmt", "fmt_refined", "streaming"}
    # the refined conversion's cache holds its store of past keys and values too
    vectors = {row["system"]: row["cache_vectors"] for row in rows if row["task"] == "passkey"}
    assert vectors["fmt_refined"] > vectors["fmt"] == vectors["streaming"]
    assert "| passkey | 600 | streaming | 2 |" in table and "| common_words | 600 | fmt | 2 |" in table
    assert {p.name for p in (tmp_path / "out").glob("heatmap_*.png")} == {
        "heatmap_dense.png",
        "heatmap_fmt.png",
        "heatmap_fmt_refined.png",
        "heatmap_streaming.png",
    }
    # A rerun with one more sample per cell answers only the new prompts.
    calls.clear()
    eval_long_context.main([*argv[:-4], "--num_samples", "3", *argv[-2:]])
    assert len(calls) == 4 * 3 and {hash_ for _, hash_ in calls}.isdisjoint({row["prompt_hash"] for row in rows})
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 36


def test_documented_command_lines_parse():
    eval_long_context = script("eval_long_context")
    (args,) = eval_long_context.parse_args(
        ["--tasks", "passkey", "niah_single", "--lengths", "2048", "4096", "--num_samples", "20"]
    )
    assert args.tasks == ["passkey", "niah_single"] and args.lengths == [2048, 4096] and args.num_samples == 20
    (args,) = eval_long_context.parse_args(["--checkpoints", "outputs/x"])
    assert args.checkpoints == ["outputs/x"]
    with pytest.raises(ValueError, match="--systems: unknown"):
        eval_long_context.parse_args(["--systems", "kvpress"])


@pytest.mark.download
def test_the_tasks_run_through_lm_eval(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    spec = importlib.util.spec_from_file_location(
        "fmt_long_context", Path(fmt_hf.LM_EVAL_TASKS) / "fmt_long_context.py"
    )
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    documents = tmp_path / "documents.jsonl"
    documents.write_text("".join(json.dumps({"text": text}) + "\n" for text in play_excerpts()))
    options = dict(tokenizer="bytes", max_seq_lengths=[500], num_samples=2, documents=str(documents))
    rows = tasks.niah_single(**options)["test"]
    expected = make_sample("niah_single", BYTES, 500, 0.0, 0, haystack=haystack())
    assert rows[0]["input"] + " " + rows[0]["gen_prefix"] == expected.prompt
    assert rows[0]["answers"] == list(expected.answers)

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    BYTES.save_pretrained(model_dir)
    manager = TaskManager(include_path=fmt_hf.LM_EVAL_TASKS, include_defaults=False, metadata=options)
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir}",
        tasks=["fmt_lc_passkey", "fmt_lc_niah_single"],
        task_manager=manager,
        device="cpu",
        batch_size=1,
    )
    for task in ("fmt_lc_passkey", "fmt_lc_niah_single"):
        assert 0 <= output["results"][task]["score,none"] <= 1
