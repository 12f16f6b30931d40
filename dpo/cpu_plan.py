"""A memory plan for a CPU run: gradient checkpointing only when keeping every layer's activations would
not fit the machine's memory (the GPU plan is dpo.plan; CPU runs keep their micro-batch).

Memory model (bytes of the process's peak resident size; float32 on CPU, 4 B a number):

    peak      = runtime + weights + train pass
    runtime   = python, torch, transformers, tokenizer, data and the LM-head chunk: a fitted constant
    weights   = params x 4 B (dpo.plan.ModelShape.params: projections, embedding and untied LM head)
                + LoRA params x 16 B (weight, gradient, AdamW's two moments)
    train pass
        off        c_full x T x L x (h + i) x 4 B          (every layer's activations kept for backward)
        recompute  c_ckpt x T x (L x h + h + i) x 4 B     (each layer's input kept, one layer live)

T is the tokens of the largest training forward (rows x longest row, padded: dpo.plan.worst_tokens). The
coefficients come from peak RSS (/usr/bin/time -v) of the default run (`python -m dpo.train`, SmolLM2-135M,
16 rows x up to 74 tokens) on the 2-core machine, with its allocator fixed (dpo.host_memory): MEASURED below,
re-fitted by tests/test_plan.py. Two runs fit two coefficients: the model is rough (activations scale with
T x layers x width; with checkpointing on, the run's peak is the evaluation's after training, which c_ckpt takes
in) and serves one decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo.plan import GIB, ModelShape

FLOAT32 = 4
LORA_BYTES = 4 + 4 + 8  # a LoRA weight, its gradient and AdamW's two moments, float32


def weights_bytes(shape: ModelShape) -> float:
    """Float32 weights, and the LoRA weights with their gradients and AdamW state."""
    return shape.params() * FLOAT32 + shape.lora_params() * LORA_BYTES


def pass_features(shape: ModelShape, tokens: int, checkpointing: bool) -> float:
    """Bytes the fitted coefficient of a mode multiplies: T x L x (h + i) x 4 B kept, T x (L h + h + i) x 4 B
    recomputed."""
    if checkpointing:
        return tokens * (shape.layers * shape.hidden + shape.hidden + shape.intermediate) * FLOAT32
    return tokens * shape.layers * (shape.hidden + shape.intermediate) * FLOAT32


@dataclass(frozen=True)
class CpuMemoryModel:
    runtime_gib: float
    c_full: float
    c_ckpt: float

    def peak_gib(self, shape: ModelShape, tokens: int, checkpointing: bool) -> float:
        c = self.c_ckpt if checkpointing else self.c_full
        return self.runtime_gib + (weights_bytes(shape) + c * pass_features(shape, tokens, checkpointing)) / GIB


@dataclass(frozen=True)
class MeasuredRun:
    """One measured CPU run: its shape, its largest training forward's tokens and its peak RSS."""

    label: str
    shape: ModelShape
    tokens: int
    checkpointing: bool
    peak_gib: float


# SmolLM2-135M-Instruct as the default run trains it (LoRA r 16 on all seven projections).
SMOLLM2_135M = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152,
                          tied_embeddings=True, load_in_4bit=False, lora_r=16)
# Resident size of a process with torch, transformers, the default data, model and LoRA loaded and one no-grad
# forward run (so every weight page is resident), before any step: VmRSS 0.918 GiB.
MEASURED_LOADED_GIB = 0.9181098937988281
# Peak RSS (/usr/bin/time -v, KiB / 2^20) of the whole `python -m dpo.train --memory-budget none
# [--no-gradient-checkpointing]` on the shared 2-core machine (2026-12-07); its largest training forward: 16 rows
# x 74 tokens. With checkpointing off a step holds the peak; on, the evaluation after training does (1,591,104 KiB
# against 1,373,552 KiB through the 8 steps), and c_ckpt takes it in: the plan bounds the run, not only its steps.
MEASURED: tuple[MeasuredRun, ...] = (
    MeasuredRun("default run, checkpointing off", SMOLLM2_135M, 16 * 74, False, 2905252 / 2**20),
    MeasuredRun("default run, checkpointing on", SMOLLM2_135M, 16 * 74, True, 1591104 / 2**20),
)


