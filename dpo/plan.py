"""A memory and throughput plan for one GPU: micro-batch, grad-accum, checkpointing, packing.

The pairs per optimizer step stay what the user asked (micro_batch x grad_accum), so every plan
makes the same update up to float rounding; the plan only chooses how a step is cut and run.

Memory model (bytes; every coefficient `c_*` fitted by benchmarks/fit_memory.py on measured peaks):

    peak = weights + lora_state + overhead + max(train pass, reference pass)
    weights     = L (2h^2 + 2h kv + 3h i) x (0.516 B in NF4 | 2 B in bf16) + embedding + LM head (bf16)
    lora_state  = LoRA params x (4 B weight + 4 B grad + optimizer: 2 B adamw_8bit | 8 B adamw_torch)
    train pass  = activations(mode, T) + c_head x chunk x V x 4 B
        off        c_full  x T x L x (h + i) x 2 B      (every layer's activations kept for backward)
        offload    c_layer x T x (h + i) x 2 B          (Unsloth: layer inputs offloaded, one layer live)
        recompute  c_saved x T x L x h x 2 B + c_layer x T x (h + i) x 2 B   (inputs kept on the card)
    reference   = c_ref x T_ref x (h + i) x 2 B + c_head x chunk x V x 4 B    (no_grad: one layer live)

T is the tokens the forward runs: rows x longest row when padded, the sum of lengths when packed; when
prefix-shared (each prompt once) pairs x the longest [prompt | chosen | rejected] row on the hf backend's
masked route, the sum of those rows on Unsloth's one-row shared-prefix kernel (dpo/sharing.py); the plan
takes the worst micro-batch (the longest pairs together), as shuffling can make one. The coefficients
were fitted on padded and packed runs; a shared row is taken as that many tokens of the same kind.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Iterable

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 per 256 absmax (double quant)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_BYTES = {"adamw_8bit": 2, "adamw_torch": 8, "none": 0}  # none: a measurement with no optimizer
CHECKPOINTING = ("off", "offload", "recompute")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    load_in_4bit: bool
    lora_r: int
    lora_targets: tuple[str, ...] = ALL_TARGETS

    @classmethod
    def from_config(cls, config, *, load_in_4bit: bool, lora_r: int, lora_targets: Iterable[str] = ALL_TARGETS):
        """From a transformers config or its dict (Llama-style names)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        return cls(layers=get("num_hidden_layers"), hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads, vocab=get("vocab_size"),
                   tied_embeddings=bool(get("tie_word_embeddings", False)), load_in_4bit=load_in_4bit,
                   lora_r=lora_r, lora_targets=tuple(lora_targets))

    def _projections(self) -> dict[str, tuple[int, int]]:
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}

    def layer_params(self) -> int:
        return sum(i * o for i, o in self._projections().values())

    def params(self) -> int:
        """All parameters: the layers' projections, the embedding and (untied) LM head; norms left out."""
        return self.layers * self.layer_params() + self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def lora_params(self) -> int:
        return self.layers * self.lora_r * sum(i + o for n, (i, o) in self._projections().items()
                                               if n in self.lora_targets)

    def weights_bytes(self, embeddings_on_cpu: bool = False) -> float:
        table = self.vocab * self.hidden * 2
        embedding = 0 if embeddings_on_cpu and not self.tied_embeddings else table
        head = 0 if self.tied_embeddings else table
        per_param = NF4_BYTES if self.load_in_4bit else 2
        return self.layers * self.layer_params() * per_param + embedding + head + self.lora_params() * 4


@dataclass(frozen=True)
class Choice:
    """How a step is run: what the plan chooses (and what a measured row was run with)."""

    micro_batch: int
    grad_accum: int
    checkpointing: str = "offload"  # one of CHECKPOINTING
    packing: bool = False
    precompute_ref: bool = False
    ref_batch: int | None = None  # pairs per reference batch (live reference: the micro-batch)
    logprob_chunk: int = 256
    embeddings_on_cpu: bool = False
    sharing: str = ""  # prefix-shared rows by this route, "masked" or "flex" (dpo/sharing.py); packing does not apply

    @property
    def layout(self) -> str:
        return "shared" if self.sharing else "packed" if self.packing else "padded"


# --- tokens per micro-batch ---------------------------------------------------------------------

Lengths = list[tuple[int, int, int]]  # (prompt, chosen, rejected) token lengths of each pair


