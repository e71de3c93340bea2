#!/usr/bin/env bash
# Issue 14's equal-latency comparison on retrieved passages (scripts/nq_index.sh: NQ, evaluation data only): full
# context with the top 3 passages against refrag + the default policy (lexical-passage, 10%) with the top 3, 8 and
# 16 (and full with the top 8), the same questions; each run reports answer-contained, decoder positions and TTFT
# p50. Run alone.
#   bash scripts/measure_equal_latency.sh [LIMIT]
set -euo pipefail
limit=${1:-300}
bash scripts/nq_index.sh
common=(--data runs/nq-sub.jsonl --index runs/nq-index --limit "$limit" --seed 0)
refrag eval qa "${common[@]}" --passages 3 --modes full,refrag --policy lexical-passage --expand-fraction 0.1 --out runs/eqlat-3
for n in 8 16; do
  refrag eval qa "${common[@]}" --passages "$n" --modes refrag --policy lexical-passage --expand-fraction 0.1 --out "runs/eqlat-$n"
done
refrag eval qa "${common[@]}" --passages 8 --modes full --out runs/eqlat-8-full
