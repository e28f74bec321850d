"""Answer-quality metrics for free-text flashcard answers: pure functions, no model, no I/O.

- exact_match / token_f1: SQuAD-style. Both texts are normalised first: lowercase, punctuation
  removed, the articles a/an/the removed, whitespace collapsed. F1 is over the bag of normalised
  tokens; when either side normalises to nothing, F1 is 1 if both do and 0 otherwise.
- rouge_l: the F-measure of ROUGE-L (longest common subsequence) from the `rouge_score` package on
  the raw texts, with its own tokenizer (lowercase, ASCII letters and digits only) and no stemming,
  the defaults of the Hugging Face `rouge` metric. `rouge_score` is imported on first use.
- content_f1 / content_recall: token F1 and recall over the reference answer's normalised tokens that
  are NOT in the question, so repeating the question earns nothing. A reference whose every token is
  in the question has no content: both scores are then 1 if the prediction adds nothing either, else 0.
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


def _content_tokens(text: str, question: str) -> list[str]:
    asked = set(normalize_answer(question).split())
    return [token for token in normalize_answer(text).split() if token not in asked]


def content_f1(prediction: str, reference: str, question: str) -> float:
    """Token F1 between prediction and reference after removing every token of the question from both."""
    return token_f1(
        " ".join(_content_tokens(prediction, question)), " ".join(_content_tokens(reference, question))
    )


def content_recall(prediction: str, reference: str, question: str) -> float:
    """Share of the reference's non-question tokens (with multiplicity) that the prediction contains."""
    expected, predicted = _content_tokens(reference, question), _content_tokens(prediction, question)
    if not expected:
        return float(not predicted)
    return sum((collections.Counter(expected) & collections.Counter(predicted)).values()) / len(expected)


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
