"""FMT with the tools users bring: PEFT (LoRA on the projections, the downsamplers trained in full), transformers'
pipelines (text-generation, fill-mask, text-classification) and streamers."""

import io
import threading
from contextlib import redirect_stdout

import pytest
import torch
from helpers.models import random_byte_ids, tiny_byte_fmt
from transformers import TextIteratorStreamer, TextStreamer, pipeline

from fmt_hf import FMTForCausalLM, FMTForMaskedLM, FMTForSequenceClassification

peft = pytest.importorskip("peft")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DOWNSAMPLERS = ["k_downsample", "v_downsample"]


def two_level_fmt(model_class, **overrides):
    """A tiny byte-level FMT whose 64-token context has two coarse FMA levels."""
    return tiny_byte_fmt(model_class, max_position_embeddings=64, fma_block_size=8, fma_coarse_tokens=2, **overrides)


# ----------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize(
    "model_class, task_type",
    [(FMTForCausalLM, "CAUSAL_LM"), (FMTForSequenceClassification, "SEQ_CLS")],
    ids=["causal-lm", "sequence-classification"],
)
def test_lora_trains_the_adapters_and_downsamplers_only(model_class, task_type, tmp_path):
    model = two_level_fmt(model_class, **({"num_labels": 3} if task_type == "SEQ_CLS" else {}))
    config = peft.LoraConfig(
        task_type=task_type, r=4, lora_alpha=8, target_modules=PROJECTIONS, modules_to_save=DOWNSAMPLERS
    )
    lora = peft.get_peft_model(model, config)
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    # LoRA on every projection of every layer; the downsamplers (and a classifier's head) trained in full.
    assert sum("lora_A" in name for name in trainable) == 2 * len(PROJECTIONS)
    assert any("k_downsample.modules_to_save" in name for name in trainable)
    assert not any("embed_tokens" in name or ".base_layer." in name for name in trainable)
    assert ("score" in " ".join(trainable)) == (task_type == "SEQ_CLS")

    ids = random_byte_ids(2, 48)
    labels = ids if task_type == "CAUSAL_LM" else torch.tensor([0, 2])
    before = lora(input_ids=ids).logits.detach()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(3):
        optimizer.zero_grad()
        lora(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    # The trained copies of the downsamplers are the ones FMA runs (48 tokens use two coarse levels).
    downsampler = lora.get_submodule("base_model.model.model.layers.0.self_attn.fma.k_downsample")
    assert downsampler.modules_to_save["default"].weight_1.grad.abs().sum() > 0
    lora.eval()
    after = lora(input_ids=ids).logits.detach()
    assert (after - before).abs().max() > 1e-4

    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(
        two_level_fmt(model_class, **({"num_labels": 3} if task_type == "SEQ_CLS" else {})), tmp_path / "adapter"
    ).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, after)
    merged = reloaded.merge_and_unload()
    assert type(merged) is model_class
    torch.testing.assert_close(merged(input_ids=ids).logits, after, rtol=1e-4, atol=1e-5)


def test_lora_generates_with_the_multilevel_cache():
    lora = peft.get_peft_model(
        two_level_fmt(FMTForCausalLM),
        peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            target_modules=PROJECTIONS,
            modules_to_save=DOWNSAMPLERS,
            init_lora_weights=False,
        ),
    )
    prompt = random_byte_ids(1, 30)
    generated = lora.generate(input_ids=prompt, max_new_tokens=20, do_sample=False)
    # Decoding through FMTCache equals recomputing the whole sequence at every step.
    sequence = prompt
    for _ in range(20):
        next_token = lora(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


# ----------------------------------------------------------------------------- pipelines and streamers


def test_text_generation_pipeline_from_a_saved_folder(tok, tmp_path):
    model = two_level_fmt(FMTForCausalLM)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    assert type(generator.model).__name__ == "FMTForCausalLM"
    text = generator("To be, or not", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    expected = model.generate(**tok("To be, or not", return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert text == tok.decode(expected[0])


def test_fill_mask_pipeline_predicts_the_masked_byte(tok):
    fill = pipeline("fill-mask", model=two_level_fmt(FMTForMaskedLM), tokenizer=tok, device="cpu")
    predictions = fill("To be, or not to b<mask>: that is the question", top_k=3)
    assert len(predictions) == 3 and all(len(p["token_str"]) <= 1 for p in predictions)
    assert predictions[0]["score"] >= predictions[1]["score"] >= predictions[2]["score"]
    assert all(p["sequence"].startswith("To be, or not to b") for p in predictions)


def test_text_classification_pipeline_names_the_works(tok):
    labels = ["Hamlet", "Macbeth", "The Tempest"]
    model = two_level_fmt(
        FMTForSequenceClassification,
        is_causal=False,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    classify = pipeline("text-classification", model=model, tokenizer=tok, device="cpu", top_k=None)
    scores = classify(["Something is rotten in the state of Denmark.", "Double, double toil"])
    for row, text in zip(scores, ["Something is rotten in the state of Denmark.", "Double, double toil"]):
        assert sorted(s["label"] for s in row) == sorted(labels)
        assert sum(s["score"] for s in row) == pytest.approx(1.0)
        probabilities = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
        assert {s["label"]: s["score"] for s in row} == pytest.approx(dict(zip(labels, probabilities.tolist())))


def test_text_streamer_prints_what_generate_returns(tok):
    model = two_level_fmt(FMTForCausalLM)
    inputs = tok("Now is the winter", return_tensors="pt")
    printed = io.StringIO()
    with redirect_stdout(printed):
        output = model.generate(
            **inputs, max_new_tokens=16, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True)
        )
    assert printed.getvalue() == tok.decode(output[0, inputs.input_ids.shape[1] :]) + "\n"

    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(**inputs, max_new_tokens=16, do_sample=False, streamer=streamer)
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tok.decode(output[0, inputs.input_ids.shape[1] :])
