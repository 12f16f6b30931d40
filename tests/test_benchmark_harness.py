"""The benchmark harness's own arithmetic (the measurements themselves run on the GPU, not in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import multi_gpu, profile

ROOT = Path(__file__).resolve().parents[1]


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=20))
def test_busy_time_is_the_length_of_the_union_of_kernel_intervals(spans):
    intervals = [(float(s), float(s + n)) for s, n in spans]
    covered = {t for s, n in spans for t in range(s, s + n)}  # unit cells of the integer line
    assert profile.union_length(intervals) == len(covered)


def test_kernel_families():
    assert profile.family("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == "4-bit dequantise"
    assert profile.family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert profile.family("nvjet_tst_128x64_64x8_1x1_v_bz_coopB_TNN") == "matmul"
    assert profile.family("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert profile.family("Memcpy HtoD (Pinned -> Device)") == "copy/memset"
    assert profile.family("triton_per_fused_add_mul_0") == "fused (Triton)"
    assert profile.family("void at::native::vectorized_elementwise_kernel<4>") == "other elementwise/reduction"


def test_scaling_efficiency_is_tokens_per_second_over_k_times_one_gpu():
    speed = {"pairs_per_s": 1.0, "step_s": 8.0, "peak_mem_gib": 5.0}
    results = {"runs": [{"shape": "s", "gpus": 1, "tokens_per_s": 1000.0, **speed},
                        {"shape": "s", "gpus": 2, "tokens_per_s": 1900.0, **speed},
                        {"shape": "s", "gpus": 4, "error": "TimeoutExpired"},
                        {"shape": "t", "gpus": 2, "tokens_per_s": 5.0, **speed}]}
    multi_gpu.add_efficiency(results)
    assert results["runs"][0]["efficiency"] == 1.0
    assert results["runs"][1]["efficiency"] == pytest.approx(0.95)
    assert "efficiency" not in results["runs"][2] and "efficiency" not in results["runs"][3]  # no K=1 row for t
    md = multi_gpu.table(results)
    assert "| s | 2 | 1,900 |" in md and "95.0%" in md and "failed: TimeoutExpired" in md


@pytest.mark.slow
def test_a_benchmark_run_under_torchrun_counts_every_ranks_pairs(tmp_path):
    """benchmarks.system on 2 gloo ranks (CPU, tiny shape): one JSON from rank 0, pairs of both ranks."""
    model_dir = tmp_path / "tiny"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", "from benchmarks.workload import SHAPES, make_model; "
                    f"make_model(SHAPES['tiny'], {str(model_dir)!r}, device='cpu')"], cwd=ROOT, env=env, check=True)
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "benchmarks.system", "--system", "ours-hf", "--shape", "tiny", "--model-dir", str(model_dir),
           "--micro-batch", "2", "--grad-accum", "2", "--steps", "3", "--warmup", "1", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "error" not in res, res
    assert res["gpus"] == 2 and res["measured_steps"] == 2
    # 2 ranks x 2 pairs x 2 micro-batches per step: pairs/s is 8 pairs a step over the seconds a step takes
    assert res["pairs_per_s"] == pytest.approx(8 / res["step_s"])


def test_efficiency_compares_runs_of_the_same_pass_only():
    speed = {"step_s": 1.0, "peak_mem_gib": 1.0}
    results = {"runs": [{"pass": "a", "shape": "s", "gpus": 1, "tokens_per_s": 100.0, "pairs_per_s": 10.0, **speed},
                        {"pass": "b", "shape": "s", "gpus": 1, "tokens_per_s": 200.0, "pairs_per_s": 20.0, **speed},
                        {"pass": "b", "shape": "s", "gpus": 2, "tokens_per_s": 360.0, "pairs_per_s": 38.0, **speed}]}
    multi_gpu.add_efficiency(results)
    assert results["runs"][2]["efficiency"] == pytest.approx(0.9)  # against pass b's 200, not pass a's 100
    assert results["runs"][2]["pair_efficiency"] == pytest.approx(0.95)


@pytest.mark.parametrize("spec, message", [
    ("foo", "is not SYSTEM:VARIANT:MICROxACCUM"),
    ("trl-x:base:2x4", "unknown system 'trl-x'"),
    ("ours-hf:fast:2x4", "unknown variant 'fast'"),
    ("ours-hf:base:0x4", "must be >= 1"),
])
def test_a_bad_run_spec_is_one_line_before_anything_runs(spec, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--shape", "tiny", "--runs", spec], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run.py: error: --runs:") and message in last and "Traceback" not in proc.stderr
