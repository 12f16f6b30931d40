"""The Unsloth path on the GPU (`pytest -m gpu`): our loop on a FastLanguageModel (4-bit NF4, LoRA,
Unsloth gradient checkpointing) against UnslothDPOTrainer, and both against our hf backend; and one
objective beyond DPO, ORPO, against UnslothORPOTrainer (Unsloth rewrites trl.experimental.orpo's trainer).

Each run is a subprocess of `tests/gpu/runs.py` (importing unsloth patches libraries process-wide).
Every comparison is recorded through `tests/gpu_results.py` before it is asserted.

Tolerances (bfloat16 has 8 significant bits: unit roundoff u = 2^-8 ~ 0.0039):
* One batch, same model object: the backbone runs the same kernels on the same inputs, so only the
  LM head differs (Unsloth swaps TRL's log-prob kernel for its own fused kernel; ours is a bf16 matmul
  + float32 log-softmax). Rounding a logit to bfloat16 moves its log-prob by at most u*|logit| per
  token; over a completion the errors are independent, so summed log-probs agree to a few u relative:
  we allow 2u relative on log-probs, beta * 2u * |logp| on rewards, a quarter of that on the loss
  (|d loss / d margin| <= 1/4), and 8u of the largest gradient on LoRA gradients (the rounding enters
  the logits' gradient too and passes through the bf16 backward of every layer).
* 20 steps: each step adds the one-batch differences and the 8-bit AdamW update amplifies them a
  little; we allow 5% relative on loss and log-probs per step and 0.05 * max|reward| on rewards.
* Unsloth vs hf backend: different kernels everywhere (RMSNorm, RoPE, SwiGLU, fused LoRA), each
  correct to bf16 rounding, so the same 5% per step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from . import gpu_results
from .conftest import run_gpu_mode
from .gpu.runs import ORPO_BETA, ORPO_STEPS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
U = 2.0**-8


def _runs_dir(tmp_path_factory) -> Path:
    """Raw run outputs: $DPO_GPU_RUNS_DIR when set (to keep them), else a temporary folder."""
    keep = os.environ.get("DPO_GPU_RUNS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("runs")


def gpu_mode_result(mode: str, model_dir, tmp_path_factory) -> dict:
    """One mode of tests/gpu/runs.py on the GPU test model, in a process of its own; its JSON."""
    out = _runs_dir(tmp_path_factory) / f"{mode}.json"
    run_gpu_mode(mode, model_dir, out)
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def unsloth_run(model_dir, tmp_path_factory) -> dict:
    return gpu_mode_result("unsloth", model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def hf_run(model_dir, tmp_path_factory) -> dict:
    return gpu_mode_result("hf", model_dir, tmp_path_factory)


def test_one_batch_equals_unsloth_dpo_trainer(unsloth_run):
    assert unsloth_run["trainer_class"].startswith("Unsloth"), unsloth_run["trainer_class"]
    assert unsloth_run["same_batch_tensors"], "our collated batch differs from TRL's collator"
    b = unsloth_run["batch"]
    trl, ours = b["trl"], b["ours"]
    logp_scale = max(abs(trl["logps/chosen"]), abs(trl["logps/rejected"]))
    checks = [
        ("unsloth-batch/logps/chosen", abs(ours["logps/chosen"] - trl["logps/chosen"]), 2 * U * logp_scale),
        ("unsloth-batch/logps/rejected", abs(ours["logps/rejected"] - trl["logps/rejected"]), 2 * U * logp_scale),
        ("unsloth-batch/rewards/chosen", abs(ours["rewards/chosen"] - trl["rewards/chosen"]), 0.1 * 2 * U * logp_scale),
        ("unsloth-batch/rewards/rejected", abs(ours["rewards/rejected"] - trl["rewards/rejected"]),
         0.1 * 2 * U * logp_scale),
        ("unsloth-batch/loss", abs(ours["loss"] - trl["loss"]), 0.25 * 0.1 * 2 * 2 * U * logp_scale),
        ("unsloth-batch/lora_grads", b["grad_max_abs_diff"], 8 * U * b["grad_max_abs"]),
    ]
    entries = [gpu_results.record(n, d, t, ours=ours, trl=trl) for n, d, t in checks]
    assert abs(trl["rewards/margins"]) > 1e-3, "rewards are ~0: the comparison would mean nothing"
    for e in entries:
        assert e["passed"], e


def _compare_histories(name: str, a: list[dict], b: list[dict], steps: int = 20,
                       relative: tuple[str, ...] = ("loss", "logps/chosen", "logps/rejected")) -> list[dict]:
    assert len(a) == len(b) == steps
    entries = []
    reward_scale = max(abs(r[k]) for r in b for k in ("rewards/chosen", "rewards/rejected"))
    for key in relative:
        rel = max(abs(x[key] - y[key]) / max(abs(y[key]), 1e-6) for x, y in zip(a, b))
        entries.append(gpu_results.record(f"{name}/{key} (max relative, {steps} steps)", rel, 0.05))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        d = max(abs(x[key] - y[key]) for x, y in zip(a, b))
        entries.append(gpu_results.record(f"{name}/{key} (max abs, {steps} steps)", d, 0.05 * reward_scale,
                                          reward_scale=reward_scale))
    return entries


def test_twenty_steps_equal_unsloth_dpo_trainer(unsloth_run):
    ours, trl = unsloth_run["ours_history"], unsloth_run["trl_history"]
    entries = _compare_histories("unsloth-20-steps ours vs UnslothDPOTrainer", ours, trl)
    assert abs(trl[-1]["rewards/margins"]) > 1e-2, "training did not move the rewards"
    for e in entries:
        assert e["passed"], e


# --- ORPO: the objective whose TRL trainer Unsloth rewrites (trl.experimental.orpo -> UnslothORPOTrainer) ---


@pytest.fixture(scope="session")
def orpo_run(model_dir, tmp_path_factory) -> dict:
    return gpu_mode_result("orpo", model_dir, tmp_path_factory)


def test_orpo_one_batch_equals_unsloth_orpo_trainer(orpo_run):
    """The DPO check's bounds, on ORPO's numbers: its log-probs are per-token means and its loss is the
    chosen NLL (a mean log-prob too, 2u relative) plus beta * -logsigmoid(log-odds), whose slope is <= 1
    in each log-prob (for log-probs well below 0), so the log-odds get the two log-probs' bounds."""
    assert orpo_run["trainer_class"].startswith("Unsloth"), orpo_run["trainer_class"]
    assert orpo_run["same_batch_tensors"], "our collated batch differs from TRL's concatenated_inputs"
    b = orpo_run["batch"]
    trl, ours = b["trl"], b["ours"]
    beta = ORPO_BETA
    logp_scale = max(abs(trl["logps/chosen"]), abs(trl["logps/rejected"]))
    nll_bound = 2 * U * abs(trl["nll_loss"])
    checks = [
        ("unsloth-orpo-batch/logps/chosen", abs(ours["logps/chosen"] - trl["logps/chosen"]), 2 * U * logp_scale),
        ("unsloth-orpo-batch/logps/rejected", abs(ours["logps/rejected"] - trl["logps/rejected"]),
         2 * U * logp_scale),
        ("unsloth-orpo-batch/rewards/chosen", abs(ours["rewards/chosen"] - trl["rewards/chosen"]),
         beta * 2 * U * logp_scale),
        ("unsloth-orpo-batch/rewards/rejected", abs(ours["rewards/rejected"] - trl["rewards/rejected"]),
         beta * 2 * U * logp_scale),
        ("unsloth-orpo-batch/nll_loss", abs(ours["nll_loss"] - trl["nll_loss"]), nll_bound),
        ("unsloth-orpo-batch/log_odds_chosen", abs(ours["log_odds_chosen"] - trl["log_odds_chosen"]),
         2 * 2 * U * logp_scale),
        ("unsloth-orpo-batch/log_odds_ratio", abs(ours["log_odds_ratio"] - trl["log_odds_ratio"]),
         2 * 2 * U * logp_scale),
        ("unsloth-orpo-batch/loss", abs(ours["loss"] - trl["loss"]), nll_bound + beta * 2 * 2 * U * logp_scale),
        ("unsloth-orpo-batch/lora_grads", b["grad_max_abs_diff"], 8 * U * b["grad_max_abs"]),
    ]
    entries = [gpu_results.record(n, d, t, ours=ours, trl=trl) for n, d, t in checks]
    assert trl["nll_loss"] > 1.0 and trl["logps/chosen"] != trl["logps/rejected"], "nothing was scored"
    for e in entries:
        assert e["passed"], e


