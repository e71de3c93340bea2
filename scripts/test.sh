#!/usr/bin/env bash
# The project's test command (README and CI): install, then run the default suite (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -p no:cacheprovider
