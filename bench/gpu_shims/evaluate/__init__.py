"""A stand-in for the `evaluate` package, used only by bench/gpu_check.py and only where `evaluate`
cannot be imported (the GPU machine: `evaluate` needs `datasets`, pyarrow and pandas, whose wheels
do not fit beside scipy in what may travel there; bench/gpu_wheels.txt).

evaluate_qa.py calls evaluate.load(<path>/metrics/qa_metrics, keep_in_memory=True) and then
metric.compute(predictions=..., references=..., per_example=True). metrics/qa_metrics only adapts
utils.metrics to `evaluate`'s API, so this stand-in returns the same numbers from utils.metrics
directly. Any other metric is refused. gpu_check.py records in its report that it was used.
"""

from pathlib import Path

STAND_IN = True


class _QAMetrics:
    def compute(self, predictions, references, per_example=False):
        from utils.metrics import per_example_scores, summarize

        scores = per_example_scores(list(predictions), list(references))
        result = summarize(scores)
        if per_example:
            result["per_example"] = scores
        return result


def load(path, *args, **kwargs):
    if Path(str(path)).name != "qa_metrics":
        raise ImportError(f"bench/gpu_shims/evaluate only stands in for metrics/qa_metrics, not {path!r}")
    return _QAMetrics()
