"""Data-parallel scaling: our loop under torchrun on K = 1, 2, 4 GPUs of one host, same per-GPU work.

    python -m benchmarks.multi_gpu --shapes llama3.2-1b-lora llama3-8b-qlora --gpus 1 2 4 \
        --micro-batch 2 --grad-accum 4 --variant precompute+no-ckpt --out benchmarks/results/multi_gpu.json
    python -m benchmarks.multi_gpu --render benchmarks/results/multi_gpu.json   # table + docs/benchmarks.md section

Each run is `torchrun --nproc-per-node K -m benchmarks.system ...` with `--micro-batch` pairs per GPU
(weak scaling: K GPUs take K times the pairs per step). tokens/s counts every rank's tokens (TRL's
count), so the scaling efficiency at K is tokens_per_s(K) / (K * tokens_per_s(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import DOC, ROOT, load, render_target, run_group, save, versions
from benchmarks.system import VARIANTS
from benchmarks.workload import SHAPES

KEEP = ("tokens_per_s", "pairs_per_s", "step_s", "e2e_s", "first_step_s", "peak_mem_gib", "final_loss", "error")


def measure(args) -> None:
    import torch

    from benchmarks.workload import make_model

    started = time.time()
    out = Path(args.out)
    results = load(out) if args.merge else {"runs": []}
    results.update(device=f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", versions=versions(),
                   settings={"system": "ours-unsloth", "variant": args.variant, "micro_batch_per_gpu": args.micro_batch,
                             "grad_accum": args.grad_accum, "steps": args.steps, "warmup_steps_excluded": args.warmup,
                             "scaling": "weak: K GPUs take K x micro-batch pairs per micro-batch"})
    for shape in args.shapes:
        model_dir = Path(args.model_root) / shape
        if not (model_dir / "config.json").is_file():
            make_model(SHAPES[shape], str(model_dir))
        for k in args.gpus:
            if k > torch.cuda.device_count():
                print(f"{shape} K={k}: only {torch.cuda.device_count()} GPUs here, not run", flush=True)
                continue
            if time.time() - started > args.deadline_s:
                print(f"{shape} K={k}: deadline reached, not run", flush=True)
                continue
            run_out = Path(tempfile.gettempdir()) / f"mgpu-{shape}-{k}.json"  # rank 0's raw result
            run_out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
                   "-m", "benchmarks.system", "--system", "ours-unsloth", "--variant", args.variant, "--shape", shape,
                   "--model-dir", str(model_dir), "--micro-batch", str(args.micro_batch), "--grad-accum",
                   str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(run_out)]
            t = time.time()
            try:
                run_group(cmd, args.run_timeout_s)
                res = json.loads(run_out.read_text())
            except (subprocess.TimeoutExpired, FileNotFoundError, ValueError) as e:
                res = {"error": type(e).__name__}
            row = {"shape": shape, "gpus": k, **{key: res[key] for key in KEEP if key in res},
                   "wall_s": time.time() - t, "steps": args.steps, "warmup_steps": args.warmup}
            if args.pass_name:
                row["pass"] = args.pass_name
            same = (row.get("pass"), shape, k)
            results["runs"] = [r for r in results["runs"] if (r.get("pass"), r["shape"], r["gpus"]) != same] + [row]
            add_efficiency(results)
            save(out, results)
            print(json.dumps(row), flush=True)


def add_efficiency(results: dict) -> None:
    """efficiency = tokens/s at K over K times tokens/s at 1, per shape (the issue's measure);
    pair_efficiency the same in pairs/s, which does not depend on which pairs each K happened to draw."""
    def group(r):  # runs are compared within one measuring pass (same host, steps and conditions)
        return r.get("pass"), r["shape"]

    one = {group(r): r for r in results["runs"] if r["gpus"] == 1 and "tokens_per_s" in r}
    for r in results["runs"]:
        if "tokens_per_s" in r and group(r) in one:
            r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * one[group(r)]["tokens_per_s"])
            r["pair_efficiency"] = r["pairs_per_s"] / (r["gpus"] * one[group(r)]["pairs_per_s"])


def table(results: dict) -> str:
    rows = ["| pass | shape | GPUs | tokens/s | pairs/s | s/step | efficiency (tokens/s) | efficiency (pairs/s) | "
            "peak GiB (rank 0) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pct(r, key):
        return f"{100 * r[key]:.1f}%" if key in r else "n/a"

    for r in sorted(results["runs"], key=lambda r: (str(r.get("pass", "")), r["shape"], r["gpus"])):
        if "tokens_per_s" not in r:
            rows.append(f"| {r.get('pass', '')} | {r['shape']} | {r['gpus']} | failed: {r.get('error', '?')[:60]} "
                        "| | | | | |")
            continue
        rows.append(f"| {r.get('pass', '')} | {r['shape']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['pairs_per_s']:.2f} | "
                    f"{r['step_s']:.2f} | {pct(r, 'efficiency')} | {pct(r, 'pair_efficiency')} | "
                    f"{r.get('peak_mem_gib') or float('nan'):.2f} |")
    return "\n".join(rows)


def render(path: Path) -> None:
    results = load(path)
    md = table(results)
    page = DOC
    start, end = "<!-- multi-gpu:start -->", "<!-- multi-gpu:end -->"
    text = page.read_text()
    if start in text and end in text:
        s = results.get("settings", {})
        note = (f"\nMeasured on {results.get('device')}: ours-unsloth +{s.get('variant')}, "
                f"{s.get('micro_batch_per_gpu')} pairs per GPU per micro-batch x {s.get('grad_accum')} micro-batches. "
                f"Raw numbers: `{path.relative_to(ROOT)}`.\n\n")
        for name, p in sorted(results.get("passes", {}).items()):
            note += f"- pass {name}: {p}\n"
        note += "\n"
        before, rest = text.split(start, 1)
        page.write_text(before + start + note + md + "\n" + end + rest.split(end, 1)[1])
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama3.2-1b-lora", "llama3-8b-qlora"], choices=list(SHAPES))
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--variant", default="precompute+no-ckpt", choices=list(VARIANTS))
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multi_gpu.json"))
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--pass-name", help="label these runs as one measuring pass (efficiency is computed within it)")
    ap.add_argument("--deadline-s", type=float, default=480)
    ap.add_argument("--run-timeout-s", type=float, default=240)
    ap.add_argument("--model-root", default="/tmp/dpo-bench-models")
    ap.add_argument("--render", metavar="JSON")
    args = ap.parse_args()
    if args.render:
        render(render_target(ap, args.render, "multi-gpu"))
    else:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the host's rule: no NVLink multicast
        measure(args)


if __name__ == "__main__":
    main()
