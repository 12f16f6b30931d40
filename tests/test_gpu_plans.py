"""Every plan makes the same update (`pytest -m gpu`): 20 steps of ours on the Unsloth backend, each way
the planner can cut a 4-pair step (micro-batch x accumulation, packing, checkpointing, a precomputed
reference, the LM-head chunk; and the planner's own choice on this card, unshared and prefix-shared), against
the 2x2 run as asked.

The pairs per optimizer step are the same in every case, so only float rounding differs (bf16 kernels
on other shapes, sums in another order); the tolerance is the GPU suite's for runs on other kernels:
5% relative per step on loss and log-probs, 5% of the largest reward on rewards (test_gpu_unsloth.py).
"""

from __future__ import annotations

import pytest
import torch

from .test_gpu_unsloth import _compare_histories, gpu_mode_result

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ASKED = "asked 2x2 (no plan)"


@pytest.fixture(scope="module")
def plan_runs(model_dir, tmp_path_factory) -> dict:
    return gpu_mode_result("plans", model_dir, tmp_path_factory)


def test_every_plan_trains_like_the_run_as_asked(plan_runs):
    asked = plan_runs[ASKED]["history"]
    assert abs(asked[-1]["rewards/margins"]) > 1e-2, "training did not move the rewards"
    given = [r["ran_as"] for name, r in plan_runs.items() if not name.startswith("auto plan")]  # auto may equal one
    assert len({tuple(sorted(g.items())) for g in given}) == len(given), f"two cases ran the same way: {given}"
    entries = []
    for name, r in plan_runs.items():
        if name != ASKED:
            entries += _compare_histories(f"plans/{name} {r['ran_as']} vs 2x2", r["history"], asked)
    for e in entries:
        assert e["passed"], e


def test_the_auto_plan_was_a_plan(plan_runs):
    auto = plan_runs["auto plan"]
    assert auto["predicted_peak_gib"] is not None, "memory_budget=auto on CUDA made no plan"
    assert auto["ran_as"]["per_device_batch_size"] * auto["ran_as"]["grad_accum"] == 4


def test_the_auto_plan_shares_prefixes_where_asked(plan_runs):
    """With --prefix-sharing auto the plan takes the shared layout on Unsloth (the prompts here are about as
    long as the completions), and the run ran it; its trajectory is checked with the others above."""
    shared = plan_runs["auto plan, prefix sharing auto"]
    assert shared["ran_as"]["prefix_sharing"] == "auto" and shared["layout"] == "shared", shared["ran_as"]
