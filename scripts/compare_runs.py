"""Paired comparison of two `refrag eval qa --out` or `refrag eval perplexity --out` runs (e.g. two compressors,
or one before and after SFT), on the items both scored, with a paired-bootstrap 95% interval of B - A.

    python scripts/compare_runs.py runs/qa-before:refrag+lexical10% runs/qa-after:refrag+lexical10%
    python scripts/compare_runs.py runs/ppl-shipped:refrag16 runs/ppl-new:refrag16

QA rows are matched by question (metrics: answer-contained, F1; higher is better); perplexity rows by
(doc, offset) (metric: the method's mean NLL per token; lower is better).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refrag.eval.metrics import paired_bootstrap


def records(spec: str) -> tuple[str, dict[tuple, dict[str, float]]]:
    """('qa' | 'perplexity', item key -> {metric: value}) of one run's column ``folder:mode-or-method``."""
    folder, _, column = spec.partition(":")
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
        better = "lower" if metric == "log_ppl" else "higher"
        print(f"{metric} ({better} is better): {b_spec} - {a_spec} = {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] "
              f"over {len(shared)} {'questions' if kind_a == 'qa' else 'windows'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
