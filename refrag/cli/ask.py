"""`refrag search` and `refrag ask`: retrieval, and retrieval-augmented answers, over an index."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, get_args

import typer

from refrag.cli.common import (
    ExpansionChoice,
    Json,
    ModelChoice,
    expansion_options,
    filter_options,
    model_options,
    print_json,
    setup_torch,
)
from refrag.config import Mode
from refrag.errors import InputError
from refrag.relevance import HitFilter

IndexPath = Annotated[Path, typer.Argument(help="index folder")]
TopK = Annotated[int, typer.Option("--top-k", help="passages to retrieve")]
BOTH = "both"  # every Mode, one after the other, and the TTFT ratio


def parse_modes(mode: str) -> tuple[Mode, ...]:
    """``full``, ``refrag`` or ``both`` -> the modes to answer in."""
    modes = get_args(Mode)
    if mode == BOTH:
        return modes
    if mode not in modes:
        raise InputError(f"--mode must be {', '.join(modes)} or {BOTH} (got {mode!r}).")
    return (mode,)  # type: ignore[return-value]


def _chunk_list(chunks: tuple[int, ...]) -> str:
    return ", ".join(map(str, chunks)) if chunks else "none (every chunk compressed)"


def _where(meta) -> str:
    return f"{meta.source}:{meta.line}" if meta.line else f"{meta.source}@{meta.offset}"


def search_cmd(index_path: IndexPath, query: Annotated[str, typer.Argument(help="query text")],
               top_k: TopK = 5, json_out: Json = False) -> None:
    """Print the passages most similar to QUERY."""
    setup_torch()
    from refrag.index import Index

    hits = Index.open(index_path).search(query, top_k)
    if json_out:
        print_json([{"id": h.id, "score": h.score, **asdict(h.meta)} for h in hits])
        return
    for rank, h in enumerate(hits, 1):
        typer.secho(f"{rank}. [{h.score:.3f}] {h.meta.title} ({_where(h.meta)})", bold=True)
        typer.echo(f"   {h.meta.text}")


@model_options()
@expansion_options()
@filter_options()
def ask_cmd(
    index_path: IndexPath,
    question: Annotated[str | None, typer.Argument(help="the question (or --questions FILE)")] = None,
    top_k: TopK = 5,
    mode: Annotated[str, typer.Option(help="refrag (stored chunk vectors), full (passages as tokens) or both")] = "refrag",
    max_new_tokens: Annotated[int, typer.Option(help="answer length cap")] = 64,
    questions: Annotated[Path | None, typer.Option(help="JSONL of questions (`question`, optional `id`) to answer in "
                                                        "batches into --out; a rerun skips answered ids")] = None,
    out: Annotated[Path | None, typer.Option(help="answers JSONL for --questions (appended as batches finish)")]
        = None,
    batch_size: Annotated[int, typer.Option(help="questions per batch with --questions")] = 8,
    max_positions: Annotated[int | None, typer.Option(help="cap the prompt's decoder positions: drop the lowest-"
                                                           "ranked passages until it fits (e.g. the decoder's "
                                                           "window)", show_default=False)] = None,
    json_out: Json = False,
    *,
    choice: ModelChoice,
    expansion: ExpansionChoice,
    hit_filter: HitFilter,
) -> None:
    """Retrieve, compress with the stored chunk vectors, generate; prints the answer, sources and timings.

    ``--mode both`` answers in full then refrag mode and prints the TTFT ratio. Unset model options default to
    what built the index.
    """
    setup_torch()
    from refrag.config import SamplingOptions, check_question, check_top_k

    modes = parse_modes(mode)
    check_top_k(top_k)
    if questions is not None:
        _batch(index_path, questions, out, batch_size, top_k, modes, max_new_tokens, json_out, choice, expansion,
               hit_filter, max_positions)
        return
    if question is None:
        raise InputError("give a QUESTION, or --questions FILE --out FILE.")
    check_question(question)  # before the model loads
    pipe = choice.pipeline(index_path, progress=not json_out)
    sampling = SamplingOptions(max_new_tokens=max_new_tokens)
    results = {m: pipe.ask(question, top_k=top_k, compression=expansion.compression(m), sampling=sampling,
                           hit_filter=hit_filter, max_positions=max_positions) for m in modes}
    dropped = results[modes[0]].dropped
    ratio = results["full"].ttft_s / results["refrag"].ttft_s if len(modes) > 1 else None
    if json_out:
        answers = [{"mode": m, "answer": r.answer.text, "ttft_s": r.ttft_s, "retrieval_s": r.retrieval_s,
                    "timings": asdict(r.answer.timings), "decoder_positions": r.answer.decoder_positions,
                    "context_tokens": r.answer.context_tokens, "policy": r.answer.policy,
                    "expanded_chunks": list(r.answer.expanded_chunks),
                    "dropped_to_fit": [d.hit.id for d in r.dropped if d.reason == "max_positions"],
                    "source_ids": [h.id for h in r.hits]}
                   for m, r in results.items()]
        sources = [{"id": h.id, "score": h.score, "title": h.meta.title, "source": _where(h.meta)}
                   for h in results[modes[0]].hits]
        gone = [{"id": d.hit.id, "score": d.hit.score, "title": d.hit.meta.title, "reason": d.reason} for d in dropped]
        print_json({"question": question, "answers": answers, "sources": sources, "dropped": gone,
                    "ttft_ratio": ratio})
        return
    for m, r in results.items():
        t = r.answer.timings
        typer.secho(f"[{m}] {r.answer.text}", bold=True)
        typer.echo(f"  TTFT {r.ttft_s:.3f}s (retrieval {r.retrieval_s * 1e3:.1f} ms, policy {t.policy_s * 1e3:.1f} ms, "
                   f"prefill {t.prefill_s:.3f}s, {r.answer.decoder_positions} decoder positions for "
                   f"{r.answer.context_tokens} context tokens)")
        if m == "refrag":
            typer.echo(f"  raw chunks ({r.answer.policy}): {_chunk_list(r.answer.expanded_chunks)}")
    first = [h.id for h in results[modes[0]].hits]
    for m, r in results.items():
        if m != modes[0] and [h.id for h in r.hits] == first:
            continue
        if len(results) > 1 and any([h.id for h in o.hits] != first for o in results.values()):
            typer.echo(f"  sources read in {m} mode (--max-positions keeps a different number per mode):")
        for rank, h in enumerate(r.hits, 1):
            typer.echo(f"  [{rank}] {h.meta.title} ({_where(h.meta)}, score {h.score:.3f})")
    for d in dropped:
        if d.reason != "max_positions":
            typer.echo(f"  dropped ({d.reason}): {d.hit.meta.title} (score {d.hit.score:.3f})")
    for m, r in results.items():  # the cap depends on the mode: full mode drops more
        for d in (d for d in r.dropped if d.reason == "max_positions"):
            typer.echo(f"  dropped in {m} mode to fit --max-positions {max_positions}: {d.hit.meta.title} "
                       f"(score {d.hit.score:.3f})")
    if ratio is not None:
        typer.secho(f"TTFT full / refrag: {ratio:.1f}x", bold=True)


def _batch(index_path: Path, questions: Path, out: Path | None, batch_size: int, top_k: int, modes: tuple[Mode, ...],
           max_new_tokens: int, json_out: bool, choice: ModelChoice, expansion: ExpansionChoice,
           hit_filter: HitFilter, max_positions: int | None) -> None:
    """``ask --questions FILE --out FILE``: batched, appended as it goes, resumable."""
    from refrag.batch import BatchOptions, answer_questions
    from refrag.config import SamplingOptions

    if out is None or len(modes) != 1:
        raise InputError("--questions needs --out FILE and one --mode (refrag or full).")
    options = BatchOptions(batch_size=batch_size, top_k=top_k, compression=expansion.compression(modes[0]),
                           sampling=SamplingOptions(max_new_tokens=max_new_tokens), hit_filter=hit_filter,
                           max_positions=max_positions)
    pipe = choice.pipeline(index_path, progress=not json_out)
    report = answer_questions(pipe, questions, out, options, progress=not json_out)
    if json_out:
        print_json({"answered": report.answered, "already": report.already, "skipped": report.skipped,
                    "seconds": report.seconds, "questions_per_s": report.questions_per_s, "out": str(out)})
        return
    typer.echo(f"answered {report.answered} questions in {report.seconds:.1f}s ({report.questions_per_s:.2f}/s) "
               f"-> {out}; {report.already} already there; {len(report.skipped)} skipped")
    for line in report.skipped:
        typer.echo(f"  skipped {line}", err=True)
