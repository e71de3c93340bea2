#!/usr/bin/env bash
# Chunk-encoder bake-off at equal CPU budget (docs/training.md "Encoder bake-off"): stage 1, 1 x 16
# reconstruction, each arm for MINUTES of wall time alone on the machine, then held-out reconstruction
# (teacher-forced and greedy) on 128 chunks the compressor never trained on.
#   [STEPS=400] [BAKEOFF_FLAGS=--no-bf16] bash scripts/bakeoff.sh [MINUTES] [ARMS...]
#   e.g. BAKEOFF_FLAGS=--no-bf16 bash scripts/bakeoff.sh 14 self minilm tokens  (fp32 is 7x faster than bf16 on
#   CPUs without AVX512-BF16/AMX; STEPS sets the LR schedule, which should end near the time box)
# Arms: minilm (all-MiniLM-L6-v2), mpnet (all-mpnet-base-v2), self (decoder's first 8 layers + LoRA, mean),
# self-memory (the same, memory-token pooling), tokens (token embeddings + one mixing layer).
# Outputs: runs/bake-ARM/{metrics.csv, checkpoint/, eval.json}; scripts/bakeoff_report.py makes the table + plot.
# Evaluation runs in float32 (EVAL_DTYPE): bf16 is ~7x slower than fp32 on CPUs without AVX512-BF16 / AMX.
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
  if [ ! -d "$out/checkpoint" ]; then  # an arm that already spent its time box is only evaluated
    refrag train reconstruct "${enc[@]}" --out "$out" --data ../shared/data/wiki_vital_summaries_en.jsonl \
      --max-chunks 1 --steps "${STEPS:-400}" --batch-size 32 --micro-batch-size 32 --lr 5e-4 --train-decoder lora \
      --lora-rank 16 --eval-every 0 --save-every 20 --max-minutes "$MINUTES" ${BAKEOFF_FLAGS:-}
  fi
  refrag eval reconstruction --model "$out/checkpoint/model" --data "$HELD_OUT" --max-chunks 1 --examples 128 \
    --dtype "${EVAL_DTYPE:-float32}" \
    --greedy --json > "$out/eval.json.tmp" && mv "$out/eval.json.tmp" "$out/eval.json"
done