def row_lengths(pair: tuple[int, int, int], max_length: int | None) -> tuple[int, int]:
    """Token lengths of a pair's two rows (prompt+chosen, prompt+rejected), cut at max_length as collate does."""
    p, c, r = pair
    cap = max_length or math.inf
    return int(min(p + c, cap)), int(min(p + r, cap))


def shared_length(pair: tuple[int, int, int], max_length: int | None) -> int:
    """Tokens of a pair's prefix-shared row [prompt | chosen | rejected], each side cut as collate cuts it."""
    chosen, rejected = row_lengths(pair, max_length)
    return chosen + rejected - min(pair[0], chosen, rejected)


def forward_tokens(pairs: Lengths, max_length: int | None, packing: bool, sharing: str = "") -> int:
    """Tokens one forward of these pairs runs: 2B x longest row padded, the sum of lengths packed; prefix-shared
    B x the longest shared row ("masked": a row per pair) or their sum ("flex": one row)."""
    if sharing:
        shared = [shared_length(p, max_length) for p in pairs]
        return sum(shared) if sharing == "flex" else len(shared) * max(shared)
    rows = [n for pair in pairs for n in row_lengths(pair, max_length)]
    return sum(rows) if packing else len(rows) * max(rows)


def worst_tokens(lengths: Lengths, pairs: int, max_length: int | None, packing: bool, in_order: bool = False,
                 sharing: str = "") -> int:
    """The most tokens any micro-batch of `pairs` pairs can hold: the longest pairs together; with
    `in_order` (no shuffling: every epoch cuts the pairs as listed) the largest of those very cuts."""
    if in_order:
        return max(forward_tokens(lengths[i:i + pairs], max_length, packing, sharing)
                   for i in range(0, len(lengths), pairs))
    key = ((lambda x: shared_length(x, max_length)) if sharing else
           (lambda x: sum(row_lengths(x, max_length))) if packing else (lambda x: max(row_lengths(x, max_length))))
    return forward_tokens(sorted(lengths, key=key, reverse=True)[:pairs], max_length, packing, sharing)


# --- the memory model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryModel:
    c_full: float
    c_layer: float
    c_saved: float
    c_ref: float
    c_head: float
    overhead_gib: float

    COEFFICIENTS = ("c_full", "c_layer", "c_saved", "c_ref", "c_head", "overhead_gib")

    def features(self, shape: ModelShape, choice: Choice, train_tokens: int, ref_tokens: int) -> tuple[list, list]:
        """Byte counts that multiply each coefficient, for the train pass and the reference pass."""
        layer = (shape.hidden + shape.intermediate) * 2
        head = choice.logprob_chunk * shape.vocab * 4
        train = {"c_head": head, "overhead_gib": GIB}
        if choice.checkpointing == "off":
            train["c_full"] = train_tokens * shape.layers * layer
        else:
            train["c_layer"] = train_tokens * layer
        if choice.checkpointing == "recompute":
            train["c_saved"] = train_tokens * shape.layers * shape.hidden * 2
        ref = {"c_ref": ref_tokens * layer, "c_head": head, "overhead_gib": GIB}
        return ([train.get(k, 0.0) for k in self.COEFFICIENTS], [ref.get(k, 0.0) for k in self.COEFFICIENTS])

    def peak(self, shape: ModelShape, choice: Choice, train_tokens: int, ref_tokens: int,
             optim: str = "adamw_8bit") -> "Breakdown":
        coeffs = [getattr(self, k) for k in self.COEFFICIENTS]
        train_f, ref_f = self.features(shape, choice, train_tokens, ref_tokens)
        fixed = fixed_bytes(shape, choice, optim)
        train = sum(c * f for c, f in zip(coeffs, train_f))
        ref = sum(c * f for c, f in zip(coeffs, ref_f))
        return Breakdown(fixed / GIB, train / GIB, ref / GIB)


def fixed_bytes(shape: ModelShape, choice: Choice, optim: str) -> float:
    """Weights (LoRA included) plus LoRA gradients and optimizer state: there at every peak."""
    return shape.weights_bytes(choice.embeddings_on_cpu) + shape.lora_params() * (4 + OPTIMIZER_BYTES[optim])


@dataclass(frozen=True)
class Breakdown:
    fixed_gib: float  # weights, LoRA, its gradients and optimizer state
    train_gib: float  # the training pass's activations and LM-head chunk, with the overhead
    ref_gib: float  # the reference pass's, with the overhead

    @property
    def peak_gib(self) -> float:
        return self.fixed_gib + max(self.train_gib, self.ref_gib)


