"""Fit the planner's memory model (dpo/plan.py) to the measured peaks and print the fit table.

    python -m benchmarks.fit_memory            # the table: each row, measured vs predicted peak
    python -m benchmarks.fit_memory --refit    # also the coefficients a fresh fit gives (to paste into FITTED)

Rows: our trainer's runs in benchmarks/results/gpu_h100_variants*.json (one row per distinct run
setting; repeated calls measured the same peak), and the padded/packed forward+backward rows of
benchmarks/packing.py in benchmarks/results/packing_*.json once committed (no optimizer state, no
reference pass). TRL's rows are another program and left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import system
from benchmarks.workload import SHAPES, length_table
from dpo import plan as planmod

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("gpu_h100_variants.json", "gpu_h100_variants_one_card.json", "gpu_h100_variants_shared_host.json")
OURS = {"ours-unsloth": "offload", "ours-hf": "recompute"}  # what gradient checkpointing means per backend


def benchmark_lengths(n: int, max_length: int = system.MAX_LENGTH) -> planmod.Lengths:
    """The (prompt, chosen, rejected) token lengths of workload.pair_rows(n): the pairs every run trained on."""
    table = length_table()
    return [(min(p, max_length - 2), max(c - 1, 1) + 1, max(r - 1, 1) + 1)
            for p, c, r in (table[i % len(table)] for i in range(n))]


def choice_of(run: dict) -> planmod.Choice:
    variant = dict(system.VARIANTS[run["variant"]])
    ckpt = OURS[run["system"]] if variant.get("gradient_checkpointing", True) else "off"
    ref_batch = run["micro_batch"] if variant.get("precompute_at_micro_batch") else 4 * run["micro_batch"]
    return planmod.Choice(run["micro_batch"], run["grad_accum"], checkpointing=ckpt, packing=False,
                          precompute_ref=variant.get("precompute_ref", False),
                          ref_batch=ref_batch if variant.get("precompute_ref") else run["micro_batch"],
                          logprob_chunk=variant.get("logprob_chunk", 256),
                          embeddings_on_cpu=variant.get("embeddings_on_cpu", False))


def measured_row(run: dict, source: str) -> planmod.MeasuredRow:
    shape = SHAPES[run["shape"]]
    model = planmod.ModelShape.from_config(shape.config, load_in_4bit=shape.load_in_4bit, lora_r=system.LORA_R)
    choice = choice_of(run)
    pairs = run["steps"] * run["micro_batch"] * run["grad_accum"]
    lengths = benchmark_lengths(pairs)
    micro = [lengths[i:i + choice.micro_batch] for i in range(0, pairs, choice.micro_batch)]  # no shuffle
    train = max(planmod.forward_tokens(m, system.MAX_LENGTH, packing=False) for m in micro)
    if choice.precompute_ref:  # length-sorted batches (Trainer.precompute_reference): the longest together
        key = lambda x: x[0] + max(x[1], x[2])  # noqa: E731
        longest = sorted(lengths, key=key, reverse=True)[:choice.ref_batch]
        ref = planmod.forward_tokens(longest, system.MAX_LENGTH, packing=False)
    else:
        ref = train
    label = f"{run['shape']} {run['system']} {run['variant']} {run['micro_batch']}x{run['grad_accum']}"
    return planmod.MeasuredRow(label, model, choice, train, ref, "adamw_8bit", run["peak_mem_gib"])


def measured_rows(files=FILES) -> list[planmod.MeasuredRow]:
    """Every distinct setting of our runs with a measured peak, in file order."""
    rows, seen = [], set()
    for name in files:
        data = json.loads((RESULTS / name).read_text())
        for run in data["runs"]:
            if run.get("system") not in OURS or run.get("peak_mem_gib") is None or "error" in run:
                continue
            key = (run["shape"], run["system"], run["variant"], run["micro_batch"], run["grad_accum"])
            if key not in seen:
                seen.add(key)
                rows.append(measured_row(run, name))
    return rows


def micro_step_rows(pattern: str = "packing_*.json") -> list[planmod.MeasuredRow]:
    """benchmarks/packing.py's rows: the policy's forward+backward over the benchmark pairs, padded or packed."""
    rows = []
    for path in sorted(RESULTS.glob(pattern)):
        data = json.loads(path.read_text())
        shape = SHAPES[data["shape"]]
        model = planmod.ModelShape.from_config(shape.config, load_in_4bit=shape.load_in_4bit, lora_r=system.LORA_R)
        ckpt = "off" if not data["checkpointing"] else OURS[f"ours-{data['backend']}"]
        lengths = benchmark_lengths(data["pairs"])
        for run in data["rows"]:
            if run.get("peak_mem_gib") is None or "error" in run:
                continue
            b, packed = run["micro_batch"], run["packing"]
            micro = [lengths[i:i + b] for i in range(0, len(lengths), b)]
            train = max(planmod.forward_tokens(m, system.MAX_LENGTH, packed) for m in micro)
            label = f"{data['shape']} {data['backend']} {'packed' if packed else 'padded'} fwd+bwd {b} pairs, ckpt {ckpt}"
            rows.append(planmod.MeasuredRow(label, model, planmod.Choice(b, 1, ckpt, packed), train, 0, "none",
                                            run["peak_mem_gib"]))
    return rows


def all_rows() -> list[planmod.MeasuredRow]:
    """Every committed measurement the memory model is fitted to."""
    return measured_rows() + micro_step_rows()


def leave_one_out(rows: list[planmod.MeasuredRow]) -> list[float]:
    """Each row's relative error under a model fitted without it: how well the fit predicts a new setting."""
    out = []
    for i, row in enumerate(rows):
        (_, _, err), = planmod.fit_errors(planmod.fit(rows[:i] + rows[i + 1:]), [row])
        out.append(err)
    return out


def table(model: planmod.MemoryModel, rows: list[planmod.MeasuredRow]) -> str:
    lines = ["| run | tokens (train / ref) | measured GiB | predicted GiB | error | left-out error |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    errors = planmod.fit_errors(model, rows)
    held_out = leave_one_out(rows)
    for (r, predicted, err), loo in zip(errors, held_out):
        lines.append(f"| {r.label} | {r.train_tokens} / {r.ref_tokens} | {r.peak_gib:.2f} | {predicted:.2f} | "
                     f"{err:+.1%} | {loo:+.1%} |")
    worst = max(abs(e) for *_, e in errors)
    lines.append(f"\nworst |error|: {worst:.1%} over {len(rows)} rows; left out of the fit: "
                 f"{max(abs(e) for e in held_out):.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refit", action="store_true", help="fit afresh and print the coefficients too")
    a = ap.parse_args(argv)
    rows = all_rows()
    model = planmod.fit(rows) if a.refit else planmod.FITTED
    if a.refit:
        print(model)
    print(table(model, rows))


if __name__ == "__main__":
    main()
