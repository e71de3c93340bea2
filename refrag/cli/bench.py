"""`refrag bench ...`: speed measured side by side against the full-context decoder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from refrag.cli.common import (
    ExpansionChoice,
    Json,
    ModelChoice,
    apply_threads,
    expansion_options,
    model_options,
    print_json,
    setup_torch,
)
from refrag.cli.index import StoreKind

app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one process).")


@app.command("ttft")
@model_options()
@expansion_options(policy="none", fraction=0.0)
def ttft_cmd(
    lengths: Annotated[str, typer.Option(help="comma-separated context lengths")] = "512,1024,2048,4096,8000",
    repeats: Annotated[int, typer.Option(help="timed runs per path and length (median)")] = 3,
    batch: Annotated[int, typer.Option(help="batch size for the throughput row (0: skip)")] = 8,
    throughput_s: Annotated[int, typer.Option(help="context length for the throughput row")] = 2048,
    plot: Annotated[Path | None, typer.Option(help="also write a PNG plot of TTFT vs context length here")] = None,
    json_out: Json = False,
    *,
    choice: ModelChoice,
    expansion: ExpansionChoice,
) -> None:
    """TTFT of full context vs REFRAG (cached and uncached chunk vectors), TTIT, throughput, KV bytes; with
    --policy and a budget, REFRAG keeps those chunks raw (the policy's time is inside its TTFT)."""
    setup_torch()
    from refrag.bench.ttft import bench_ttft, plot_ttft

    sizes = [int(x) for x in lengths.split(",") if x.strip()]
    m = choice.load(progress=not json_out)
    report = bench_ttft(m, sizes, repeats=repeats, throughput_batch=batch, throughput_s=throughput_s,
                        compression=expansion.compression("refrag"), progress=not json_out)
    if plot is not None:
        plot_ttft(report, plot)
    if json_out:
        print_json(report.to_json())
        return
    table = Table(title=f"TTFT: full vs REFRAG{report.k}, raw chunks: {report.expansion} ({report.machine['cpu']}, "
                        f"{report.dtype})")
    for col in ("s", "full", "cached", "uncached", "x cached", "x uncached", "TTIT full/refrag", "KV full/refrag"):
        table.add_column(col, justify="right")
    for r in report.rows:
        table.add_row(
            str(r.s), f"{r.ttft_full_s:.3f}s", f"{r.ttft_cached_s:.3f}s", f"{r.ttft_uncached_s:.3f}s",
            f"{r.ratio_cached:.1f}x", f"{r.ratio_uncached:.1f}x",
            f"{r.ttit_full_s * 1e3:.0f}/{r.ttit_refrag_s * 1e3:.0f} ms",
            f"{r.kv_bytes_full / 2**20:.1f}/{r.kv_bytes_refrag / 2**20:.1f} MiB",
        )
    console = Console()
    console.print(table)
    console.print(f"decoder weights {report.decoder_weight_bytes / 2**20:.0f} MiB ({report.quantize or 'not quantized'}), "
                  f"RSS {report.rss_bytes / 2**20:.0f} MiB at the end (peak {report.peak_rss_bytes / 2**20:.0f} MiB)")
    if report.throughput:
        t = report.throughput
        console.print(f"throughput, batch {t.batch} x {t.s} tokens: full {t.tokens_per_s_full:.1f} tok/s, "
                      f"refrag {t.tokens_per_s_refrag:.1f} tok/s ({t.ratio:.1f}x)")
    if plot is not None:
        console.print(f"plot: {plot}")


@app.command("index")
@model_options(quantize=False)
def index_cmd(
    corpus: Annotated[list[Path] | None, typer.Argument(help="corpus files (default: the offline Wikipedia)")] = None,
    out: Annotated[Path, typer.Option(help="index folder")] = Path("~/.cache/refrag/indexes/wiki"),
    reuse: Annotated[bool, typer.Option(help="reuse the index at --out (its recorded build stats)")] = False,
    recall: Annotated[Path | None, typer.Option(help="QA .jsonl (question, context): recall@1/@5")] = None,
    store_kind: StoreKind = "flat",
    json_out: Json = False,
    *,
    choice: ModelChoice,
) -> None:
    """Index build throughput, retrieval latency, TTFT full vs refrag, disk bytes (and recall); --threads
    defaults to 2 here (the reference machine's cores)."""
    setup_torch()
    from refrag.bench.index import bench_index, bench_recall, report_json
    from refrag.index import Index, IndexOptions, StoreOptions, wiki_corpus
    from refrag.models import cache_root

    choice = replace(choice, threads=2 if choice.threads is None else choice.threads)
    apply_threads(choice.threads)
    out = out.expanduser()
    if not corpus:
        wiki = cache_root() / "data" / "wiki_vital_summaries_en.jsonl"
        corpus = [wiki if wiki.exists() else wiki_corpus(wiki)]
    m = choice.load(progress=not json_out, merge=False)
    options = IndexOptions(store=StoreOptions(kind=store_kind))  # type: ignore[arg-type]
    report = report_json(bench_index(corpus, out, m, options, reuse=reuse, progress=not json_out))
    if recall is not None:
        report["recall"] = report_json(bench_recall(recall, Index.open(out).retriever, progress=not json_out))
    if json_out:
        print_json(report)
        return
    for key, value in report.items():
        typer.echo(f"{key:>22}: {value}")


@app.command("serve")
@model_options()
def serve_cmd(
    index_path: Annotated[Path | None, typer.Option("--index", help="index the server retrieves from (else "
                                                                     "--data's passages are sent)")] = None,
    data: Annotated[Path, typer.Option(help="QA .jsonl: questions (+ gold passages and distractors when there is "
                                            "no --index)")] = Path("../shared/data/nq_bigbench.jsonl"),
    clients: Annotated[str, typer.Option(help="comma-separated concurrency levels")] = "1,8,32",
    requests: Annotated[int, typer.Option(help="requests per level")] = 500,
    modes: Annotated[str, typer.Option(help="modes, interleaved in one load")] = "full,refrag",
    stream_share: Annotated[float, typer.Option(help="share of streaming requests")] = 0.5,
    max_tokens: Annotated[int, typer.Option(help="answer length cap")] = 16,
    passages: Annotated[int, typer.Option(help="passages per question (gold + distractors, or top-k)")] = 3,
    max_batch: Annotated[int, typer.Option(help="the engine's batch size (the last run repeats the highest level "
                                                "with 1)")] = 8,
    plot: Annotated[Path | None, typer.Option(help="also write a PNG of latency vs concurrency here")] = None,
    json_out: Json = False,
    *,
    choice: ModelChoice,
) -> None:
    """Load-test the OpenAI-compatible server on localhost: throughput, p50 / p99 TTFT and latency per mode,
    errors by status, lost responses, and the batching gain."""
    setup_torch()
    import json

    from refrag.bench.serve import LoadSpec, Prompt, bench_serve, plot_serve
    from refrag.cli.common import comma_list
    from refrag.eval.qa import gold_passages, load_qa

    levels = comma_list(clients, int, "--clients")
    spec = LoadSpec(requests=requests, modes=comma_list(modes, str, "--modes"), stream_share=stream_share,  # type: ignore[arg-type]
                    max_tokens=max_tokens, top_k=passages)
    examples = load_qa(data, limit=min(requests, 200))
    pipeline = None
    if index_path is not None:
        pipeline = choice.pipeline(index_path, progress=not json_out)
        model = pipeline.model
        prompts = [Prompt(ex.question, None) for ex in examples]
    else:
        model = choice.load(progress=not json_out)
        prompts = [Prompt(ex.question, tuple(gold_passages(examples, i, passages, 0))) for i, ex in enumerate(examples)]
    def report(run) -> None:  # each run as it finishes: a long benchmark never loses what it measured
        if not json_out:
            typer.echo(json.dumps(run.to_json()), err=True)

    runs = bench_serve(model, pipeline, prompts, spec, levels, max_batch, progress=not json_out, on_run=report)
    if plot is not None:
        plot_serve(runs, plot)
    if json_out:
        print_json([r.to_json() for r in runs])
        return
    table = Table(title=f"refrag serve on localhost: {requests} requests per run, {stream_share:.0%} streaming")
    for col in ("clients", "batch", "mode", "ok", "lost", "errors", "req/s", "tok/s", "TTFT p50/p99",
                "latency p50/p99", "mean batch"):
        table.add_column(col, justify="right")
    for r in runs:
        for s in r.modes:
            ttft = f"{s.ttft_p50_s:.2f}/{s.ttft_p99_s:.2f}s" if s.ttft_p50_s is not None else "-"
            table.add_row(str(r.clients), str(r.max_batch), s.mode, str(s.ok), str(s.lost),
                          ",".join(f"{k}:{v}" for k, v in s.errors.items()) or "0", f"{s.requests_per_s:.2f}",
                          f"{s.tokens_per_s:.1f}", ttft, f"{s.latency_p50_s:.2f}/{s.latency_p99_s:.2f}s",
                          f"{r.mean_batch:.1f}")
    console = Console()
    console.print(table)
    if plot is not None:
        console.print(f"plot: {plot}")
