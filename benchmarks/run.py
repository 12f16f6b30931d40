"""The benchmark harness: each system in its own process, same model, same pairs, same settings.

    python -m benchmarks.run --shape llama3-8b-qlora --runs trl-unsloth:base:2x4 ours-unsloth:precompute+no-ckpt:2x4 \
        --out benchmarks/results/gpu_throughput.json [--merge] [--deadline-s 540]
    python -m benchmarks.run --render benchmarks/results/gpu_throughput.json   # table, chart, README section

A run is SYSTEM:VARIANT:MICROxACCUM (variants apply to our systems; see benchmarks/system.py).
Results are written after every run, so a call that runs out of time keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.workload import H100_BF16_DENSE_PEAK, SHAPES

ROOT = Path(__file__).resolve().parents[1]


def matmul_rate() -> float:
    """Measured bf16 matmul rate (FLOP/s) of this card: 8192^3 products, mean of 10 after 3 warm-ups."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t)


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def parse_run(spec: str) -> dict:
    """SYSTEM:VARIANT:MICROxACCUM[:BUDGET] -> the run's fields; ValueError naming what is wrong.
    BUDGET (ours-cli only): dpo.train's --memory-budget in GiB (default: auto)."""
    from benchmarks.system import SYSTEMS, VARIANTS

    try:
        system, variant, batch, *budget = spec.split(":")
        micro, accum = (int(n) for n in batch.split("x"))
        budget = float(budget[0]) if budget else None
    except ValueError:
        raise ValueError(f"{spec!r} is not SYSTEM:VARIANT:MICROxACCUM[:BUDGET_GIB] (e.g. trl-unsloth:base:2x4, "
                         f"ours-cli:base:2x4:16)") from None
    if budget is not None and system != "ours-cli":
        raise ValueError(f"{spec!r}: a memory budget is for ours-cli (python -m dpo.train's --memory-budget)")
    if system not in SYSTEMS:
        raise ValueError(f"{spec!r}: unknown system {system!r} (one of {', '.join(SYSTEMS)})")
    if variant not in VARIANTS:
        raise ValueError(f"{spec!r}: unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    if micro < 1 or accum < 1:
        raise ValueError(f"{spec!r}: micro-batch and accumulation must be >= 1")
    return {"system": system, "variant": variant, "micro_batch": micro, "grad_accum": accum,
            "memory_budget_gib": budget}


def key(run: dict) -> tuple:
    return (run["system"], run.get("variant", "base"), run["shape"], run["micro_batch"], run["grad_accum"], run.get("batch"),
            run.get("memory_budget_gib"))


def run_group(cmd: list[str], timeout: float, env: dict | None = None) -> None:
    """Run `cmd` in a process group of its own; on timeout, kill the whole group (torchrun's workers, the
    compiler's workers): one left behind would hold the GPU, or keep writing into a cache being removed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


COMPILE_CACHE_VARS = ("UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def fresh_compile_caches(env: dict, root: str) -> dict:
    """`env` with Unsloth's, Inductor's and Triton's compile caches pointed at new empty folders under `root`.

    Every run then compiles from cold, as a user's first run does. Shared caches made a later run's first
    step (and so its e2e time) tens of seconds shorter than the first run's: run order favoured the later.
    """
    base = tempfile.mkdtemp(prefix="caches-", dir=root)
    return {**env, **{var: os.path.join(base, var.lower()) for var in COMPILE_CACHE_VARS}}


def measure(args) -> None:
    import torch

    from benchmarks.workload import make_model

    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load(out) if args.merge else {"runs": []}
    cuda = args.device == "cuda"
    results.update(device=torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)", versions=versions(),
                   settings={"max_length": 1024, "beta": 0.1, "lora": "r16 alpha16 q,k,v,o,gate,up,down",
                             "optim": "adamw_8bit" if cuda else "adamw_torch",
                             "pairs": "HH helpful-base token lengths",
                             "steps": args.steps, "warmup_steps_excluded": args.warmup,
                             "peak_flops": H100_BF16_DENSE_PEAK, "mfu": "8 x N x tokens/s / peak"})
    if cuda:
        results["matmul_tflops_measured"] = matmul_rate() / 1e12
    shape = SHAPES[args.shape]
    model_dir = Path(args.model_root) / args.shape
    if not (model_dir / "config.json").is_file():
        t = time.time()
        make_model(shape, str(model_dir), device=args.device)
        print(f"made {args.shape} in {time.time() - t:.0f} s", flush=True)
    if cuda:
        torch.cuda.empty_cache()
    for spec in args.runs:
        run = parse_run(spec)
        if time.time() - started > args.deadline_s:
            print(f"deadline reached: {spec} not run", flush=True)
            continue
        run_out = out.parent / f".run-{run['system']}-{run['variant'].replace('+', '_')}-{run['micro_batch']}x{run['grad_accum']}.json"
        run_out.unlink(missing_ok=True)  # a run that writes nothing must not read an older call's result
        cmd = [sys.executable, "-m", "benchmarks.system", "--system", run["system"], "--variant", run["variant"],
               "--shape", args.shape, "--model-dir", str(model_dir), "--micro-batch", str(run["micro_batch"]),
               "--grad-accum", str(run["grad_accum"]), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--out", str(run_out), "--device", args.device]
        if getattr(args, "profile", False) and run["system"].startswith("ours"):
            cmd.append("--profile")
        if run["memory_budget_gib"] is not None:
            cmd += ["--memory-budget", str(run["memory_budget_gib"])]
            run_out = run_out.with_name(f"{run_out.stem}-{run['memory_budget_gib']}gib.json")
            run_out.unlink(missing_ok=True)
            cmd[cmd.index("--out") + 1] = str(run_out)
        t = time.time()
        remaining = min(args.run_timeout_s, args.hard_stop_s - (time.time() - started))
        with tempfile.TemporaryDirectory(prefix="dpo-bench-", ignore_cleanup_errors=True) as caches:
            try:
                run_group(cmd, remaining, env=fresh_compile_caches(dict(os.environ), caches))
                res = {**json.loads(run_out.read_text()), "compile_caches": "cold", "batch": getattr(args, "batch", None)}
            except (subprocess.TimeoutExpired, FileNotFoundError, ValueError) as e:  # ValueError: half-written JSON
                res = {**run, "shape": args.shape, "error": f"{type(e).__name__}", "batch": getattr(args, "batch", None)}
        res["wall_s"] = time.time() - t
        results["runs"] = [r for r in results["runs"] if key(r) != key(res)] + [res]
        save(out, results)
        print(f"{spec}: {json.dumps({k: res.get(k) for k in ('tokens_per_s', 'pairs_per_s', 'e2e_s', 'peak_mem_gib', 'error')})}",
              flush=True)


# --- rendering ---------------------------------------------------------------------------------


def batch_name(r: dict) -> str:
    """A run's batch by its first word (the batch is "NAME TIME"; "" where the run has none)."""
    return str(r.get("batch") or "").split(" ")[0]


def label(r: dict, short: bool = False) -> str:
    """The run's name in tables; `short` (charts): the batch by its first word, without its time."""
    name = r["system"] + ("" if r.get("variant", "base") == "base" else f" +{r['variant']}")
    if r.get("memory_budget_gib") is not None:
        name += f" --memory-budget {r['memory_budget_gib']:g}"
    batch = str(r.get("batch") or "")
    return name + (f" [{batch_name(r) if short else batch}]" if batch else "")


def baseline(results: dict, r: dict) -> dict | None:
    """TRL+Unsloth at the same shape and micro-batch, measured in the same batch (same machine, same load)."""
    for b in results["runs"]:
        if (b["system"] == "trl-unsloth" and "error" not in b and b["shape"] == r["shape"] and b.get("batch") == r.get("batch")
                and (b["micro_batch"], b["grad_accum"]) == (r["micro_batch"], r["grad_accum"])):
            return b
    return None


WARM_MARK = "°"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def warm_caches(r: dict) -> bool:
    """The run's first step found compile caches an earlier run left (or may have): its e2e is too short."""
    return r.get("compile_caches") not in (None, "cold", "unused")


def table(results: dict) -> str:
    """One row per run; pairs/s and peak memory also as multiples of TRL+Unsloth's in the same batch."""
    rows = ["| shape | system | micro x accum | pairs/s | tokens/s | s/step | e2e s | peak GiB (planned) | MFU | "
            "x TRL+Unsloth: pairs/s, e2e, peak |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    warm = False
    for r in sorted(results["runs"], key=lambda r: (r["shape"], r["micro_batch"], -(r.get("pairs_per_s") or 0))):
        if "error" in r:
            rows.append(f"| {r['shape']} | {label(r)} | {r['micro_batch']} x {r['grad_accum']} | failed: "
                        f"{r['error'][:60]} | | | | | | |")
            continue
        mark = WARM_MARK if warm_caches(r) else ""
        warm |= bool(mark)
        b = baseline(results, r)
        # end to end compares runs of the same number of steps only
        e2e = (ratio(b["e2e_s"], r["e2e_s"]) + (WARM_MARK if mark or warm_caches(b) else "")
               if b is not None and b.get("steps") == r.get("steps") else "—")
        vs = "—" if b is None or b is r else (f"{ratio(r['pairs_per_s'], b['pairs_per_s'])}, {e2e}, "
                                             f"{ratio(r['peak_mem_gib'], b['peak_mem_gib'])}")
        peak = "—" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"  # None on the CPU
        if r.get("predicted_peak_gib") is not None:  # the plan's prediction, where one was made
            peak += f" ({r['predicted_peak_gib']:.2f})"
        mfu = "—" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        rows.append(f"| {r['shape']} | {label(r)} | {r['micro_batch']} x {r['grad_accum']} | {r['pairs_per_s']:.2f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['e2e_s']:.0f}{mark} | {peak} | {mfu} | {vs} |")
    if warm:
        rows.append(f"\n{WARM_MARK} this run found (or may have found) compile caches left by an earlier run on the same machine "
                    "(`compile_caches` in the JSON), so its first step compiled less than a user's first run would: "
                    "its e2e is too short. Steady-state columns are not affected.")
    return "\n".join(rows)


def cut(r: dict) -> str:
    """micro-batch x grad-accum as asked, and as the plan ran it where that differs."""
    asked, ran = f"{r['micro_batch']}x{r['grad_accum']}", r.get("ran_as") or {}
    planned = f"{ran.get('per_device_batch_size')}x{ran.get('grad_accum')}" if ran else asked
    return asked if planned == asked else f"{asked} asked, ran {planned}"


def chart(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "error" not in r]
    shapes = sorted({r["shape"] for r in runs})
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(7 * max(1, len(shapes)), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = sorted([r for r in runs if r["shape"] == shape], key=lambda r: (r["micro_batch"], r["pairs_per_s"]))
        names = [f"{label(r, short=True)}\n{cut(r)}" for r in rs]
        colors = ["tab:blue" if r["system"].startswith("ours") else "tab:gray" for r in rs]
        ax.barh(names, [r["pairs_per_s"] for r in rs], color=colors)
        for i, r in enumerate(rs):
            ax.text(r["pairs_per_s"], i, f" {r['pairs_per_s']:.2f} ({r['peak_mem_gib']:.1f} GiB)", va="center",
                    fontsize=8)
        ax.set_title(f"{shape}: pairs/s (higher is better)")
        ax.set_xlabel("pairs/s, steady state; blue = ours, grey = TRL")
        ax.margins(x=0.35)
    fig.suptitle(textwrap.fill(f"DPO training throughput on {results.get('device', '?')}", 70), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def render(path: Path, section: str = "gpu-throughput", batches: list[str] | None = None) -> None:
    """The table and chart of `path` (only the runs of `batches`, named by their first word, where given)
    into its .md and .png and README section `section`."""
    results = load(path)
    if batches:
        results["runs"] = [r for r in results["runs"] if batch_name(r) in batches]
        if not results["runs"]:
            raise ValueError(f"--batches: no run of {path.name} is in batch {', '.join(batches)}")
    md = table(results)
    out = path.with_name(path.stem + "".join(f"_{b}" for b in batches or []))  # a file per selection
    out.with_suffix(".md").write_text(md + "\n")
    chart(results, out.with_suffix(".png"))
    readme = ROOT / "README.md"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = readme.read_text()
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        note = f"\nMeasured on {results.get('device')}"
        rates = results.get("matmul_tflops_measured_per_call") or [results.get("matmul_tflops_measured")]
        if all(rates):  # one per call where the runs came from several calls (machines may differ)
            span = f"{min(rates):.0f}" if len(rates) == 1 else f"{min(rates):.0f} to {max(rates):.0f}"
            note += f"; matmul rate measured on the same card{'s' if len(rates) > 1 else ''}: {span} TFLOP/s (bf16)"
        note += f". Raw numbers: `{path.relative_to(ROOT)}`.{(' ' + results['conditions']) if 'conditions' in results else ''}\n\n"
        readme.write_text(before + start + note + md + f"\n\n![throughput]({out.with_suffix('.png').relative_to(ROOT)})\n" + end + after)
    print(md)


def render_target(ap: argparse.ArgumentParser, results_file: str, section: str) -> Path:
    """The results file to render into README section `section`; refused in one line (argparse's exit 2)
    before anything is written, where it is missing (rendering nothing would empty the table) or the
    README has no such section."""
    path = Path(results_file).resolve()
    if not path.is_file():
        ap.error(f"--render: no such results file: {results_file}")
    if f"<!-- {section}:start -->" not in (ROOT / "README.md").read_text():
        ap.error(f"--section: README.md has no '<!-- {section}:start -->' marker to render into")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES))
    ap.add_argument("--runs", nargs="+", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_throughput.json"))
    ap.add_argument("--merge", action="store_true", help="add to the runs already in --out")
    ap.add_argument("--batch", default=None, help="a name every row of this call carries (compare within a batch)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true",
                    help="profile two steps after warm-up in our runs (GPU busy share); they are timed after those")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=400, help="start no new run after this many seconds")
    ap.add_argument("--hard-stop-s", type=float, default=560, help="kill a run still going at this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=300, help="kill one run after this many seconds")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU benchmark")
    ap.add_argument("--model-root", default="/tmp/dpo-bench-models")
    ap.add_argument("--render", metavar="JSON", help="only render the table, chart and README section")
    ap.add_argument("--section", default="gpu-throughput", help="the README section --render replaces")
    ap.add_argument("--batches", nargs="+", default=None, metavar="NAME",
                    help="with --render: only the runs of these batches (the first word of each run's batch)")
    args = ap.parse_args()
    if args.render:
        try:
            render(render_target(ap, args.render, args.section), args.section, args.batches)
        except ValueError as e:  # nothing selected: refuse before the README loses its table
            ap.error(str(e))
        return
    if not args.shape:
        ap.error("--shape is needed to measure (or --render JSON to only render)")
    for spec in args.runs:  # every spec checked before anything is measured
        try:
            parse_run(spec)
        except ValueError as e:
            ap.error(f"--runs: {e}")
    measure(args)


if __name__ == "__main__":
    main()