def fit(loaded: tuple[ModelShape, float], runs: tuple[MeasuredRun, ...]) -> CpuMemoryModel:
    """runtime from the loaded process (its RSS with the model and LoRA built, less their weights), then each
    mode's coefficient as the mean over its runs of (peak - runtime - weights) / features."""
    shape, loaded_gib = loaded
    runtime = loaded_gib - (shape.params() + shape.lora_params()) * FLOAT32 / GIB

    def coefficient(checkpointing: bool) -> float:
        ratios = [((r.peak_gib - runtime) * GIB - weights_bytes(r.shape)) / pass_features(r.shape, r.tokens, checkpointing)
                  for r in runs if r.checkpointing == checkpointing]
        if not ratios:
            raise ValueError(f"no measured run with checkpointing {'on' if checkpointing else 'off'}")
        return sum(ratios) / len(ratios)

    return CpuMemoryModel(runtime, coefficient(False), coefficient(True))


# fit((SMOLLM2_135M, MEASURED_LOADED_GIB), MEASURED); tests/test_plan.py checks they stay what the runs give.
FITTED = CpuMemoryModel(runtime_gib=0.3989372253417969, c_full=6.433606333606334, c_ckpt=6.368254393006868)


@dataclass(frozen=True)
class CpuPlan:
    checkpointing: bool
    peak_gib: float  # predicted peak of the chosen setting
    other_gib: float  # predicted peak of the other one
    budget_gib: float
    limit_gib: float  # the budget less the headroom
    fixed: bool  # the user's flag chose it
    source: str  # where the budget came from

    def config_changes(self) -> dict:
        return {"gradient_checkpointing": self.checkpointing}

    def format(self, every_setting: bool = False) -> str:  # noqa: ARG002  (one line, whatever is asked)
        """The one line printed at start."""
        mode = "on" if self.checkpointing else "off"
        if self.fixed:
            why = "--no-gradient-checkpointing given"
        elif not self.checkpointing:
            why = "it fits, and no layer is recomputed in backward"
        elif self.peak_gib <= self.limit_gib:
            why = f"off would need {self.other_gib:.2f} GiB"
        else:
            why = "nothing fits; the least memory (a smaller --per-device-batch-size needs less)"
        return (f"dpo: CPU plan: gradient checkpointing {mode} ({why}): predicted peak {self.peak_gib:.2f} GiB of a "
                f"{self.budget_gib:.2f} GiB budget ({self.source}; limit {self.limit_gib:.2f} GiB with headroom)")


def plan_cpu(shape: ModelShape, tokens: int, budget_gib: float, *, checkpointing_off: bool = False,
             source: str = "--memory-budget", headroom: float = 0.1, model: CpuMemoryModel = FITTED) -> CpuPlan:
    """Checkpointing off where its predicted peak stays under budget x (1 - headroom), else on. With
    `checkpointing_off` (the user's --no-gradient-checkpointing) off whatever it needs. tokens: the largest
    training forward (rows x longest row)."""
    if budget_gib <= 0:
        raise ValueError(f"--memory-budget must be > 0 GiB, got {budget_gib:g}")
    limit = budget_gib * (1 - headroom)
    off, on = model.peak_gib(shape, tokens, False), model.peak_gib(shape, tokens, True)
    checkpointing = not checkpointing_off and off > limit
    chosen, other = (on, off) if checkpointing else (off, on)
    return CpuPlan(checkpointing, chosen, other, budget_gib, limit, checkpointing_off, source)


def available_gib(meminfo: str = "/proc/meminfo") -> float | None:
    """MemAvailable of /proc/meminfo in GiB: what the kernel can give without swapping; None where absent."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None
