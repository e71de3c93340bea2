"""A question / passages / answer training set (`refrag data qa`) built from text that may be trained on.

For each sampled passage of the corpus (seeded order):
1. an answer span is picked from the passage (a capitalised name or a year, seeded);
2. the decoder writes a question for that answer (few-shot prompt, greedy, original decoder); or, with
   ``questions="cloze"``, the question is the passage's sentence that holds the span, the span blanked out
   ("Fill in the blank: ..."): no model runs, and the answer is in the passage by construction (step 4 is
   skipped: the span is both answers, as in cloze-QA pre-training, Lewis et al. 2019);
3. distractors: the corpus passages BM25 ranks highest for the question that do not contain the answer;
4. the full-context decoder answers the question from the gold passage among the distractors, with the same
   prompt ``refrag eval qa`` uses. The row is kept when that answer contains the span (``verified``), or when
   it is grounded in the gold passage (``grounded``: it adds content words to the question's and at least
   two thirds of them occur in the passage); the answer itself is the teacher's target for sequence-level
   distillation (a 135M writer often asks about another part of the passage than the span). With
   ``keep="all"`` every answered question is kept, flags recorded (pure sequence-level distillation, as PISCO:
   the student learns to answer as the full-context decoder does, right or wrong).

Questions that appear in an ``exclude`` file (evaluation sets: their ``question`` field) are never kept, nor
questions that repeat or give their answer away. The output is JSONL that ``load_qa`` reads (``question``,
``answer``, ``context`` = the gold passage) plus ``passages``, ``gold``, ``teacher`` and ``title``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from refrag.config import ChunkingOptions, CompressionOptions, SamplingOptions, check_choice
from refrag.errors import InputError
from refrag.eval.metrics import contains_answer, normalize_answer
from refrag.generation import Request, generate
from refrag.index.ingest import iter_documents
from refrag.io import read_jsonl, write_jsonl_atomic
from refrag.lexical import BM25, terms
from refrag.modeling import RefragModel

# Two worked examples in the style of Natural Questions (short, lower-case); invented text, not from any dataset.
FEW_SHOT = """Passage: The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is \
named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.
Answer: Gustave Eiffel
Question: who is the eiffel tower named after?

Passage: Pride and Prejudice is an 1813 novel of manners by Jane Austen. The novel follows the character \
development of Elizabeth Bennet, the protagonist of the book.
Answer: 1813
Question: when was pride and prejudice published?

