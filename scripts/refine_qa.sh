#!/usr/bin/env bash
# Refined chunk encodings on question answering, paired: two indexes over the SAME passages (the gold passages of
# the first N NQ rows: evaluation data, never trained on), one plain and one with `--refine-steps 10`, so retrieval
# is identical and only the stored chunk encodings differ; then the same questions through each. Also prints each
# build's chunk-encoding and refinement seconds. Run alone (it times the builds).
#   bash scripts/refine_qa.sh [N]
set -euo pipefail
n=${1:-100}
mkdir -p runs
python - "$n" <<'PY'
import json, sys
n = int(sys.argv[1])
rows = [json.loads(l) for l in open("../shared/data/nq_bigbench.jsonl")][:n]
with open(f"runs/nq-sub{n}.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
with open(f"runs/nq-passages{n}.jsonl", "w") as f:
    f.writelines(json.dumps({"text": c}) + "\n" for c in dict.fromkeys(r["context"] for r in rows))
PY
for kind in plain refined; do
  extra=(); [ "$kind" = refined ] && extra=(--refine-steps 10)
  refrag index build "runs/nq-passages$n.jsonl" --out "runs/nq$n-index-$kind" "${extra[@]}" --json > "runs/nq$n-index-$kind.json"
  refrag eval qa --data "runs/nq-sub$n.jsonl" --index "runs/nq$n-index-$kind" --limit "$n" --seed 0 --passages 3 \
    --modes refrag --policy lexical-passage --expand-fraction 0.1 --out "runs/qa-nq$n-$kind"
done
cat "runs/nq$n-index-plain.json" "runs/nq$n-index-refined.json"
for mode in refrag refrag+lexical-passage10%; do
  python scripts/compare_runs.py "runs/qa-nq$n-plain:$mode" "runs/qa-nq$n-refined:$mode"
done
