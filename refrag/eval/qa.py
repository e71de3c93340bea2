"""RAG question answering: EM / F1 / answer-contained and TTFT per mode, on gold passages or an index.

Modes (``parse_modes``): ``full`` (plain RAG), ``refrag`` (compressed, same passages), ``refrag@N`` (compressed
with N passages: the paper's "more passages at equal latency" comparison), ``llmlingua`` (the same passages
cut by LLMLingua to as many decoder tokens as REFRAG uses positions, read as plain tokens). With expansion
policies and budgets, ``refrag`` also runs once per (policy, budget) with those chunks kept raw
(``refrag+lexical10%``, ``refrag+lexical96t``), and ``extractive`` reads ONLY the chunks the policy keeps, as
plain text (the baseline that tells what the compressed chunks add). With gold passages
a question gets its own passage plus distractors (other questions' passages, seeded) up to the mode's count,
the gold one at a seeded position. Chunk encodings are precomputed outside the timed region (as an index
stores them); LLMLingua's compression time IS counted in its TTFT. In counterfactual data the gold answer is
the swapped one and ``memory`` is the rate at which the model still says the original answer.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm import tqdm

from refrag.chunking import Passage
from refrag.config import ChunkingOptions, CompressionOptions, Mode, PolicyName, SamplingOptions, check_choice
from refrag.errors import InputError
from refrag.eval.metrics import Difference, contains_answer, exact_match, paired_bootstrap, token_f1
from refrag.generation import Request, generate
from refrag.io import read_jsonl
from refrag.modeling import RefragModel
from refrag.policy import choose_expanded
from refrag.relevance import HitFilter


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


QAKind = Literal[Mode, "llmlingua", "extractive"]  # a generation mode, or text cut down and read in full mode


@dataclass(frozen=True)
class QAMode:
    name: str  # as printed: the command line's name, plus +POLICY and the budget (10% or 96t) when expanding
    kind: QAKind
    passages: int | None  # None: the run's default number of passages
    policy: PolicyName | None = None  # refrag / extractive: which chunks are kept raw
    fraction: float = 0.0  # ... a fraction of the chunks
    tokens: int | None = None  # ... or a number of decoder positions

    def selection(self, seed: int) -> CompressionOptions:
        """The compression this mode's policy and budget stand for (what refrag mode runs; extractive keeps the
        same chunks as text)."""
        return CompressionOptions(mode="refrag", policy=self.policy or "none", expand_fraction=self.fraction,
                                  expand_tokens=self.tokens, seed=seed)


@dataclass(frozen=True)
class QAOptions:
    modes: tuple[QAMode, ...]
    passages: int = 1  # passages per question for modes without @N
    max_new_tokens: int = 16
    seed: int = 0
    hit_filter: HitFilter = HitFilter()  # relevance filtering of retrieved passages (with an index)


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
    expanded_chunks: tuple[int, ...] = ()  # refrag / extractive: the chunks the policy kept raw


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


def budget_label(fraction: float, tokens: int | None) -> str:
    """The suffix a budget gives a mode's name: ``10%`` for a fraction of chunks, ``48t`` for decoder positions."""
    return f"{tokens}t" if tokens is not None else f"{100 * fraction:g}%"


_BUDGET_SUFFIX = re.compile(r"(\d+(\.\d+)?%|\d+t)$")  # what budget_label appends


def mode_family(name: str) -> str:
    """A mode's name without its budget (``refrag+lexical10%`` and ``refrag+lexical48t`` -> ``refrag+lexical``)."""
    return _BUDGET_SUFFIX.sub("", name)


