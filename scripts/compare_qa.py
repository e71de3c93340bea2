"""Paired comparison of two `refrag eval qa --out` runs (e.g. one model before and after SFT), on the questions
both answered: answer-contained / F1 of B minus A with a paired-bootstrap 95% interval.

    python scripts/compare_qa.py runs/qa-before:refrag+lexical10% runs/qa-after:refrag+lexical10%
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refrag.eval.metrics import paired_bootstrap


def records(spec: str) -> dict[str, dict]:
    folder, _, mode = spec.partition(":")
    rows = [json.loads(line) for line in (Path(folder) / "examples.jsonl").read_text().splitlines() if line.strip()]
    return {r["question"]: r for r in rows if r["mode"] == mode}


def main(a_spec: str, b_spec: str) -> None:
    a, b = records(a_spec), records(b_spec)
    shared = [q for q in a if q in b]
    if not shared:
        sys.exit(f"no question is in both {a_spec} and {b_spec}")
    for metric in ("contains", "f1"):
        d = paired_bootstrap([b[q][metric] for q in shared], [a[q][metric] for q in shared])
        print(f"{metric}: {b_spec} - {a_spec} = {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over {len(shared)} questions")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