# Fitted by `python -m benchmarks.fit_memory` on the measured rows (H100, see its table);
# tests/test_plan.py re-fits and checks these stay what the rows give.
FITTED = MemoryModel(c_full=3.3682954651897967, c_layer=7.097836722756159, c_saved=0.8954572691189933,
                     c_ref=2.7739996779220397, c_head=1.1503813126151625, overhead_gib=0.0)


# --- fitting the coefficients to measured peaks ---------------------------------------------------


@dataclass(frozen=True)
class MeasuredRow:
    label: str
    shape: ModelShape
    choice: Choice
    train_tokens: int  # the largest training forward of the run
    ref_tokens: int  # the largest reference forward of the run
    optim: str
    peak_gib: float  # torch.cuda.max_memory_allocated


def fit(rows: list[MeasuredRow], rounds: int = 20) -> MemoryModel:
    """Least squares on relative error, coefficients >= 0.

    The peak is fixed + max(train, reference): which pass holds a row's peak depends on the
    coefficients, so the fit alternates: assign each row its larger pass, solve, repeat.
    """
    import numpy as np

    model = MemoryModel(*([1.0] * len(MemoryModel.COEFFICIENTS)))
    for _ in range(rounds):
        a, b = [], []
        for r in rows:
            train_f, ref_f = model.features(r.shape, r.choice, r.train_tokens, r.ref_tokens)
            bd = model.peak(r.shape, r.choice, r.train_tokens, r.ref_tokens, r.optim)
            f = train_f if bd.train_gib >= bd.ref_gib else ref_f
            a.append([x / GIB / r.peak_gib for x in f])
            b.append((r.peak_gib - fixed_bytes(r.shape, r.choice, r.optim) / GIB) / r.peak_gib)
        coeffs = _nonnegative_lstsq(np.array(a), np.array(b))
        new = MemoryModel(*map(float, coeffs))
        if new == model:
            break
        model = new
    return model


