"""fmt-serve (fmt_hf.toolkit.serve): a tiny FMT checkpoint behind transformers' OpenAI-compatible server, talked to
with the `openai` client and raw HTTP; and the engines FMT refuses (continuous batching, vLLM/SGLang backends)."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import transformers
from helpers.lm import TINY_FMT
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fmt_hf import FMTConfig, FMTForCausalLM, FMTForMaskedLM, FMTForSequenceClassification, FMTModel
from fmt_hf.toolkit.serve import PLAIN_CHAT_TEMPLATE, FMTModelLoader, background_server, main
from fmt_hf.toolkit.tokenizer import byte_tokenizer
from fmt_hf.toolkit.training import ModelArguments, build_config

CONTEXT = 128
"""The tiny models' `max_position_embeddings`: prompt and answer together, under FMA with 16-token blocks (coarse
levels from 64 tokens on, so the longer prompts below use the multilevel cache)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny FMT with the byte tokenizer and a chat template. Its head can pick only printable ASCII (the other rows
    are zero, below the best of 95 random logits), so every answer is text that decodes byte for byte and runs to
    `max_tokens` (the end-of-text token is never picked)."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = build_config(ModelArguments(task="clm", config_overrides=TINY_FMT), tokenizer, seq_len=CONTEXT)
    model = FMTForCausalLM(config)
    with torch.no_grad():
        printable = torch.zeros(config.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0
    folder = tmp_path_factory.mktemp("fmt")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(checkpoint):
    with background_server(checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", timeout=60, max_retries=0)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy_answer(checkpoint: str, messages: list[dict], max_new_tokens: int) -> str:
    """What `generate` answers in this process, greedily, through the model's own cache (FMTCache under FMA)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = byte_tokenizer()
    inputs = tokenizer.apply_chat_template(
        messages, chat_template=PLAIN_CHAT_TEMPLATE, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def post(server, body) -> tuple[int, dict | str]:
    """Raw HTTP: `body` (a dict, or the bytes to send as they are) to `/v1/chat/completions`; the status and the JSON
    answer (the text of a stream)."""
    status, text = server.request("/chat/completions", body)
    return status, text if text.startswith("data:") else json.loads(text)


def test_chat_completion_is_what_generate_answers(server, client, checkpoint):
    assert [model.id for model in client.models.list().data] == [checkpoint]
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 2  # 107 tokens with the template: 2 coarse levels
    for text in ("Hello!", long_prompt):
        answer = client.chat.completions.create(model=checkpoint, messages=chat(text), max_tokens=12, temperature=0)
        assert answer.choices[0].message.content == greedy_answer(checkpoint, chat(text), 12)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 12


def test_streamed_chunks_join_to_the_answer(client, checkpoint):
    messages = chat("Stream this, please.")
    whole = client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=10, temperature=0)
    chunks = client.chat.completions.create(
        model=checkpoint, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    streamed = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len(streamed) > 2
    assert "".join(streamed) == whole.choices[0].message.content


def test_concurrent_requests_are_all_answered_correctly(client, checkpoint):
    prompts = [f"Request number {index}: {'ab' * index}" for index in range(8)]

    def ask(text):
        answer = client.chat.completions.create(model=checkpoint, messages=chat(text), max_tokens=6, temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [greedy_answer(checkpoint, chat(text), 6) for text in prompts]


def test_bad_requests_get_a_4xx_that_says_what_to_fix(server, checkpoint):
    good = {"messages": chat("Hi"), "max_tokens": 3}
    too_long = {"messages": chat("x" * CONTEXT), "max_tokens": 3}
    status, answer = post(server, too_long)
    assert status == 400
    assert re.fullmatch(rf"The prompt has \d+ tokens, but the model takes at most {CONTEXT}, .*", answer["detail"])
    status, answer = post(server, b'{"messages": [{"role": "user"')
    assert status == 422 and answer["detail"][0]["msg"] == "JSON decode error"
    assert post(server, {**good, "model": "no/such-model"}) == (
        400,
        {"detail": f"Server is pinned to '{checkpoint}'; requested 'no/such-model'."},
    )
    for stream in (False, True):
        for max_tokens in (0, -2):
            status, answer = post(server, {**good, "max_tokens": max_tokens, "stream": stream})
            assert (status, answer) == (
                400,
                {
                    "detail": f"max_tokens (or max_completion_tokens, max_output_tokens) is {max_tokens}: it is the "
                    "most tokens the answer may have, and must be at least 1."
                },
            )
    # the server keeps serving
    status, answer = post(server, good)
    assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_an_answer_stops_where_the_context_is_full(server):
    # No max_tokens: transformers' default (at least 1024 new tokens) would overflow the 128-token context, which a
    # depthwise FMT refuses; the answer takes the room the prompt leaves instead.
    status, answer = post(server, {"messages": chat("Fill it up")})
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["total_tokens"] == CONTEXT
    status, stream = post(server, {"messages": chat("Fill it up"), "stream": True})
    assert status == 200 and '"finish_reason":"length"' in stream and '"error"' not in stream


def test_the_loader_finds_fmt_and_leaves_other_models_to_transformers(checkpoint, tmp_path, monkeypatch):
    # The attribute the loader sets lives on in this process: monkeypatch removes it at the end.
    monkeypatch.setattr(transformers, "FMTForCausalLM", None, raising=False)
    assert type(FMTModelLoader()._load_model(checkpoint)) is FMTForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert type(FMTModelLoader()._load_model(str(tmp_path))) is LlamaForCausalLM


def test_fmt_serve_listens_on_loopback_by_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the help's table, unwrapped
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    assert "[default: 127.0.0.1]" in help_text and "--continuous-batching" in help_text


def test_continuous_batching_is_refused_with_what_to_use_instead():
    model = FMTForCausalLM(FMTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    for attn_implementation in ("fma", "sdpa"):
        model.set_attn_implementation(attn_implementation)
        with pytest.raises(NotImplementedError, match="continuous batching.*generate\\(\\).*fmt-serve without"):
            model.generate_batch([[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="FMT cannot use continuous batching"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache_implementation="paged")


@pytest.mark.parametrize("model_class", [FMTModel, FMTForCausalLM, FMTForMaskedLM, FMTForSequenceClassification])
def test_vllm_and_sglang_transformers_backends_are_refused(model_class):
    # Both engines load a Transformers-backend model only when this says True, and would then run its attention as
    # their dense paged kernel: wrong outputs for FMA weights. False makes them refuse the model by name.
    assert model_class.is_backend_compatible() is False
