"""`refrag eval perplexity|qa`: the paper's evaluation protocols, summary + per-example JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import Checkpoint, Decoder, DEFAULTS, DType, Encoder, Json, print_json, setup_torch

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Evaluate quality (perplexity, QA).")

Out = Annotated[Path | None, typer.Option("--out", help="folder for summary.json + examples.jsonl")]
Limit = Annotated[int, typer.Option("--limit", help="number of examples")]
Seed = Annotated[int, typer.Option("--seed", help="example selection seed")]


@app.command("perplexity")
def perplexity_cmd(
    data: Annotated[list[str], typer.Option("--data", help="documents: txt (blank-line separated), jsonl, folder, hf:NAME")],
    s: Annotated[int, typer.Option("--s", help="context tokens")] = 512,
    o: Annotated[int, typer.Option("--o", help="output tokens scored")] = 128,
    k: Annotated[list[int] | None, typer.Option("--k", help="compression rate(s) (repeatable)")] = None,
    limit: Limit = 200,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option(help="examples per forward")] = 4,
    text_field: Annotated[str, typer.Option(help="text field of jsonl / HF records")] = "text",
    out: Out = None,
    model: Checkpoint = None,
    decoder: Decoder = DEFAULTS["decoder"],
    encoder: Encoder = DEFAULTS["encoder"],
    dtype: DType = "bfloat16",
    json_out: Json = False,
) -> None:
    """Log-perplexity of o output tokens after s context tokens: no context, full, truncated, REFRAG_k."""
    setup_torch()
    import itertools

    from refrag.eval.perplexity import PerplexityOptions, evaluate_perplexity, extract_examples
    from refrag.io import write_json_atomic, write_jsonl_atomic
    from refrag.loading import load_model
    from refrag.train.data import iter_documents

    ks = tuple(k or [16])
    options = PerplexityOptions(s=s, o=o, ks=ks, limit=limit, seed=seed, batch_size=batch_size)
    m = load_model(model, decoder=decoder, encoder=encoder, k=ks[0], dtype=dtype, progress=not json_out)
    docs = itertools.chain.from_iterable(iter_documents(src, text_field) for src in data)
    examples = extract_examples(docs, m.tokenizer, s, o, limit, seed)
    result = evaluate_perplexity(m, examples, options)
    summary = {**result.summary(), "model": model or "default", "data": list(data)}
    if out is not None:
        write_json_atomic(out / "summary.json", summary)
        write_jsonl_atomic(out / "examples.jsonl", result.rows())
    if json_out:
        print_json(summary)
        return
    typer.echo(f"s={s} o={o} n={result.n}  (log-ppl, nats/token; recovered = share of the context benefit)")
    rec = result.recovered
    for name, value in result.log_ppl.items():
        extra = f"  recovered {rec[name]:+.3f}" if name in rec else ""
        typer.echo(f"  {name:<14} {value:.4f}{extra}")
