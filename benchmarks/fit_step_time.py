"""Fit the planner's step-time estimate (dpo/plan.py: LAUNCH_S_PER_LAYER, ACHIEVED_FLOPS) to measured steps.

    python -m benchmarks.fit_step_time            # each row: measured vs estimated seconds per step
    python -m benchmarks.fit_step_time --refit    # also the constants a fresh fit gives (to paste into plan.py)

Rows: `python -m dpo.train`'s own runs on the H200 (system ours-cli in benchmarks/results/gpu_h200_vs_peers.json),
each with the setting the plan ran (`ran_as`) and its steady-state seconds per step. The estimate is
max(layer_launches x LAUNCH_S_PER_LAYER, flops / ACHIEVED_FLOPS) + extras: ACHIEVED_FLOPS is the bf16 matmul
rate measured on the card in the same file, LAUNCH_S_PER_LAYER the least-squares host time per layer and pass
over the rows (every row is host-bound: the launches take longer than the matmuls).

Limits: every row runs the step as one micro-batch (8 x 1), so the per-step costs (the optimizer, clipping,
the loop: about 45 ms of the 8B step) are folded into the per-layer constant, and a plan of several
micro-batches is estimated by extrapolation; no row is bound by the matmuls, so that branch is unchecked.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import system
from benchmarks.fit_memory import benchmark_lengths
from benchmarks.run import batch_name
from benchmarks.workload import SHAPES
from dpo import plan as planmod

RESULTS = Path(__file__).resolve().parent / "results"
FILE = "gpu_h200_vs_peers.json"
# Batches whose step times are not the code's as it is: before dpo/unsloth_varlen.py (a slower attention
# call per layer), and h200-last's no-flag row, whose timed steps held the profiler's trace summary.
LEFT_OUT = {("h200-a", None), ("h200-b", 6.71), ("h200-b", 16.0), ("h200-last", None)}


@dataclass(frozen=True)
class StepRow:
    label: str
    work: planmod.StepWork
    step_s: float  # measured, steady state


def choice_ran(run: dict) -> planmod.Choice:
    """The setting a planned run ran (`ran_as`; on CUDA the auto backend is Unsloth: offloaded checkpointing)."""
    r = run["ran_as"]
    ckpt = "offload" if r["gradient_checkpointing"] else "off"
    return planmod.Choice(r["per_device_batch_size"], r["grad_accum"], ckpt, r["packing"], r["precompute_ref"],
                          r["per_device_batch_size"], r["logprob_chunk"], r["embeddings_on_cpu"])


def step_rows(name: str = FILE) -> list[StepRow]:
    rows = []
    for run in json.loads((RESULTS / name).read_text())["runs"]:
        if run.get("system") != "ours-cli" or "error" in run or "ran_as" not in run or not run.get("step_s"):
            continue
        batch = batch_name(run)
        if (batch, run.get("memory_budget_gib")) in LEFT_OUT:
            continue
        shape = SHAPES[run["shape"]]
        model = planmod.ModelShape.from_config(shape.config, load_in_4bit=shape.load_in_4bit, lora_r=system.LORA_R)
        choice = choice_ran(run)
        lengths = benchmark_lengths(run["steps"] * run["micro_batch"] * run["grad_accum"])
        work = planmod.step_work(model, choice, lengths, system.MAX_LENGTH)
        budget = run.get("memory_budget_gib")
        label = (f"{batch} {run['shape']} {choice.micro_batch}x{choice.grad_accum} ckpt {choice.checkpointing}"
                 f"{'' if budget is None else f', budget {budget:g} GiB'}")
        rows.append(StepRow(label, work, run["step_s"]))
    return rows


def matmul_rate(name: str = FILE) -> float:
    """FLOP/s: the bf16 matmul rate benchmarks.run measured on the card (benchmarks.run.matmul_rate)."""
    return json.loads((RESULTS / name).read_text())["matmul_tflops_measured"] * 1e12


def fit(rows: list[StepRow], flops_per_s: float) -> float:
    """LAUNCH_S_PER_LAYER: least squares of step_s - extras = layer_launches x L over the rows, all of which
    must be host-bound under it (else the max() would not be the launch term and the fit would be wrong)."""
    launches = np.array([r.work.layer_launches for r in rows], dtype=np.float64)
    host = np.array([r.step_s - r.work.extras_s for r in rows], dtype=np.float64)
    launch = float(launches @ host / (launches @ launches))
    gpu_bound = [r.label for r in rows if r.work.flops / flops_per_s > r.work.layer_launches * launch]
    if gpu_bound:
        raise ValueError(f"rows bound by the GPU's matmuls, not the host: {gpu_bound}")
    return launch


def table(rows: list[StepRow], launch: float, flops: float) -> str:
    lines = ["| run | measured s/step | estimated | error |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        est = r.work.seconds(launch, flops)
        lines.append(f"| {r.label} | {r.step_s:.3f} | {est:.3f} | {est / r.step_s - 1:+.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refit", action="store_true", help="fit afresh and print the constants too")
    a = ap.parse_args(argv)
    rows = step_rows()
    flops = matmul_rate() if a.refit else planmod.ACHIEVED_FLOPS
    launch = fit(rows, flops) if a.refit else planmod.LAUNCH_S_PER_LAYER
    if a.refit:
        print(f"LAUNCH_S_PER_LAYER = {launch!r}\nACHIEVED_FLOPS = {flops!r}")
    print(table(rows, launch, flops))


if __name__ == "__main__":
    main()