def parse_modes(
    spec: str,
    policies: Sequence[str] = (),
    fractions: Sequence[float] = (),
    tokens: Sequence[int] = (),
) -> tuple[QAMode, ...]:
    """``full,refrag,refrag@8,llmlingua,extractive`` x policies x budgets -> modes.

    ``refrag`` gives its plain row plus one row per policy and budget (each fraction, each token count);
    ``extractive`` gives only the policy rows (it needs a budget)."""
    budgets = [(budget_label(f, None), f, None) for f in fractions] + [(budget_label(0.0, t), 0.0, t) for t in tokens]
    for policy in policies:
        check_choice(policy, PolicyName, "--policy")
    modes = []
    for name in (m.strip() for m in spec.split(",") if m.strip()):
        kind, _, count = name.partition("@")
        if kind not in get_args(QAKind) or (count and not count.isdigit()) or count == "0":
            raise InputError(f"unknown QA mode {name!r}: use full, refrag, llmlingua, extractive, optionally @N "
                             "passages (refrag@8).")
        passages = int(count) if count else None
        if kind == "extractive" and not (policies and budgets):
            raise InputError("the extractive mode reads the chunks a policy keeps: give --policy and "
                             "--expand-fraction or --expand-tokens.")
        if kind != "extractive":
            modes.append(QAMode(name, kind, passages))  # type: ignore[arg-type]
        if kind in ("refrag", "extractive"):
            modes += [QAMode(f"{name}+{policy}{label}", kind, passages, policy, f, t)  # type: ignore[arg-type]
                      for policy in policies for label, f, t in budgets]
    if not modes:
        raise InputError("give at least one mode (--modes full,refrag).")
    if len({m.name for m in modes}) < len(modes):
        raise InputError(f"a mode, policy or budget is given twice ({', '.join(m.name for m in modes)}).")
    for m in modes:  # budgets checked now, not at the first answer
        m.selection(0)
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
    rows = [row for _, row in read_jsonl(path, "QA file not found")]
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
        text_only = mode.kind in ("llmlingua", "extractive")
        compression = mode.selection(self.options.seed) if mode.kind == "refrag" else CompressionOptions(mode="full")
        expanded: tuple[int, ...] = ()
        if self.pipeline is not None and not text_only:
            result = self.pipeline.ask(ex.question, top_k=count, compression=compression, sampling=sampling,  # type: ignore[attr-defined]
                                       hit_filter=self.options.hit_filter)
            answer, ttft = result.answer, result.ttft_s
        else:
            request, extra_s, expanded = self._request(i, mode, count)
            answer = generate(self.model, [request], compression=compression, sampling=sampling)[0]
            ttft = answer.timings.ttft_s + extra_s
        if mode.kind == "refrag":
            expanded = answer.expanded_chunks
        pred = answer.text.strip()
        return QARecord(
            mode=mode.name, question=ex.question, prediction=pred, answers=ex.answers,
            em=exact_match(pred, ex.answers), f1=token_f1(pred, ex.answers), contains=contains_answer(pred, ex.answers),
            memory=contains_answer(pred, ex.memory_answers) if ex.memory_answers else None,
            ttft_s=ttft, decoder_positions=answer.decoder_positions, context_tokens=answer.context_tokens,
            expanded_chunks=expanded,
        )

    def _request(self, i: int, mode: QAMode, count: int) -> tuple[Request, float, tuple[int, ...]]:
        """Gold passages + distractors, or the index's passages with their stored chunk encodings (retrieval time
        returned to be counted in TTFT, as ``Pipeline.ask`` counts it); encodings of gold passages precomputed
        outside the timed region. LLMLingua's compression time and the extractive policy's time are counted in
        TTFT too; the chunks extractive kept are returned."""
        ex, model, chunking = self.examples[i], self.model, ChunkingOptions(k=self.model.k)
        extra_s = 0.0
        if self.pipeline is None:
            texts = gold_passages(self.examples, i, count, self.options.seed)
            request = Request.from_texts(ex.question, texts, model.tokenizer, chunking)
        else:
            index, t0 = self.pipeline.index, time.perf_counter()  # type: ignore[attr-defined]
            hits = index.search(ex.question, count)
            request = Request(ex.question, tuple(index.passage(h.id, model.tokenizer) for h in hits),
                              tuple(index.encoded(h.id) for h in hits))
            extra_s = time.perf_counter() - t0
        if mode.kind == "refrag":
            return request.with_encodings(model), extra_s, ()
        if mode.kind == "extractive":
            encoded = (request.encoded or request.with_encodings(model).encoded) or ()
            chosen = choose_expanded(request.chunks, mode.selection(self.options.seed),
                                     encodings=torch.cat([e.to(model.device) for e in encoded]), question=ex.question,
                                     model=model)
            return extract(request, chosen.expanded), extra_s + chosen.seconds, tuple(sorted(chosen.expanded))
        if mode.kind == "llmlingua":
            budget = len(request.chunks)  # REFRAG's context positions
            squeezed = self.compressor.compress([p.text for p in request.passages], ex.question, budget)  # type: ignore[attr-defined]
            return (Request.from_texts(ex.question, [squeezed.text], model.tokenizer, chunking),
                    extra_s + squeezed.seconds, ())
        return Request(request.question, request.passages), extra_s, ()


def extract(request: Request, keep: set[int]) -> Request:
    """The request with only the chunks in ``keep`` (indices into ``request.chunks``), as plain passages: each
    run of consecutive kept chunks of a passage becomes one passage."""
    passages, index = [], 0
    for passage in request.passages:
        run: list = []
        for chunk in (*passage.chunks, None):  # None closes the last run
            if chunk is not None and index in keep:
                run.append(chunk)
            elif run:
                ids = tuple(t for c in run for t in c.token_ids)
                passages.append(Passage("".join(c.text for c in run), ids, tuple(run)))
                run = []
            index += chunk is not None
    if not passages:
        raise InputError("the expansion budget keeps no chunk: raise --expand-fraction / --expand-tokens.")
    return Request(request.question, tuple(passages))


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


@dataclass(frozen=True)
class QAComparison:
    """answer-contained of ``mode`` minus ``baseline`` over the same questions, with a paired-bootstrap 95%
    interval."""

    mode: str
    baseline: str
    contains: Difference


def compare_modes(modes: Sequence[QAMode], records: Sequence[QARecord], seed: int = 0) -> list[QAComparison]:
    """Every mode against the first one, and every ``refrag+P`` row against its ``extractive+P`` twin (same
    passages, policy and budget: what the compressed chunks add over dropping them)."""
    by_mode = {m.name: [r.contains for r in records if r.mode == m.name] for m in modes}
    pairs = [(m.name, modes[0].name) for m in modes[1:]]
    twins = {(m.passages, m.policy, m.fraction, m.tokens): m.name for m in modes if m.kind == "extractive"}
    pairs += [(m.name, twins[key]) for m in modes
              if m.kind == "refrag" and (key := (m.passages, m.policy, m.fraction, m.tokens)) in twins
              and twins[key] != modes[0].name]
    return [QAComparison(a, b, paired_bootstrap(by_mode[a], by_mode[b], seed=seed)) for a, b in pairs
            if by_mode[a] and len(by_mode[a]) == len(by_mode[b])]
