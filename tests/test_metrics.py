"""Answer metrics: exact match as SQuAD normalises it, GSM8K's final number, chrF from sacrebleu."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llmops.evaluation import metrics


def test_exact_match_normalises_case_spaces_punctuation_and_articles():
    assert metrics.scores("exact_match", ["The  Eiffel tower.", "251", "o"], ["eiffel Tower", "251", "a"]) == \
        [1.0, 1.0, 0.0]


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
     Decimal(72)),
    ("#### 1,200", Decimal(1200)), ("The answer is $18.", Decimal(18)), ("It costs 5.50 dollars", Decimal("5.5")),
    ("-3 degrees, then 7", Decimal(7)), ("no number here", None), ("#### 72 (I think 80)", Decimal(72)),
])
def test_the_final_number_is_what_gsm8k_compares(text, number):
    assert metrics.final_number(text) == number


def test_numeric_compares_final_numbers_not_the_text():
    reference = "She sold 48 in April and 24 in May.\n#### 72"
    assert metrics.scores("numeric", ["48 + 24 = 72", "72.0", "#### 72", "The answer is 71", ""],
                          [reference] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_chrf_is_sacrebleus_sentence_score_on_a_0_1_scale():
    from sacrebleu.metrics import CHRF

    answer, reference = "The cat sat on the mat.", "The cat is sitting on the mat."
    assert metrics.scores("chrf", [answer], [reference]) == [CHRF().sentence_score(answer, [reference]).score / 100]
    assert metrics.scores("chrf", [reference], [reference]) == [1.0]
    assert 0 < metrics.scores("chrf", [answer], [reference])[0] < 1