def _nonnegative_lstsq(a, b):
    """min |a x - b| with x >= 0, by dropping the most negative coefficient until none is left."""
    import numpy as np

    active = np.ones(a.shape[1], dtype=bool)
    while True:
        x = np.zeros(a.shape[1])
        x[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (x >= 0).all():
            return x
        active[np.argmin(x)] = False


def fit_errors(model: MemoryModel, rows: list[MeasuredRow]) -> list[tuple[MeasuredRow, float, float]]:
    """(row, predicted peak GiB, relative error) for each measured row."""
    out = []
    for r in rows:
        predicted = model.peak(r.shape, r.choice, r.train_tokens, r.ref_tokens, r.optim).peak_gib
        out.append((r, predicted, (predicted - r.peak_gib) / r.peak_gib))
    return out


# --- the plan -----------------------------------------------------------------------------------

# Step-time estimate, to rank settings that fit and to print with the plan. The host launches each layer's
# kernels while the GPU runs earlier ones, so a step takes the longer of the two: host time per layer and pass
# of each micro-batch, or matmul FLOPs at the card's measured bf16 matmul rate. Both from the H200 runs of
# `python -m dpo.train` (benchmarks/results/gpu_h200_vs_peers.json; `python -m benchmarks.fit_step_time --refit`).
LAUNCH_S_PER_LAYER = 0.0034491504294212943
ACHIEVED_FLOPS = 789077551024869.4


class DoesNotFit(ValueError):
    """No setting fits the budget (the message is one line a user reads)."""


@dataclass(frozen=True)
class Candidate:
    choice: Choice
    breakdown: Breakdown
    step_s: float  # estimated seconds per optimizer step

    @property
    def peak_gib(self) -> float:
        return self.breakdown.peak_gib


@dataclass
class Plan:
    chosen: Candidate
    budget_gib: float
    limit_gib: float  # the budget less the headroom: what a predicted peak must stay under
    pairs_per_step: int
    reasons: list[str]
    considered: list[Candidate] = field(default_factory=list)

    @property
    def choice(self) -> Choice:
        return self.chosen.choice

    @property
    def peak_gib(self) -> float:
        return self.chosen.peak_gib

    def unshared(self) -> Candidate | None:
        """The chosen setting with padded rows instead of prefix-shared ones: what runs where sharing's
        first-micro-batch self-check fails (Trainer.choose_layout). None where the choice does not share, or
        the user fixed sharing on (a failed check is then refused, so nothing runs unshared)."""
        if not self.choice.sharing:
            return None
        want = replace(self.choice, sharing="")
        return next((k for k in self.considered if k.choice == want), None)

    def config_changes(self) -> dict:
        """TrainConfig field updates that run this plan (`packing` is the field the lead adds)."""
        c = self.choice
        changes = {"per_device_batch_size": c.micro_batch, "grad_accum": c.grad_accum,
                   "gradient_checkpointing": c.checkpointing != "off", "packing": c.packing,
                   "prefix_sharing": "auto" if c.sharing else "off",
                   "precompute_ref": c.precompute_ref, "logprob_chunk": c.logprob_chunk,
                   "embeddings_on_cpu": c.embeddings_on_cpu}
        if c.precompute_ref:
            changes["precompute_ref_batch_size"] = c.ref_batch
        return changes

    def format(self, every_setting: bool = False) -> str:
        """The plan as printed at start: the choice, the predicted peak, why, and a table of the settings
        considered: the fastest of each micro-batch, checkpointing and packing (every one with `every_setting`,
        as --plan prints it)."""
        c, b = self.choice, self.chosen.breakdown
        lines = [f"plan: {c.micro_batch} x {c.grad_accum} (micro-batch x grad-accum = {self.pairs_per_step} pairs "
                 f"per step), checkpointing {c.checkpointing}, rows {c.layout}, reference "
                 f"{'precomputed' if c.precompute_ref else 'live'}, LM-head chunk {c.logprob_chunk}, embeddings on "
                 f"{'CPU' if c.embeddings_on_cpu else 'GPU'}",
                 f"predicted peak {b.peak_gib:.2f} GiB (weights+LoRA+optimizer {b.fixed_gib:.2f} + the larger of the "
                 f"training pass {b.train_gib:.2f} and the reference pass {b.ref_gib:.2f}) of a {self.budget_gib:.2f} "
                 f"GiB budget (limit {self.limit_gib:.2f} GiB with headroom); about {self.chosen.step_s:.2f} s per step "
                 "(an estimate fitted on an H200)"]
        lines += [f"  why: {r}" for r in self.reasons]
        rows = sorted(self.considered, key=lambda k: (-k.choice.micro_batch, k.step_s, k.peak_gib))
        if not every_setting:  # one row per micro-batch/checkpointing/packing: the chosen one, else the fastest
            seen, shown = set(), []  # that fits, else the one that needs the least memory
            for k in sorted(rows, key=lambda k: (k is not self.chosen, k.peak_gib > self.limit_gib,
                                                 k.step_s if k.peak_gib <= self.limit_gib else k.peak_gib)):
                group = (k.choice.micro_batch, k.choice.checkpointing, k.choice.layout)
                if group not in seen:
                    seen.add(group)
                    shown.append(k)
            rows = [k for k in rows if k in shown]
        lines.append("| micro x accum | checkpointing | rows | LM-head chunk | embeddings | peak GiB | fits "
                     "| est. s/step |")
        lines.append("| --- | --- | --- | ---: | --- | ---: | --- | ---: |")
        for k in rows:
            mark = " (chosen)" if k is self.chosen else ""
            lines.append(f"| {k.choice.micro_batch} x {k.choice.grad_accum}{mark} | {k.choice.checkpointing} | "
                         f"{k.choice.layout} | {k.choice.logprob_chunk} | "
                         f"{'CPU' if k.choice.embeddings_on_cpu else 'GPU'} | {k.peak_gib:.2f} | "
                         f"{'yes' if k.peak_gib <= self.limit_gib else 'no'} | {k.step_s:.2f} |")
        if len(rows) < len(self.considered):
            lines.append(f"({len(rows)} of {len(self.considered)} settings considered: of each micro-batch, checkpointing "
                         "and rows the fastest that fits, else the least memory; --plan lists every one)")
        return "\n".join(lines)


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step costs, before any rate: layer passes launched, matmul FLOPs and the small
    fixed extras (seconds)."""

    layer_launches: float  # layers x micro-batches x passes: each costs LAUNCH_S_PER_LAYER of host-bound launches
    flops: float  # 2 x params x tokens x passes
    extras_s: float

    def seconds(self, launch_s_per_layer: float = LAUNCH_S_PER_LAYER, flops_per_s: float = ACHIEVED_FLOPS) -> float:
        """The longer of the host's launches and the GPU's matmuls (they overlap), plus the extras."""
        return max(self.layer_launches * launch_s_per_layer, self.flops / flops_per_s) + self.extras_s


def step_work(shape: ModelShape, choice: Choice, lengths: Lengths, max_length: int | None) -> StepWork:
    """The work of a step over the tokens it runs (the mean micro-batch, in data order). Passes: forward,
    backward (twice a forward's matmuls, and about twice its host time in the H200 profile), any recompute
    of checkpointing and a live reference forward."""
    b = choice.micro_batch
    chunks = [lengths[i:i + b] for i in range(0, len(lengths) - b + 1, b)] or [lengths]
    tokens = sum(forward_tokens(m, max_length, choice.packing, choice.sharing) for m in chunks) / len(chunks)
    passes = 3 + (choice.checkpointing != "off") + (not choice.precompute_ref)
    # tie-breakers: more LM-head chunks are more launches; host embeddings a copy per micro-batch
    extras = choice.grad_accum * (0.002 * (256 / choice.logprob_chunk) + 0.005 * choice.embeddings_on_cpu)
    return StepWork(shape.layers * passes * choice.grad_accum, 2 * shape.params() * passes * tokens * choice.grad_accum,
                    extras)


def step_seconds(shape: ModelShape, choice: Choice, lengths: Lengths, max_length: int | None) -> float:
    """A rough step time: the longer of the host's launches (per layer and pass of each micro-batch) and the
    matmul FLOPs (forward, backward, any recompute and a live reference forward) over the tokens a step runs
    (the mean micro-batch, in data order), plus small extras. See StepWork."""
    return step_work(shape, choice, lengths, max_length).seconds()


def candidate_choices(pairs_per_step: int, backend: str, packing_available: bool, precompute: bool,
                      tied_embeddings: bool, fixed: dict, sharing_available: bool = False) -> list[Choice]:
    """Every setting the plan may pick, with the user's own flags (`fixed`, Choice fields; sharing as a bool)
    kept."""
    ckpt = "offload" if backend == "unsloth" else "recompute"
    route = "flex" if backend == "unsloth" else "masked"  # how the backend's attention shares (dpo/trainer.py)
    fixed = {k: (route if v else "") if k == "sharing" else v for k, v in fixed.items()}
    options = {
        "micro_batch": [b for b in range(pairs_per_step, 0, -1) if pairs_per_step % b == 0],
        "checkpointing": ["off", ckpt],
        "packing": [True, False] if packing_available else [False],
        "precompute_ref": [precompute],
        "logprob_chunk": [256, 128],
        "embeddings_on_cpu": [False] if tied_embeddings else [False, True],
        "sharing": [route, ""] if sharing_available else [""],
    }
    for name, value in fixed.items():
        if name not in options:
            raise ValueError(f"the plan does not choose {name!r}; it chooses {', '.join(options)}")
        options[name] = [value]
    names = list(options)
    out = []
    for values in itertools.product(*(options[n] for n in names)):
        v = dict(zip(names, values))
        if v["sharing"] and v["packing"]:  # a shared row is its own layout
            continue
        out.append(Choice(v["micro_batch"], pairs_per_step // v["micro_batch"], v["checkpointing"], v["packing"],
                          v["precompute_ref"], v["micro_batch"], v["logprob_chunk"], v["embeddings_on_cpu"],
                          v["sharing"]))
    return out


def evaluate(shape: ModelShape, choice: Choice, lengths: Lengths, max_length: int | None, optim: str,
             model: MemoryModel, in_order: bool = False) -> Candidate:
    """Predicted peak (worst micro-batch) and estimated step time of one setting. The reference is
    precomputed in length-sorted batches (Trainer.precompute_reference), so its worst is always the
    longest pairs together."""
    train = worst_tokens(lengths, choice.micro_batch, max_length, choice.packing, in_order, choice.sharing)
    ref = worst_tokens(lengths, choice.ref_batch or choice.micro_batch, max_length, choice.packing,
                       sharing=choice.sharing)
    return Candidate(choice, model.peak(shape, choice, train, ref, optim),
                     step_seconds(shape, choice, lengths, max_length))


def plan(shape: ModelShape, lengths: Lengths, budget_gib: float, *, pairs_per_step: int, max_length: int | None,
         backend: str = "unsloth", optim: str = "adamw_8bit", packing_available: bool = True,
         precompute: bool = True, fixed: dict | None = None, headroom: float = 0.1,
         model: MemoryModel = FITTED, in_order: bool = False, sharing_available: bool = False) -> Plan:
    """The largest micro-batch whose predicted peak stays under budget x (1 - headroom), then the
    fastest setting at that micro-batch (of equally fast ones, the smallest peak). More budget never gives a
    smaller micro-batch.

    lengths: (prompt, chosen, rejected) tokens of the pairs; fixed: Choice fields the user set
    (flags win over the plan); precompute: whether the reference may be precomputed (not when
    the run is reference-free or the user turned it off); in_order: the run does not shuffle, so its
    micro-batches are the pairs as listed, cut in order.
    """
    if not lengths:
        raise ValueError("the plan needs the token lengths of at least one pair")
    if budget_gib <= 0:
        raise ValueError(f"--memory-budget must be > 0 GiB, got {budget_gib:g}")
    fixed = dict(fixed or {})
    limit = budget_gib * (1 - headroom)
    considered = [evaluate(shape, c, lengths, max_length, optim, model, in_order) for c in
                  candidate_choices(pairs_per_step, backend, packing_available, precompute, shape.tied_embeddings,
                                    fixed, sharing_available)]
    fitting = [k for k in considered if k.peak_gib <= limit]
    if not fitting:
        least = min(considered, key=lambda k: k.peak_gib)
        raise DoesNotFit(f"no setting fits {budget_gib:.2f} GiB (limit {limit:.2f} GiB after {headroom:.0%} headroom): "
                         f"the smallest, micro-batch {least.choice.micro_batch} with checkpointing "
                         f"{least.choice.checkpointing}, needs {least.peak_gib:.2f} GiB")
    largest = max(k.choice.micro_batch for k in fitting)
    # the fastest; of equally fast (host-bound) settings, the one that needs the least memory
    chosen = min((k for k in fitting if k.choice.micro_batch == largest), key=lambda k: (k.step_s, k.peak_gib))
    return Plan(chosen, budget_gib, limit, pairs_per_step, reasons(chosen, considered, limit, fixed), considered)


def reasons(chosen: Candidate, considered: list[Candidate], limit: float, fixed: dict) -> list[str]:
    """One line per choice: why this and not the alternative."""
    c = chosen.choice
    out = [f"{name} = {value!r}: given on the command line" for name, value in fixed.items()]

    def alternative(**changes) -> Candidate | None:
        want = replace(c, **changes)
        return next((k for k in considered if k.choice == want), None)

    bigger = [k for k in considered if k.choice.micro_batch > c.micro_batch]
    if "micro_batch" not in fixed:
        if bigger:
            least = min(bigger, key=lambda k: k.peak_gib)
            out.append(f"micro-batch {c.micro_batch}: the largest that fits; {least.choice.micro_batch} would need "
                       f"{least.peak_gib:.2f} GiB at the least (limit {limit:.2f})")
        else:
            out.append(f"micro-batch {c.micro_batch}: the whole step in one micro-batch (fewest launches)")
    other = alternative(checkpointing="off") if c.checkpointing != "off" else None
    if c.checkpointing == "off":
        out.append("checkpointing off: it fits, and no layer is recomputed in backward")
    elif other is not None:
        out.append(f"checkpointing {c.checkpointing}: off would need {other.peak_gib:.2f} GiB")
    unpacked = alternative(packing=False) if c.packing else None
    if unpacked is not None:
        before, after = f"{unpacked.step_s:.2f}", f"{chosen.step_s:.2f}"
        faster = f"{before} -> {after} s per step estimated" if before != after else "the same step time estimated"
        out.append(f"packing on: no pad tokens: peak {unpacked.peak_gib:.2f} -> {chosen.peak_gib:.2f} GiB, {faster}")
    unshared = alternative(sharing="") if c.sharing else None
    if unshared is not None:
        out.append(f"rows prefix-shared: each prompt computed once: peak {unshared.peak_gib:.2f} -> "
                   f"{chosen.peak_gib:.2f} GiB, {unshared.step_s:.2f} -> {chosen.step_s:.2f} s per step estimated")
    if c.precompute_ref:
        out.append(f"reference precomputed at {c.ref_batch} pairs per batch: no reference forward in each step")
    return out


def auto_budget_gib(free_bytes: int, margin_gib: float = 1.0) -> float:
    """--memory-budget auto: the card's free memory (torch.cuda.mem_get_info()[0]) less a margin."""
    return max(free_bytes / GIB - margin_gib, 0.0)


def lengths_of(pairs) -> Lengths:
    """(prompt, chosen, rejected) token lengths of tokenized pairs (dpo.data.TokenizedPair)."""
    return [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
