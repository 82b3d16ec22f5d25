"""scripts/eval_lm.py and fmt_hf.toolkit.evaluation: strided windows over whole documents, on FMT and dense
checkpoints."""

import json
import math

import pytest
import torch
from helpers.lm import play_excerpts, script, write_documents
from helpers.models import tiny_byte_fmt, tiny_byte_llama

from fmt_hf.toolkit.evaluation import position_breakdown, score_documents, strided_windows
from fmt_hf.toolkit.tokenizer import byte_tokenizer


@pytest.mark.parametrize("num_tokens", [1, 2, 50, 64, 65, 200, 257])
@pytest.mark.parametrize("context_length, stride", [(64, 32), (64, 63), (64, 1), (64, 48)])
def test_strided_windows_score_every_token_once(num_tokens, context_length, stride):
    windows = strided_windows(3, num_tokens, context_length, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, num_tokens))
    for i, w in enumerate(windows):
        assert w.document == 3 and w.end - w.begin <= context_length and w.begin < w.first_target < w.end
        if i > 0:  # past the first window, every target sees at least context_length - stride tokens
            assert w.first_target - w.begin >= context_length - stride
    assert windows == [] or windows[-1].end == num_tokens


def reference_nll(model, ids, context_length, stride):
    """The Hugging Face perplexity guide's loop: labels -100 except the new targets, mean loss x target count."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context_length, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        targets = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(window, labels=labels).loss) * targets
        count += targets
        prev_end = end
        if end == ids.numel():
            break
    return total, count


@pytest.mark.download  # registry corpora
@pytest.mark.parametrize("make_model", [tiny_byte_fmt, tiny_byte_llama], ids=["fmt", "llama"])
def test_scores_match_the_perplexity_guide_loop(make_model):
    model, tokenizer = make_model(), byte_tokenizer()
    texts = [play_excerpts()[0][:300], "Short één.", play_excerpts()[1][:130]]
    scores = score_documents(model, tokenizer, texts, context_length=64, stride=24, batch_size=3, progress=False)
    for i, text in enumerate(texts):
        ids = torch.tensor([tokenizer.bos_token_id] + list(text.encode("utf-8")))
        nll, count = reference_nll(model, ids, 64, 24)
        assert scores["num_tokens"][i] == count == len(text.encode("utf-8"))  # the BOS makes every byte a target
        assert scores["num_bytes"][i] == len(text.encode("utf-8"))
        assert scores["nll"][i] == pytest.approx(nll, rel=1e-5)
    # Batching is only a grouping of the same windows.
    one_by_one = score_documents(model, tokenizer, texts, context_length=64, stride=24, batch_size=1, progress=False)
    assert one_by_one["nll"] == pytest.approx(scores["nll"], rel=1e-5)


@pytest.mark.download  # registry corpora
def test_max_document_tokens_scores_each_documents_first_tokens():
    model, tokenizer = tiny_byte_llama(), byte_tokenizer()
    texts = [play_excerpts()[0][:300], "Short één.", play_excerpts()[1][:130]]
    cut = score_documents(
        model, tokenizer, texts, context_length=64, stride=24, progress=False, max_document_tokens=100
    )
    first = score_documents(
        model,
        tokenizer,
        [t.encode("utf-8")[:99].decode("utf-8") for t in texts],
        context_length=64,
        stride=24,
        progress=False,
    )
    assert cut["num_tokens"] == first["num_tokens"] == [99, 12, 99]  # the BOS is one of the 100 tokens
    assert cut["num_bytes"] == first["num_bytes"]
    assert cut["nll"] == pytest.approx(first["nll"], rel=1e-6)


@pytest.mark.download  # registry corpora
def test_scores_by_position_add_up_to_each_targets_own_loss():
    model, tokenizer = tiny_byte_llama(), byte_tokenizer()
    texts = [play_excerpts()[0][:300], "Short één.", play_excerpts()[1][:130]]
    scores = score_documents(
        model, tokenizer, texts, context_length=64, stride=24, batch_size=2, progress=False, by_position=True
    )
    expected_nll, expected_tokens = torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = torch.tensor([tokenizer.bos_token_id] + list(text.encode("utf-8")))
        for window in strided_windows(i, ids.numel(), 64, 24):
            with torch.no_grad():
                logits = model(ids[None, window.begin : window.end]).logits[0, :-1]
            token_nll = torch.nn.functional.cross_entropy(logits, ids[window.begin + 1 : window.end], reduction="none")
            positions = slice(window.first_target - window.begin, window.end - window.begin)
            expected_nll[positions] += token_nll[positions.start - 1 : positions.stop - 1].double()
            expected_tokens[positions] += 1
    assert scores["position_tokens"] == expected_tokens.tolist()
    assert scores["position_tokens"][0] == 0 and sum(scores["position_tokens"]) == sum(scores["num_tokens"])
    torch.testing.assert_close(
        torch.tensor(scores["position_nll"], dtype=torch.float64), expected_nll, rtol=1e-5, atol=1e-6
    )
    assert sum(scores["position_nll"]) == pytest.approx(sum(scores["nll"]), rel=1e-9)


def test_position_breakdown_buckets_the_sums():
    position_nll = [0.0, 2.0, 4.0, 0.0, 9.0, 3.0]  # positions 0..5; position 0 is never a target
    position_tokens = [0, 1, 2, 0, 3, 1]
    rows = position_breakdown(position_nll, position_tokens, [3, 4])
    assert [row["positions"] for row in rows] == [[1, 3], [4, 6]]  # [3, 4) scored nothing: left out
    assert [row["num_tokens"] for row in rows] == [3, 4]
    assert [row["nll_per_token"] for row in rows] == pytest.approx([2.0, 3.0])
    assert rows[1]["perplexity"] == pytest.approx(math.exp(3.0))


def run_eval(tmp_path, model, *extra, context_length=128, stride=64):
    """scripts/eval_lm.py on `model` (saved with the byte tokenizer) over eight 1500-byte documents, split 6/1/1."""
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    documents = write_documents(tmp_path / "documents", play_excerpts(count=8, chars=1500))
    argv = [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--dataset_name",
        documents,
        "--context_length",
        str(context_length),
        "--stride",
        str(stride),
        *extra,
    ]
    return script("eval_lm").main(argv)


@pytest.mark.download  # registry corpora
@pytest.mark.parametrize("make_model", [tiny_byte_fmt, tiny_byte_llama], ids=["fmt", "llama"])
def test_eval_lm_on_a_tiny_checkpoint(tmp_path, make_model):
    results = run_eval(tmp_path, make_model())
    assert results["split"] == "test" and results["documents"] == 1
    assert results["num_bytes"] == results["num_tokens"] == 1500  # one held-out excerpt, every byte scored
    assert results["perplexity"] == pytest.approx(math.exp(results["nll_per_token"]))
    assert results["bits_per_byte"] == pytest.approx(results["nll_per_token"] / math.log(2))
    assert 7 < results["bits_per_byte"] < 9  # an untrained model over 259 tokens: about log2(259)
    saved = json.loads((tmp_path / "model" / "eval_lm_test_128.json").read_text())
    assert saved == results


@pytest.mark.download  # registry corpora
def test_eval_lm_reports_perplexity_by_position(tmp_path):
    results = run_eval(tmp_path, tiny_byte_fmt(), "--position_buckets", "32", "64")
    rows = results["by_position"]
    assert [row["positions"] for row in rows] == [[1, 32], [32, 64], [64, 128]]
    assert sum(row["num_tokens"] for row in rows) == results["num_tokens"]
    weighted = sum(row["nll_per_token"] * row["num_tokens"] for row in rows) / results["num_tokens"]
    assert weighted == pytest.approx(results["nll_per_token"], rel=1e-9)
    assert "by_position" not in run_eval(tmp_path, tiny_byte_fmt())


@pytest.mark.download  # registry corpora
def test_fma_and_dense_attention_score_the_same_model(tmp_path):
    """FMA equals dense attention up to 2 * fma_block_size tokens: at context 32 the two agree."""
    fma = run_eval(tmp_path, tiny_byte_fmt(), context_length=32, stride=16)
    sdpa = run_eval(tmp_path, tiny_byte_fmt(), "--attn_implementation", "sdpa", context_length=32, stride=16)
    assert (fma["attn_implementation"], sdpa["attn_implementation"]) == ("fma", "sdpa")  # the results say which ran
    assert fma["bits_per_byte"] == pytest.approx(sdpa["bits_per_byte"], rel=1e-5)


@pytest.mark.download  # registry corpora
def test_bad_eval_input_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="context_length=256 exceeds the model's max_position_embeddings=128"):
        run_eval(tmp_path, tiny_byte_fmt(), context_length=256)
    with pytest.raises(ValueError, match="no split 'dev'"):
        run_eval(tmp_path, tiny_byte_fmt(), "--split", "dev")
