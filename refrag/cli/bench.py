"""`refrag bench ...`: speed measured side by side against the full-context decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from refrag.cli.common import DEFAULTS, Checkpoint, Decoder, DType, Encoder, Json, K, print_json, setup_torch

app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one process).")


@app.command("ttft")
def ttft_cmd(
    model: Checkpoint = None,
    decoder: Decoder = DEFAULTS["decoder"],
    encoder: Encoder = DEFAULTS["encoder"],
    k: K = 16,
    dtype: DType = "bfloat16",
    lengths: Annotated[str, typer.Option(help="comma-separated context lengths")] = "512,1024,2048,4096,8000",
    repeats: Annotated[int, typer.Option(help="timed runs per path and length (median)")] = 3,
    batch: Annotated[int, typer.Option(help="batch size for the throughput row (0: skip)")] = 8,
    throughput_s: Annotated[int, typer.Option(help="context length for the throughput row")] = 2048,
    plot: Annotated[Path | None, typer.Option(help="also write a PNG plot of TTFT vs context length here")] = None,
    json_out: Json = False,
) -> None:
    """TTFT of full context vs REFRAG (cached and uncached chunk vectors), TTIT, throughput, KV bytes."""
    setup_torch()
    from refrag.bench.ttft import bench_ttft, plot_ttft
    from refrag.loading import load_model

    sizes = [int(x) for x in lengths.split(",") if x.strip()]
    m = load_model(model, decoder=decoder, encoder=encoder, k=k, dtype=dtype, progress=not json_out)
    report = bench_ttft(m, sizes, repeats=repeats, throughput_batch=batch, throughput_s=throughput_s,
                        progress=not json_out)
    if plot is not None:
        plot_ttft(report, plot)
    if json_out:
        print_json(report.to_json())
        return
    table = Table(title=f"TTFT: full vs REFRAG{report.k} ({report.machine['cpu']}, {report.dtype})")
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
