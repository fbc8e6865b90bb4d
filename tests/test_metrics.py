"""SQuAD F1 / exact match, ROUGE-L and distinct-n on known cases."""

from __future__ import annotations

import pytest

from kvroute.metrics import distinct_n, exact_match, f1_score, normalize_answer, qa_metrics, rouge_l, standard_error


def test_normalize_answer_follows_squad():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


def test_f1_known_values():
    assert f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)  # P=1, R=2/3
    assert f1_score("cat dog", "dog bird") == pytest.approx(0.5)  # P=R=1/2
    assert f1_score("Paris", "paris") == 1.0
    assert f1_score("London", "Paris") == 0.0
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)  # bags of tokens: P=1/2, R=1


def test_f1_takes_the_best_gold_and_handles_empty_answers():
    assert f1_score("blue whale", ["a whale", "the blue whale"]) == 1.0
    assert f1_score("", "") == 1.0
    assert f1_score("", "something") == 0.0
    assert f1_score("the", "a") == 1.0  # both normalize to nothing


def test_exact_match_known_values():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0
    assert exact_match("1916", ["1915", "1916"]) == 1.0


def test_rouge_l_known_values():
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/3, R = 2/4
    assert rouge_l("a b c", "a x c y") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a") == 0.0
    assert rouge_l("Hello, World", ["nothing", "hello world"]) == 1.0


def test_rouge_l_agrees_with_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("the quick brown fox jumps", "a quick fox jumped over"), ("42 apples, 7 pears", "7 pears and 42 apples")]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_qa_metrics_means_and_errors():
    scores = qa_metrics(["Paris", "Rome"], ["paris", ["Milan", "Turin"]])
    assert scores == {"f1": 0.5, "exact_match": 0.5, "rouge_l": 0.5}
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        qa_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no QA examples"):
        qa_metrics([], [])
    with pytest.raises(ValueError, match="at least one gold answer"):
        f1_score("a", [])


def test_distinct_n_known_values():
    assert distinct_n([1, 2, 3, 4, 5], 2) == 1.0  # never repeats
    assert distinct_n([7, 7, 7, 7, 7], 2) == 0.25  # one bigram, four times
    assert distinct_n([5, 6, 5, 6, 5, 6], 2) == pytest.approx(2 / 5)  # (5,6) (6,5) over 5 bigrams
    assert distinct_n([5, 6, 5, 6, 5, 6], 1) == pytest.approx(2 / 6)
    assert distinct_n([1, 2, 1, 2, 3], 3) == pytest.approx(3 / 3)
    assert distinct_n([1, 2, 1, 2, 1], 3) == pytest.approx(2 / 3)


def test_distinct_n_short_outputs_and_tensors():
    torch = pytest.importorskip("torch")
    assert distinct_n([], 2) == 0.0 and distinct_n([4], 2) == 0.0  # no bigram at all
    assert distinct_n([4], 1) == 1.0 and distinct_n([4, 4], 2) == 1.0
    assert distinct_n(torch.tensor([9, 9, 9, 9, 9]), 2) == 0.25  # tensor elements compared by value
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n([1, 2], 0)


def test_standard_error_of_a_mean():
    import statistics

    scores = [1.0, 0.0, 0.5, 1.0, 0.25]
    assert standard_error(scores) == pytest.approx(statistics.stdev(scores) / len(scores) ** 0.5)
    assert standard_error([0.0, 1.0]) == pytest.approx(0.5)  # deviations 0.5, variance 0.5, over n = 2
    assert standard_error([0.7, 0.7, 0.7]) == pytest.approx(0.0, abs=1e-12)
    assert standard_error([0.3]) == 0.0 and standard_error([]) == 0.0  # no spread to measure
