"""Question -> retrieval -> compressed (or full) context -> answer, with sources and timings.

In refrag mode the decoder reads the index's stored chunk encodings (projected now, the "cached" path): a
question costs one retrieval, one projection and one short prefill; no chunk is encoded at query time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import InputError
from refrag.generation import Answer, Request, generate, prompt_positions
from refrag.index import Index, SearchHit
from refrag.modeling import RefragModel
from refrag.relevance import Dropped, HitFilter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AskResult:
    question: str
    answer: Answer
    hits: tuple[SearchHit, ...]  # the passages given to the decoder, best first
    retrieval_s: float  # query encoding + vector search + reading the passages (and their chunk vectors)
    dropped: tuple[Dropped, ...] = ()  # retrieved but filtered out (``HitFilter``, ``max_positions``)

    @property
    def ttft_s(self) -> float:
        """Question in -> first answer token out, retrieval included."""
        return self.retrieval_s + self.answer.timings.ttft_s


class Pipeline:
    """Retrieval-augmented answering over an :class:`Index` with a :class:`RefragModel`."""

    def __init__(self, index: Index, model: RefragModel) -> None:
        index.check_model(model)  # stored chunk encodings must come from this model's chunk encoder
        if index.manifest.refine is not None and model.has_answer_adapter:
            log.warning("%s holds chunk encodings refined for continuation; read through the answer adapter they "
                        "answered slightly worse in the one measurement (NQ F1 -0.03, docs/index.md): index "
                        "without --refine-steps for question answering.", index.path)
        index.load_retriever(model.config.dtype)  # now, not inside the first question's timing
        self.index, self.model = index, model

    def ask(
        self,
        question: str,
        *,
        top_k: int = 5,
        compression: CompressionOptions = CompressionOptions(),
        sampling: SamplingOptions = SamplingOptions(),
        hit_filter: HitFilter = HitFilter(),
        max_positions: int | None = None,
    ) -> AskResult:
        """Answer ``question`` from its ``top_k`` passages; ``max_positions`` caps the prompt's decoder positions
        by dropping the lowest-ranked passages (reported in ``dropped``)."""
        found = self.retrieve(question, top_k=top_k, compression=compression, hit_filter=hit_filter,
                              max_positions=max_positions)
        answer = generate(self.model, [found.request], compression=compression, sampling=sampling)[0]
        return AskResult(question, answer, found.hits, found.seconds, found.dropped)

    def retrieve(self, question: str, *, top_k: int = 5, compression: CompressionOptions = CompressionOptions(),
                 hit_filter: HitFilter = HitFilter(), max_positions: int | None = None) -> Retrieved:
        """The question's request (the kept passages, and their stored chunk encodings in refrag mode), the hits
        kept and dropped, and the seconds retrieval took: what ``ask`` answers, and what a server batches."""
        return self.retrieve_many([question], top_k=top_k, compression=compression, hit_filter=hit_filter,
                                  max_positions=max_positions)[0]

    def retrieve_many(self, questions: Sequence[str], *, top_k: int = 5,
                      compression: CompressionOptions = CompressionOptions(),
                      hit_filter: HitFilter = HitFilter(), max_positions: int | None = None) -> list[Retrieved]:
        """``retrieve`` for several questions, the query encoding and vector search batched (each one's seconds:
        its share of the batch's retrieval time)."""
        if max_positions is not None and max_positions < 1:
            raise InputError(f"--max-positions must be >= 1 (got {max_positions}).")
        t0 = time.perf_counter()
        out = []
        for question, found in zip(questions, self.index.search_many(questions, top_k)):
            hits, dropped = hit_filter.apply(found)
            if not hits:
                best = max(d.hit.score for d in dropped) if dropped else float("nan")
                raise InputError(f"no passage retrieved for {question!r} passed the relevance filter (best score "
                                 f"{best:.3f}): lower --min-score / --relative-score.")
            passages = tuple(self.index.passage(h.id, self.model.tokenizer) for h in hits)
            encoded = tuple(self.index.encoded(h.id) for h in hits) if compression.mode == "refrag" else None
            request = Request(question=question, passages=passages, encoded=encoded)
            if max_positions is not None:
                request, hits, over = self._fit(request, list(hits), compression, max_positions)
                dropped = [*dropped, *over]
            out.append((request, tuple(hits), tuple(dropped)))
        share = (time.perf_counter() - t0) / max(len(out), 1)
        return [Retrieved(request, hits, dropped, share) for request, hits, dropped in out]

    def _fit(self, request: Request, hits: list[SearchHit], compression: CompressionOptions,
             max_positions: int) -> tuple[Request, list[SearchHit], list[Dropped]]:
        """Drop the lowest-ranked passages until the prompt takes at most ``max_positions`` decoder positions."""
        over: list[Dropped] = []
        while (needed := prompt_positions(self.model, request, compression=compression)) > max_positions:
            if len(hits) == 1:
                raise InputError(f"the best passage alone needs {needed} decoder positions in {compression.mode} "
                                 f"mode, more than --max-positions {max_positions}: raise it"
                                 + (" or use --mode refrag." if compression.mode == "full" else "."))
            over.insert(0, Dropped(hits.pop(), "max_positions"))
            request = Request(question=request.question, passages=request.passages[:-1],
                              encoded=request.encoded[:-1] if request.encoded is not None else None)
        return request, hits, over


@dataclass(frozen=True)
class Retrieved:
    request: Request
    hits: tuple[SearchHit, ...]  # kept, best first
    dropped: tuple[Dropped, ...]
    seconds: float
