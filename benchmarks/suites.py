"""Benchmark suites by name: one declared list of rows per question a user asks.

    python -m benchmarks.run --list-suites
    python -m benchmarks.run --suite gpu-8b-vs-peers [--results-dir DIR]

A row is a run of `benchmarks.run` (SYSTEM:VARIANT:MICROxACCUM, see benchmarks/system.py) with its own
number of steps, profiling and timeout; a suite also names its shape, its time budget (seconds of the
device call it is meant for) and its results file. Timeouts are H200 seconds; `card_factor` scales them
to the card that runs them. The GPU tests suite runs test files instead of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK = "peak:"  # a budget "peak:SPEC": the peak memory that row (SPEC) measured earlier in the same batch


@dataclass(frozen=True)
class Row:
    run: str  # SYSTEM:VARIANT:MICROxACCUM
    steps: int
    budget: str | None = None  # ours-cli's --memory-budget: GiB, or PEAK + another row's run spec
    profile: bool = False  # profile two steps after warm-up (ours only; timed after them)
    timeout_s: float = 300.0  # H200 seconds

    def describe(self) -> str:
        budget = "" if self.budget is None else f" --memory-budget {self.budget}"
        return f"{self.run}{budget}, {self.steps} steps{', profiled' if self.profile else ''}"


@dataclass(frozen=True)
class Suite:
    name: str
    question: str
    results: str  # file name under benchmarks/results/
    budget_s: float  # start no row after this many seconds, kill a row still going at it (+ margin)
    shape: str = "llama3-8b-qlora"
    rows: tuple[Row, ...] = ()
    tests: tuple[str, ...] = ()  # the GPU tests suite: test files, each `pytest -m gpu FILE` in its own process
    device: str = "cuda"
    warmup: int = 2
    notes: str = ""
    hard_stop_margin_s: float = 40.0

    def describe(self) -> str:
        lines = [f"{self.name}: {self.question}",
                 f"  {'device ' + self.device + ', ' if self.device != 'cuda' else ''}"
                 f"{'shape ' + self.shape + ', ' if self.rows else ''}budget {self.budget_s:.0f} s, "
                 f"results benchmarks/results/{self.results}"]
        lines += [f"  - {r.describe()}" for r in self.rows] + [f"  - pytest -m gpu {t}" for t in self.tests]
        if self.notes:
            lines.append(f"  note: {self.notes}")
        return "\n".join(lines)


TRL_BEST_NOTE = ("TRL+Unsloth's own best setting that fits is 8x1 with precompute_ref_log_probs: TRL 1.15 turns "
                 "padding_free off for DPO, so a larger micro-batch with the reference precomputed is what it has")

SUITES = {s.name: s for s in (
    Suite("gpu-8b-vs-peers", "8B QLoRA on one card: ours against TRL+Unsloth at the seed's 2x4 and at its own best",
          "gpu_8b_vs_peers.json", budget_s=560, rows=(
              Row("trl-unsloth:base:2x4", steps=50, timeout_s=200),
              Row("ours-cli:base:2x4", steps=50, profile=True, timeout_s=110),
              Row("trl-unsloth-precompute:base:8x1", steps=16, timeout_s=110),
              Row("ours-cli:base:2x4", steps=12, budget=PEAK + "trl-unsloth:base:2x4", timeout_s=80),
          ), notes=TRL_BEST_NOTE),
    Suite("gpu-1b-vs-peers", "Llama-3.2-1B bf16 LoRA on one card: ours against TRL+Unsloth at 2x4 and at its best",
          "gpu_1b_vs_peers.json", budget_s=400, shape="llama3.2-1b-lora", rows=(
              Row("trl-unsloth:base:2x4", steps=20, timeout_s=90),
              Row("ours-cli:base:2x4", steps=20, profile=True, timeout_s=70),
              Row("trl-unsloth-precompute:base:8x1", steps=20, timeout_s=90),
          ), notes=TRL_BEST_NOTE),
    Suite("gpu-memory-budgets", "8B QLoRA under --memory-budget: TRL+Unsloth's measured peak, 10 GiB and 16 GiB",
          "gpu_memory_budgets.json", budget_s=480, rows=(
              Row("trl-unsloth:base:2x4", steps=12, timeout_s=110),
              Row("ours-cli:base:2x4", steps=12, budget=PEAK + "trl-unsloth:base:2x4", timeout_s=80),
              Row("ours-cli:base:2x4", steps=12, budget="10", timeout_s=80),
              Row("ours-cli:base:2x4", steps=12, budget="16", timeout_s=80),
          )),
    Suite("gpu-tests", "the GPU test suite: every GPU test file as `pytest -m gpu FILE`, each in its own process",
          "gpu_tests.json", budget_s=540, tests=(
              "tests/test_gpu_kernel.py", "tests/test_gpu_unsloth.py", "tests/test_gpu_packing.py", "tests/test_gpu_sharing.py",
              "tests/test_gpu_plans.py", "tests/test_memory_options.py", "tests/test_diskspace.py",
              "tests/test_distributed.py",
          ), notes="the files run at once on the card (they check numbers, not time); test_distributed's NCCL "
                   "cases need two GPUs and skip on one"),
    Suite("cpu-smoke", "does the harness run: a tiny random model, 2 steps of ours and of TRL, on the CPU (CI runs it)",
          "cpu_smoke.json", budget_s=240, shape="tiny", device="cpu", warmup=1, hard_stop_margin_s=20, rows=(
              Row("ours-hf:base:1x2", steps=2, timeout_s=120),
              Row("ours-cli:base:1x2", steps=2, timeout_s=120),
              Row("trl-hf:base:1x2", steps=2, timeout_s=180),
          )),
)}

# Seconds a row takes on the card against an H200. H100: the same rows ran 1.3x (ours) to 1.5x (TRL+Unsloth)
# slower in one call of each (issue 25's H100 rows against batch h200-close); 1.6 leaves room.
CARD_FACTORS = (("H200", 1.0), ("H100", 1.6))
UNKNOWN_GPU_FACTOR = 2.0


def card_factor(device: str) -> float:
    """How much longer than on an H200 a row may take on `device` (its name; "CPU ..." for the CPU)."""
    if device.upper().startswith("CPU"):
        return 1.0
    for name, factor in CARD_FACTORS:
        if name in device.upper():
            return factor
    return UNKNOWN_GPU_FACTOR
