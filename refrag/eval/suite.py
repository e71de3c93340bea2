"""Evaluation suites for `refrag report --suite`: the eval and bench commands, run in order into one folder.

Each step is a `refrag` command line; it runs in a child process (bounded memory: one model at a time) and
its outputs land in the results folder, where :func:`refrag.eval.report.write_report` reads them. A step whose
output already exists is skipped, so an interrupted suite resumes where it stopped. The exact commands go to
``commands.txt``; a step that fails (e.g. the optional llmlingua package missing) is recorded in
``failures.md`` (printed at the top of the report) and the suite goes on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from refrag.errors import InputError
from refrag.io import write_text_atomic


@dataclass(frozen=True)
class Step:
    args: tuple[str, ...]  # after `refrag`; {data} and {results} are filled in
    output: str  # relative to the results folder: the file that proves the step ran
    stdout_to: bool = False  # the step prints its JSON result; save stdout as `output`


def _paper_steps(ppl_limit: int, qa_limit: int, cf_limit: int, lingua_limit: int, ttft: tuple[str, ...]) -> list[Step]:
    nq = "{data}/nq_bigbench.jsonl"
    return [
        Step(("eval", "perplexity", "--data", "{data}/wiki_paragraph_segmentation_en.txt", "--s", "512", "--o", "128",
              "--k", "16", "--limit", str(ppl_limit), "--seed", "0", "--out", "{results}/ppl"), "ppl/summary.json"),
        Step(("eval", "qa", "--data", nq, "--modes", "full,refrag,refrag@8", "--limit", str(qa_limit),
              "--max-new-tokens", "8", "--seed", "0", "--out", "{results}/qa_nq"), "qa_nq/summary.json"),
        Step(("eval", "qa", "--data", nq, "--counterfactual", "--modes", "full,refrag", "--limit", str(cf_limit),
              "--max-new-tokens", "8", "--seed", "1", "--out", "{results}/qa_cf"), "qa_cf/summary.json"),
        Step(("eval", "qa", "--data", nq, "--modes", "llmlingua", "--limit", str(lingua_limit), "--max-new-tokens", "8",
              "--seed", "0", "--out", "{results}/qa_llmlingua"), "qa_llmlingua/summary.json"),
        Step(("bench", "ttft", *ttft, "--plot", "{results}/ttft.png", "--json"), "ttft.json", stdout_to=True),
    ]


SUITES: dict[str, list[Step]] = {
    # the protocol: >= 200 perplexity windows at s=512/o=128, >= 300 NQ questions, full TTFT sweep
    "paper": _paper_steps(200, 300, 100, 50, ("--lengths", "512,1024,2048,4096,8000", "--repeats", "7")),
    # minutes, for a first look
    "quick": _paper_steps(24, 30, 10, 5, ("--lengths", "512,2048", "--repeats", "2", "--batch", "0")),
}


def suite_commands(name: str, results: Path, data: Path, model: str | None) -> list[tuple[Step, list[str]]]:
    """The steps of suite ``name`` with their full argument lists (after `refrag`)."""
    if name not in SUITES:
        raise InputError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}.")
    if not data.is_dir():
        raise InputError(f"data folder not found: {data} (it holds nq_bigbench.jsonl and the held-out text).")
    extra = ["--model", model] if model else []
    return [
        (step, [a.format(data=data, results=results) for a in step.args] + extra) for step in SUITES[name]
    ]


def run_suite(
    name: str, results: Path, data: Path, model: str | None = None,
    runner: Callable[[list[str]], subprocess.CompletedProcess] | None = None,
) -> list[str]:
    """Run the suite's missing steps into ``results``; returns the notes on failed steps (empty when all ran)."""
    # A child process per step, not a function call: each step loads its own model(s) and the memory is freed
    # when the step ends (a long suite would otherwise hold every model it used). stdout is captured (JSON
    # results); stderr passes through (progress bars, errors).
    run = runner or (lambda argv: subprocess.run(argv, check=False, stdout=subprocess.PIPE, text=True))
    results.mkdir(parents=True, exist_ok=True)
    lines, failures = [], []
    for step, args in suite_commands(name, results, data, model):
        target = results / step.output
        lines.append("refrag " + " ".join(args) + (f" > {target}" if step.stdout_to else ""))
        if target.exists():
            continue
        print(f"[suite {name}] refrag {' '.join(args)}", file=sys.stderr, flush=True)
        done = run([sys.executable, "-m", "refrag.cli", *args])
        if done.returncode != 0:
            failures.append(f"- `refrag {' '.join(args)}` failed (exit {done.returncode}; its error is in the log)")
            continue
        if step.stdout_to:
            write_text_atomic(target, done.stdout)
    write_text_atomic(results / "commands.txt", "\n".join(lines) + "\n")
    failed = results / "failures.md"
    if failures:
        write_text_atomic(failed, "**Steps that failed:**\n\n" + "\n".join(failures) + "\n")
    elif failed.exists():
        failed.unlink()
    return failures
