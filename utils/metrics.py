"""Answer-quality metrics for free-text flashcard answers: pure functions, no model, no I/O.

- exact_match / token_f1: SQuAD-style. Both texts are normalised first: lowercase, punctuation
  removed, the articles a/an/the removed, whitespace collapsed. F1 is over the bag of normalised
  tokens; when either side normalises to nothing, F1 is 1 if both do and 0 otherwise.
- rouge_l: the F-measure of ROUGE-L (longest common subsequence) from the `rouge_score` package on
  the raw texts, with its own tokenizer (lowercase, ASCII letters and digits only) and no stemming,
  the defaults of the Hugging Face `rouge` metric. `rouge_score` is imported on first use.
- summarize: the mean of each per-example list.

Scores are fractions in [0, 1].
"""

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_rouge_scorer = None


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    global _rouge_scorer
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_rouge_scorer.score(reference, prediction)["rougeL"].fmeasure)  # score(target, prediction)


def per_example_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """{"exact_match": [...], "f1": [...], "rougeL": [...]}, one value per (prediction, reference) pair."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    pairs = list(zip(predictions, references))
    return {
        "exact_match": [exact_match(p, r) for p, r in pairs],
        "f1": [token_f1(p, r) for p, r in pairs],
        "rougeL": [rouge_l(p, r) for p, r in pairs],
    }


def summarize(scores: dict[str, list[float]]) -> dict[str, float]:
    return {name: (sum(values) / len(values) if values else float("nan")) for name, values in scores.items()}
