#!/usr/bin/env bash
# An index over the gold passages of the first 2,000 NQ rows (evaluation data: never trained on), with the default
# compressor: runs/nq-sub.jsonl (the rows), runs/nq-passages.jsonl (unique passages), runs/nq-questions.jsonl (48
# questions for `ask --questions`), runs/nq-index. Kept when already built.   bash scripts/nq_index.sh
set -euo pipefail
mkdir -p runs
[ -d runs/nq-index ] && [ -f runs/nq-sub.jsonl ] && [ -f runs/nq-questions.jsonl ] && exit 0
python - <<'PY'
import json
rows = [json.loads(l) for l in open("../shared/data/nq_bigbench.jsonl")][:2000]
with open("runs/nq-sub.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
seen = set()
with open("runs/nq-passages.jsonl", "w") as f:
    for r in rows:
        if r["context"] not in seen:
            seen.add(r["context"])
            f.write(json.dumps({"text": r["context"]}) + "\n")
with open("runs/nq-questions.jsonl", "w") as f:
    f.writelines(json.dumps({"id": str(i), "question": r["question"]}) + "\n" for i, r in enumerate(rows[:48]))
PY
refrag index build runs/nq-passages.jsonl --out runs/nq-index --dtype float32 --json > runs/nq-index.json
