"""Selective expansion: which context chunks stay raw tokens. One seam, ``ExpansionPolicy.select``.

REFRAG compresses every chunk but a few, chosen per question. A policy ranks the chunks and keeps ``count`` of
them raw; how many is the budget (``expansion_count``: round(p * L) for a fraction p), decided outside the
policy so every policy spends the same positions. Heuristic policies live here; a learned one plugs in at the
same seam (anything with a ``select`` method).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from refrag.chunking import Chunk
from refrag.config import CompressionOptions, ExpandStrategy
from refrag.errors import InputError

Encode = Callable[[Sequence[str]], torch.Tensor]  # texts -> [N, E] chunk-encoder outputs


class ExpansionPolicy(Protocol):
    """Picks which of a question's L chunks the decoder reads as raw tokens."""

    def select(
        self, chunks: Sequence[Chunk], encodings: torch.Tensor | None, question: str | None, count: int
    ) -> set[int]:
        """``count`` chunk indices in [0, L). ``encodings``: [L, E] chunk-encoder outputs (None where the
        caller has none); ``question``: the question text (None when there is none, e.g. plain text)."""
        ...


@dataclass(frozen=True)
class FirstPolicy:
    """The first chunks (the top-ranked passage's opening)."""

    def select(self, chunks, encodings, question, count) -> set[int]:
        return set(range(count))


@dataclass(frozen=True)
class LastPolicy:
    """The last chunks (nearest the question, or the continuation to predict)."""

    def select(self, chunks, encodings, question, count) -> set[int]:
        return set(range(len(chunks) - count, len(chunks)))


@dataclass(frozen=True)
class RandomPolicy:
    """A seeded random choice (the paper's RAND baseline)."""

    seed: int = 0

    def select(self, chunks, encodings, question, count) -> set[int]:
        return set(random.Random(self.seed).sample(range(len(chunks)), count))


@dataclass(frozen=True)
class SimilarityPolicy:
    """The chunks whose encoder vectors are most cosine-similar to the question's (encoded the same way)."""

    encode: Encode

    def select(self, chunks, encodings, question, count) -> set[int]:
        if encodings is None or question is None:
            raise InputError("similarity expansion needs the chunks' encodings and the question.")
        query = self.encode([question])[0]  # [E]
        scores = torch.nn.functional.cosine_similarity(
            encodings.float(), query.float().reshape(1, -1), dim=-1
        )  # [L]
        return set(scores.topk(count).indices.tolist())


def make_policy(strategy: ExpandStrategy, *, seed: int = 0, encode: Encode | None = None) -> ExpansionPolicy:
    """The heuristic policy named ``strategy``; ``similarity`` needs the chunk encoder (``encode``)."""
    if strategy == "first":
        return FirstPolicy()
    if strategy == "last":
        return LastPolicy()
    if strategy == "random":
        return RandomPolicy(seed)
    if strategy == "similarity":
        if encode is None:
            raise InputError("similarity expansion needs the chunk encoder to encode the question.")
        return SimilarityPolicy(encode)
    raise InputError(f"unknown expansion strategy {strategy!r}.")


def expansion_count(num_chunks: int, fraction: float) -> int:
    """The budget: round(p * L) chunks stay raw."""
    return round(fraction * num_chunks)


def choose_expanded(
    chunks: Sequence[Chunk],
    options: CompressionOptions,
    *,
    encodings: torch.Tensor | None = None,
    question: str | None = None,
    encode: Encode | None = None,
) -> set[int]:
    """Indices of chunks kept as raw tokens: all in full mode, ``expansion_count`` of them in refrag mode,
    picked by ``options.expand_strategy``."""
    if options.mode == "full":
        return set(range(len(chunks)))
    count = expansion_count(len(chunks), options.expand_fraction)
    if count == 0:
        return set()
    policy = make_policy(options.expand_strategy, seed=options.seed, encode=encode)
    return policy.select(chunks, encodings, question, count)
