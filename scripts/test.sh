#!/usr/bin/env bash
# Set up .venv with the dev extras, then run the CPU test suite (the GPU suite is `pytest -m gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
