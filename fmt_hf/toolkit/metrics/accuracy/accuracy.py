"""Accuracy of a classifier: the fraction of predictions equal to their references."""

import datasets
import evaluate

_DESCRIPTION = """\
Accuracy of a classifier: the fraction of examples whose predicted class equals the reference class. Shipped with
fmt_hf because `evaluate.load("accuracy")` needs the Hugging Face Hub; it computes the same number.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class of each example.
    references (`list` of `int`): true class of each example.
Returns:
    accuracy (`float`): correct / total, in [0, 1].
    num_examples (`int`): the number of examples scored.
Examples:
    >>> import evaluate
    >>> from fmt_hf.toolkit.metrics import ACCURACY
    >>> metric = evaluate.load(ACCURACY)
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75, 'num_examples': 4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """The fraction of predictions that equal their references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        if not references:
            raise ValueError("accuracy needs at least one example")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references), "num_examples": len(references)}
