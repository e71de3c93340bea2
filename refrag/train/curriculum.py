"""The paper's curriculum (Table 8): a 9-stage geometric data mixture over "n x k" example types.

Early stages are dominated by 1-chunk examples, later ones by long contexts. Each row of Table 8 is a
geometric sequence over the stages; we keep each row's SHAPE (its normalised stage distribution) and its
share of the total, and generalise to any maximum number of chunks (types 1, 2, 4, ... <= max_chunks; types
past 256 chunks reuse the 256 row) and any total budget (counts rounded so every row sums exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refrag.errors import InputError

# Table 8 (k = 8 in the paper), rows 1xk, 2xk, ..., 256xk; columns S1..S9.
TABLE8: tuple[tuple[int, ...], ...] = (
    (1333, 445, 148, 49, 16, 6, 2, 1, 0),
    (333, 298, 267, 238, 213, 191, 171, 153, 137),
    (83, 102, 126, 156, 193, 238, 293, 362, 447),
    (20, 35, 61, 106, 185, 324, 565, 985, 1719),
    (5, 11, 23, 48, 103, 220, 468, 997, 2125),
    (1, 3, 7, 19, 50, 133, 353, 939, 2496),
    (1, 3, 9, 25, 73, 212, 618, 1802, 5259),
    (1, 3, 9, 25, 73, 212, 618, 1802, 5259),
    (1, 3, 9, 25, 73, 212, 618, 1802, 5259),
)
NUM_STAGES = 9


def chunk_types(max_chunks: int) -> list[int]:
    """Example types 1, 2, 4, ... up to max_chunks (max_chunks itself is added when not a power of 2)."""
    if max_chunks < 1:
        raise InputError(f"max_chunks must be >= 1 (got {max_chunks}).")
    types = [1 << i for i in range(max_chunks.bit_length()) if (1 << i) <= max_chunks]
    if types[-1] != max_chunks:
        types.append(max_chunks)
    return types


def _round_to_total(weights: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding: integer counts proportional to ``weights`` that sum to ``total``."""
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Curriculum:
    """counts[stage][type]: how many examples of ``types[type]`` chunks stage ``stage`` trains on."""

    types: tuple[int, ...]  # number of chunks per example type
    counts: tuple[tuple[int, ...], ...]  # [NUM_STAGES][len(types)]

    @property
    def total(self) -> int:
        return int(sum(map(sum, self.counts)))

    def stage_mean_chunks(self) -> list[float]:
        """Mean chunks per example in each stage (grows stage by stage)."""
        return [
            sum(c * n for c, n in zip(row, self.types)) / max(sum(row), 1) for row in self.counts
        ]

    def order(self, seed: int) -> list[int]:
        """The whole run as one list of chunk counts: stage by stage, shuffled within each stage."""
        rng = np.random.default_rng(seed)
        out: list[int] = []
        for row in self.counts:
            stage = [n for n, c in zip(self.types, row) for _ in range(c)]
            out.extend(int(x) for x in rng.permutation(np.array(stage, dtype=np.int64)))
        return out


def build_curriculum(max_chunks: int, total: int) -> Curriculum:
    """Table 8 generalised: ``total`` examples over 9 stages and types 1..max_chunks chunks."""
    if total < 1:
        raise InputError(f"the curriculum needs a positive number of examples (got {total}).")
    types = chunk_types(max_chunks)
    rows = [np.array(TABLE8[min(i, len(TABLE8) - 1)], dtype=np.float64) for i in range(len(types))]
    type_totals = _round_to_total(np.array([r.sum() for r in rows]), total)
    per_type = [_round_to_total(r, int(t)) if t else np.zeros(NUM_STAGES, np.int64)
                for r, t in zip(rows, type_totals)]
    counts = tuple(tuple(int(per_type[j][s]) for j in range(len(types))) for s in range(NUM_STAGES))
    return Curriculum(types=tuple(types), counts=counts)


def flat_order(max_chunks: int, total: int, seed: int) -> list[int]:
    """No curriculum (the ablation): the same example types and totals, shuffled over the whole run."""
    cur = build_curriculum(max_chunks, total)
    rng = np.random.default_rng(seed)
    every = np.array(cur.order(seed), dtype=np.int64)
    return [int(x) for x in rng.permutation(every)]
