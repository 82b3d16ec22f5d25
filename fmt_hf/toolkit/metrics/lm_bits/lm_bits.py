"""Bits per byte, bits per token and perplexity of a language model from its summed negative log-likelihood."""

import math

import datasets
import evaluate

_DESCRIPTION = """\
Language-model quality from summed negative log-likelihoods. Each input row is one scored piece of
text (a block, a document, an evaluation batch): `nll`, the sum over its predicted tokens of
-ln p(token) in nats; `num_tokens`, how many tokens were predicted; `num_bytes`, how many UTF-8
bytes those tokens cover. Rows are summed before dividing, so the result is per token and per
byte of the whole evaluation set, not an average of per-row ratios.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): summed negative log-likelihood in nats of each row's predicted tokens.
    num_tokens (`list` of `int`): number of predicted tokens in each row.
    num_bytes (`list` of `int`): UTF-8 bytes covered by each row's predicted tokens.
Returns:
    nll_per_token (`float`): mean NLL in nats per token (a causal LM's loss).
    bits_per_token (`float`): nll_per_token / ln 2.
    bits_per_byte (`float`): total NLL / ln 2 / total bytes; comparable across tokenizers.
    perplexity (`float`): exp(nll_per_token).
    num_tokens (`int`), num_bytes (`int`): the totals.
Examples:
    >>> import evaluate
    >>> from fmt_hf.toolkit.metrics import LM_BITS
    >>> metric = evaluate.load(LM_BITS)
    >>> result = metric.compute(nll=[693.147], num_tokens=[1000], num_bytes=[500])
    >>> round(result["bits_per_token"], 3), round(result["bits_per_byte"], 3), round(result["perplexity"], 3)
    (1.0, 2.0, 2.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LmBits(evaluate.Metric):
    """Bits per byte, bits per token and perplexity from summed NLL, token and byte counts."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll": datasets.Value("float64"),
                    "num_tokens": datasets.Value("int64"),
                    "num_bytes": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, nll: list[float], num_tokens: list[int], num_bytes: list[int]) -> dict[str, float]:
        total_nll, tokens, n_bytes = math.fsum(nll), sum(num_tokens), sum(num_bytes)
        if tokens <= 0 or n_bytes <= 0:
            raise ValueError(f"need a positive token and byte count, got num_tokens={tokens}, num_bytes={n_bytes}")
        nll_per_token = total_nll / tokens
        return {
            "nll_per_token": nll_per_token,
            "bits_per_token": nll_per_token / math.log(2),
            "bits_per_byte": total_nll / math.log(2) / n_bytes,
            "perplexity": math.exp(nll_per_token),
            "num_tokens": tokens,
            "num_bytes": n_bytes,
        }
