"""F1-Recall and friends: hand-checked cases, the released code's quirks, both modes."""

from __future__ import annotations

import pytest

from kbrouter.eval.metrics import (
    exact_match,
    f1_recall,
    f1_recall_detail,
    normalize_answer,
    token_f1,
    tokenize_answer,
    yes_no_accuracy,
    yes_no_label,
)


@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is Two dogs.", "answer is 2 dogs"),  # 'the' dropped, number word, period
        ("an apple and a pear", "apple and a pear"),  # 'an' dropped, 'a' kept
        ("Hank Williams, Jr.", "hank williams jr"),  # ', ' -> comma deleted (next to a space)
        ("well-known", "well known"),  # '-' not next to a space -> space
        ("3.5 - 4", "3.5 4"),  # period before a digit kept; ' - ' deleted
        ("1,000 (approx)", "1000 approx"),  # digit,digit -> every listed mark deleted
        ("U.S.A.", "usa"),  # periods not followed by a digit deleted
        ("line\nbreak\ttab", "line break tab"),
        ("I dont know", "i don't know"),  # contraction
        ("Ten", "10"),
    ],
)
def test_normalize_answer(text, expected, paper):
    """VQA-style normalisation, identical in both modes on these inputs."""
    assert normalize_answer(text, paper_compat=paper) == expected


def test_period_count_quirk():
    """Paper mode strips only the first 32 periods (re.sub count bug); default strips all."""
    text = "a." * 40
    assert normalize_answer(text) == "a" * 40
    paper = normalize_answer(text, paper_compat=True)
    assert paper == "a" * 32 + "a." * 7 + "a."
    assert paper.count(".") == 8


def test_none_gold_quirk():
    """Paper: gold 'None' becomes '0' and equals a prediction '0'; default keeps 'none'."""
    assert f1_recall("0", ["None"], paper_compat=True) == 1.0
    assert f1_recall("none", ["None"], paper_compat=True) == 1.0
    assert f1_recall("0", ["None"]) == 0.0
    assert f1_recall("None", ["None"]) == 1.0
    # a missing gold value: str(None) in paper mode, dropped by default
    assert f1_recall("0", [None], paper_compat=True) == 1.0
    assert f1_recall("0", [None]) == 0.0
    assert f1_recall("Paris", [None, "Paris"]) == 1.0


def test_punctuation_token_quirk():
    """Paper keeps punctuation tokens that are not substrings of ,.?!:;'" ; default drops them."""
    assert tokenize_answer("paris «", paper_compat=True) == ["paris", "«"]
    assert tokenize_answer("paris «") == ["paris"]


def test_contraction_quirk():
    """The released table maps somebody'd -> somebodyd; the fixed one maps somebodyd back."""
    assert normalize_answer("somebody'd", paper_compat=True) == "somebodyd"
    assert normalize_answer("somebodyd") == "somebody'd"


def test_recall_of_best_f1_gold():
    """Recall is taken from the gold with the best F1, not the best recall."""
    golds = ["new york city usa", "new york"]
    # vs gold 1: P=2/2 R=2/4 F1=.667; vs gold 2: P=1 R=1 F1=1 -> recall 1
    assert f1_recall("New York", golds) == 1.0
    # verbose prediction: token recall is lenient
    assert f1_recall("I think it is New York, in the USA", ["New York"]) == 1.0
    d = f1_recall_detail("york", golds)
    # gold 1: P=1 R=.25 F1=.4 ; gold 2: P=1 R=.5 F1=.667 -> gold 2
    assert d.gold_index == 1 and d.recall == pytest.approx(0.5)
    assert token_f1("york", golds) == pytest.approx(2 / 3)


def test_first_gold_wins_ties():
    """On equal F1 the first gold's recall is reported (strictly-greater comparison)."""
    # pred 'a b': gold1 'a c' P=.5 R=.5 F1=.5; gold2 'a c d e f g' ... make equal F1 cases:
    d = f1_recall_detail("x y", ["x z", "y w"])
    assert d.gold_index == 0 and d.recall == 0.5


def test_empty_and_none_prediction():
    """Empty (or all-punctuation) predictions score 0."""
    assert f1_recall("", ["paris"]) == 0.0
    assert f1_recall(None, ["paris"]) == 0.0
    assert f1_recall("...", ["paris"]) == 0.0
    assert exact_match("", ["paris"]) == 0.0


def test_numbers_and_ints():
    """Number words equal digits; int golds (Dyn-VQA) are compared as strings."""
    assert f1_recall("two", [2]) == 1.0
    assert f1_recall("It happened in 2016.", [2016, "2016 年 1 月 10 日"]) == 1.0
    assert f1_recall("1,000", ["1000"]) == 1.0
    assert f1_recall("3.5", ["3.50"]) == 0.0


def test_chinese_golds():
    """Chinese golds are one token per unspaced run (word_tokenize), matched only exactly."""
    golds = ["莱昂纳多·迪卡普里奥没有任何孩子。", "Leonardo DiCaprio does not have any children."]
    assert f1_recall("莱昂纳多·迪卡普里奥没有任何孩子。", golds) == 1.0
    assert f1_recall("He does not have any children", golds) == pytest.approx(5 / 7)
    assert f1_recall("没有", golds) == 0.0


def test_webqa_quoted_gold():
    """Literal quotes around a WebQA gold do not affect the score."""
    gold = ['"Centennial Olympic Park contains greenery."']
    assert f1_recall("Yes, Centennial Olympic Park contains greenery", gold) == 1.0
    assert f1_recall("Yes, Centennial Olympic Park contains greenery", gold, True) == 1.0


def test_bare_string_gold():
    """A bare string gold is treated as a one-element list."""
    assert f1_recall("Paris", "Paris") == 1.0


def test_exact_match():
    """Exact match compares normalised token sequences."""
    assert exact_match("The Seine.", ["seine"]) == 1.0
    assert exact_match("the river Seine", ["seine"]) == 0.0


def test_yes_no():
    """yes/no labels from the first yes- or no-like token; accuracy against yes/no golds."""
    assert yes_no_label("Yes, it is.") == "yes"
    assert yes_no_label("No.") == "no"
    assert yes_no_label("It is not true") == "no"
    assert yes_no_label("Paris") is None
    assert yes_no_accuracy("yes", ["yes"]) == 1.0
    assert yes_no_accuracy("No, it was 1921", ["yes"]) == 0.0
    assert yes_no_accuracy("maybe", ["no"]) == 0.0
    assert yes_no_accuracy("yes", ["Paris"]) is None
