"""One benchmark run: one system, one shape, one micro-batch, in a process of its own (so peak
memory is its own, and unsloth's patches stay in the processes that import it).

    python -m benchmarks.system --system ours-unsloth --shape llama3-8b-qlora --model-dir DIR \
        --micro-batch 2 --grad-accum 4 --steps 8 --warmup 2 --out run.json [--variant NAME ...]

Timing: `e2e_s` runs from the start of trainer set-up (tokenization, any reference precompute,
optimizer) to the end of the last step, model load excluded; `step_s` and `tokens_per_s` average
the steps after `--warmup` (the first step compiles). Tokens are TRL's count: non-pad tokens of
prompt+chosen and prompt+rejected rows.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import time

from benchmarks.workload import H100_BF16_DENSE_PEAK, SHAPES, pair_rows

SYSTEMS = ("ours-cli", "ours-unsloth", "ours-hf", "trl-unsloth", "trl-unsloth-precompute", "trl-hf")
# Our optimisations, each a row on the table (see README): names -> TrainConfig changes.
# "lean": the input-embedding table in CPU memory and a 128-token LM-head chunk; "precompute+lean" also
# runs the reference pass at the training micro-batch, so no pass holds more rows than training does.
LEAN = {"embeddings_on_cpu": True, "logprob_chunk": 128}
VARIANTS = {
    "base": {},
    "precompute": {"precompute_ref": True},
    "no-ckpt": {"gradient_checkpointing": False},
    "precompute+no-ckpt": {"precompute_ref": True, "gradient_checkpointing": False},
    "lean": LEAN,
    "precompute+lean": {"precompute_ref": True, "precompute_at_micro_batch": True, **LEAN},
}
LR, BETA, LORA_R, LORA_ALPHA, MAX_LENGTH = 5e-5, 0.1, 16, 16, 1024
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_mem_gib": None, "peak_reserved_gib": None}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def summarise(step_ends: list[float], tokens_after: list[int], setup_start: float, warmup: int, pairs_per_step: int):
    """Per-step times from the wall-clock ends of each step (after a device sync)."""
    measured = len(step_ends) - warmup
    t0 = step_ends[warmup - 1] if warmup > 0 else setup_start
    span = step_ends[-1] - t0
    tokens = tokens_after[-1] - (tokens_after[warmup - 1] if warmup > 0 else 0)
    return {"step_s": span / measured, "tokens_per_s": tokens / span, "pairs_per_s": measured * pairs_per_step / span,
            "e2e_s": step_ends[-1] - setup_start, "measured_steps": measured, "total_tokens": tokens_after[-1],
            "first_step_s": step_ends[0] - setup_start}


def busy_shares(profile: dict, timed_step_s: float) -> dict:
    """The GPU's busy share of a step, two ways.

    gpu_busy_share        kernel time / wall time of the profiled steps. The profiler's own host cost is in
                          that wall time, and a host-bound step is slowed by it (8B on an H200: 0.36 s a
                          profiled step against 0.30 s a timed one), so this is a lower bound.
    gpu_busy_share_timed  kernel time of a profiled step / the mean timed step (no profiler running): the
                          same kernels over the step as the user's run takes it. An estimate: the profiled
                          steps are two of the run's micro-batches, the timed ones the rest.
    """
    kernel_s_per_step = profile["kernel_time_s"] / profile["profiled_steps"]
    return {"gpu_busy_share": profile["gpu_busy_frac"], "gpu_busy_share_timed": kernel_s_per_step / timed_step_s}


def write_pairs(rows: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows)
    return path


def run_ours(a, rows, out: dict) -> None:
    """Ours through `dpo.train.run`, the function `python -m dpo.train` calls: the rows as a data file, a
    run folder of its own; hooks only read the clock (after the model is built, after each step)."""
    if a.system == "ours-unsloth" or (a.system == "ours-cli" and a.device == "cuda"):
        import unsloth  # noqa: F401  (before transformers/peft; ours-cli's backend auto picks it on CUDA)
    import tempfile

    import torch

    from dpo.config import TrainConfig
    from dpo.train import RunHooks, run

    variant = dict(VARIANTS[a.variant])
    if variant.pop("precompute_at_micro_batch", False):
        variant["precompute_ref_batch_size"] = a.micro_batch
    folder = tempfile.mkdtemp(prefix="dpo-bench-")
    data = write_pairs(rows, os.path.join(folder, "pairs.jsonl"))
    # ours-cli: what `python -m dpo.train` does with no speed flags (the backend and the plan its own);
    # ours-unsloth / ours-hf: that backend, unplanned, with the variant's flags.
    backend = {"ours-cli": "auto", "ours-unsloth": "unsloth", "ours-hf": "hf"}[a.system]
    budget = (a.memory_budget or "auto") if a.system == "ours-cli" else "none"
    cfg = TrainConfig(model=a.model_dir, dataset=data, output_dir=os.path.join(folder, "run"), backend=backend,
                      memory_budget=budget, load_in_4bit=a.load_in_4bit, max_length=MAX_LENGTH,
                      per_device_batch_size=a.micro_batch, grad_accum=a.grad_accum, max_steps=a.steps,
                      learning_rate=LR, beta=BETA, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                      optim="adamw_8bit" if a.device == "cuda" else "adamw_torch", shuffle=False,
                      dtype="bfloat16" if a.device == "cuda" else "float32", device=a.device, **variant)
    if a.no_varlen:  # the change's A/B: Unsloth's own packed attention (one SDPA call per sequence run)
        import dpo.unsloth_varlen

        dpo.unsloth_varlen.use_torch_varlen = lambda: "left as is (--no-varlen)"
    cuda = a.device.startswith("cuda") and torch.cuda.is_available()
    t = time.perf_counter()
    ends, tokens, computed, marks = [], [], [], {}
    profiler = start_profiler(a, out) if a.profile else None

    def model_built(model):
        sync()
        marks["setup_start"] = time.perf_counter()
        out["load_s"] = marks["setup_start"] - t
        out["model_mem_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A profiled run times the steps after the profiled ones (the profiler slows the steps it watches).
    timed_from = a.warmup + (PROFILED_STEPS if profiler is not None else 0)

    def step_done(row):
        sync()
        # The profiler first: after its last profiled step it summarises the trace (seconds), which must
        # fall in that step, never timed, not in the first timed one.
        if profiler is not None:
            profiler.step()
        ends.append(time.perf_counter())
        tokens.append(row["num_tokens"])
        computed.append(row["tokens_computed"])
        if len(ends) == 1 and cuda:  # weights + LoRA + optimizer state, between steps
            out["after_first_step_mem_gib"] = torch.cuda.memory_allocated() / 2**30
        if len(ends) == a.steps:
            write_row(a, {**out, **summarise(ends, tokens, marks["setup_start"], timed_from,
                                             a.micro_batch * a.grad_accum * world), **AT_LAST_STEP})

    result = run(cfg, hooks=RunHooks(model_built=model_built, step_done=step_done))
    out.update(summarise(ends, tokens, marks["setup_start"], timed_from, a.micro_batch * a.grad_accum * world))
    out["warmup_steps"] = timed_from
    if "profile" in out:
        out.update(busy_shares(out["profile"], out["step_s"]))
    out["final_loss"] = result["history"][-1]["loss"]
    out["gpus"] = world
    out["entry_point"] = "dpo.train.run"
    out["memory_budget_gib"] = float(a.memory_budget) if a.memory_budget not in (None, "auto", "none") else None
    out["predicted_peak_gib"] = result.get("predicted_peak_gib")  # the plan's, when one was made
    timed = slice(timed_from, None) if len(computed) > timed_from else slice(None)
    totals = [0] + tokens  # num_tokens is a running total of the unshared sequences' real tokens
    out["prefix_sharing"] = result["layout"] == "shared"
    out["layout"] = result["layout"]
    out["tokens_computed"] = sum(computed[timed]) / len(computed[timed])  # per step: positions the forwards ran
    unshared = [b - a for a, b in zip(totals, totals[1:])][timed]
    out["tokens_unshared"] = sum(unshared) / len(unshared)  # per step: real tokens of prompt+chosen, prompt+rejected
    planned = result["config"]
    out["ran_as"] = {k: planned[k] for k in ("backend", "per_device_batch_size", "grad_accum", "gradient_checkpointing",
                                             "packing", "prefix_sharing", "precompute_ref", "logprob_chunk",
                                             "embeddings_on_cpu")}


PROFILED_STEPS = 2


def start_profiler(a, out: dict):
    """torch.profiler over the two steps after warm-up: where the GPU time goes, and how much is idle."""
    from benchmarks import profile

    return profile.StepProfiler(warmup=a.warmup, active=PROFILED_STEPS, out=out, stacks=a.profile_stacks)


def run_trl(a, rows, out: dict) -> None:
    if a.system.startswith("trl-unsloth"):
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t = time.perf_counter()
    peft_config = None
    if a.system.startswith("trl-unsloth"):
        model, tok = FastLanguageModel.from_pretrained(model_name=a.model_dir, max_seq_length=MAX_LENGTH,
                                                       load_in_4bit=a.load_in_4bit, dtype=None)
        model = FastLanguageModel.get_peft_model(model, r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth", random_state=0)
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        kw = {"dtype": torch.bfloat16 if a.device == "cuda" else torch.float32}
        if a.load_in_4bit:
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16,
                                                           bnb_4bit_use_double_quant=True)
            kw["device_map"] = {"": 0}
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kw)
        if not a.load_in_4bit:
            model = model.to(a.device)
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM")
    sync()
    out["load_s"] = time.perf_counter() - t
    ends, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == a.steps and logs and "loss" in logs:  # the last step's row is in
                done = [int(r["num_tokens"]) for r in state.log_history if "num_tokens" in r and "loss" in r]
                write_row(a, {**out, **summarise(ends, done, setup_start, a.warmup, a.micro_batch * a.grad_accum),
                              **AT_LAST_STEP})

    setup_start = time.perf_counter()
    args = DPOConfig(output_dir="/tmp/trl-bench", per_device_train_batch_size=a.micro_batch,
                     gradient_accumulation_steps=a.grad_accum, max_steps=a.steps, learning_rate=LR, beta=BETA,
                     max_length=MAX_LENGTH, optim="adamw_8bit" if a.device == "cuda" else "adamw_torch",
                     bf16=a.device == "cuda", use_cpu=a.device == "cpu", logging_steps=1, report_to=[],
                     save_strategy="no", train_sampling_strategy="sequential", warmup_steps=0,
                     precompute_ref_log_probs=a.system == "trl-unsloth-precompute", dataloader_num_workers=0,
                     disable_tqdm=True)
    import contextlib

    kernel = contextlib.nullcontext()
    if a.device == "cpu":  # TRL's log-prob kernel is Triton-only: use the tested pure-torch stand-in
        from tests.trl_cpu_kernel import use_cpu_kernel

        kernel = use_cpu_kernel()
    with kernel:
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_config, callbacks=[Timer()])
        trainer.train()
    tokens = [int(r["num_tokens"]) for r in trainer.state.log_history if "num_tokens" in r and "loss" in r]
    out.update(summarise(ends, tokens, setup_start, a.warmup, a.micro_batch * a.grad_accum))
    out["final_loss"] = [r for r in trainer.state.log_history if "loss" in r][-1]["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=SYSTEMS, required=True)
    ap.add_argument("--variant", choices=tuple(VARIANTS), default="base")
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--grad-accum", type=int, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true",
                    help="profile two steps after warm-up (our systems; see benchmarks/profile.py); summary in --out")
    ap.add_argument("--no-varlen", action="store_true",
                    help="ours: leave Unsloth's packed attention as torch 2.11 gets it (dpo/unsloth_varlen.py off)")
    ap.add_argument("--profile-stacks", action="store_true",
                    help="with --profile: also count host ops per step by the Python stack that called them")
    ap.add_argument("--memory-budget", default=None,
                    help="ours-cli: dpo.train's --memory-budget (GiB, auto or none; default auto)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stacks-file", default=None,
                    help="SIGUSR1 writes every thread's Python stack here (the harness asks where a run hangs)")
    a = ap.parse_args()
    if a.stacks_file:
        stacks = open(a.stacks_file, "w")  # kept open for the process's life: the handler writes to its fd
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)

    shape = SHAPES[a.shape]
    a.load_in_4bit = shape.load_in_4bit and a.device == "cuda"
    a.model_dir = os.path.abspath(a.model_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun every rank builds the same pairs
    rows = pair_rows(a.steps * a.micro_batch * a.grad_accum * world)
    out = {"system": a.system, "variant": a.variant, "shape": a.shape, "micro_batch": a.micro_batch,
           "grad_accum": a.grad_accum, "steps": a.steps, "warmup_steps": a.warmup}
    try:
        (run_ours if a.system.startswith("ours") else run_trl)(a, rows, out)
    except Exception as e:  # noqa: BLE001  (recorded as the run's result; the harness goes on)
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    row = write_row(a, out)
    if row is not None:
        print(json.dumps(row), flush=True)


def write_row(a, out: dict) -> dict | None:
    """The run's row as it stands, with peak memory and MFU, to `a.out` (written whole, then renamed: the
    harness takes a present file as a result). Rank 0 writes (its own peak memory; the speed counts every
    rank's tokens); other ranks write nothing and get None."""
    row = {**out, **memory()}
    if "tokens_per_s" in row and a.device == "cuda":
        row["mfu"] = 8 * SHAPES[a.shape].matmul_params() * row["tokens_per_s"] / H100_BF16_DENSE_PEAK / row.get("gpus", 1)
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    tmp = f"{a.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=2)
    os.replace(tmp, a.out)
    return row


# Marks a row written at the last step, before the run returned: if the run then hangs (saving, closing,
# exiting), the harness still has the measured numbers; the complete row replaces it when the run returns.
AT_LAST_STEP = {"written": "at the last step, before the run returned"}


if __name__ == "__main__":
    main()
