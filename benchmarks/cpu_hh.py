"""Real data, real model, on the CPU: SmolLM2-135M-Instruct on HH-RLHF helpful-base, ours and TRL's
DPOTrainer with the same settings, evaluated before and after on the same held-out pairs.

    python -m benchmarks.cpu_hh [--steps 60] [--held-out 120] [--systems ours trl] [--out benchmarks/results]
                                [--model DIR] [--data FILE]

Train rows: the first 90% of the file; held out: the first `--held-out` rows of the last 10%.
Ours runs through `dpo.train.run`, the function `python -m dpo.train` calls. Both systems see the same
pairs in the same order (TRL: sequential sampling; ours: --no-shuffle),
start from the same model with a fresh LoRA (B = 0, so policy == reference at step 0), and are
evaluated by the same function (dpo.evaluation.evaluate_items), TRL's adapter included. Each system
also reports its own steady-state speed (s/step, pairs/s): the CPU benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-helpful-base-test.jsonl.gz"
SETTINGS = dict(max_length=192, per_device_batch_size=8, grad_accum=1, learning_rate=5e-5, beta=0.1, lora_r=16,
                lora_alpha=16, lr_scheduler="linear", warmup_steps=0, seed=0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def split_rows(path: Path, held_out: int):
    from dpo.data.sources import DataSpec, load_rows

    rows = load_rows(DataSpec(path=str(path)))
    cut = int(0.9 * len(rows))
    return rows[:cut], rows[cut : cut + held_out]


def base_model(path: str):
    from dpo import models

    return models.load_model(path, torch.float32, "cpu"), models.load_tokenizer(path)


def evaluate(model, tok, pairs):
    from dpo.eval.evaluation import evaluate_items
    from dpo.loss_settings import LossSettings

    return evaluate_items(model, tok, pairs, loss=LossSettings(beta=SETTINGS["beta"]), batch_size=8,
                          max_length=SETTINGS["max_length"])


def per_step(times: list[float], start: float) -> float:
    """Seconds a step, from the ends of the steps: steady state (after the first) where there are two or more."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[-1] - start


def run_ours(model_path: str, train_rows, eval_pairs, steps: int, log, workdir: Path) -> dict:
    """Ours through `dpo.train.run`, the function `python -m dpo.train` calls (as the GPU benchmark rows run):
    the training rows as a data file, a run folder of its own. The hooks evaluate the model with its fresh
    LoRA before the first step (policy == reference) and read the clock after each step."""
    from dpo import models
    from dpo.config import TrainConfig
    from dpo.train import RunHooks, run

    tok = models.load_tokenizer(model_path)
    data = workdir / "train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                     for r in train_rows)
    cfg = TrainConfig(model=model_path, dataset=str(data), output_dir=str(workdir / "ours"), backend="hf",
                      device="cpu", dtype="float32", max_steps=steps, shuffle=False, **SETTINGS)
    before, times, t0 = {}, [], []

    def model_built(model):
        before.update(evaluate(model, tok, eval_pairs))
        t0.append(time.perf_counter())

    def step_done(row):
        times.append(time.perf_counter())
        log(f"ours step {row['step']}: loss {row['loss']:.4f} acc {row['rewards/accuracies']:.2f}")

    result = run(cfg, hooks=RunHooks(model_built=model_built, step_done=step_done))
    after = evaluate(result["model"], tok, eval_pairs)
    return {"before": before, "after": after, "history": result["history"], "train_s": times[-1] - t0[0],
            "step_s": per_step(times, t0[0])}