"""
# A capitalised name not at a sentence start (after a lower-case word or a comma), or a year.
Keep = Literal["grounded", "all"]
Questions = Literal["written", "cloze"]
BLANK = "___"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SPAN = re.compile(r"(?<=[a-z,] )([A-Z][\w'-]+(?: (?:of |the |de |von )?[A-Z][\w'-]+)*)|\b(1[0-9]{3}|20[0-2][0-9])\b")


@dataclass(frozen=True)
class QADataOptions:
    examples: int = 1000  # rows to keep
    passages: int = 3  # per row: the gold passage + passages - 1 distractors
    min_words: int = 25  # shorter passages are skipped
    max_words: int = 120  # passages are cut to this many words
    batch_size: int = 16  # questions written / answered per generate call
    attempts: int = 4  # give up after examples * attempts candidate passages
    keep: Keep = "grounded"  # grounded: verified or grounded answers only; all: every answered question
    questions: Questions = "written"  # written by the decoder, or cloze (the span's sentence, blanked)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.examples < 1 or self.passages < 1 or self.batch_size < 1 or self.attempts < 1:
            raise InputError("--examples, --passages, --batch-size and --attempts must be >= 1.")
        if not 0 < self.min_words <= self.max_words:
            raise InputError("need 0 < --min-words <= --max-words.")
        check_choice(self.keep, Keep, "--keep")
        check_choice(self.questions, Questions, "--questions")


@dataclass(frozen=True)
class QAItem:
    """One training row: a question, its passages (gold among distractors) and two answers."""

    question: str
    answer: str  # the span the question was written for (in the gold passage)
    teacher: str  # the full-context decoder's answer (grounded in the gold passage): the distillation target
    passages: tuple[str, ...]
    gold: int  # index of the passage the question was written from
    title: str
    verified: bool = False  # the teacher's answer contains ``answer`` (else ``answer`` is the teacher's)
    grounded: bool = False  # the teacher's answer is grounded in the gold passage (``grounded``)

    @property
    def context(self) -> str:
        return self.passages[self.gold]

    def row(self) -> dict:
        return {**asdict(self), "passages": list(self.passages), "context": self.context}

    @classmethod
    def from_row(cls, row: dict, where: str) -> QAItem:
        try:
            return cls(question=row["question"], answer=row["answer"], teacher=row.get("teacher") or row["answer"],
                       passages=tuple(row["passages"]), gold=int(row["gold"]), title=row.get("title", ""),
                       verified=bool(row.get("verified", False)), grounded=bool(row.get("grounded", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: not a `refrag data qa` row (needs question, answer, passages, gold): {e}") \
                from e


def read_items(path: str | Path) -> list[QAItem]:
    """Rows written by :func:`build_qa_set` (or by hand in the same format)."""
    rows = read_jsonl(path, "QA training file not found (build one with `refrag data qa --out FILE`)")
    items = [QAItem.from_row(row, f"{path}:{n}") for n, row in rows]
    if not items:
        raise InputError(f"{path} holds no rows.")
    return items


def excluded_questions(paths: Sequence[str | Path]) -> set[str]:
    """Normalised ``question`` fields of evaluation files: never trained on."""
    out: set[str] = set()
    for path in paths:
        for _, row in read_jsonl(path, "--exclude file not found"):
            if isinstance(row, dict) and isinstance(q := row.get("question"), str):
                out.add(normalize_answer(q))
    return out


def corpus_passages(sources: Sequence[str | Path], options: QADataOptions) -> list[tuple[str, str]]:
    """(title, passage) pairs: each paragraph of each document, cut to ``max_words``; short ones skipped."""
    out = []
    for doc in iter_documents(list(sources)):
        for para in re.split(r"\n\s*\n", doc.text):
            words = para.split()
            if len(words) >= options.min_words:
                out.append((doc.title, " ".join(words[: options.max_words])))
    if len(out) < options.passages:
        raise InputError(f"the corpus has {len(out)} passages of >= {options.min_words} words; need at least "
                         f"{options.passages} (--passages).")
    return out


def answer_span(passage: str, rng: random.Random) -> str | None:
    """A seeded choice among the passage's names and years."""
    spans = [a or b for a, b in _SPAN.findall(passage)]
    return rng.choice(spans) if spans else None


def clean_question(text: str, answer: str) -> str | None:
    """The written question's first line, or None when it is unusable (too short or long, gives the answer)."""
    q = text.strip().split("\n")[0].strip()
    if not q.endswith("?"):
        q = q.rstrip(".") + "?"
    words = q.split()
    if not 4 <= len(words) <= 30 or normalize_answer(answer) in normalize_answer(q):
        return None
    return q


def cloze_question(passage: str, span: str) -> str | None:
    """The passage's first sentence that holds ``span``, with the span blanked; None when that sentence is too
    short or long, or still gives the answer away."""
    for sentence in _SENTENCE_END.split(passage):
        if span in sentence:
            blanked = sentence.replace(span, BLANK, 1)
            if 6 <= len(blanked.split()) <= 40 and normalize_answer(span) not in normalize_answer(blanked):
                return f"Fill in the blank: {blanked}"
            return None
    return None


def grounded(answer: str, question: str, passage: str) -> bool:
    """The answer adds content words to the question's, and at least two thirds of those are in the passage."""
    new = set(terms(answer)) - set(terms(question))
    return bool(new) and len(new & set(terms(passage))) >= 2 * len(new) / 3


