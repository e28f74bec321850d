"""The project's answer-quality metric for `evaluate`: exact match, token F1 and ROUGE-L.

Loaded from this directory, offline: `evaluate.load("metrics/qa_metrics")` (any path to this folder).
The arithmetic lives in utils/metrics.py (see its docstring for the normalisation); this module only
adapts it to `evaluate`'s API, so the project root must be importable (it is whenever a script of
this project or its tests run).

    metric.compute(predictions=[...], references=[...])
        -> {"exact_match": mean, "f1": mean, "rougeL": mean}   (fractions in [0, 1])
    metric.compute(..., per_example=True) adds "per_example": {"exact_match": [...], "f1": [...], "rougeL": [...]}
"""

import datasets
import evaluate

from utils.metrics import per_example_scores, summarize

_DESCRIPTION = (
    "Exact match and token F1 after SQuAD-style normalisation (lowercase, no punctuation, no articles "
    "a/an/the, single spaces), and the ROUGE-L F-measure of rouge_score without stemming."
)
_INPUTS = """
Args:
    predictions: generated answers, list of str.
    references: reference answers, list of str (one per prediction).
    per_example: also return the per-pair scores (default False).
Returns:
    exact_match, f1, rougeL: means over the pairs, in [0, 1].
"""


class QAMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, per_example=False):
        scores = per_example_scores(list(predictions), list(references))
        result = summarize(scores)
        if per_example:
            result["per_example"] = scores
        return result
