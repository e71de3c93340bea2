#!/usr/bin/env bash
# Issue 17's retrieval measurements on an index over NQ passages (evaluation data: never trained on):
# answer-contained / decoder positions with and without relevance filtering, and `ask --questions` throughput
# batched vs one at a time. Run alone on the machine.   bash scripts/measure_nq_index.sh [LIMIT]
set -euo pipefail
limit=${1:-100}
bash scripts/nq_index.sh
refrag eval qa --data runs/nq-sub.jsonl --index runs/nq-index --passages 3 --limit "$limit" --modes full,refrag \
  --dtype float32 --out runs/qa-nofilter
refrag eval qa --data runs/nq-sub.jsonl --index runs/nq-index --passages 3 --limit "$limit" --modes full,refrag \
  --relative-score 0.9 --dedup 0.8 --dtype float32 --out runs/qa-filter
rm -f runs/nq-answers-b8.jsonl runs/nq-answers-b1.jsonl
refrag ask runs/nq-index --questions runs/nq-questions.jsonl --out runs/nq-answers-b8.jsonl --batch-size 8 --dtype float32
refrag ask runs/nq-index --questions runs/nq-questions.jsonl --out runs/nq-answers-b1.jsonl --batch-size 1 --dtype float32
