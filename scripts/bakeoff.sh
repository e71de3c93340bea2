#!/usr/bin/env bash
# Chunk-encoder bake-off at equal CPU budget (docs/training.md "Encoder bake-off"): stage 1, 1 x 16
# reconstruction, each arm for MINUTES of wall time alone on the machine, then held-out reconstruction
# (teacher-forced and greedy) on 128 chunks the compressor never trained on.
#   bash scripts/bakeoff.sh [MINUTES] [ARMS...]      e.g. bash scripts/bakeoff.sh 15 self minilm tokens
# Arms: minilm (all-MiniLM-L6-v2), mpnet (all-mpnet-base-v2), self (decoder's first 8 layers + LoRA, mean),
# self-memory (the same, memory-token pooling), tokens (token embeddings + one mixing layer).
# Outputs: runs/bake-ARM/{metrics.csv, checkpoint/, eval.json}; scripts/bakeoff_report.py makes the table + plot.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-15}
shift || true
ARMS=${*:-self minilm tokens}
HELD_OUT=../shared/data/wiki_paragraph_segmentation_en.txt
for arm in $ARMS; do
  case $arm in
    minilm) enc=(--encoder all-minilm-l6-v2) ;;
    mpnet) enc=(--encoder mpnet) ;;
    self) enc=(--encoder self --encoder-layers 8 --pooling mean) ;;
    self-memory) enc=(--encoder self --encoder-layers 8 --pooling memory) ;;
    tokens) enc=(--encoder tokens) ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
  esac
  out=runs/bake-$arm
  refrag train reconstruct "${enc[@]}" --out "$out" --data ../shared/data/wiki_vital_summaries_en.jsonl \
    --max-chunks 1 --steps 3000 --batch-size 32 --micro-batch-size 32 --lr 5e-4 --train-decoder lora \
    --lora-rank 16 --eval-every 0 --save-every 20 --max-minutes "$MINUTES" ${BAKEOFF_FLAGS:-}
  refrag eval reconstruction --model "$out/checkpoint/model" --data "$HELD_OUT" --max-chunks 1 --examples 128 \
    --greedy --json > "$out/eval.json"
done
