"""The benchmark harness's own arithmetic (the measurements themselves run on the GPU, not in CI)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import multi_gpu, profile, run

ROOT = Path(__file__).resolve().parents[1]


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=20))
def test_busy_time_is_the_length_of_the_union_of_kernel_intervals(spans):
    intervals = [(float(s), float(s + n)) for s, n in spans]
    covered = {t for s, n in spans for t in range(s, s + n)}  # unit cells of the integer line
    assert profile.union_length(intervals) == len(covered)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15)), max_size=15),
       st.lists(st.tuples(st.integers(0, 60), st.integers(1, 30), st.sampled_from("abc")), max_size=8),
       st.integers(0, 20), st.integers(1, 60))
def test_idle_time_goes_to_the_innermost_host_region_open_meanwhile(spans, regions, w0, width):
    """Cell by cell on the integer line: an idle cell (no kernel) counts for the shortest region covering it."""
    busy = [(float(s), float(s + n)) for s, n in spans]
    spans_named = [(float(s), float(s + n), name) for s, n, name in regions]
    window = (float(w0), float(w0 + width))
    expected: dict[str, float] = {}
    for t in range(w0, w0 + width):
        if any(s <= t < s + n for s, n in spans):
            continue
        covering = [(e - s, name) for s, e, name in spans_named if s <= t < e]
        name = min(covering)[1] if covering else profile.OUTSIDE
        expected[name] = expected.get(name, 0.0) + 1.0
    got = profile.idle_by_region(busy, spans_named, window)
    assert got == pytest.approx(expected)
    assert sum(got.values()) == pytest.approx(sum(b - a for a, b in profile.idle_intervals(busy, window)))


def test_a_profiled_run_says_where_the_host_was_while_the_device_waited(tmp_path):
    """benchmarks.system --profile on CPU (tiny shape): no kernels, so the whole profiled window is idle, and
    it is split over the trainer's named spans (dpo:forward, dpo:backward, ...) and the loop between steps."""
    model_dir = tmp_path / "tiny"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", "from benchmarks.workload import SHAPES, make_model; "
                    f"make_model(SHAPES['tiny'], {str(model_dir)!r}, device='cpu')"], cwd=ROOT, env=env, check=True)
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "benchmarks.system", "--system", "ours-hf", "--shape", "tiny", "--model-dir",
           str(model_dir), "--micro-batch", "2", "--grad-accum", "2", "--steps", "5", "--warmup", "1", "--device",
           "cpu", "--profile", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prof = json.loads(out.read_text())["profile"]
    host, idle = prof["host_s_per_step"], prof["idle_s_per_step"]
    assert {"dpo:data", "dpo:forward", "dpo:backward", "dpo:metrics", "dpo:clip", "dpo:optimizer"} <= set(host)
    assert host["dpo:forward"] >= host["dpo:data"] > 0  # data is collated inside the forward's span
    steps = prof["profiled_steps"]  # wall_s covers them all; the spans are per step
    assert prof["gpu_busy_s"] == 0 and sum(idle.values()) * steps == pytest.approx(prof["wall_s"], rel=0.05)
    assert idle["dpo:backward"] == pytest.approx(host["dpo:backward"], rel=1e-6)  # nothing nests in it
    row = json.loads(out.read_text())
    assert row["gpu_busy_share"] == 0 and row["gpu_busy_share_timed"] == 0  # no kernels on the CPU


def test_the_timed_busy_share_is_a_profiled_steps_kernel_time_over_a_timed_step():
    from benchmarks.system import busy_shares

    prof = {"profiled_steps": 2, "kernel_time_s": 0.4, "gpu_busy_frac": 0.5}  # 0.2 s of kernels a step
    assert busy_shares(prof, timed_step_s=0.25) == {"gpu_busy_share": 0.5, "gpu_busy_share_timed": pytest.approx(0.8)}


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


