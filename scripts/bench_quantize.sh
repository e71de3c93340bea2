#!/usr/bin/env bash
# Quantized decoders side by side, one setting after the other on an otherwise idle machine:
# TTFT / TTIT in both modes, decoder weight bytes, peak RSS (`refrag bench ttft`) and the quality cost on the
# perplexity protocol (`refrag eval perplexity`, held-out wiki). Results: runs/quantize/{ttft,ppl}-SETTING.json.
#   bash scripts/bench_quantize.sh [LIMIT] [LENGTH]
set -euo pipefail
limit=${1:-40}
length=${2:-1024}
out=runs/quantize
mkdir -p "$out"
for q in none int8 int4; do
  flag=()
  [ "$q" = none ] || flag=(--quantize "$q")
  refrag bench ttft --lengths "$length" --repeats 3 --batch 0 --dtype float32 "${flag[@]}" --json > "$out/ttft-$q.json"
  refrag eval perplexity --data ../shared/data/wiki_paragraph_segmentation_en.txt --s 512 --o 128 --limit "$limit" \
    --dtype float32 "${flag[@]}" --json > "$out/ppl-$q.json"
  echo "$q done"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| decoder | weights MiB | peak RSS MiB | TTFT full / refrag (s) | TTIT full / refrag (ms) | log-ppl full | log-ppl REFRAG16 |")
print("|---|---|---|---|---|---|---|")
for q in ("none", "int8", "int4"):
    t, p = json.loads((out / f"ttft-{q}.json").read_text()), json.loads((out / f"ppl-{q}.json").read_text())
    r = t["rows"][0]
    lp = p["log_ppl"]
    refrag = next(v for k, v in lp.items() if k.startswith("refrag"))
    print(f"| {q} | {t['decoder_weight_bytes'] / 2**20:.0f} | {t['peak_rss_bytes'] / 2**20:.0f} | "
          f"{r['ttft_full_s']:.3f} / {r['ttft_cached_s']:.3f} | {1e3 * r['ttit_full_s']:.1f} / {1e3 * r['ttit_refrag_s']:.1f} | "
          f"{lp['full']:.4f} | {refrag:.4f} |")
PY
