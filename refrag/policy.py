"""Selective expansion: which context chunks stay raw tokens. One seam, ``ExpansionPolicy.scores``.

REFRAG compresses every chunk but a few, chosen per question. A policy scores the L chunks (higher: keep raw
first); the budget (``Budget``: a fraction p of the chunks, or a number of decoder positions) is spent outside the
policy, in score order, so every policy spends the same positions and a token budget is never exceeded.

Policies (``PolicyName``): ``none`` (nothing raw), ``first`` / ``last`` (position), ``random`` (seeded, the paper's
RAND), ``similarity`` (cosine of chunk and question encodings), ``lexical`` (BM25 of the question's terms over the
request's chunks), ``lexical-passage`` (BM25 over whole passages picks the passage, then its chunks by their own),
``perplexity-desc`` / ``perplexity-asc`` (the chunk's token perplexity under the decoder, highest / lowest first:
the paper's Fig. 3 baselines), ``learned`` (the checkpoint's trained network,
``refrag.learned_policy``). Any object with a ``scores`` method plugs in at the same seam.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from refrag.chunking import Chunk
from refrag.config import CompressionOptions, PolicyName
from refrag.errors import InputError
from refrag.lexical import BM25

if TYPE_CHECKING:
    from refrag.modeling import RefragModel

Encode = Callable[[Sequence[str]], torch.Tensor]  # texts -> [N, E] chunk-encoder outputs
ChunkNLL = Callable[[Sequence[Chunk]], list[float]]  # chunks -> mean token NLL of each, read alone


class ExpansionPolicy(Protocol):
    """Ranks a question's L chunks for expansion."""

    def scores(self, chunks: Sequence[Chunk], encodings: torch.Tensor | None, question: str | None) -> list[float]:
        """One score per chunk, higher = keep raw first. ``encodings``: [L, E] chunk-encoder outputs (None where
        the caller has none); ``question``: the question text (None when there is none, e.g. plain text)."""
        ...


@dataclass(frozen=True)
class FirstPolicy:
    """The first chunks (the top-ranked passage's opening)."""

    def scores(self, chunks, encodings, question) -> list[float]:
        return [-float(i) for i in range(len(chunks))]


@dataclass(frozen=True)
class LastPolicy:
    """The last chunks (nearest the question, or the continuation to predict)."""

    def scores(self, chunks, encodings, question) -> list[float]:
        return [float(i) for i in range(len(chunks))]


@dataclass(frozen=True)
class RandomPolicy:
    """A seeded random order (the paper's RAND baseline)."""

    seed: int = 0

    def scores(self, chunks, encodings, question) -> list[float]:
        order = random.Random(self.seed).sample(range(len(chunks)), len(chunks))  # order[r]: the r-th pick
        scores = [0.0] * len(chunks)
        for rank, i in enumerate(order):
            scores[i] = -float(rank)
        return scores


def need_question(question: str | None, policy: str) -> str:
    if not question or not question.strip():
        raise InputError(f"the {policy} policy needs the question; for plain text use first, last, random or "
                         "perplexity-desc/asc.")
    return question


@dataclass(frozen=True)
class SimilarityPolicy:
    """The chunks whose encoder vectors are most cosine-similar to the question's (encoded the same way)."""

    encode: Encode

    def scores(self, chunks, encodings, question) -> list[float]:
        if encodings is None:
            raise InputError("the similarity policy needs the chunks' encodings.")
        query = self.encode([need_question(question, "similarity")])[0]  # [E]
        return torch.nn.functional.cosine_similarity(
            encodings.float(), query.float().reshape(1, -1), dim=-1
        ).tolist()  # [L]


@dataclass(frozen=True)
class LexicalPolicy:
    """BM25 of the question's terms over the request's chunks (Lucene's idf, k1 = 1.2, b = 0.75)."""

    k1: float = 1.2
    b: float = 0.75

    def scores(self, chunks, encodings, question) -> list[float]:
        return BM25([c.text for c in chunks], self.k1, self.b).scores(need_question(question, "lexical"))


@dataclass(frozen=True)
class PassageLexicalPolicy:
    """BM25 picks the passage, then its chunks: passages ranked by BM25 of the question over their whole text (a
    16-token chunk is too short for term statistics to tell the answer's passage from a distractor), all chunks
    of the best passage before any of the next one's, and within a passage by the chunk's own BM25. One passage
    (plain text): the same order as ``lexical``. Reads ``Chunk.passage`` (``request_chunks`` numbers them)."""

    k1: float = 1.2
    b: float = 0.75

    def scores(self, chunks, encodings, question) -> list[float]:
        question = need_question(question, "lexical-passage")
        ids = sorted({c.passage for c in chunks})
        texts = ["".join(c.text for c in chunks if c.passage == j) for j in ids]
        by_passage = dict(zip(ids, BM25(texts, self.k1, self.b).scores(question)))
        rank = {j: r for r, j in enumerate(sorted(ids, key=lambda j: (-by_passage[j], j)))}
        own = BM25([c.text for c in chunks], self.k1, self.b).scores(question)
        top = max(own, default=0.0) or 1.0
        return [s / top - 2.0 * rank[c.passage] for c, s in zip(chunks, own)]  # in [0, 1] within a passage