def test_every_run_compiles_from_fresh_empty_caches(tmp_path):
    env = {"PATH": "/bin", "TRITON_CACHE_DIR": "/shared/triton"}
    a, b = run.fresh_compile_caches(env, str(tmp_path)), run.fresh_compile_caches(env, str(tmp_path))
    for var in run.COMPILE_CACHE_VARS:
        assert a[var] != b[var] and Path(a[var]).is_relative_to(tmp_path)
        assert not os.path.exists(a[var]) or not os.listdir(a[var])  # nothing an earlier run compiled
    assert a["PATH"] == "/bin" and env["TRITON_CACHE_DIR"] == "/shared/triton"  # the caller's env is untouched


def test_measure_gives_each_run_its_own_caches_and_never_reads_an_old_result(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    out = tmp_path / "res" / "gpu.json"
    out.parent.mkdir()
    (out.parent / ".run-ours-hf-base-1x1.json").write_text('{"pairs_per_s": 99}')  # left by an older call
    seen = []

    def fake_run_child(cmd, timeout, env, result, grace_s, stacks_file):
        seen.append({v: env[v] for v in run.COMPILE_CACHE_VARS})
        target = Path(cmd[cmd.index("--out") + 1])
        assert target == result
        if "trl-hf" in cmd:  # writes its result; ours-hf crashes before writing; trl-unsloth leaves half a file
            target.write_text(json.dumps({"system": "trl-hf", "variant": "base", "shape": "tiny", "micro_batch": 1,
                                          "grad_accum": 1, "pairs_per_s": 1.0}))
        elif "trl-unsloth" in cmd:
            target.write_text('{"system": "trl-uns')
        return run.Outcome(returncode=0)

    monkeypatch.setattr(run, "run_child", fake_run_child)
    args = argparse.Namespace(out=str(out), merge=False, device="cpu", steps=2, warmup=1, shape="tiny",
                              model_root=str(tmp_path / "models"),
                              runs=["trl-hf:base:1x1", "ours-hf:base:1x1", "trl-unsloth:base:1x1"],
                              deadline_s=100, hard_stop_s=100, run_timeout_s=100)
    run.measure(args)
    assert len(seen) == 3 and len({s[v] for s in seen for v in run.COMPILE_CACHE_VARS}) == 9
    runs = json.loads(out.read_text())["runs"]
    assert runs[0]["pairs_per_s"] == 1.0 and runs[0]["compile_caches"] == "cold"
    assert runs[1]["error"] == "FileNotFoundError"  # not the 99 pairs/s an older call left behind
    assert runs[2]["error"] == "JSONDecodeError" and "compile_caches" not in runs[2]


def test_run_group_kills_the_whole_group_on_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run.run_group(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1.0)
    pid = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline:  # the grandchild is gone (or a zombie nobody reaps in a container)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the child's own child {pid} outlived the timeout")


def _row(system, batch, micro, accum, pairs, e2e, peak, caches="cold", **extra):
    return {"system": system, "variant": "base", "shape": "s", "micro_batch": micro, "grad_accum": accum,
            "pairs_per_s": pairs, "tokens_per_s": 1.0, "step_s": 1.0, "e2e_s": e2e, "peak_mem_gib": peak,
            "mfu": 0.1, "batch": batch, "compile_caches": caches, **extra}


def _rows(results):
    return {line.split("|")[2].strip() + line.split("|")[3]: line for line in run.table(results).splitlines()
            if line.startswith("| s |")}


def test_table_compares_each_run_with_trl_unsloth_of_the_same_batch_and_micro_batch():
    results = {"runs": [_row("trl-unsloth", "B", 2, 4, 4.0, 60.0, 8.0), _row("trl-unsloth", "A", 2, 2, 3.0, 60.0, 8.0),
                        _row("trl-unsloth", "A", 2, 4, 2.0, 60.0, 8.0),
                        _row("ours-unsloth", "A", 2, 4, 5.0, 30.0, 4.0, caches="warm"),
                        _row("ours-unsloth", "A", 8, 1, 9.0, 10.0, 9.0)]}
    rows = _rows(results)
    # against A's 2x4 (2.0 pairs/s), not B's 2x4 (4.0) nor A's 2x2 (3.0), though both come first
    assert rows["ours-unsloth [A] 2 x 4 "].endswith("| 2.50x, 2.00x°, 0.50x |")
    assert rows["ours-unsloth [A] 8 x 1 "].endswith("| — |")  # no TRL+Unsloth at 8x1 in batch A
    assert rows["trl-unsloth [A] 2 x 4 "].endswith("| — |")
    assert "| 30° |" in rows["ours-unsloth [A] 2 x 4 "] and "earlier run on the same machine" in run.table(results)


def test_a_failed_baseline_is_no_baseline_and_a_warm_baseline_marks_the_ratio():
    failed = {"runs": [{**_row("trl-unsloth", "A", 2, 4, 0, 0, 0), "error": "TimeoutExpired"},
                       _row("ours-unsloth", "A", 2, 4, 5.0, 30.0, 4.0)]}
    assert _rows(failed)["ours-unsloth [A] 2 x 4 "].endswith("| — |")
    warm_base = {"runs": [_row("trl-unsloth", "A", 2, 4, 2.0, 60.0, 8.0, caches="warm"),
                          _row("ours-unsloth", "A", 2, 4, 5.0, 30.0, 4.0)]}
    assert _rows(warm_base)["ours-unsloth [A] 2 x 4 "].endswith("| 2.50x, 2.00x°, 0.50x |")


def test_a_cpu_run_without_peak_memory_renders():
    cpu = {"runs": [_row("trl-unsloth", None, 2, 4, 2.0, 60.0, None, mfu=None), _row("ours-unsloth", None, 2, 4, 5.0, 30.0, None)]}
    assert _rows(cpu)["ours-unsloth 2 x 4 "].endswith("| — | 10.0% | 2.50x, 2.00x, — |")


def test_end_to_end_compares_runs_of_equal_steps_and_a_planned_row_names_its_budget_and_prediction():
    results = {"runs": [_row("trl-unsloth", "A", 2, 4, 2.0, 60.0, 8.0, steps=50),
                        _row("ours-cli", "A", 2, 4, 8.0, 20.0, 20.0, steps=50, predicted_peak_gib=21.5),
                        _row("ours-cli", "A", 2, 4, 6.0, 10.0, 6.0, steps=12, memory_budget_gib=6.95)]}
    rows = _rows(results)
    assert rows["ours-cli [A] 2 x 4 "].endswith("| 20.00 (21.50) | 10.0% | 4.00x, 3.00x, 2.50x |")
    # 12 steps against TRL's 50: no end-to-end ratio, the steady-state ones stand
    assert rows["ours-cli --memory-budget 6.95 [A] 2 x 4 "].endswith("| 6.00 | 10.0% | 3.00x, —, 0.75x |")


def test_runs_of_two_batches_are_two_rows_when_merged():
    assert run.key(_row("trl-unsloth", "D", 2, 4, 1, 1, 1)) != run.key(_row("trl-unsloth", "E", 2, 4, 1, 1, 1))


@pytest.mark.parametrize("args, message", [
    (["benchmarks.run", "--render", "no/such/results.json"], "--render: no such results file: no/such/results.json"),
    (["benchmarks.run", "--render", "benchmarks/results/gpu_h100_variants.json", "--section", "nowhere"],
     "docs/benchmarks.md has no '<!-- nowhere:start -->'"),
    (["benchmarks.multi_gpu", "--render", "no/such/multi.json"], "--render: no such results file"),
    (["benchmarks.run", "--render", "benchmarks/results/gpu_h200_vs_peers.json", "--section", "gpu-h200-vs-peers",
      "--batches", "no-such-batch"], "--batches: no run of gpu_h200_vs_peers.json is in batch no-such-batch"),
])
def test_render_refuses_a_missing_file_or_section_in_one_line_and_leaves_the_page(args, message):
    page = run.DOC.read_text()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert run.DOC.read_text() == page


def test_every_rendered_section_of_the_benchmarks_page_names_a_results_file_that_exists():
    """The markers --render writes into are on docs/benchmarks.md, each with its raw numbers' file."""
    import re

    page = run.DOC.read_text()
    sections = re.findall(r"<!-- ([\w-]+):start -->(.*?)<!-- \1:end -->", page, re.S)
    assert {"gpu-h200-vs-peers", "gpu-h100-variants", "multi-gpu"} <= {name for name, _ in sections}
    for name, body in sections:
        raw = re.search(r"Raw numbers: `([^`]+)`", body)
        assert raw and (ROOT / raw.group(1)).is_file(), name
        for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", body):
            assert (run.DOC.parent / png).is_file(), png


# A child that measures its row, writes it (atomically, as benchmarks.system does) and then does not exit.
HANGING_CHILD = """
import faulthandler, json, os, signal, sys, time
args = sys.argv[1:]
out, stacks = args[args.index("--out") + 1], args[args.index("--stacks-file") + 1]
faulthandler.register(signal.SIGUSR1, file=open(stacks, "w"), all_threads=True)
row = {"system": args[args.index("--system") + 1], "variant": "base", "shape": "tiny", "micro_batch": 2,
       "grad_accum": 4, "steps": 50, "pairs_per_s": 26.83, "e2e_s": 55.3, "peak_mem_gib": 26.18}
with open(out + ".tmp", "w") as f:
    json.dump(row, f)
os.replace(out + ".tmp", out)
print(json.dumps(row), flush=True)
def stuck_on_the_way_out():
    time.sleep(600)
stuck_on_the_way_out()
"""


@pytest.mark.parametrize("timeout, grace_s, exit_says", [(4.0, 600.0, "timeout after 4 s"),
                                                          (600.0, 1.0, "hung at exit")])
def test_a_row_whose_child_wrote_its_result_and_then_hangs_keeps_its_numbers_and_says_where(
        tmp_path, monkeypatch, timeout, grace_s, exit_says):
    monkeypatch.setattr(run, "CHILD", ["-c", HANGING_CHILD])
    t = time.time()
    res = run.measure_row(run.parse_run("ours-cli:base:2x4"), shape="tiny", model_dir=tmp_path, steps=50, warmup=2,
                          device="cpu", out_dir=tmp_path, timeout=timeout, batch="B", grace_s=grace_s)
    assert time.time() - t < 60  # killed at the timeout, or soon after the result: never left to run
    assert "error" not in res and res["pairs_per_s"] == 26.83 and res["e2e_s"] == 55.3 and res["batch"] == "B"
    assert res["exit"].startswith(exit_says)
    assert "stuck_on_the_way_out" in res["hang_stacks"]  # where it hangs, from the child's own stacks


def test_a_row_that_writes_nothing_before_its_timeout_is_a_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "CHILD", ["-c", "import time; time.sleep(600)"])
    res = run.measure_row(run.parse_run("trl-unsloth:base:2x4"), shape="tiny", model_dir=tmp_path, steps=8, warmup=2,
                          device="cpu", out_dir=tmp_path, timeout=2.0, batch="B")
    assert res["error"] == "TimeoutExpired" and res["exit"] == "timeout after 2 s" and "pairs_per_s" not in res


