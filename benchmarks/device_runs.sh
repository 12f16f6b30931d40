#!/usr/bin/env bash
# The GPU runs behind benchmarks/results/, as sent to a multi-GPU H100 host through the device tool.
# From the repository root, with .whl/site.tgz (scripts/make_gpu_site.sh) and .whl/tok carried:
#
#   bash benchmarks/device_runs.sh single   # 8B rows, one GPU each, 4 at a time (+ a profile)
#   bash benchmarks/device_runs.sh scaling  # multi_gpu.json: K = 1, 2, 4 for the 1B and 8B shapes
#   bash benchmarks/device_runs.sh suite    # pytest -m gpu (2 GPUs: the NCCL tests) beside more rows
#   bash benchmarks/device_runs.sh final    # the suite again, beside 1B scaling at 20 steps and two 8B rows
#   bash benchmarks/device_runs.sh rows-1b  # (one GPU) the rows the one-GPU table still lacks; rows-8b too
#   bash benchmarks/device_runs.sh rows-8b-same-card  # (one GPU) 8B lean/fast vs TRL+Unsloth at 2x4 and 8x1
#   bash benchmarks/device_runs.sh packing  # (one GPU) padded vs packed micro-batches + the GPU packing tests
#
# Results go to $OUT (the device tool's folder) or ./device-out. Each single-GPU run gets its own
# compile caches, so every row's first step (and so its e2e time) compiles from cold, as a user's would.
set -u
source scripts/gpu_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-device-out}; mkdir -p "$OUT"
MODELS=/tmp/dpo-bench-models
T0=$(date +%s)

models() {
  for shape in "$@"; do
    [ -f "$MODELS/$shape/config.json" ] || python -c "from benchmarks.workload import SHAPES, make_model; \
make_model(SHAPES['$shape'], '$MODELS/$shape')" || echo "could not make $shape"
  done
}

# one GPU_ID SYSTEM VARIANT SHAPE MICRO ACCUM [extra args]: a single-GPU run in the background
one() {
  local gpu=$1 system=$2 variant=$3 shape=$4 micro=$5 accum=$6; shift 6
  local name="${shape}_${system}_${variant//+/_}_${micro}x${accum}${TAG:+_$TAG}"
  local cache=/tmp/cache-$name; rm -rf "$cache"; mkdir -p "$cache"
  CUDA_VISIBLE_DEVICES=$gpu UNSLOTH_COMPILE_LOCATION=$cache/unsloth TORCHINDUCTOR_CACHE_DIR=$cache/inductor \
    TRITON_CACHE_DIR=$cache/triton timeout 420 taskset -c "${CPUS:-0-$(( $(nproc) - 1 ))}" python -m benchmarks.system --system "$system" --variant "$variant" \
    --shape "$shape" --model-dir "$MODELS/$shape" --micro-batch "$micro" --grad-accum "$accum" --steps 8 --warmup 2 \
    --out "$OUT/run_$name.json" "$@" > "/tmp/log_$name.txt" 2>&1 &
}

# `accelerate launch --multi_gpu` on GPUs 0,1: 2 steps of the hf backend on a small random Llama.
launch_with_accelerate() {
  DPO_TOKENIZER_DIR=$PWD/.whl/tok python -m tests.gpu.runs make-model /tmp/acc-model > /dev/null 2>&1 || return 1
  python -c "import json; print(''.join(json.dumps({'prompt': f'Q{i}: add {i} and {i}?', 'chosen': f' {2*i}.', \
'rejected': f' {2*i+1}?'}) + '\n' for i in range(16)), end='')" > /tmp/acc.jsonl
  CUDA_VISIBLE_DEVICES=0,1 DPO_TOKENIZER_DIR=$PWD/.whl/tok timeout 240 accelerate launch --multi_gpu --num_processes 2 \
    --num_machines 1 --mixed_precision no --dynamo_backend no -m dpo.train --model /tmp/acc-model \
    --dataset /tmp/acc.jsonl --output-dir /tmp/acc-run --backend hf --device cuda --max-steps 2 \
    --per-device-batch-size 2 --max-length 64
  echo "accelerate exit code $?"; cat /tmp/acc-run/metrics.jsonl
}