@torch.inference_mode()
def write_questions(model: RefragModel, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 24) -> list[str]:
    """The decoder (without any adapter) writes one question per (passage, answer), few-shot, greedy."""
    tok = model.tokenizer
    prompts = [f"{FEW_SHOT}Passage: {p}\nAnswer: {a}\nQuestion:" for p, a in pairs]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tok.padding_side = side
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with model.decoder_for(False) as decoder:
        out = decoder.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def _candidates(passages: list[tuple[str, str]], options: QADataOptions) -> Iterator[tuple[int, str]]:
    """(passage index, answer span) in a seeded order, passages without a span skipped."""
    rng = random.Random(options.seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    for i in order[: options.examples * options.attempts]:
        if (span := answer_span(passages[i][1], rng)) is not None:
            yield i, span


def build_qa_set(
    model: RefragModel | None,
    sources: Sequence[str | Path],
    out: str | Path,
    options: QADataOptions = QADataOptions(),
    *,
    exclude: Sequence[str | Path] = (),
    progress: bool = True,
) -> list[QAItem]:
    """Write ``options.examples`` answerable, grounded rows to ``out`` (JSONL, rewritten atomically after every
    batch, so an interrupted run leaves the rows kept so far). Returns the rows. ``model`` writes and answers the
    questions; cloze questions need none."""
    cloze = options.questions == "cloze"
    if model is None and not cloze:
        raise InputError("written questions need a model (the decoder writes and answers them).")
    passages = corpus_passages(sources, options)
    bm25 = BM25([p for _, p in passages])
    banned = excluded_questions(exclude)
    seen: set[str] = set()
    kept: list[QAItem] = []
    candidates = list(_candidates(passages, options))
    bar = tqdm(total=options.examples, desc="qa data", unit="row", disable=not progress)
    for start in range(0, len(candidates), options.batch_size):
        batch = candidates[start : start + options.batch_size]
        questions = ([cloze_question(passages[i][1], span) for i, span in batch] if cloze else
                     [clean_question(text, span) for (_, span), text in
                      zip(batch, write_questions(model, [(passages[i][1], span) for i, span in batch]))])
        rows = []
        for (i, span), q in zip(batch, questions):
            if q is None or (key := normalize_answer(q)) in banned or key in seen:
                continue
            seen.add(key)
            rows.append(_with_distractors(q, span, i, passages, bm25, options, len(kept) + len(rows)))
        answers = [it.answer for it in rows] if cloze else _teacher_answers(model, rows)
        for item, answer in zip(rows, answers):
            answer, verified = answer.strip(), bool(contains_answer(answer, [item.answer]))
            is_grounded = verified or grounded(answer, item.question, item.context)
            if answer and (is_grounded or options.keep == "all") and len(kept) < options.examples:
                kept.append(QAItem(item.question, item.answer if verified else answer, answer, item.passages,
                                   item.gold, item.title, verified, is_grounded))
                bar.update()
        if rows:
            write_jsonl_atomic(out, [k.row() for k in kept])
        if len(kept) >= options.examples:
            break
    bar.close()
    if not kept:
        raise InputError("no question passed the answerability filter: give more (or longer) passages.")
    return kept


def _with_distractors(question: str, span: str, gold: int, passages: list[tuple[str, str]], bm25: BM25,
                      options: QADataOptions, row: int) -> QAItem:
    """The gold passage at a seeded position among the BM25-best passages that do not contain the answer."""
    scores = bm25.scores(question)
    ranked = sorted(range(len(passages)), key=lambda j: -scores[j])
    distractors = []
    for j in ranked:
        if len(distractors) == options.passages - 1:
            break
        if j != gold and not contains_answer(passages[j][1], [span]):
            distractors.append(passages[j][1])
    at = random.Random(options.seed * 1_000_003 + row).randrange(len(distractors) + 1)
    texts = [*distractors[:at], passages[gold][1], *distractors[at:]]
    return QAItem(question, span, "", tuple(texts), at, passages[gold][0])


def _teacher_answers(model: RefragModel, items: Sequence[QAItem], max_new_tokens: int = 16) -> list[str]:
    """The full-context decoder's answers, with ``refrag eval qa``'s prompt and sampling (greedy, stop at a
    newline)."""
    if not items:
        return []
    chunking = ChunkingOptions(k=model.k)
    requests = [Request.from_texts(it.question, list(it.passages), model.tokenizer, chunking) for it in items]
    sampling = SamplingOptions(max_new_tokens=max_new_tokens, stop=("\n",))
    answers = generate(model, requests, compression=CompressionOptions(mode="full"), sampling=sampling)
    return [a.text for a in answers]