def test_orpo_steps_equal_unsloth_orpo_trainer(orpo_run):
    ours, trl = orpo_run["ours_history"], orpo_run["trl_history"]
    entries = _compare_histories("unsloth-orpo ours vs UnslothORPOTrainer", ours, trl, steps=ORPO_STEPS,
                                 relative=("loss", "nll_loss", "logps/chosen", "logps/rejected"))
    for e in entries:
        assert e["passed"], e


def test_twenty_steps_hf_backend_equals_unsloth(unsloth_run, hf_run):
    assert unsloth_run["trl_warmup_steps"] == 0, "the hf run assumes no warmup"
    entries = _compare_histories("ours-hf vs ours-unsloth", hf_run["ours_hf_history"], unsloth_run["ours_history"])
    entries += _compare_histories("ours-hf vs UnslothDPOTrainer", hf_run["ours_hf_history"], unsloth_run["trl_history"])
    for e in entries:
        assert e["passed"], e


def test_chunked_logprobs_fit_where_full_logits_do_not(tmp_path_factory):
    out = _runs_dir(tmp_path_factory) / "memory.json"
    run_gpu_mode("memory", out)
    r = json.loads(out.read_text())
    chunked, full = r["chunked"], r["full"]
    # Recorded as: chunked peak (GiB) against the budget between the two peaks; the full path's peak
    # and whether each fitted the budget ride along.
    gpu_results.record("memory/chunked peak (GiB) vs budget between the two peaks",
                       chunked.get("peak_allocated_gib", float("inf")), r.get("budget_gib", 0.0),
                       chunked_peak_gib=chunked.get("peak_allocated_gib"),
                       full_peak_gib=full.get("peak_allocated_gib"), budget_gib=r.get("budget_gib"),
                       chunked_fits_budget=chunked.get("fits_budget"), full_fits_budget=full.get("fits_budget"))
    assert chunked["peak_allocated_gib"] < full["peak_allocated_gib"]
    assert chunked["fits_budget"] is True and full["fits_budget"] is False