def test_timeouts_follow_the_card():
    from benchmarks.suites import card_factor

    assert card_factor("NVIDIA H200") == 1.0
    assert card_factor("NVIDIA H100 80GB HBM3") > 1.3  # the same rows ran 1.3x to 1.5x slower on an H100
    assert card_factor("CPU (2 cores)") == 1.0


def test_a_suite_scales_its_timeouts_to_the_card_and_sets_a_budget_at_the_peak_its_peer_just_measured(
        tmp_path, monkeypatch):
    from benchmarks import suites

    suite = suites.Suite("t", "?", "t.json", budget_s=10_000, rows=(
        suites.Row("trl-unsloth:base:2x4", steps=12, timeout_s=100),
        suites.Row("ours-cli:base:2x4", steps=12, budget=suites.PEAK + "trl-unsloth:base:2x4", timeout_s=50),
        suites.Row("ours-cli:base:2x4", steps=12, budget=suites.PEAK + "trl-unsloth-precompute:base:8x1")))
    monkeypatch.setattr(run, "begin", lambda *a, **k: ({"runs": [], "device": "NVIDIA H100 80GB HBM3"}, tmp_path))
    calls = []

    def fake_row(r, **kw):
        calls.append((r, kw["timeout"], kw["steps"]))
        return {**r, "shape": kw["shape"], "batch": kw["batch"], "peak_mem_gib": 6.7123, "pairs_per_s": 1.0,
                "tokens_per_s": 1.0, "step_s": 1.0, "e2e_s": 1.0, "mfu": None}

    monkeypatch.setattr(run, "measure_row", fake_row)
    out = run.run_suite(suite, tmp_path, str(tmp_path))
    factor = suites.card_factor("NVIDIA H100 80GB HBM3")
    assert [c[1] for c in calls] == [pytest.approx(100 * factor), pytest.approx(50 * factor)]
    assert calls[1][0]["memory_budget_gib"] == 6.71  # the peak TRL+Unsloth measured in this batch
    results = json.loads(out.read_text())  # the third row's peer never ran: no row, no guess
    assert len(results["runs"]) == 2 and results["batch"].startswith("t ") and results["suite"] == "t"
    assert all(r["batch"] == results["batch"] and r["device"] == "NVIDIA H100 80GB HBM3" for r in results["runs"])


