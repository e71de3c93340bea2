"""RAG question answering: EM / F1 / answer-contained and TTFT per mode, on gold passages or an index.

Modes (``parse_modes``): ``full`` (plain RAG), ``refrag`` (compressed, same passages), ``refrag@N`` (compressed
with N passages: the paper's "more passages at equal latency" comparison), ``llmlingua`` (the same passages
cut by LLMLingua to as many decoder tokens as REFRAG uses positions, read as plain tokens). With gold passages
a question gets its own passage plus distractors (other questions' passages, seeded) up to the mode's count,
the gold one at a seeded position. Chunk encodings are precomputed outside the timed region (as an index
stores them); LLMLingua's compression time IS counted in its TTFT. In counterfactual data the gold answer is
the swapped one and ``memory`` is the rate at which the model still says the original answer.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from tqdm import tqdm

from refrag.config import ChunkingOptions, CompressionOptions, Mode, SamplingOptions
from refrag.errors import InputError
from refrag.eval.metrics import contains_answer, exact_match, token_f1
from refrag.generate import Request, generate
from refrag.modeling import RefragModel


@dataclass(frozen=True)
class QAFields:
    """JSONL field names (defaults: ../shared/data/nq_bigbench.jsonl)."""

    question: str = "question"
    answer: str = "answer"  # a string or a list of strings
    context: str = "context"  # gold passage (optional when retrieving from an index)
    cf_answer: str = "cf_answer"
    cf_context: str = "cf_context"


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]
    context: str | None  # gold passage
    memory_answers: tuple[str, ...] = ()  # counterfactual data: the original (swapped-out) answer


QAKind = Literal[Mode, "llmlingua"]  # a generation mode, or LLMLingua-compressed text read in full mode


@dataclass(frozen=True)
class QAMode:
    name: str  # as given on the command line
    kind: QAKind
    passages: int | None  # None: the run's default number of passages


@dataclass(frozen=True)
class QAOptions:
    modes: tuple[QAMode, ...]
    passages: int = 1  # passages per question for modes without @N
    max_new_tokens: int = 16
    seed: int = 0


@dataclass(frozen=True)
class QARecord:
    """One question answered in one mode (a JSONL row)."""

    mode: str
    question: str
    prediction: str
    answers: tuple[str, ...]
    em: float
    f1: float
    contains: float
    memory: float | None  # counterfactual only: the original answer is in the prediction
    ttft_s: float
    decoder_positions: int
    context_tokens: int


@dataclass(frozen=True)
class QASummary:
    mode: str
    n: int
    em: float
    f1: float
    contains: float
    memory: float | None
    ttft_p50_s: float
    decoder_positions: float  # mean
    passages: int


def parse_modes(spec: str) -> tuple[QAMode, ...]:
    """``full,refrag,refrag@8,llmlingua`` -> modes."""
    modes = []
    for name in (m.strip() for m in spec.split(",") if m.strip()):
        kind, _, count = name.partition("@")
        if kind not in get_args(QAKind) or (count and not count.isdigit()) or count == "0":
            raise InputError(
                f"unknown QA mode {name!r}: use full, refrag, llmlingua, optionally @N passages (refrag@8)."
            )
        modes.append(QAMode(name, kind, int(count) if count else None))  # type: ignore[arg-type]
    if not modes:
        raise InputError("give at least one mode (--modes full,refrag).")
    return tuple(modes)


def load_qa(
    path: str | Path,
    fields: QAFields = QAFields(),
    *,
    limit: int | None = None,
    seed: int = 0,
    counterfactual: bool = False,
) -> list[QAExample]:
    """Read question/answer JSONL; a seeded sample of ``limit`` rows (file order kept) when limit is set."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"QA file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{line_no} is not JSON ({e}).") from e
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    answer_f, context_f = (
        (fields.cf_answer, fields.cf_context) if counterfactual else (fields.answer, fields.context)
    )
    out = []
    for row in rows:
        if fields.question not in row or answer_f not in row:
            raise InputError(f"{path}: a row lacks {fields.question!r} or {answer_f!r}; set the field names.")
        out.append(
            QAExample(
                question=row[fields.question],
                answers=_answers(row[answer_f]),
                context=row.get(context_f),
                memory_answers=_answers(row[fields.answer]) if counterfactual else (),
            )
        )
    return out


