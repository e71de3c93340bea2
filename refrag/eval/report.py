"""One markdown report from a results folder: perplexity protocol, QA modes, LLMLingua, TTFT, training curves.

The folder holds what the eval and bench commands wrote (``--out`` / ``--json`` / ``--plot``):
``ppl/summary.json``, ``qa_*/summary.json``, ``ttft.json`` + ``ttft.png``, and optionally ``commands.txt``
(the exact commands run), ``notes.md`` (caveats to print first) and ``failures.md`` (from a suite run).
Training logs are ``metrics.csv`` files (step,name,value) under ``runs/``. Every number in the report is read from those files, none is typed in.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from refrag.errors import InputError
from refrag.eval.methods import Method


@dataclass(frozen=True)
class ReportInputs:
    results: Path  # folder with the measurement outputs
    out: Path  # markdown file to write; PNGs go next to it
    runs: Path | None = None  # training runs folder (metrics.csv files) for curriculum curves


def _read(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, legend_size: int) -> Path:
    """Grid, legend, tight layout; write the PNG and free the figure."""
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def _rate(method: str, s: int, first_k: int) -> float | None:
    """Context tokens per decoder position a perplexity method gives the decoder (None: not a rate)."""
    parsed = Method.from_name(method, s, first_k)
    return parsed.rate(s) if parsed is not None else None


def plot_quality_vs_rate(ppl: dict, path: Path) -> Path:
    """Log-ppl of each method against the compression rate it applies to the context."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    s, ks = ppl["s"], ppl["ks"]
    for method, value in ppl["log_ppl"].items():
        if method == "no_context":
            ax.axhline(value, color="gray", ls="--", label="no context")
            continue
        if (rate := _rate(method, s, ks[0])) is None:
            continue
        ax.plot(
            [rate],
            [value],
            "o" if method.startswith("refrag") else "s",
            ms=8,
            label=method,
        )
    ax.set(
        xscale="log",
        xlabel="context tokens per decoder position",
        ylabel="log-perplexity (nats/token)",
        title=f"Quality vs compression, s={s}, o={ppl['o']}, n={ppl['n']}",
    )
    return _save(fig, ax, path, legend_size=8)


def plot_qa(rows: list[dict], path: Path) -> Path:
    """QA token F1 against median TTFT, one point per mode."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for r in rows:
        ax.plot([r["ttft_p50_s"]], [r["f1"]], "o", ms=8, label=f"{r['mode']} ({r['passages']} passages)")
    ax.set(xlabel="median TTFT (s)", ylabel="token F1", title="RAG QA: quality vs latency")
    return _save(fig, ax, path, legend_size=8)


def qa_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(decoder positions, answer-contained) per QA row family: ``full``, ``refrag`` (no expansion) and one
    series per mode kind + policy across its budgets (``refrag+lexical10%`` and ``refrag+lexical48t`` are both
    ``refrag+lexical``), sorted by positions."""
    from refrag.eval.qa import mode_family

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(mode_family(r["mode"]), []).append((r["decoder_positions"], r["contains"]))
    return {name: sorted(points) for name, points in series.items()}


