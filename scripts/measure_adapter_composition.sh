#!/usr/bin/env bash
# Issue 17: what composing the shipped compressor (trained on the base decoder) with a user's LoRA adapter costs.
# Makes a stand-in user adapter (scripts/make_user_adapter.py: rank-8 LoRA, 60 steps of 4 x 256 tokens on the SOTU addresses) once,
# then runs the perplexity protocol on held-out wiki with the base decoder and with the adapter merged.
# Run alone on the machine.   bash scripts/measure_adapter_composition.sh [LIMIT]
set -euo pipefail
limit=${1:-100}
out=runs/adapter-composition
mkdir -p "$out"
[ -d runs/user-adapter ] || python scripts/make_user_adapter.py --out runs/user-adapter | tee "$out/adapter-train.log"
for arm in base adapter; do
  flag=()
  [ "$arm" = base ] || flag=(--decoder-adapter runs/user-adapter)
  refrag eval perplexity --data ../shared/data/wiki_paragraph_segmentation_en.txt --s 512 --o 128 --limit "$limit" \
    --dtype float32 "${flag[@]}" --json > "$out/ppl-$arm.json"
  echo "$arm done"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| decoder | log-ppl no context | full | REFRAG16 | recovered |")
print("|---|---|---|---|---|")
for arm in ("base", "adapter"):
    p = json.loads((out / f"ppl-{arm}.json").read_text())
    lp, rec = p["log_ppl"], p["recovered"]
    name = next(k for k in lp if k.startswith("refrag"))
    print(f"| {arm} | {lp['no_context']:.4f} | {lp['full']:.4f} | {lp[name]:.4f} | {rec[name]:.3f} |")
PY