def _answers(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def gold_passages(examples: Sequence[QAExample], i: int, count: int, seed: int) -> list[str]:
    """Example i's gold passage among count - 1 distractors from other examples, at a seeded position."""
    gold = examples[i].context
    if not gold:
        raise InputError("an example has no gold passage: give --index to retrieve passages instead.")
    rng = random.Random(seed * 1_000_003 + i)
    others = [j for j in range(len(examples)) if j != i and examples[j].context]
    picked = [examples[j].context for j in rng.sample(others, min(count - 1, len(others)))]
    picked.insert(rng.randrange(len(picked) + 1), gold)
    return picked  # type: ignore[return-value]


def evaluate_qa(
    model: RefragModel,
    examples: Sequence[QAExample],
    options: QAOptions,
    *,
    pipeline=None,
    compressor=None,
    progress: bool = True,
) -> tuple[list[QASummary], list[QARecord]]:
    """Answer every example in every mode (modes interleaved per question, so machine noise hits all alike).

    pipeline: a :class:`refrag.pipeline.Pipeline` to retrieve passages (else gold passages + distractors).
    compressor: an :class:`LLMLinguaCompressor`, required by the ``llmlingua`` mode.
    """
    if any(m.kind == "llmlingua" for m in options.modes) and compressor is None:
        raise InputError("the llmlingua mode needs the LLMLingua compressor (pip install llmlingua).")
    answerer = _Answerer(model, examples, options, pipeline, compressor)
    records: list[QARecord] = []
    bar = tqdm(total=len(examples) * len(options.modes), desc="qa", unit="answer", disable=not progress)
    for i in range(len(examples)):
        for mode in options.modes:
            records.append(answerer.record(i, mode))
            bar.update()
    bar.close()
    return [_summarise(m, [r for r in records if r.mode == m.name], options) for m in options.modes], records


@dataclass(frozen=True)
class _Answerer:
    """Answers one question in one mode and scores the answer."""

    model: RefragModel
    examples: Sequence[QAExample]
    options: QAOptions
    pipeline: object | None
    compressor: object | None

    def record(self, i: int, mode: QAMode) -> QARecord:
        ex, count = self.examples[i], mode.passages or self.options.passages
        sampling = SamplingOptions(max_new_tokens=self.options.max_new_tokens, stop=("\n",))
        compression = CompressionOptions(mode="full" if mode.kind == "llmlingua" else mode.kind)
        if self.pipeline is not None and mode.kind != "llmlingua":
            result = self.pipeline.ask(ex.question, top_k=count, compression=compression, sampling=sampling)  # type: ignore[attr-defined]
            answer, ttft = result.answer, result.ttft_s
        else:
            request, extra_s = self._request(i, mode, count)
            answer = generate(self.model, [request], compression=compression, sampling=sampling)[0]
            ttft = answer.timings.ttft_s + extra_s
        pred = answer.text.strip()
        return QARecord(
            mode=mode.name, question=ex.question, prediction=pred, answers=ex.answers,
            em=exact_match(pred, ex.answers), f1=token_f1(pred, ex.answers), contains=contains_answer(pred, ex.answers),
            memory=contains_answer(pred, ex.memory_answers) if ex.memory_answers else None,
            ttft_s=ttft, decoder_positions=answer.decoder_positions, context_tokens=answer.context_tokens,
        )

    def _request(self, i: int, mode: QAMode, count: int) -> tuple[Request, float]:
        """Gold passages + distractors (or the index's passages as text); chunk encodings precomputed outside the
        timed region for refrag; LLMLingua's compression time returned to be counted in its TTFT."""
        ex, model, chunking = self.examples[i], self.model, ChunkingOptions(k=self.model.k)
        if self.pipeline is None:
            texts = gold_passages(self.examples, i, count, self.options.seed)
        else:
            index = self.pipeline.index  # type: ignore[attr-defined]
            texts = [index.passage(h.id, model.tokenizer).text for h in index.search(ex.question, count)]
        request = Request.from_texts(ex.question, texts, model.tokenizer, chunking)
        if mode.kind == "refrag":
            return request.with_encodings(model), 0.0
        if mode.kind == "llmlingua":
            budget = len(request.chunks)  # REFRAG's context positions
            squeezed = self.compressor.compress(texts, ex.question, budget)  # type: ignore[attr-defined]
            return Request.from_texts(ex.question, [squeezed.text], model.tokenizer, chunking), squeezed.seconds
        return request, 0.0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _summarise(mode: QAMode, rows: Sequence[QARecord], options: QAOptions) -> QASummary:
    memory = [r.memory for r in rows if r.memory is not None]
    return QASummary(
        mode=mode.name,
        n=len(rows),
        em=_mean([r.em for r in rows]),
        f1=_mean([r.f1 for r in rows]),
        contains=_mean([r.contains for r in rows]),
        memory=_mean(memory) if memory else None,
        ttft_p50_s=statistics.median(r.ttft_s for r in rows) if rows else float("nan"),
        decoder_positions=_mean([r.decoder_positions for r in rows]),
        passages=mode.passages or options.passages,
    )
