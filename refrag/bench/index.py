"""`refrag bench index`: build throughput, retrieval latency, end-to-end TTFT (full vs refrag), disk bytes.

Also retrieval quality: recall@1/@5 of each question's gold passage when every passage of a QA file
(``question`` + ``context`` per line, e.g. nq_bigbench.jsonl) is in the vector store.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from refrag.bench.machine import machine_info
from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import InputError
from refrag.index import Index, IndexOptions, RetrievalEncoder, StoreOptions
from refrag.index.store import create_store
from refrag.modeling import RefragModel
from refrag.pipeline import Pipeline

# General-knowledge questions answered by the offline Wikipedia lead paragraphs.
QUESTIONS = (
    "Who painted the Mona Lisa?", "What is the capital of Japan?", "When did World War II end?",
    "Who developed the theory of relativity?", "What is photosynthesis?", "Who wrote Hamlet?",
    "What is the largest planet in the Solar System?", "Where is the Amazon River?",
    "Who was the first President of the United States?", "What is DNA made of?",
    "When was the printing press invented?", "What language is spoken in Brazil?",
    "Who composed the Ninth Symphony?", "What causes earthquakes?", "What is the speed of light?",
    "Who founded the Roman Empire?", "What is the Great Wall of China?", "Who discovered penicillin?",
    "What is the tallest mountain on Earth?", "What is Buddhism?",
)


@dataclass(frozen=True)
class IndexBenchReport:
    machine: dict
    load_average: tuple[float, float, float]  # other processes compete for the same cores
    passages: int
    chunks: int
    build_s: float
    passages_per_s: float  # whole build (split + both encoders + writes) / wall time
    chunks_per_s: float  # chunk-encoder throughput (chunks / chunk-encoding seconds)
    retrieval_encode_s: float
    retrieval_p50_ms: float  # query encoding + vector search + metadata read
    retrieval_p95_ms: float
    vector_search_p50_ms: float  # vector search alone (query vector precomputed)
    ttft_full_p50_s: float  # question -> first token, retrieval included, top_k passages as tokens
    ttft_refrag_p50_s: float  # same, stored chunk encodings projected (cached path)
    ttft_ratio: float  # full / refrag
    bytes_per_passage: float  # whole index folder on disk / passages
    disk_bytes: dict  # per part: chunks (safetensors), metadata (jsonl), vectors, manifest
    top_k: int
    store: dict


@dataclass(frozen=True)
class RecallReport:
    questions: int
    passages: int  # distinct gold passages in the store
    recall_at_1: float
    recall_at_5: float
    encode_s: float


def _time_retrieval(index: Index, queries: BenchQueries, progress: bool) -> tuple[list[float], list[float]]:
    """Milliseconds per search: whole (query encoding + vector search + metadata) and vector search alone."""
    retriever = index.retriever
    for q in queries.questions[:3]:  # warm-up
        index.search(q, queries.top_k)
    search_ms, vector_ms = [], []
    for q in tqdm(list(queries.questions) * 5, desc="retrieval", disable=not progress):
        t = time.perf_counter()
        index.search(q, queries.top_k)
        search_ms.append((time.perf_counter() - t) * 1e3)
        vec = retriever.encode([q])
        t = time.perf_counter()
        index.store.search(vec, queries.top_k)
        vector_ms.append((time.perf_counter() - t) * 1e3)
    return search_ms, vector_ms


def _time_ttft(pipe: Pipeline, queries: BenchQueries, progress: bool) -> dict[str, list[float]]:
    """TTFT (retrieval included) per mode, the modes interleaved so machine noise hits both alike."""
    sampling = SamplingOptions(max_new_tokens=1)
    ttft: dict[str, list[float]] = {"full": [], "refrag": []}
    pipe.ask(queries.questions[0], top_k=queries.top_k, compression=CompressionOptions(mode="full"),
             sampling=sampling)  # warm-up
    for q in tqdm(queries.questions[:queries.ttft_questions], desc="ttft", disable=not progress):
        for mode in ("full", "refrag"):
            result = pipe.ask(q, top_k=queries.top_k, compression=CompressionOptions(mode=mode), sampling=sampling)
            ttft[mode].append(result.ttft_s)
    return ttft


def _disk_bytes(path: Path) -> dict:
    parts = {"chunks": 0, "metadata": 0, "vectors": 0, "manifest": 0}
    for f in path.rglob("*"):
        if f.is_file():
            part = ("chunks" if f.suffix == ".safetensors" else "metadata" if f.suffix == ".jsonl"
                    else "manifest" if f.name == "index.json" else "vectors")
            parts[part] += f.stat().st_size
    return parts


@dataclass(frozen=True)
class BenchQueries:
    """The questions the retrieval and TTFT timings ask."""

    questions: tuple[str, ...] = QUESTIONS
    top_k: int = 5
    ttft_questions: int = 5  # questions answered in both modes for the TTFT ratio


def bench_index(
    corpus: Sequence[str | Path],
    out: str | Path,
    model: RefragModel,
    options: IndexOptions = IndexOptions(),
    *,
    reuse: bool = False,
    queries: BenchQueries = BenchQueries(),
    progress: bool = True,
) -> IndexBenchReport:
    """Build (or, with ``reuse``, open) the index at ``out``; then time retrieval and TTFT in both modes."""
    out = Path(out)
    index = Index.open(out) if reuse and (out / "index.json").exists() else Index.build(
        corpus, out, model, options, progress=progress)
    build = index.manifest.builds[0]
    search_ms, vector_ms = _time_retrieval(index, queries, progress)
    ttft = _time_ttft(Pipeline(index, model), queries, progress)
    top_k = queries.top_k
    disk = _disk_bytes(out)
    full, refrag = statistics.median(ttft["full"]), statistics.median(ttft["refrag"])
    return IndexBenchReport(
        machine=machine_info(),
        load_average=os.getloadavg(),
        passages=len(index),
        chunks=sum(e.chunks for e in index.manifest.shards),
        build_s=build["total_s"],
        passages_per_s=build["passages"] / build["total_s"],
        chunks_per_s=build["chunks"] / build["chunk_encode_s"],
        retrieval_encode_s=build["retrieval_encode_s"],
        retrieval_p50_ms=statistics.median(search_ms),
        retrieval_p95_ms=float(np.percentile(search_ms, 95)),
        vector_search_p50_ms=statistics.median(vector_ms),
        ttft_full_p50_s=full,
        ttft_refrag_p50_s=refrag,
        ttft_ratio=full / refrag,
        bytes_per_passage=sum(disk.values()) / len(index),
        disk_bytes=disk,
        top_k=top_k,
        store=index.options.store.to_json(),
    )


def bench_recall(
    qa_file: str | Path,
    retriever: RetrievalEncoder,
    *,
    limit: int | None = None,
    progress: bool = True,
) -> RecallReport:
    """Put every distinct ``context`` of ``qa_file`` in an exact FAISS store; recall of the gold one per question.

    Retrieval only: the passages are whole contexts embedded by the retrieval encoder (no chunk encodings).
    """
    rows = [json.loads(line) for line in Path(qa_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    if not rows or any("question" not in r or "context" not in r for r in rows):
        raise InputError(f"{qa_file} needs JSON lines with 'question' and 'context'.")
    ids: dict[str, int] = {}
    gold = np.array([ids.setdefault(r["context"], len(ids)) for r in rows])  # [Q]
    t = time.perf_counter()
    vectors = create_store(StoreOptions(), retriever.dim)
    texts = list(ids)
    for start in tqdm(range(0, len(texts), 256), desc="recall: passages", disable=not progress):
        vectors.add(retriever.encode(texts[start : start + 256]))
    queries = retriever.encode([r["question"] for r in rows])  # [Q, dim]
    encode_s = time.perf_counter() - t
    _, found = vectors.search(queries, 5)  # [Q, 5]
    return RecallReport(
        questions=len(rows),
        passages=len(texts),
        recall_at_1=float((found[:, 0] == gold).mean()),
        recall_at_5=float((found == gold[:, None]).any(1).mean()),
        encode_s=encode_s,
    )


def report_json(report: IndexBenchReport | RecallReport) -> dict:
    return asdict(report)
