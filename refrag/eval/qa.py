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

from tqdm import tqdm

from refrag.config import ChunkingOptions, CompressionOptions, SamplingOptions
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


@dataclass(frozen=True)
class QAMode:
    name: str  # as given on the command line
    kind: str  # full | refrag | llmlingua
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
        if kind not in ("full", "refrag", "llmlingua") or (count and not count.isdigit()) or count == "0":
            raise InputError(
                f"unknown QA mode {name!r}: use full, refrag, llmlingua, optionally @N passages (refrag@8)."
            )
        modes.append(QAMode(name, kind, int(count) if count else None))
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
    from refrag.bench.ttft import with_cached_vectors

    if any(m.kind == "llmlingua" for m in options.modes) and compressor is None:
        raise InputError("the llmlingua mode needs the LLMLingua compressor (pip install llmlingua).")
    sampling = SamplingOptions(max_new_tokens=options.max_new_tokens, stop=("\n",))
    chunking = ChunkingOptions(k=model.k)
    records: list[QARecord] = []
    bar = tqdm(total=len(examples) * len(options.modes), desc="qa", unit="answer", disable=not progress)
    for i, ex in enumerate(examples):
        for mode in options.modes:
            count = mode.passages or options.passages
            compression = CompressionOptions(mode="refrag" if mode.kind == "refrag" else "full")
            extra_s = 0.0
            if pipeline is not None and mode.kind != "llmlingua":
                result = pipeline.ask(ex.question, top_k=count, compression=compression, sampling=sampling)
                answer, ttft = result.answer, result.ttft_s
            else:
                texts = (
                    gold_passages(examples, i, count, options.seed)
                    if pipeline is None
                    else [
                        pipeline.index.passage(h.id, model.tokenizer).text
                        for h in pipeline.index.search(ex.question, count)
                    ]
                )
                request = Request.from_texts(ex.question, texts, model.tokenizer, chunking)
                if mode.kind == "refrag":
                    request = with_cached_vectors(model, request)
                elif mode.kind == "llmlingua":
                    budget = sum(len(p.chunks) for p in request.passages)  # REFRAG's context positions
                    squeezed = compressor.compress(texts, ex.question, budget)
                    request = Request.from_texts(ex.question, [squeezed.text], model.tokenizer, chunking)
                    extra_s = squeezed.seconds
                answer = generate(model, [request], compression=compression, sampling=sampling)[0]
                ttft = answer.timings.ttft_s + extra_s
            pred = answer.text.strip()
            records.append(
                QARecord(
                    mode=mode.name,
                    question=ex.question,
                    prediction=pred,
                    answers=ex.answers,
                    em=exact_match(pred, ex.answers),
                    f1=token_f1(pred, ex.answers),
                    contains=contains_answer(pred, ex.answers),
                    memory=contains_answer(pred, ex.memory_answers) if ex.memory_answers else None,
                    ttft_s=ttft,
                    decoder_positions=answer.decoder_positions,
                    context_tokens=answer.context_tokens,
                )
            )
            bar.update()
    bar.close()
    return [_summarise(m, [r for r in records if r.mode == m.name], options) for m in options.modes], records


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
