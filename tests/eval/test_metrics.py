"""EM / F1 / contains with SQuAD normalisation."""

from __future__ import annotations

import pytest

from refrag.eval.metrics import contains_answer, exact_match, normalize_answer, token_f1


def test_normalisation_drops_case_punctuation_articles_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"


def test_exact_match_uses_normalised_forms_and_any_answer():
    assert exact_match("the Beatles.", ["Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("Rome", ["Paris", "rome"]) == 1.0


def test_token_f1_hand_values():
    # pred {barack, obama, jr}, gold {barack, obama}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Barack Obama Jr.", ["Barack Obama"]) == pytest.approx(0.8)
    assert token_f1("no overlap", ["Barack Obama"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to empty
    assert token_f1("obama obama", ["obama"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_contains_matches_whole_words_only():
    assert contains_answer("It was Claude Rains, I think.", ["claude rains"]) == 1.0
    assert contains_answer("Romeo", ["Rome"]) == 0.0
    assert contains_answer("anything", ["the"]) == 0.0  # an answer that normalises to nothing never matches


def test_paired_bootstrap_interval_contains_the_mean_and_detects_a_real_difference():
    from refrag.eval.metrics import paired_bootstrap

    same = paired_bootstrap([1.0, 0.0] * 50, [1.0, 0.0] * 50)
    assert (same.mean, same.low, same.high, same.significant) == (0.0, 0.0, 0.0, False)
    better = paired_bootstrap([1.0] * 60 + [0.0] * 40, [1.0] * 30 + [0.0] * 70)
    assert better.mean == pytest.approx(0.3) and better.low <= better.mean <= better.high and better.significant
    noisy = paired_bootstrap([1.0, 0.0] * 5, [0.0, 1.0] * 5)
    assert noisy.low < 0 < noisy.high and not noisy.significant
    assert paired_bootstrap([1.0] * 60 + [0.0] * 40, [1.0] * 30 + [0.0] * 70, seed=0) == better  # seeded
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])