def test_a_suite_runs_within_a_budget_given_on_the_command_line(tmp_path, monkeypatch):
    """--budget-s replaces the suite's declared budget (a shorter device call): rows past it are not started,
    and a budget of zero or less is refused in one line."""
    seen = []
    monkeypatch.setattr(run, "run_suite", lambda suite, results_dir, model_root: seen.append(suite))
    monkeypatch.setattr(sys, "argv", ["run", "--suite", "gpu-8b-vs-peers", "--budget-s", "300"])
    run.main()
    assert seen[0].budget_s == 300 and seen[0].rows == run.SUITES["gpu-8b-vs-peers"].rows
    monkeypatch.setattr(sys, "argv", ["run", "--suite", "gpu-tests", "--budget-s", "0"])
    with pytest.raises(SystemExit) as refused:
        run.main()
    assert refused.value.code == 2 and len(seen) == 1

def test_our_row_is_written_at_its_last_step_before_the_run_returns(tmp_path, monkeypatch):
    """A run that hangs after its last step (saving the adapter, closing, exiting) still leaves its numbers."""
    import dpo.train
    from benchmarks import system, workload

    out = tmp_path / "row.json"
    seen = {}

    def fake_run(cfg, argv=None, hooks=None):
        hooks.model_built(None)
        for step in range(1, cfg.max_steps + 1):
            time.sleep(0.01)
            hooks.step_done({"step": step, "num_tokens": 100 * step, "tokens_computed": 80, "loss": 0.69})
        seen.update(json.loads(out.read_text()))  # on disk while the run has yet to return
        return {"history": [{"loss": 0.69}], "predicted_peak_gib": None, "layout": "shared",
                "config": {k: 1 for k in ("backend", "per_device_batch_size", "grad_accum", "gradient_checkpointing",
                                          "packing", "prefix_sharing", "precompute_ref", "logprob_chunk",
                                          "embeddings_on_cpu")}}

    monkeypatch.setattr(dpo.train, "run", fake_run)
    a = argparse.Namespace(system="ours-hf", variant="base", shape="tiny", model_dir=str(tmp_path), micro_batch=1,
                           grad_accum=2, steps=3, warmup=1, device="cpu", load_in_4bit=False, profile=False,
                           profile_stacks=False, no_varlen=False, memory_budget=None, out=str(out))
    row = {"system": "ours-hf", "steps": 3}
    system.run_ours(a, workload.pair_rows(6), row)
    assert seen["written"] == system.AT_LAST_STEP["written"] and seen["measured_steps"] == 2
    assert seen["pairs_per_s"] == pytest.approx(row["pairs_per_s"]) and seen["tokens_per_s"] > 0
    assert "written" not in row  # the complete row, written when the run returns, drops the mark
    assert row["prefix_sharing"] and (row["tokens_computed"], row["tokens_unshared"]) == (80, 100)