case "${1:-}" in
  single)
    nvidia-smi -L
    models llama3-8b-qlora
    one 0 ours-unsloth base llama3-8b-qlora 2 4 --profile
    one 1 ours-unsloth precompute+lean llama3-8b-qlora 2 4
    one 2 ours-unsloth lean llama3-8b-qlora 2 4
    one 3 trl-unsloth base llama3-8b-qlora 2 4
    wait
    ;;
  scaling)
    models llama3.2-1b-lora llama3-8b-qlora
    python -m benchmarks.multi_gpu --shapes llama3.2-1b-lora llama3-8b-qlora --gpus 1 2 4 \
      --out "$OUT/multi_gpu.json" --deadline-s 470 --run-timeout-s 150
    ;;
  suite)
    models llama3.2-1b-lora llama3-8b-qlora
    one 2 ours-unsloth precompute+no-ckpt llama3-8b-qlora 2 4 --profile
    one 3 ours-unsloth precompute+lean llama3-8b-qlora 8 1
    CUDA_VISIBLE_DEVICES=0,1 DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/gpu_equivalence.json \
      timeout 500 python -m pytest -m gpu -q -p no:cacheprovider tests/ > "$OUT/gpu_suite.txt" 2>&1
    wait
    ;;
  final)
    # GPUs 0,1 and cores 0-31: the GPU suite. GPUs 2,3 and cores 32-63: 1B scaling at 20 steps, a
    # profile of 1B on 2 GPUs, then two 8B rows side by side, then 8B scaling if time is left.
    models llama3.2-1b-lora llama3-8b-qlora
    CUDA_VISIBLE_DEVICES=0,1 DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/gpu_equivalence.json \
      timeout 540 taskset -c 0-31 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_unsloth.py \
      tests/test_distributed.py tests/test_memory_options.py > "$OUT/gpu_suite.txt" 2>&1 &
    suite=$!
    (wait $suite 2>/dev/null; launch_with_accelerate > "$OUT/accelerate.txt" 2>&1) &
    suite=$!
    export CUDA_VISIBLE_DEVICES=2,3
    taskset -c 32-63 python -m benchmarks.multi_gpu --shapes llama3.2-1b-lora --gpus 1 2 --steps 20 --warmup 4 \
      --out "$OUT/multi_gpu_1b.json" --run-timeout-s 150
    taskset -c 32-63 timeout 150 python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.system \
      --system ours-unsloth --variant precompute+no-ckpt --shape llama3.2-1b-lora --model-dir $MODELS/llama3.2-1b-lora \
      --micro-batch 2 --grad-accum 4 --steps 8 --warmup 2 --profile --out "$OUT/profile_1b_k2.json" > /tmp/log_prof.txt 2>&1
    unset CUDA_VISIBLE_DEVICES
    CPUS=32-47 one 2 ours-unsloth precompute+lean llama3-8b-qlora 2 4
    CPUS=48-63 one 3 ours-unsloth precompute llama3-8b-qlora 2 4
    wait $(jobs -p | grep -v "^$suite$")
    if [ $(( $(date +%s) - T0 )) -lt 400 ]; then
      CUDA_VISIBLE_DEVICES=2,3 taskset -c 32-63 python -m benchmarks.multi_gpu --shapes llama3-8b-qlora --gpus 1 2 \
        --steps 12 --warmup 2 --out "$OUT/multi_gpu_8b.json" --run-timeout-s 120 --deadline-s 60
    fi
    wait $suite
    tail -n 15 "$OUT/gpu_suite.txt"
    ;;
  rows-1b|rows-8b)
    # Rows still missing from the one-GPU table (issue 6), one at a time on one GPU (nvidia-h100-x1),
    # each beside a fresh TRL+Unsloth 2x4 baseline; merge $OUT/gpu_throughput.json into the committed one.
    if [ "$1" = rows-1b ]; then shape=llama3.2-1b-lora; runs="trl-unsloth:base:2x4 ours-unsloth:precompute+no-ckpt:2x4 \
trl-unsloth-precompute:base:2x4 trl-hf:base:2x4 ours-hf:base:2x4 ours-unsloth:precompute+no-ckpt:8x1 trl-unsloth:base:8x1"
    else shape=llama3-8b-qlora; runs="trl-unsloth:base:2x4 ours-unsloth:precompute+lean:2x4 ours-unsloth:lean:2x4 \
ours-hf:base:2x4 ours-unsloth:precompute+lean:8x1 trl-hf:base:8x1"; fi
    python -m benchmarks.run --shape $shape --runs $runs --out "$OUT/gpu_throughput.json" --deadline-s 480 --hard-stop-s 570
    ;;
  rows-8b-same-card)
    # (one GPU) ours lean and fast beside TRL+Unsloth at 2x4 and 8x1, all five on one card in one call
    python -m benchmarks.run --shape llama3-8b-qlora --runs trl-unsloth:base:2x4 trl-unsloth:base:8x1 \
      ours-unsloth:precompute+lean:8x1 ours-unsloth:precompute+lean:2x4 ours-unsloth:precompute+no-ckpt:2x4 \
      --out "$OUT/gpu_throughput.json" --deadline-s 470 --hard-stop-s 570
    ;;
  packing)
    # (one GPU, about 8 min) packed == padded on the GPU (tests/test_gpu_packing.py), then forward+backward
    # time and peak, padded vs packed, over the 64 benchmark pairs, beside the planner's predicted peak.
    models llama3.2-1b-lora llama3-8b-qlora
    DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/gpu_equivalence_packing.json timeout 240 \
      python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_packing.py > "$OUT/gpu_packing_suite.txt" 2>&1
    tail -n 5 "$OUT/gpu_packing_suite.txt"
    for spec in "llama3-8b-qlora unsloth" "llama3-8b-qlora unsloth --no-ckpt" "llama3-8b-qlora hf" \
                "llama3.2-1b-lora unsloth --no-ckpt"; do
      read -r shp be flag <<< "$spec"; name="packing_${shp}_${be}${flag:+_nockpt}"
      timeout 150 python -m benchmarks.packing --shape "$shp" --backend "$be" $flag --model-dir "$MODELS/$shp" \
        --micro-batches 2 8 --out "$OUT/$name.json" > "/tmp/log_$name.txt" 2>&1 || echo "$name failed"
    done
    ;;
  h200-a|h200-b)
    # (one H200) rows through dpo.train.run, each with fresh compile caches, one at a time; TRL+Unsloth 2x4 in
    # each call, so every row has its baseline in its own batch. a: the unplanned row of before (ours-unsloth
    # base, no speed flags) and the planned default (ours-cli); b: the planned runs under a memory budget.
    if [ "$1" = h200-a ]; then runs="trl-unsloth:base:2x4 ours-unsloth:base:2x4 ours-cli:base:2x4"
    else runs="trl-unsloth:base:2x4 ours-cli:base:2x4:6.71 ours-cli:base:2x4:16"; fi
    python -m benchmarks.run --shape llama3-8b-qlora --runs $runs --out "$OUT/gpu_throughput_h200.json" \
      --batch "$1 $(date -u +%FT%H:%M)" --deadline-s 470 --hard-stop-s 560 --run-timeout-s 200
    ;;
  h200-c)
    # (one H200) the 1B bf16 LoRA rows (TRL+Unsloth and ours-cli), then where ours-cli's 8B step goes
    # (torch.profiler over two steps: GPU busy share), each with fresh compile caches.
    models llama3.2-1b-lora
    python -m benchmarks.run --shape llama3.2-1b-lora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 \
      --out "$OUT/gpu_throughput_h200_1b.json" --batch "h200-c $(date -u +%FT%H:%M)" --deadline-s 200 \
      --hard-stop-s 230 --run-timeout-s 110
    models llama3-8b-qlora
    one 0 ours-cli base llama3-8b-qlora 2 4 --profile
    wait
    ;;
  h200-profile)
    # (one H200) where ours-cli's 8B step goes: torch.profiler over two steps after warm-up (GPU busy share)
    models llama3-8b-qlora
    one 0 ours-cli base llama3-8b-qlora 2 4 --profile
    wait
    ;;
  h200-last)
    # (one H200, about 9 minutes) one batch: TRL+Unsloth 2x4 and ours-cli (no memory flag; profiled at steps 3-4,
    # timed after them) over 50 steps, then ours-cli under a 16 GiB budget. OBJ_TESTS (optional): GPU tests to
    # run while the 8B model is made, before anything is timed.
    models llama3-8b-qlora &
    if [ -n "${OBJ_TESTS:-}" ]; then
      DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/eq_objectives.json UNSLOTH_COMPILE_LOCATION=/tmp/uc-obj \
        timeout 240 python -m pytest -m gpu -q -p no:cacheprovider --basetemp=/tmp/pt-obj $OBJ_TESTS \
        > "$OUT/suite_objectives.txt" 2>&1 &
    fi
    wait; tail -n 3 "$OUT/suite_objectives.txt" 2>/dev/null
    batch="h200-last $(date -u +%FT%H:%M)"; f="$OUT/gpu_throughput_h200.json"
    python -m benchmarks.run --shape llama3-8b-qlora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 --steps 50 --profile \
      --out "$f" --batch "$batch" --deadline-s 300 --hard-stop-s 420 --run-timeout-s 300
    python -m benchmarks.run --shape llama3-8b-qlora --runs ours-cli:base:2x4:16 --steps 12 --merge --out "$f" \
      --batch "$batch" --deadline-s 60 --hard-stop-s 150 --run-timeout-s 150
    ;;
  h200-where)
    # (one H200, about 8 minutes) the GPU tests not re-run since their last change, while the models are made;
    # then one batch: 1B TRL+Unsloth 2x4 and ours-cli (20 steps), and ours-cli 8B with no memory flag and under
    # 16 GiB (12 steps). Each of ours is profiled at steps 3-4: the GPU busy share, and where the host was while
    # the GPU waited (idle_s_per_step). Results in /tmp/res, then one JSON and one log to $OUT (8 files at most).
    models llama3.2-1b-lora llama3-8b-qlora &
    for f in tests/test_gpu_unsloth.py tests/test_diskspace.py; do
      n=$(basename "$f" .py)
      DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/eq_$n.json UNSLOTH_COMPILE_LOCATION=/tmp/uc-$n \
        timeout 240 python -m pytest -m gpu -q -p no:cacheprovider --basetemp=/tmp/pt-$n "$f" > "/tmp/suite_$n.txt" 2>&1 &
    done
    wait
    for f in /tmp/suite_*.txt; do echo "== $f"; tail -n 25 "$f"; done > "$OUT/suites.txt"; grep -h "passed\|failed" /tmp/suite_*.txt
    mkdir -p /tmp/res; batch="h200-where $(date -u +%FT%H:%M)"; f=/tmp/res/gpu_throughput_h200.json
    python -m benchmarks.run --shape llama3.2-1b-lora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 --steps 20 \
      --profile --out "$f" --batch "$batch" --deadline-s 150 --hard-stop-s 210 --run-timeout-s 150
    python -m benchmarks.run --shape llama3-8b-qlora --runs ours-cli:base:2x4 ours-cli:base:2x4:16 --steps 12 \
      --profile --merge --out "$f" --batch "$batch" --deadline-s 110 --hard-stop-s 220 --run-timeout-s 110
    cp "$f" "$OUT/"
    ;;
  h200-end)
    # (one H200, about 6 minutes) the 1B batch again with the profiler's summary out of the timed steps
    # (TRL+Unsloth 2x4 and ours-cli, 20 steps, ours profiled), then the Unsloth GPU tests h200-where's time
    # limit cut (the two DPO ones passed there).
    models llama3.2-1b-lora
    mkdir -p /tmp/res; f=/tmp/res/gpu_throughput_h200.json
    python -m benchmarks.run --shape llama3.2-1b-lora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 --steps 20 \
      --profile --out "$f" --batch "h200-end $(date -u +%FT%H:%M)" --deadline-s 130 --hard-stop-s 190 --run-timeout-s 130
    cp "$f" "$OUT/"
    DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/eq_test_gpu_unsloth.json UNSLOTH_COMPILE_LOCATION=/tmp/uc-u \
      timeout $(( 420 - ($(date +%s) - T0) )) python -m pytest -m gpu -q -p no:cacheprovider --basetemp=/tmp/pt-u \
      tests/test_gpu_unsloth.py -k "orpo or hf_backend or chunked" > "$OUT/suite_test_gpu_unsloth.txt" 2>&1
    tail -n 5 "$OUT/suite_test_gpu_unsloth.txt"
    ;;
  h200-final)
    # (one H200) one batch: TRL+Unsloth 2x4 and ours-cli (no memory flag) over 50 steps (pairs/s and the 50-step
    # end to end), then ours-cli under the two memory budgets (12 steps), then a profiled ours-cli run for the
    # GPU busy share. Every run with fresh compile caches, one at a time.
    batch="h200-final $(date -u +%FT%H:%M)"; f="$OUT/gpu_throughput_h200.json"
    python -m benchmarks.run --shape llama3-8b-qlora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 --steps 50 \
      --out "$f" --batch "$batch" --deadline-s 300 --hard-stop-s 330 --run-timeout-s 250
    python -m benchmarks.run --shape llama3-8b-qlora --runs ours-cli:base:2x4:6.71 ours-cli:base:2x4:16 --steps 12 \
      --merge --out "$f" --batch "$batch" --deadline-s 120 --hard-stop-s 150 --run-timeout-s 90
    [ $(( $(date +%s) - T0 )) -lt 470 ] && { TAG=profile one 0 ours-cli base llama3-8b-qlora 2 4 --profile; wait; }
    ;;
  h200-close)
    # (one H200, about 8 minutes) one batch for every 8B target of issue 14, all through dpo.train.run with the
    # fixed harness (the profiler's summary out of the timed steps): TRL+Unsloth 2x4 and ours-cli (no memory flag,
    # profiled at steps 3-4, timed after them) over 50 steps, then ours-cli under a budget equal to the peak
    # TRL+Unsloth just measured, then under 16 GiB (12 steps each).
    models llama3-8b-qlora
    mkdir -p /tmp/res; f=/tmp/res/gpu_throughput_h200.json; batch="h200-close $(date -u +%FT%H:%M)"
    python -m benchmarks.run --shape llama3-8b-qlora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 --steps 50 --profile \
      --out "$f" --batch "$batch" --deadline-s 280 --hard-stop-s 400 --run-timeout-s 260
    cp "$f" "$OUT/"
    peak=$(python -c "import json; r=[r for r in json.load(open('$f'))['runs'] if r['system']=='trl-unsloth']; \
print(f\"{r[0]['peak_mem_gib']:.2f}\")" 2>/dev/null) || { echo "no TRL+Unsloth peak in $f: no budget row"; exit 1; }
    echo "TRL+Unsloth peak in this batch: $peak GiB"
    python -m benchmarks.run --shape llama3-8b-qlora --runs ours-cli:base:2x4:$peak ours-cli:base:2x4:16 --steps 12 \
      --merge --out "$f" --batch "$batch" --deadline-s 120 --hard-stop-s 240 --run-timeout-s 115
    cp "$f" "$OUT/"
    ;;
  h200-tests)
    # (one H200, under 9 minutes) the Unsloth GPU tests earlier calls' time limits cut (ORPO, the hf backend,
    # the chunked LM head; the two DPO ones passed in h200-where) beside every plan's equivalence run, each file
    # in its own process (they check numbers, not time, so they may share the card). `h200-tests rest`: the
    # other GPU files, the same way.
    gpu_test() {  # NAME pytest-args...: one pytest process in the background, its results under $OUT
      local n=$1; shift
      DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/eq_$n.json UNSLOTH_COMPILE_LOCATION=/tmp/uc-$n \
        timeout 520 python -m pytest -m gpu -q -p no:cacheprovider --basetemp=/tmp/pt-$n "$@" > "$OUT/suite_$n.txt" 2>&1 &
    }
    case "${2:-}" in
      rest)  # the rest of `pytest -m gpu` on one card (test_distributed's cases need two GPUs)
        gpu_test test_gpu_unsloth_dpo tests/test_gpu_unsloth.py -k "not (orpo or hf_backend or chunked)"
        gpu_test test_gpu_kernel tests/test_gpu_kernel.py
        gpu_test test_gpu_packing tests/test_gpu_packing.py
        gpu_test test_memory_options tests/test_memory_options.py
        gpu_test test_diskspace tests/test_diskspace.py ;;
      *)
        gpu_test test_gpu_unsloth tests/test_gpu_unsloth.py -k "orpo or hf_backend or chunked"
        gpu_test test_gpu_plans tests/test_gpu_plans.py ;;
    esac
    wait
    for f in "$OUT"/suite_*.txt; do echo "$f: $(tail -n 1 "$f")"; done
    ;;
  h200-suite)
    # (one H200) the GPU suite, one pytest process per file at once (the card has room; these check numbers,
    # not time), then ours-cli's 8B step with and without dpo/unsloth_varlen.py, one after the other.
    models llama3-8b-qlora
    pids=()
    for f in tests/test_gpu_kernel.py tests/test_gpu_unsloth.py tests/test_gpu_packing.py tests/test_gpu_plans.py \
             tests/test_memory_options.py ${EXTRA_TESTS:-}; do
      n=$(basename "$f" .py)
      DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/eq_$n.json UNSLOTH_COMPILE_LOCATION=/tmp/uc-$n \
        timeout 420 python -m pytest -m gpu -q -p no:cacheprovider --basetemp=/tmp/pt-$n "$f" > "$OUT/suite_$n.txt" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    for f in "$OUT"/suite_*.txt; do echo "$f: $(tail -n 1 "$f")"; done
    TAG=varlen one 0 ours-cli base llama3-8b-qlora 2 4; wait
    TAG=novarlen one 0 ours-cli base llama3-8b-qlora 2 4 --no-varlen; wait
    ;;
  h200-diag)
    # (one H200) where ours-cli's 8B launches come from (host ops by calling stack), beside the GPU test
    # that every plan trains like the run as asked (correctness only: the two share the card).
    models llama3-8b-qlora
    DPO_TOKENIZER_DIR=$PWD/.whl/tok DPO_GPU_RESULTS=$OUT/gpu_equivalence_plans.json timeout 500 \
      python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_plans.py > "$OUT/gpu_plans_suite.txt" 2>&1 &
    one 0 ours-cli base llama3-8b-qlora 2 4 --profile --profile-stacks
    wait
    tail -n 15 "$OUT/gpu_plans_suite.txt"
    ;;
  *) echo "usage: $0 single|scaling|suite|final|rows-1b|rows-8b|rows-8b-same-card|packing|h200-a|h200-b|h200-c|h200-profile|h200-diag|h200-suite|h200-final|h200-last|h200-where|h200-end|h200-close|h200-tests"; exit 2 ;;
esac
echo "phase ${1} took $(( $(date +%s) - T0 )) s"
tail -n 3 /tmp/log_*.txt 2>/dev/null | cut -c1-400
exit 0
