"""Relevance filtering of retrieved passages: each threshold drops exactly the hits below it."""

import pytest

from refrag.errors import InputError
from refrag.index import SearchHit
from refrag.index.chunkstore import PassageMeta
from refrag.relevance import HitFilter


def hit(i: int, score: float, text: str) -> SearchHit:
    return SearchHit(i, score, PassageMeta(text, "f.txt", 0, 0, f"t{i}"))


HITS = [hit(0, 0.9, "paris is the capital of france"), hit(1, 0.8, "Paris is the capital of France!"),
        hit(2, 0.5, "rivers flow to the sea"), hit(3, 0.44, "mountains rise above the clouds"),
        hit(4, 0.2, "numbers one two three")]


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.21, 0.44, 0.5, 0.85, 0.95])
def test_min_score_drops_exactly_the_hits_below_it(floor):
    kept, dropped = HitFilter(min_score=floor).apply(HITS)
    assert [h.id for h in kept] == [h.id for h in HITS if h.score >= floor]
    assert {d.hit.id for d in dropped} == {h.id for h in HITS if h.score < floor}
    assert all(d.reason == "min_score" for d in dropped)


def test_relative_score_is_a_fraction_of_the_best_hit():
    kept, dropped = HitFilter(relative_score=0.5).apply(HITS)  # floor 0.45
    assert [h.id for h in kept] == [0, 1, 2] and [(d.hit.id, d.reason) for d in dropped] == [(3, "relative_score"),
                                                                                              (4, "relative_score")]
    mean = sum(h.score for h in HITS) / len(HITS) / HITS[0].score  # the naive recipe: above the mean score
    assert [h.id for h in HitFilter(relative_score=mean).apply(HITS)[0]] == [0, 1]  # mean 0.568


def test_dedup_drops_near_copies_of_kept_hits_only():
    kept, dropped = HitFilter(dedup=0.8).apply(HITS)
    assert [h.id for h in kept] == [0, 2, 3, 4] and [(d.hit.id, d.reason) for d in dropped] == [(1, "duplicate")]
    assert HitFilter().apply(HITS) == (HITS, [])  # no filter: everything kept
    assert not HitFilter().active and HitFilter(dedup=0.9).active


def test_bad_thresholds_are_errors():
    for bad in ({"relative_score": 0.0}, {"relative_score": 1.5}, {"dedup": -0.1}):
        with pytest.raises(InputError):
            HitFilter(**bad)
