"""SQuAD v1.1 EM/F1 against hand-computed values, including the normalization edge cases."""

import pytest

from fastcpu.tasks.squad_metrics import exact_match_score, f1_score, normalize_answer, squad_evaluate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos", "denver broncos"),  # case and a leading article
        ("an apple a day", "apple day"),  # every article, as whole words only
        ("theatre another anthem", "theatre another anthem"),  # articles inside words stay
        ("Santa Clara, California.", "santa clara california"),  # punctuation dropped, not spaced
        ("U.S.A.", "usa"),
        ("(the) cat", "cat"),  # punctuation goes first, then the freed article
        ("  Hello\t \n World  ", "hello world"),  # whitespace collapses
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_articles_punctuation_and_spacing() -> None:
    assert exact_match_score("the  Denver Broncos.", "Denver broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_token_overlap() -> None:
    # prediction tokens [cat, sat, on, mat] vs gold [cat, on, mat]: P = 3/4, R = 1
    assert f1_score("The cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # repeated tokens count at most as often as they are shared: overlap {x: 1, y: 1}, P = R = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("Denver Broncos", "denver broncos!") == 1.0
    assert f1_score("Carolina", "Denver") == 0.0


def test_empty_answers_follow_the_v1_script() -> None:
    assert f1_score("", "Denver") == 0.0
    assert exact_match_score("", "Denver") == 0.0
    # both normalize to "": v1.1 counts that as an exact match with zero F1
    assert exact_match_score("the", "a") == 1.0
    assert f1_score("the", "a") == 0.0


def test_squad_evaluate_takes_best_ground_truth_and_averages() -> None:
    gold = {
        "q1": ["Denver Broncos", "Broncos"],
        "q2": ["eight", "8"],
        "q3": ["Santa Clara, California"],
    }
    predictions = {"q1": "the broncos", "q2": "8 times", "q3": ""}
    scores = squad_evaluate(gold, predictions)
    # q1: EM 1, F1 1 (second truth); q2: EM 0, F1 vs "8" = 2*(1/2*1)/(1/2+1) = 2/3; q3: 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_missing_prediction_scores_zero() -> None:
    scores = squad_evaluate({"q1": ["a cat"], "q2": ["dog"]}, {"q1": "cat"})
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_squad_evaluate_rejects_empty_gold() -> None:
    with pytest.raises(ValueError, match="no gold"):
        squad_evaluate({}, {})
    with pytest.raises(ValueError, match="q1"):
        squad_evaluate({"q1": []}, {"q1": "x"})
