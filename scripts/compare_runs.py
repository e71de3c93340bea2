"""Paired comparison of two `refrag eval qa --out` or `refrag eval perplexity --out` runs (e.g. two compressors,
or one before and after SFT), on the items both scored, with a paired-bootstrap 95% interval of B - A.

    python scripts/compare_runs.py runs/qa-before:refrag+lexical10% runs/qa-after:refrag+lexical10%
    python scripts/compare_runs.py runs/ppl-shipped:refrag16 runs/ppl-new:refrag16
    python scripts/compare_runs.py runs/cpt-a:train/loss runs/cpt-b:train/loss

QA rows are matched by question (metrics: answer-contained, F1; higher is better); perplexity rows by
(doc, offset) (metric: the method's mean NLL per token; lower is better); a training run's metrics.csv column
by step (two runs of one stage, seed and objective train on the same batches: a paired comparison on training
data; a run with another loss, e.g. --distill-hidden, logs another quantity).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from refrag.eval.metrics import paired_bootstrap

ITEMS = {"qa": "questions", "perplexity": "windows", "train": "steps"}


def records(spec: str) -> tuple[str, dict[tuple, dict[str, float]]]:
    """('qa' | 'perplexity' | 'train', item key -> {metric: value}) of one run's column
    ``folder:mode-or-method`` (or ``folder:train/<metric>``)."""
    folder, _, column = spec.partition(":")
    if column.startswith("train/"):
        if column != "train/loss":
            sys.exit(f"{column}: only train/loss compares (lower is better), and only between runs of one objective")
        with (Path(folder) / "metrics.csv").open() as f:
            steps = {(int(r["step"]),): {column: float(r["value"])} for r in csv.DictReader(f) if r["name"] == column}
        if not steps:
            sys.exit(f"{folder}/metrics.csv has no {column!r}")
        return "train", steps
    path = Path(folder) / "examples.jsonl"
    if not path.is_file():
        sys.exit(f"{path} does not exist: pass a folder written by `refrag eval qa|perplexity --out`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and "question" in rows[0]:
        if not any(r["mode"] == column for r in rows):
            sys.exit(f"{path} has no mode {column!r}: it has {sorted({r['mode'] for r in rows})}")
        return "qa", {(r["question"],): {"contains": r["contains"], "f1": r["f1"]} for r in rows
                      if r["mode"] == column}
    if rows and column not in rows[0]:
        sys.exit(f"{path} has no method {column!r}: it has {sorted(k for k in rows[0] if k not in ('doc', 'offset'))}")
    return "perplexity", {(r["doc"], r["offset"]): {"log_ppl": r[column]} for r in rows}


def main(a_spec: str, b_spec: str) -> None:
    (kind_a, a), (kind_b, b) = records(a_spec), records(b_spec)
    if kind_a != kind_b:
        sys.exit(f"{a_spec} is a {kind_a} run and {b_spec} a {kind_b} run: compare runs of one kind")
    shared = [key for key in a if key in b]
    if not shared:
        sys.exit(f"no item is in both {a_spec} and {b_spec}")
    for metric in a[shared[0]]:
        d = paired_bootstrap([b[key][metric] for key in shared], [a[key][metric] for key in shared])
        better = "higher" if kind_a == "qa" else "lower"
        print(f"{metric} ({better} is better): {b_spec} - {a_spec} = {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] "
              f"over {len(shared)} {ITEMS[kind_a]}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
