"""`refrag bench ...`: speed measured side by side against the full-context decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from refrag.cli.common import (
    ExpansionChoice,
    Json,
    ModelChoice,
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
    if report.throughput:
        t = report.throughput
        console.print(f"throughput, batch {t.batch} x {t.s} tokens: full {t.tokens_per_s_full:.1f} tok/s, "
                      f"refrag {t.tokens_per_s_refrag:.1f} tok/s ({t.ratio:.1f}x)")
    if plot is not None:
        console.print(f"plot: {plot}")


@app.command("index")
@model_options()
def index_cmd(
    corpus: Annotated[list[Path] | None, typer.Argument(help="corpus files (default: the offline Wikipedia)")] = None,
    out: Annotated[Path, typer.Option(help="index folder")] = Path("~/.cache/refrag/indexes/wiki"),
    reuse: Annotated[bool, typer.Option(help="reuse the index at --out (its recorded build stats)")] = False,
    recall: Annotated[Path | None, typer.Option(help="QA .jsonl (question, context): recall@1/@5")] = None,
    store_kind: StoreKind = "flat",
    threads: Annotated[int, typer.Option(help="torch threads (the reference machine has 2 cores)")] = 2,
    json_out: Json = False,
    *,
    choice: ModelChoice,
) -> None:
    """Index build throughput, retrieval latency, TTFT full vs refrag, disk bytes (and recall)."""
    setup_torch()
    import torch

    from refrag.bench.index import bench_index, bench_recall, report_json
    from refrag.index import Index, IndexOptions, StoreOptions, wiki_corpus
    from refrag.models import cache_root

    torch.set_num_threads(threads)
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
