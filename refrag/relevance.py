"""Relevance filtering of retrieved passages: a score floor, a floor relative to the best hit, near-duplicates.

Applied to the hits in rank order: a hit is dropped when its score is below ``min_score``, below
``relative_score`` x the top hit's score (the naive recipe's "above the mean" is one setting of it), or when its
words overlap a hit already kept by ``dedup`` or more (Jaccard of word sets). What was dropped, and why, is
returned so the caller can report it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from refrag.errors import InputError

if TYPE_CHECKING:
    from refrag.index import SearchHit

Reason = Literal["min_score", "relative_score", "duplicate", "max_positions"]  # max_positions: Pipeline
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Dropped:
    hit: SearchHit
    reason: Reason


@dataclass(frozen=True)
class HitFilter:
    min_score: float | None = None  # absolute floor (cosine similarity)
    relative_score: float | None = None  # in (0, 1]: floor as a fraction of the best hit's score
    dedup: float | None = None  # in (0, 1]: word-set Jaccard at or above which a hit duplicates a kept one

    def __post_init__(self) -> None:
        for name, value in (("--relative-score", self.relative_score), ("--dedup", self.dedup)):
            if value is not None and not 0.0 < value <= 1.0:
                raise InputError(f"{name} must be in (0, 1] (got {value}).")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_score, self.relative_score, self.dedup))

    def apply(self, hits: Sequence[SearchHit]) -> tuple[list[SearchHit], list[Dropped]]:
        """(kept hits in rank order, dropped hits with their reason)."""
        kept: list[SearchHit] = []
        words: list[set[str]] = []
        dropped: list[Dropped] = []
        top = hits[0].score if hits else 0.0
        for hit in hits:
            mine = set(_WORD.findall(hit.meta.text.lower()))
            if self.min_score is not None and hit.score < self.min_score:
                dropped.append(Dropped(hit, "min_score"))
            elif self.relative_score is not None and hit.score < self.relative_score * top:
                dropped.append(Dropped(hit, "relative_score"))
            elif self.dedup is not None and any(_jaccard(mine, w) >= self.dedup for w in words):
                dropped.append(Dropped(hit, "duplicate"))
            else:
                kept.append(hit)
                words.append(mine)
        return kept, dropped


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