def plot_qa_positions(rows: list[dict], path: Path) -> Path:
    """QA answer-contained against mean decoder positions: one line per policy (its budgets), one point per
    plain mode, so quality at equal positions reads off one figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in qa_series(rows).items():
        single = len(points) == 1
        ax.plot(*zip(*points), marker="o", ms=7 if single else 4,
                ls="none" if single else "-" if name.startswith("refrag") else "--", label=name)
    ax.set(xlabel="mean decoder positions per question", ylabel="answer-contained",
           title="RAG QA: quality vs decoder positions")
    return _save(fig, ax, path, legend_size=7)


def training_series(runs: Path) -> dict[str, list[tuple[int, float]]]:
    """"RUN: NAME" -> (step, value) points of train/loss and the held-out eval/log_ppl_* of every metrics.csv."""
    series: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(runs.rglob("metrics.csv")) if runs.is_dir() else []:
        with f.open(encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["name"] == "train/loss" or row["name"].startswith("eval/log_ppl"):  # names the loop writes
                    series.setdefault(f"{f.parent.name}: {row['name']}", []).append(
                        (int(row["step"]), float(row["value"]))
                    )
    return series


def plot_training(runs: Path, path: Path) -> Path | None:
    """The curves of :func:`training_series`; None when there are none."""
    series = training_series(runs)
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, points in series.items():
        ax.plot(*zip(*points), label=label, lw=1)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Training curves")
    return _save(fig, ax, path, legend_size=7)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ppl_section(ppl: dict, png: str) -> str:
    rec = ppl["recovered"]
    lp = ppl["log_ppl"]
    order = ["no_context", "full"] + sorted(m for m in lp if m not in ("no_context", "full"))
    rows = [[m, _fmt(lp[m]), _fmt(rec.get(m))] for m in order]
    return (
        f"## Perplexity protocol (Table 1)\n\ns = {ppl['s']} context tokens, o = {ppl['o']} output tokens, "
        f"n = {ppl['n']} windows (one per document, seed {ppl['seed']}), data {', '.join(ppl.get('data', []))}.\n"
        "Log-ppl = mean NLL of the same o output tokens for every method; recovered = "
        "(no_context - method) / (no_context - full).\n\n"
        + _table(["method", "log-ppl", "context benefit recovered"], rows)
        + f"\n\n![quality vs compression]({png})\n"
    )


def _qa_section(title: str, summary: dict) -> list[list[str]]:
    return [
        [
            title,
            r["mode"],
            str(r["passages"]),
            str(r["n"]),
            _fmt(r["em"]),
            _fmt(r["f1"]),
            _fmt(r["contains"]),
            _fmt(r.get("memory")),
            f"{r['ttft_p50_s'] * 1e3:.0f}",
            f"{r['decoder_positions']:.0f}",
        ]
        for r in summary["modes"]
    ]


def _ttft_section(ttft: dict, png: str) -> str:
    rows = [
        [
            str(r["s"]),
            f"{r['ttft_full_s']:.3f}",
            f"{r['ttft_cached_s']:.3f}",
            f"{r['ttft_uncached_s']:.3f}",
            f"{r['ratio_cached']:.2f}x",
            f"{r['ratio_uncached']:.2f}x",
            f"{r['positions_full']} / {r['positions_refrag']}",
        ]
        for r in ttft["rows"]
    ]
    return (
        f"## TTFT sweep\n\nmodel {ttft['model']}, k = {ttft['k']}, {ttft['dtype']}, median of {ttft['repeats']} "
        "interleaved runs per path.\n\n"
        + _table(
            [
                "s",
                "full (s)",
                "REFRAG cached (s)",
                "REFRAG uncached (s)",
                "speed-up cached",
                "speed-up uncached",
                "positions full / REFRAG",
            ],
            rows,
        )
        + f"\n\n![TTFT vs context length]({png})\n"
    )


def _qa_part(res: Path, out_dir: Path) -> str | None:
    """The RAG QA section from every qa_* folder of the results (None when there is none)."""
    qa_rows: list[list[str]] = []
    qa_points: list[dict] = []
    for folder in sorted(res.glob("qa_*")):
        summary = _read(folder / "summary.json")
        if isinstance(summary, dict):
            title = folder.name[3:] + (" (counterfactual)" if summary.get("counterfactual") else "")
            qa_rows += _qa_section(title, summary)
            qa_points += [r for r in summary["modes"] if not summary.get("counterfactual")]
    if not qa_rows:
        return None
    png = plot_qa(qa_points, out_dir / "qa_quality_vs_ttft.png").name if qa_points else None
    header = ["run", "mode", "passages", "n", "EM", "F1", "contains", "memory", "TTFT p50 (ms)", "decoder positions"]
    return (
        "## RAG QA\n\nGreedy answers; EM / token F1 / answer-contained after SQuAD normalisation; TTFT median "
        "(chunk encodings precomputed as an index stores them; LLMLingua's compression time included). "
        "memory = the counterfactual run's rate of answering with the ORIGINAL answer (answering from memory "
        "instead of reading the passage).\n\n"
        + _table(header, qa_rows)
        + (f"\n\n![QA quality vs TTFT]({png})\n" if png else "\n")
    )


def write_report(inputs: ReportInputs) -> Path:
    """Assemble the markdown report (and its PNGs) from the results folder."""
    from refrag.bench.machine import machine_info
    from refrag.io import write_text_atomic

    res = inputs.results
    if not res.is_dir():
        raise InputError(
            f"results folder not found: {res}; run the eval/bench commands with --out there first."
        )
    out_dir = inputs.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# REFRAG evaluation report\n"]
    for name in ("notes.md", "failures.md"):  # caveats written by hand; steps of a suite that failed
        if (res / name).is_file():
            parts.append((res / name).read_text(encoding="utf-8").strip() + "\n")
    ttft = _read(res / "ttft.json")
    machine = ttft["machine"] if isinstance(ttft, dict) else machine_info()
    parts.append("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n")
    commands = res / "commands.txt"
    if commands.is_file():
        parts.append("Commands (exact):\n\n```\n" + commands.read_text(encoding="utf-8").strip() + "\n```\n")
    ppl = _read(res / "ppl" / "summary.json")
    if isinstance(ppl, dict):
        parts.append(_ppl_section(ppl, plot_quality_vs_rate(ppl, out_dir / "quality_vs_rate.png").name))
    if qa := _qa_part(res, out_dir):
        parts.append(qa)
    if isinstance(ttft, dict):
        shutil.copyfile(res / "ttft.png", out_dir / "ttft.png")
        parts.append(_ttft_section(ttft, "ttft.png"))
    curves = plot_training(inputs.runs, out_dir / "training_curves.png") if inputs.runs else None
    if curves is not None:
        parts.append(f"## Training curves\n\n![training curves]({curves.name})\n")
    write_text_atomic(inputs.out, "\n".join(parts))
    return inputs.out
