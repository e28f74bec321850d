"""utils/metrics.py: SQuAD-style exact match and token F1, ROUGE-L, and their per-example lists and means."""

import math

import pytest

from utils import metrics


# --- normalize_answer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("  Insulin\tlowers\n\nglucose.  ", "insulin lowers glucose"),
        ("theory and Anatomy", "theory and anatomy"),  # articles only as whole words
        ("A", ""),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_answer_lowercases_drops_punctuation_articles_and_extra_space(text, normalized):
    assert metrics.normalize_answer(text) == normalized


# --- exact_match --------------------------------------------------------------------------------------------


def test_exact_match_is_1_for_texts_equal_after_normalisation():
    assert metrics.exact_match("The Liver.", "liver") == 1.0
    assert metrics.exact_match("  an   ACE inhibitor ", "ACE inhibitor!") == 1.0


def test_exact_match_is_0_for_different_texts():
    assert metrics.exact_match("the liver", "the kidney") == 0.0
    assert metrics.exact_match("liver kidney", "kidney liver") == 0.0  # order matters


# --- token_f1 --------------------------------------------------------------------------------------------


def test_token_f1_hand_computed_equal_precision_and_recall():
    # "cat sat on mat" vs "cat lay on rug": 2 common of 4 each -> P = R = 1/2 -> F1 = 1/2
    assert metrics.token_f1("The cat sat on the mat", "a cat lay on a rug") == pytest.approx(0.5)


def test_token_f1_hand_computed_unequal_precision_and_recall():
    # 3 common, 4 predicted, 3 expected -> P = 3/4, R = 1 -> F1 = 2 * 3/4 / (7/4) = 6/7
    assert metrics.token_f1("insulin lowers blood glucose", "Insulin lowers glucose.") == pytest.approx(6 / 7)


def test_token_f1_counts_a_repeated_token_at_most_as_often_as_the_other_side_has_it():
    # common = min(2, 1) = 1 -> P = 1/2, R = 1 -> F1 = 2/3
    assert metrics.token_f1("glucose glucose", "glucose") == pytest.approx(2 / 3)
    assert metrics.token_f1("glucose", "glucose glucose") == pytest.approx(2 / 3)


def test_token_f1_is_symmetric_and_1_for_identical_texts():
    assert metrics.token_f1("a b c", "b c d e") == pytest.approx(metrics.token_f1("b c d e", "a b c"))
    assert metrics.token_f1("The liver.", "liver") == 1.0


def test_token_f1_is_0_without_common_tokens():
    assert metrics.token_f1("liver", "kidney") == 0.0


@pytest.mark.parametrize(
    "prediction, reference, f1",
    [
        ("", "", 1.0),
        ("the", "a.", 1.0),  # both normalise to nothing
        ("", "liver", 0.0),
        ("liver", "", 0.0),
        ("!!!", "liver", 0.0),
    ],
)
def test_token_f1_when_a_side_normalises_to_nothing(prediction, reference, f1):
    assert metrics.token_f1(prediction, reference) == f1


# --- content_f1 / content_recall --------------------------------------------------------------------------

QUESTION = "What does insulin do?"  # normalised tokens: what does insulin do
REFERENCE = "Insulin lowers blood glucose levels."  # content: lowers blood glucose levels


def test_content_scores_hand_computed_with_a_repeated_token():
    # prediction content: lowers glucose and glucose -> common (with multiplicity) lowers, glucose = 2
    prediction = "Insulin lowers glucose and glucose"
    assert metrics.content_recall(prediction, REFERENCE, QUESTION) == pytest.approx(2 / 4)
    assert metrics.content_f1(prediction, REFERENCE, QUESTION) == pytest.approx(0.5)  # P = 2/4, R = 2/4


def test_content_scores_give_nothing_for_repeating_the_question():
    assert (
        metrics.content_f1(QUESTION, REFERENCE, QUESTION)
        == metrics.content_recall(QUESTION, REFERENCE, QUESTION)
        == 0.0
    )
    assert metrics.token_f1(QUESTION, REFERENCE) > 0  # where plain F1 gives credit for "insulin"


def test_content_scores_ignore_question_tokens_in_the_prediction():
    assert metrics.content_f1("What does insulin do? lowers blood glucose levels", REFERENCE, QUESTION) == 1.0
    assert metrics.content_recall("lowers blood glucose levels and more", REFERENCE, QUESTION) == 1.0


def test_content_scores_of_a_reference_with_no_content_are_1_only_for_a_prediction_adding_nothing():
    assert metrics.content_recall("", "Insulin.", "What is insulin?") == 1.0
    assert metrics.content_f1("insulin", "Insulin.", "What is insulin?") == 1.0
    assert metrics.content_recall("a hormone", "Insulin.", "What is insulin?") == 0.0
    assert metrics.content_f1("a hormone", "Insulin.", "What is insulin?") == 0.0


# --- rouge_l ---------------------------------------------------------------------------------------------


def test_rouge_l_hand_computed_lcs_example():
    # reference a b c d e, prediction a c e x: LCS = a c e (3) -> P = 3/4, R = 3/5 -> F = 2PR/(P+R) = 2/3
    assert metrics.rouge_l("a c e x", "a b c d e") == pytest.approx(2 / 3)


def test_rouge_l_counts_a_subsequence_not_a_bag():
    # ref "the cat sat on the mat", pred "the cat on the mat sat": LCS "the cat on the mat" = 5 of 6 -> F = 5/6
    assert metrics.rouge_l("the cat on the mat sat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # the same bag in reverse order shares only a one-token subsequence: P = R = 1/3
    assert metrics.rouge_l("c b a", "a b c") == pytest.approx(1 / 3)


def test_rouge_l_ignores_case_and_punctuation_and_keeps_articles():
    assert metrics.rouge_l("Insulin, LOWERS glucose!", "insulin lowers glucose") == pytest.approx(1.0)
    assert metrics.rouge_l("the liver", "liver") == pytest.approx(2 / 3)  # P = 1/2, R = 1


def test_rouge_l_is_0_for_an_empty_prediction_or_no_common_token():
    assert metrics.rouge_l("", "liver") == 0.0
    assert metrics.rouge_l("kidney", "liver") == 0.0


# --- per_example_scores / summarize ------------------------------------------------------------------------


def test_per_example_scores_give_one_value_per_pair_for_each_metric():
    scores = metrics.per_example_scores(["The liver.", "kidney", "a c e x"], ["liver", "liver", "a b c d e"])
    assert set(scores) == {"exact_match", "f1", "rougeL"}
    assert scores["exact_match"] == [1.0, 0.0, 0.0]
    # F1 drops the article "a": "c e x" vs "b c d e", 2 common -> P = 2/3, R = 1/2 -> F1 = 4/7
    assert scores["f1"] == pytest.approx([1.0, 0.0, 4 / 7])
    assert scores["rougeL"] == pytest.approx([2 / 3, 0.0, 2 / 3])  # ROUGE-L keeps "the": P = 1/2, R = 1


def test_per_example_scores_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.per_example_scores(["a", "b"], ["a"])


def test_per_example_scores_of_nothing_are_empty_lists():
    assert metrics.per_example_scores([], []) == {"exact_match": [], "f1": [], "rougeL": []}


def test_summarize_is_the_mean_of_each_list_and_nan_for_an_empty_one():
    summary = metrics.summarize({"exact_match": [1.0, 0.0, 0.0, 1.0], "f1": [0.5, 1.0], "rougeL": []})
    assert summary["exact_match"] == 0.5 and summary["f1"] == 0.75 and math.isnan(summary["rougeL"])
