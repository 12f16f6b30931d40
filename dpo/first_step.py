"""The first step's check: an untrained policy's loss is known where policy == reference.

At step 1 of a fresh run the policy is the reference: a fresh LoRA adds exactly zero (its B is zero),
and a starting adapter (--adapter) is both the policy's start and the frozen reference. Every log-ratio
log pi - log pi_ref is then 0, so each pair's loss is the loss type's value at zero log-ratios, whatever
the data. A step-1 loss far from it means the policy and reference did not score the same tokens: broken
batching (a packing bug once showed as 6 x ln 2) or a broken reference.

Values at zero log-ratios (beta > 0; eps = label_smoothing):
    sigmoid, sigmoid_norm             ln 2
    robust, aot, aot_unpaired         ln 2   (any eps: the smoothed terms are both ln 2 at zero)
    exo_pair                          -ln 2 - (ln(1 - eps) + ln eps) / 2
    nca_pair, bco_pair                2 ln 2
    hinge, apo_zero, apo_down         1
    ipo                               1 / (4 beta^2)
    sppo_hard                         1 / (2 beta^2)
    discopop                          (ln 2 + 1) / 2
    kto (equal desirable and undesirable weights w)   w / 2
A mix of loss types: the weighted sum. No known value (the check does not apply): sft (the chosen NLL, a
property of the data), WPO's pair weights (use_weighting), reference-free DPO and SimPO/CPO/ORPO (no
reference), KTO with unequal weights (the value depends on each batch's mix of rows), dropout on (the policy
and reference forwards draw different masks) and a resumed run (its policy is trained).
"""

from __future__ import annotations

import math

import torch

from dpo.loss_settings import LossSettings
from dpo.models import REF_ADAPTER

LN2 = math.log(2)


def zero_margin_loss(loss_type: str, beta: float, label_smoothing: float = 0.0,
                     discopop_tau: float = 0.05) -> float | None:
    """One DPO loss type's per-pair value when both log-ratios are 0; None where it depends on the data."""
    eps = label_smoothing
    values = {
        "sigmoid": LN2, "sigmoid_norm": LN2, "robust": LN2, "aot": LN2, "aot_unpaired": LN2,
        "nca_pair": 2 * LN2, "bco_pair": 2 * LN2,
        "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0,
        "ipo": 1 / (4 * beta**2), "sppo_hard": 1 / (2 * beta**2),
        "discopop": (LN2 + 1) / 2,  # z = 0: mix = 1/2 for any tau
    }
    if loss_type == "exo_pair":
        return -LN2 - (math.log1p(-eps) + math.log(eps)) / 2 if 0 < eps < 1 else None
    return values.get(loss_type)


def expected_first_loss(settings: LossSettings, dropout_off: bool = True) -> tuple[float | None, str]:
    """(the step-1 loss of an untrained policy, its name) or (None, why the check does not apply)."""
    if not dropout_off:
        return None, "dropout is on (--no-disable-dropout)"
    if settings.objective == "kto":
        w = settings.kto_desirable_weight
        if w != settings.kto_undesirable_weight:
            return None, "KTO with unequal desirable and undesirable weights"
        return w / 2, f"{w:g} / 2"
    if settings.objective != "dpo" or settings.reference_free:
        return None, "no reference (the policy is not compared with one)"
    if settings.use_weighting:
        return None, "WPO pair weights (use_weighting)"
    weights = settings.loss_weights or (1.0,) * len(settings.loss_type)
    total = 0.0
    for loss_type, weight in zip(settings.loss_type, weights):
        value = zero_margin_loss(loss_type, settings.beta, settings.label_smoothing, settings.discopop_tau)
        if value is None:
            return None, f"{loss_type} has no value known at zero log-ratios"
        total += weight * value
    name = "ln 2" if settings.loss_type == ("sigmoid",) and settings.loss_weights is None else "the value at zero"
    return total, name


def relative_tolerance(dtype: torch.dtype) -> float:
    """How far (relative) the step-1 loss may sit from its expected value: 8 x the dtype's machine epsilon,
    at least 1e-3. float32 1e-3; bfloat16 0.0625 (its eps is 2^-7: policy and reference forwards of
    differently batched rows round differently, about a tenth of a nat of log-ratio on 100 tokens, while a
    broken batching or reference is off by a factor)."""
    return max(1e-3, 8 * torch.finfo(dtype).eps)


def first_step_problem(loss: float, expected: float, name: str, rtol: float) -> str | None:
    """The one line that stops the run when the step-1 loss is not the untrained value; None when it is."""
    if loss is not None and math.isfinite(loss) and abs(loss - expected) <= rtol * abs(expected):
        return None
    return (f"step 1 loss {loss:.4g} != {name} = {expected:.4f} for an untrained policy (policy == reference; "
            f"relative tolerance {rtol:g}): the batching or the reference is broken")


def policy_is_reference(model) -> bool:
    """Whether the policy computes what the reference does, read from the weights before the first step: a
    PEFT model whose LoRA B matrices are all zero (a fresh LoRA), or whose trainable adapter equals its frozen
    reference copy (--adapter). False for anything else (weights set by a caller, a full model)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return False
    params = dict(model.named_parameters())
    ours = {n: p for n, p in params.items() if ".default." in n and "lora_" in n}
    if not ours:
        return False
    with torch.no_grad():
        if REF_ADAPTER in model.peft_config:
            twins = {n: params.get(n.replace(".default.", f".{REF_ADAPTER}.")) for n in ours}
            return all(twins[n] is not None and torch.equal(p, twins[n]) for n, p in ours.items())
        b = [p for n, p in ours.items() if "lora_B" in n]
        return bool(b) and all(not p.any() for p in b)
