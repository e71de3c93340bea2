"""Many questions at once (`refrag ask INDEX --questions FILE.jsonl --out answers.jsonl`).

Questions are read from JSONL (``question``, optional ``id``; a line number is the id otherwise), answered in
batches (one retrieval call and one ``generate`` call per batch), and appended to the output file as each batch
finishes, one JSON object per line, flushed and synced: a killed run loses at most the batch in flight. A rerun
skips every id already in the output (a torn last line from a kill is cut off first). A line that is not JSON,
has no question, or fails on its own (e.g. no passage passes the relevance filter) is reported and skipped; it
never stops the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from refrag.config import CompressionOptions, SamplingOptions, check_question
from refrag.errors import InputError, RefragError
from refrag.generation import generate
from refrag.pipeline import Pipeline, Retrieved
from refrag.relevance import HitFilter


@dataclass(frozen=True)
class BatchOptions:
    batch_size: int = 8
    top_k: int = 5
    compression: CompressionOptions = CompressionOptions()
    sampling: SamplingOptions = SamplingOptions()
    hit_filter: HitFilter = HitFilter()
    max_positions: int | None = None  # Pipeline.retrieve's cap (lowest-ranked passages dropped to fit)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1 (got {self.batch_size}).")


@dataclass
class BatchReport:
    answered: int = 0  # in this run
    already: int = 0  # found in the output file (a resumed run)
    skipped: list[str] = field(default_factory=list)  # "line N: why"
    seconds: float = 0.0

    @property
    def questions_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class _Question:
    id: str
    text: str
    line: int


def read_questions(path: Path, report: BatchReport) -> Iterator[_Question]:
    if not path.is_file():
        raise InputError(f"questions file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                text = row["question"] if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise InputError('needs a string "question" field')
                check_question(text)
            except (json.JSONDecodeError, KeyError, InputError) as e:
                report.skipped.append(f"line {n}: {e}")
                continue
            yield _Question(str(row.get("id", n)), text, n)


def answered_ids(out: Path) -> set[str]:
    """Ids already in the output; a torn last line (a run killed mid-write) is cut off the file first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    return {str(json.loads(line)["id"]) for line in data[:end].decode("utf-8").splitlines() if line.strip()}


def answer_questions(pipeline: Pipeline, questions: str | Path, out: str | Path, options: BatchOptions = BatchOptions(),
                     *, progress: bool = True) -> BatchReport:
    """Answer every question of ``questions`` not yet in ``out``, appending one row per answer."""
    questions, out = Path(questions), Path(out)
    report = BatchReport()
    done = answered_ids(out)
    todo = []
    for q in read_questions(questions, report):
        if q.id in done:
            report.already += 1
        else:
            todo.append(q)
            done.add(q.id)  # a repeated id is answered once
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="questions", unit="q",
                                                     disable=not progress) as bar:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            rows = _answer_batch(pipeline, batch, options, report)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            report.answered += len(rows)
            bar.update(len(batch))
    report.seconds = time.perf_counter() - t0
    return report


def _answer_batch(pipeline: Pipeline, batch: list[_Question], options: BatchOptions, report: BatchReport) -> list[dict]:
    """One batch's rows; a question that fails alone (retrieval filter, window) is skipped and reported."""
    found: list[tuple[_Question, Retrieved]] = []
    try:
        retrieved = pipeline.retrieve_many([q.text for q in batch], top_k=options.top_k,
                                           compression=options.compression, hit_filter=options.hit_filter,
                                           max_positions=options.max_positions)
        found = list(zip(batch, retrieved))
    except RefragError:  # one question's filter left nothing: retrieve them one by one
        for q in batch:
            try:
                found.append((q, pipeline.retrieve(q.text, top_k=options.top_k, compression=options.compression,
                                                   hit_filter=options.hit_filter, max_positions=options.max_positions)))
            except RefragError as e:
                report.skipped.append(f"line {q.line}: {e}")
    if not found:
        return []
    try:
        answers = generate(pipeline.model, [r.request for _, r in found], compression=options.compression,
                           sampling=options.sampling)
    except RefragError as e:
        if len(found) == 1:
            report.skipped.append(f"line {found[0][0].line}: {e}")
            return []
        return [row for q, _ in found for row in _answer_batch(pipeline, [q], options, report)]
    return [_row(q, r, a) for (q, r), a in zip(found, answers)]


def _row(q: _Question, found: Retrieved, answer) -> dict:
    return {
        "id": q.id, "question": q.text, "answer": answer.text, "finish_reason": answer.finish_reason,
        "sources": [{"id": h.id, "score": h.score, "title": h.meta.title} for h in found.hits],
        "dropped": [{"id": d.hit.id, "score": d.hit.score, "reason": d.reason} for d in found.dropped],
        "decoder_positions": answer.decoder_positions, "context_tokens": answer.context_tokens,
        "policy": answer.policy, "expanded_chunks": list(answer.expanded_chunks),
        "timings": asdict(answer.timings) | {"retrieval_s": found.seconds},
    }
