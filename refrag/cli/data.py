"""`refrag data qa`: build training data for the answering stage (``refrag train sft``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import ModelChoice, model_options, setup_torch

app = typer.Typer(no_args_is_help=True, help="Build training data (QA rows for `refrag train sft`).")

CORPUS = "../shared/data/wiki_vital_summaries_en.jsonl"
EVALUATION_FILES = ("../shared/data/nq_bigbench.jsonl", "../shared/data/disflqa_bigbench.jsonl")


@app.command("qa")
@model_options(checkpoint=False)
def qa_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="output .jsonl (rewritten atomically as rows are kept)")],
    source: Annotated[list[str], typer.Option(
        "--source", help=f"corpus to write questions from: .txt/.md/.jsonl files or folders (default: {CORPUS}; "
                         "rebuild it with `refrag index wiki-corpus`)")] = [CORPUS],  # noqa: B006
    examples: Annotated[int, typer.Option(help="rows to keep")] = 1000,
    passages: Annotated[int, typer.Option(help="passages per row: the gold one + distractors")] = 3,
    batch_size: Annotated[int, typer.Option(help="questions written / answered per generate call")] = 16,
    exclude: Annotated[list[str] | None, typer.Option(
        help="QA JSONL whose questions are never kept (default: the evaluation-only files of ../shared/data that "
             "exist)")] = None,
    keep: Annotated[str, typer.Option(help="grounded: rows whose full-context answer contains the span or is "
                                           "grounded in the passage; all: every answered question (flags kept)")] =
        "grounded",
    questions: Annotated[str, typer.Option(
        help="written: the decoder writes each question and answers it from the passages; cloze: the sentence "
             "holding the answer, the answer blanked (no model runs; thousands of rows per minute)")] = "written",
    seed: Annotated[int, typer.Option(help="seed: passage order, answer spans, gold position")] = 0,
    *, choice: ModelChoice,
) -> None:
    """Question / passages / answer rows from a corpus that may be trained on: the decoder writes a question for a
    name or year of a passage (or blanks it out of its sentence: `--questions cloze`), BM25 picks distractors, and
    a row is kept when the full-context decoder's answer contains that answer (its answer is the distillation
    target)."""
    setup_torch()
    from refrag.train.qa_data import QADataOptions, build_qa_set

    if exclude is None:
        exclude = [f for f in EVALUATION_FILES if Path(f).is_file()]
    options = QADataOptions(examples=examples, passages=passages, batch_size=batch_size, keep=keep,  # type: ignore[arg-type]
                            questions=questions, seed=seed)
    model = None if options.questions == "cloze" else choice.load(merge=False)
    items = build_qa_set(model, source, out, options, exclude=exclude)
    verified, grounded = sum(it.verified for it in items), sum(it.grounded for it in items)
    typer.echo(f"wrote {len(items)} rows to {out}: {verified} verified, {grounded} grounded (questions excluded "
               f"from: {', '.join(exclude) or 'none'})")