def run_trl(model_path: str, train_rows, eval_pairs, steps: int, log, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tests.trl_cpu_kernel import use_cpu_kernel  # TRL's log-prob kernel is Triton-only

    model, tok = base_model(model_path)
    times = []

    class Log(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log(f"trl step {state.global_step}: loss {logs['loss']:.4f} acc {logs.get('rewards/accuracies', 0):.2f}")

    args = DPOConfig(output_dir=str(workdir / "trl"), max_steps=steps, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, learning_rate=SETTINGS["learning_rate"], beta=SETTINGS["beta"],
                     max_length=SETTINGS["max_length"], lr_scheduler_type="linear", warmup_steps=0, seed=0,
                     bf16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                     train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True)
    records = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in train_rows]
    peft = LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"], target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    with use_cpu_kernel():
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                             peft_config=peft, callbacks=[Log()])
        before = evaluate(trainer.model, tok, eval_pairs)
        t0 = time.perf_counter()
        trainer.train()
    after = evaluate(trainer.model, tok, eval_pairs)
    history = [r for r in trainer.state.log_history if "rewards/chosen" in r]
    return {"before": before, "after": after, "history": history, "train_s": times[-1] - t0,
            "step_s": per_step(times, t0)}


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, r in results["systems"].items():
        steps = [h["step"] if "step" in h else i + 1 for i, h in enumerate(r["history"])]
        axes[0].plot(steps, [h["loss"] for h in r["history"]], label=name, alpha=0.8)
        axes[1].plot(steps, [h["rewards/margins"] for h in r["history"]], label=name, alpha=0.8)
    axes[0].set(title="train loss (per step of 8 pairs)", xlabel="step", ylabel="loss")
    axes[1].set(title="train reward margin", xlabel="step", ylabel="beta * (logratio_c - logratio_r)")
    names = list(results["systems"])
    keys = [("eval_length_normalised_accuracy", "length-norm. acc."), ("eval_rewards/accuracies", "reward acc.")]
    width = 0.2
    for i, name in enumerate(names):
        r = results["systems"][name]
        for j, (k, lab) in enumerate(keys):
            axes[2].bar([j + i * 2 * width], [r["before"][k]], width, color="lightgray", edgecolor="k")
            axes[2].bar([j + i * 2 * width + width], [r["after"][k]], width, label=f"{name} after" if j == 0 else None,
                        color=f"C{i}")
    axes[2].set_xticks([j + 1.5 * width for j in range(len(keys))], [lab for _, lab in keys])
    axes[2].set(title=f"held-out ({results['held_out']} pairs): before (grey) / after", ylim=(0, 1))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct, DPO on HH-RLHF helpful-base, 2-core CPU")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--held-out", type=int, default=120)
    ap.add_argument("--systems", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dpo import models, smollm2
    from dpo.data.pairs import prepare_pairs

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = args.model or str(smollm2.plain_copy())
    tok = models.load_tokenizer(model_path)
    train_rows, eval_rows = split_rows(Path(args.data), args.held_out)
    train_pairs, train_report = prepare_pairs(tok, train_rows, SETTINGS["max_length"])
    eval_pairs, _ = prepare_pairs(tok, eval_rows, SETTINGS["max_length"])
    # Both systems get the rows our data layer kept (identical pairs and too-long prompts out), in order.
    kept_ids = [p.row_id for p in train_pairs[: args.steps * 8]]
    by_id = {r.row_id: r for r in train_rows}
    kept_rows = [by_id[i] for i in kept_ids]
    results = {"model": "SmolLM2-135M-Instruct (float32, CPU)" if args.model is None else args.model, "data": Path(args.data).name, "settings": SETTINGS,
               "steps": args.steps, "held_out": len(eval_pairs), "train_rows": len(train_rows),
               "device": f"CPU ({os.cpu_count()} cores)", "systems": {}}
    path = out / "cpu_hh_smollm2.json"
    if path.is_file():  # keep a system measured by an earlier call
        results["systems"] = json.loads(path.read_text()).get("systems", {})

    def log(msg):
        print(msg, flush=True)

    for name in args.systems:
        t = time.time()
        with tempfile.TemporaryDirectory(prefix=f"cpu-hh-{name}-") as work:
            r = (run_ours if name == "ours" else run_trl)(model_path, kept_rows, eval_pairs, args.steps, log, Path(work))
        r["wall_s"] = time.time() - t
        r["pairs_per_s"] = 8 / r["step_s"]
        results["systems"][name] = r
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
        log(f"{name}: before {r['before']['eval_length_normalised_accuracy']:.3f} -> after "
            f"{r['after']['eval_length_normalised_accuracy']:.3f} (length-normalised acc.), reward acc after "
            f"{r['after']['eval_rewards/accuracies']:.3f}, margin {r['after']['eval_rewards/margins']:.3f}; "
            f"{r['step_s']:.1f} s/step")
    plot(results, out / "cpu_hh_smollm2.png")


if __name__ == "__main__":
    main()
