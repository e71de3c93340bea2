"""`refrag eval perplexity|qa`: the paper's evaluation protocols, summary + per-example JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from refrag.cli.common import (
    Checkpoint,
    Json,
    ModelChoice,
    RefineSteps,
    comma_list,
    filter_options,
    model_options,
    print_json,
    setup_torch,
)
from refrag.config import PolicyName
from refrag.errors import InputError
from refrag.relevance import HitFilter

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Evaluate quality (perplexity, QA).")

Out = Annotated[Path | None, typer.Option("--out", help="folder for summary.json + examples.jsonl")]
Limit = Annotated[int, typer.Option("--limit", help="number of examples")]
Seed = Annotated[int, typer.Option("--seed", help="example selection seed")]


@app.command("perplexity")
@model_options(k=False, answer_adapter=False)
def perplexity_cmd(
    data: Annotated[
        list[str],
        typer.Option("--data", help="documents: txt (blank-line separated), jsonl, folder, hf:NAME"),
    ],
    s: Annotated[int, typer.Option("--s", help="context tokens")] = 512,
    o: Annotated[int, typer.Option("--o", help="output tokens scored")] = 128,
    k: Annotated[list[int] | None, typer.Option("--k", help="compression rate(s) (repeatable; the first is the "
                                                          "model's k, default 16 or the checkpoint's)")] = None,
    limit: Limit = 200,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option(help="examples per forward")] = 4,
    text_field: Annotated[str, typer.Option(help="text field of jsonl / HF records")] = "text",
    expand: Annotated[str, typer.Option(help="also score REFRAG_k with these fractions of chunks as raw tokens, "
                                             "comma-separated (and truncated at their positions)")] = "",
    policy: Annotated[str, typer.Option(help="which chunks stay raw, comma-separated: first, last, random, "
                                             "perplexity-desc, perplexity-asc")] = "last",
    refine_steps: RefineSteps = 0,
    out: Out = None,
    json_out: Json = False,
    *,
    choice: ModelChoice,
) -> None:
    """Log-perplexity of o output tokens after s context tokens: no context, full, truncated, REFRAG_k."""
    setup_torch()
    import itertools
    from dataclasses import replace

    from refrag.eval.perplexity import PerplexityOptions, evaluate_perplexity, extract_examples
    from refrag.io import write_json_atomic, write_jsonl_atomic
    from refrag.refine import RefineOptions
    from refrag.train.data import iter_documents

    fractions, policies = comma_list(expand, float, "--expand"), comma_list(policy, str, "--policy")
    refine = RefineOptions(steps=refine_steps) if refine_steps else None
    if refine is not None and choice.quantize:
        raise InputError("--refine-steps runs a backward pass through the decoder: it cannot use --quantize.")
    PerplexityOptions(s=s, o=o, ks=tuple(k or [16]), limit=limit, expand=fractions, policies=policies)  # type: ignore[arg-type]  # fail before loading
    m = replace(choice, k=k[0] if k else None).load(progress=not json_out)
    options = PerplexityOptions(s=s, o=o, ks=tuple(k or [m.k]), limit=limit, seed=seed, batch_size=batch_size,
                                expand=fractions, policies=policies, refine=refine)  # type: ignore[arg-type]
    docs = itertools.chain.from_iterable(iter_documents(src, text_field) for src in data)
    examples = extract_examples(docs, m.tokenizer, s, o, limit, seed)
    result = evaluate_perplexity(m, examples, options)
    summary = {**result.summary(), "model": choice.checkpoint or "default", "data": list(data)}
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
        typer.echo(f"  {name:<18} {value:.4f}{extra}")


@app.command("qa")
@model_options()
@filter_options()
def qa_cmd(
    data: Annotated[Path, typer.Option("--data", help="question/answer JSONL")],
    modes: Annotated[
        str, typer.Option(help="comma list: full, refrag, refrag@N (N passages), llmlingua, extractive (the chunks "
                                "--policy keeps, as plain text)")
    ] = "full,refrag",
    index: Annotated[
        Path | None, typer.Option("--index", help="retrieve passages from this index (else gold passages)")
    ] = None,
    passages: Annotated[int, typer.Option(help="passages per question (modes without @N)")] = 1,
    policy: Annotated[str, typer.Option(help="expansion policies for refrag / extractive rows, comma-separated "
                                             f"({', '.join(get_args(PolicyName))})")] = "",
    expand_fraction: Annotated[str, typer.Option(help="budgets: fractions of chunks kept raw, comma-separated")] = "",
    expand_tokens: Annotated[str, typer.Option(help="budgets: decoder positions on raw chunks, comma-separated")]
        = "",
    counterfactual: Annotated[
        bool, typer.Option(help="use the answer-swapped passages (cf_context / cf_answer)")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="answer length cap")] = 16,
    question_field: Annotated[str, typer.Option(help="JSONL field")] = "question",
    answer_field: Annotated[str, typer.Option(help="JSONL field (string or list)")] = "answer",
    context_field: Annotated[str, typer.Option(help="JSONL field holding the gold passage")] = "context",
    limit: Limit = 300,
    seed: Seed = 0,
    out: Out = None,
    json_out: Json = False,
    *,
    choice: ModelChoice,
    hit_filter: HitFilter,
) -> None:
    """Exact match, token F1, answer-contained and median TTFT per mode (with --index: retrieved passages,
    optionally relevance-filtered)."""
    setup_torch()
    from dataclasses import asdict

    from refrag.eval.qa import QAFields, QAOptions, compare_modes, evaluate_qa, load_qa, parse_modes
    from refrag.io import write_json_atomic, write_jsonl_atomic

    parsed = parse_modes(modes, comma_list(policy, str, "--policy"),
                         comma_list(expand_fraction, float, "--expand-fraction"),
                         comma_list(expand_tokens, int, "--expand-tokens"))
    if hit_filter.active and index is None:
        raise InputError("--min-score / --relative-score / --dedup filter retrieved passages: give --index.")
    options = QAOptions(parsed, passages=passages, max_new_tokens=max_new_tokens, seed=seed, hit_filter=hit_filter)
    fields = QAFields(question=question_field, answer=answer_field, context=context_field)
    examples = load_qa(data, fields, limit=limit, seed=seed, counterfactual=counterfactual)
    m = choice.load(progress=not json_out)
    pipeline, compressor = _qa_helpers(m, index, options, choice)
    summaries, records = evaluate_qa(m, examples, options, pipeline=pipeline, compressor=compressor)
    comparisons = compare_modes(options.modes, records, seed)
    rows = [asdict(s) for s in summaries]
    deltas = [asdict(c) for c in comparisons]
    if out is not None:
        write_json_atomic(out / "summary.json", {"modes": rows, "comparisons": deltas, "data": str(data),
                                                 "counterfactual": counterfactual,
                                                 "model": choice.checkpoint or "default", "seed": seed})
        write_jsonl_atomic(out / "examples.jsonl", (asdict(r) for r in records))
        from refrag.eval.report import plot_qa_positions

        plot_qa_positions(rows, out / "quality_vs_positions.png")
    if json_out:
        print_json({"modes": rows, "comparisons": deltas})
        return
    for s in summaries:
        memory = f"  memory {s.memory:.3f}" if s.memory is not None else ""
        typer.echo(
            f"{s.mode:<12} n={s.n} passages={s.passages} EM {s.em:.3f}  F1 {s.f1:.3f}  contains {s.contains:.3f}"
            f"{memory}  TTFT p50 {s.ttft_p50_s * 1e3:.0f} ms  positions {s.decoder_positions:.0f}"
        )
    for c in comparisons:
        d = c.contains
        typer.echo(f"contains {c.mode} - {c.baseline}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] "
                   f"({d.level:.0%} paired bootstrap{', significant' if d.significant else ''})")


def _qa_helpers(model, index: Path | None, options, choice: ModelChoice):
    """The retrieval pipeline (with --index) and the LLMLingua compressor (for its mode), else None."""
    pipeline = compressor = None
    if index is not None:
        from refrag.index import Index
        from refrag.pipeline import Pipeline

        pipeline = Pipeline(Index.open(index), model)
    if any(mode.kind == "llmlingua" for mode in options.modes):
        from refrag.eval.llmlingua_baseline import LLMLinguaCompressor
        from refrag.models import resolve

        compressor = LLMLinguaCompressor(str(resolve(choice.decoder or model.config.decoder).path), model.tokenizer)
    return pipeline, compressor


@app.command("reconstruction")
@model_options(answer_adapter=False)
def reconstruction_cmd(
    data: Annotated[str, typer.Option(help="held-out text (.txt/.jsonl) the compressor never trained on")] =
        "../shared/data/wiki_paragraph_segmentation_en.txt",
    max_chunks: Annotated[int, typer.Option(help="longest context in chunks (rows 1, 2, 4, .. max)")] = 8,
    examples: Annotated[int, typer.Option(help="examples per number of chunks")] = 32,
    greedy: Annotated[bool, typer.Option(help="also generate each 1 x k chunk from its vector alone: exact-chunk "
                                              "rate and accuracy per position")] = False,
    seed: Seed = 0,
    json_out: Json = False,
    *,
    choice: ModelChoice,
) -> None:
    """Reconstruction quality by number of chunks: token accuracy and log-perplexity (teacher-forced), and
    with --greedy the decoder generating chunks from their vectors."""
    setup_torch()
    from rich.console import Console
    from rich.table import Table

    from refrag.eval.reconstruction import eval_reconstruction

    m = choice.load(progress=not json_out)
    report = eval_reconstruction(m, data, max_chunks=max_chunks, examples=examples, seed=seed, greedy=greedy,
                                 progress=not json_out)
    if json_out:
        print_json(report.to_json())
        return
    table = Table(title=f"reconstruction, k={report.k}, {report.examples} held-out examples per row ({data})")
    for col in ("chunks", "tokens", "log-ppl", "token accuracy"):
        table.add_column(col, justify="right")
    for r in report.rows:
        table.add_row(f"{r.chunks}x{report.k}", str(r.tokens), f"{r.log_ppl:.3f}", f"{r.accuracy:.3f}")
    Console().print(table)
    if (g := report.greedy) is not None:
        positions = " ".join(f"{a:.2f}" for a in g.position_accuracy)
        typer.echo(f"greedy 1x{report.k} from the vector alone: exact chunks {g.exact:.3f} of {g.chunks}; "
                   f"accuracy by position: {positions}")


def report_cmd(
    results: Annotated[Path, typer.Option("--results", help="folder the eval/bench commands write into")],
    out: Annotated[Path, typer.Option("--out", help="markdown file (PNGs are written next to it)")] = Path(
        "docs/report.md"
    ),
    runs: Annotated[
        Path | None, typer.Option("--runs", help="training runs folder (metrics.csv) for curves")
    ] = Path("runs"),
    suite: Annotated[
        str | None, typer.Option(help="first run this suite's missing steps into RESULTS: paper or quick")
    ] = None,
    data: Annotated[Path, typer.Option(help="folder with nq_bigbench.jsonl and the held-out text")] = Path(
        "../shared/data"
    ),
    model: Checkpoint = None,
) -> None:
    """Run an evaluation suite (optional), then write one markdown report (tables + PNG plots) from RESULTS."""
    from refrag.eval.report import ReportInputs, write_report

    if suite is not None:
        from refrag.eval.suite import run_suite

        for line in run_suite(suite, results, data, model):
            typer.echo(line, err=True)
    typer.echo(str(write_report(ReportInputs(results=results, out=out, runs=runs))))