@dataclass(frozen=True)
class PerplexityPolicy:
    """Chunks by their tokens' perplexity under the decoder, each chunk read alone (so it is one float per chunk,
    computable at index time): ``descending`` expands the hardest-to-predict chunks first."""

    nll: ChunkNLL
    descending: bool = True

    def scores(self, chunks, encodings, question) -> list[float]:
        values = self.nll(chunks)
        return values if self.descending else [-v for v in values]


def chunk_nll(model: RefragModel, chunks: Sequence[Chunk], batch_size: int = 64) -> list[float]:
    """Mean next-token NLL of each chunk's tokens after the start token, under the ORIGINAL decoder (adapter
    off), each chunk read alone after the start token."""
    from refrag.modeling import start_token, token_nll

    start = start_token(model.tokenizer)
    if start is None:
        raise InputError("the perplexity policies need a tokenizer with a BOS or EOS token to start a chunk.")
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            layouts = [model.scored_layout([[start]], list(c.token_ids)) for c in chunks[i : i + batch_size]]
            logits, labels = model.label_logits(model.build_inputs(layouts))
            nll, mask = token_nll(logits, labels)  # [B, K]
            out += ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


def make_policy(name: PolicyName, *, seed: int = 0, model: RefragModel | None = None) -> ExpansionPolicy:
    """The heuristic policy ``name``; ``similarity`` and ``perplexity-*`` need the model (its chunk encoder,
    its decoder)."""
    if name == "first":
        return FirstPolicy()
    if name == "last":
        return LastPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "lexical":
        return LexicalPolicy()
    if name == "lexical-passage":
        return PassageLexicalPolicy()
    if name == "learned":
        if model is None or model.policy_network is None:
            raise InputError("this checkpoint has no learned policy: train one with `refrag train policy --init "
                             "CKPT`, or choose a heuristic --policy (lexical, similarity, ...).")
        from refrag.learned_policy import LearnedPolicy

        return LearnedPolicy(model.policy_network, model.encode_chunks)  # type: ignore[arg-type]
    if name in ("similarity", "perplexity-desc", "perplexity-asc"):
        if model is None:
            raise InputError(f"the {name} policy needs the model (its chunk encoder or decoder).")
        if name == "similarity":
            return SimilarityPolicy(model.encode_chunks)
        return PerplexityPolicy(lambda chunks: chunk_nll(model, chunks), descending=name == "perplexity-desc")
    raise InputError(f"unknown policy {name!r} (none has no policy object: nothing is expanded).")


@dataclass(frozen=True)
class Budget:
    """How much raw text a request may read: ``fraction`` p of its L chunks (``expansion_count``), or at most
    ``tokens`` decoder positions on raw chunks (in score order; a chunk that does not fit is skipped and a
    smaller later one may still be taken)."""

    fraction: float = 0.0
    tokens: int | None = None

    @classmethod
    def of(cls, options: CompressionOptions) -> Budget:
        return cls(options.expand_fraction, options.expand_tokens)

    @property
    def empty(self) -> bool:
        return not self.tokens and not self.fraction

    def spend(self, chunks: Sequence[Chunk], scores: Sequence[float]) -> set[int]:
        """Chunk indices to keep raw, best score first (ties: earlier chunk first)."""
        order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
        if self.tokens is None:
            return set(order[: expansion_count(len(chunks), self.fraction)])
        picked, used = set(), 0
        for i in order:
            if used + len(chunks[i].token_ids) <= self.tokens:
                picked.add(i)
                used += len(chunks[i].token_ids)
        return picked


def expansion_count(num_chunks: int, fraction: float) -> int:
    """The fraction budget: p * L chunks rounded half up, and at least one when p > 0 (a budget asked for is
    never silently empty)."""
    return min(num_chunks, max(1, math.floor(fraction * num_chunks + 0.5))) if fraction > 0 else 0


def select(
    policy: ExpansionPolicy,
    chunks: Sequence[Chunk],
    budget: Budget,
    *,
    encodings: torch.Tensor | None = None,
    question: str | None = None,
) -> set[int]:
    """The chunks ``policy`` keeps raw within ``budget``."""
    if budget.empty or not chunks:
        return set()
    scores = policy.scores(chunks, encodings, question)
    if len(scores) != len(chunks):
        raise InputError(f"the expansion policy gave {len(scores)} scores for {len(chunks)} chunks.")
    return budget.spend(chunks, scores)


@dataclass(frozen=True)
class Expansion:
    """What a policy decided for one request, and how long it took (part of TTFT)."""

    expanded: set[int]
    policy: str  # the policy's name ("full" in full mode, "none" when nothing could be expanded)
    seconds: float


def choose_expanded(
    chunks: Sequence[Chunk],
    options: CompressionOptions,
    *,
    encodings: torch.Tensor | None = None,
    question: str | None = None,
    model: RefragModel | None = None,
    policy: ExpansionPolicy | None = None,
) -> Expansion:
    """The chunks kept as raw tokens: all in full mode; in refrag mode what ``policy`` (default: the one
    ``options.policy`` names) picks within the options' budget."""
    t0 = time.perf_counter()
    if options.mode == "full":
        return Expansion(set(range(len(chunks))), "full", 0.0)
    budget = Budget.of(options)
    if budget.empty or (policy is None and options.policy == "none"):
        return Expansion(set(), "none", 0.0)
    name = options.policy if policy is None else type(policy).__name__  # a caller's own policy: its class name
    policy = policy or make_policy(options.policy, seed=options.seed, model=model)
    expanded = select(policy, chunks, budget, encodings=encodings, question=question)
    return Expansion(expanded, name, time.perf_counter() - t0)
