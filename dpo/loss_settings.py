"""Every loss setting as one validated object (`LossSettings`), built once from the run's config and
taken by training and evaluation: which objective it names and what that objective needs (a reference,
length-normalised log-probs, an NLL term). The objective that computes the loss under these settings
is `dpo.objectives.objective_for(settings)`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dpo.losses import _as_list, validate_loss_config
from dpo.losses import OBJECTIVES


def _validate_objective(s: "LossSettings") -> None:
    """Raise ValueError, with one sentence, for objective settings TRL would refuse or that cannot work."""
    types, obj = s.loss_type, s.objective
    named = [t for t in types if t in OBJECTIVES]
    if named and len(types) > 1:
        raise ValueError(
            f"the {named[0]} objective stands alone; give --loss-type {named[0]} without other loss types.")
    if obj != "dpo":
        if s.loss_weights is not None:
            raise ValueError(f"loss weights apply to mixes of DPO loss types, not to the {obj} objective.")
        if s.reference_free:
            raise ValueError(f"reference_free applies to DPO loss types only; {obj} has its own reference handling.")
        if s.ld_alpha is not None or s.use_weighting:
            raise ValueError(f"ld_alpha and use_weighting are DPO options; {obj} does not take them.")
        if not s.beta > 0:
            raise ValueError(f"beta must be > 0, got {s.beta}.")
    smoothing_ok = obj in ("simpo", "cpo") and 0 <= s.label_smoothing < 0.5
    if obj in ("simpo", "cpo", "orpo", "kto") and not (smoothing_ok or s.label_smoothing == 0):
        raise ValueError(
            f"{obj} takes label_smoothing in [0, 0.5) (simpo, cpo) or 0 (orpo, kto); got {s.label_smoothing}.")
    if not math.isfinite(s.simpo_gamma):
        raise ValueError(f"simpo_gamma must be a finite number, got {s.simpo_gamma}.")
    if s.cpo_alpha is not None and obj not in ("simpo", "cpo"):
        raise ValueError(f"cpo_alpha weighs the NLL term of cpo and simpo only; the loss type is {obj}.")
    if s.cpo_alpha is not None and not s.cpo_alpha >= 0:
        raise ValueError(f"cpo_alpha must be >= 0, got {s.cpo_alpha}.")
    for name in ("kto_desirable_weight", "kto_undesirable_weight"):
        if not getattr(s, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(s, name)}.")
    if s.ld_alpha is not None and not 0 <= s.ld_alpha <= 1:
        raise ValueError(f"ld_alpha must be in [0, 1] (1 = plain DPO), got {s.ld_alpha}.")
    if s.use_weighting and any(t in ("aot", "aot_unpaired") for t in types):
        raise ValueError(
            "use_weighting (WPO) cannot be combined with aot or aot_unpaired: they sort pairs across the batch.")


@dataclass(frozen=True)
class LossSettings:
    """Every setting of the preference loss, validated once when made; training and evaluation both
    take this one object (built from the run's config by `LossSettings.from_config`).

    `loss_type` names either DPO loss types (mixable, weighted) or one objective from OBJECTIVES.
    """

    beta: float = 0.1  # DPO/SimPO/CPO/KTO temperature; ORPO's lambda (as in TRL)
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    reference_free: bool = False
    simpo_gamma: float = 0.5  # SimPO's target margin gamma
    cpo_alpha: float | None = None  # NLL weight: None = 1.0 for cpo, 0.0 for simpo (pure SimPO)
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens past the shorter completion; None = off
    use_weighting: bool = False  # WPO: weigh each pair by its chosen and rejected sequence probabilities

    def __post_init__(self):
        object.__setattr__(self, "loss_type", tuple(_as_list(self.loss_type)))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if self.objective == "dpo":
            validate_loss_config(self.loss_type, self.loss_weights, self.label_smoothing, self.beta)
        _validate_objective(self)
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}.")

    @property
    def objective(self) -> str:
        """"dpo" for DPO loss types, else the objective's name (simpo, cpo, orpo, kto)."""
        named = [t for t in self.loss_type if t in OBJECTIVES]
        return named[0] if named else "dpo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (SimPO, CPO and ORPO load no reference)."""
        return self.objective == "kto" or (self.objective == "dpo" and not self.reference_free)

    @property
    def reference_per_pair(self) -> bool:
        """Whether the loss reads each pair's reference log-probs alone (DPO's loss types), which can then be
        computed once before training; KTO's reference depends on its batch, SimPO/CPO/ORPO read none."""
        return self.objective == "dpo"

    @property
    def unpaired(self) -> bool:
        """Whether batches are unpaired (prompt, completion, label) rows: KTO."""
        return self.objective == "kto"

    @property
    def length_normalised(self) -> bool:
        """Whether the policy log-probs enter the loss as per-token means (SimPO, ORPO), not sums."""
        return self.objective in ("simpo", "orpo")

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen-completion NLL term added to the loss (CPO: cpo_alpha, ORPO: 1)."""
        if self.objective == "orpo":
            return 1.0
        if self.objective in ("simpo", "cpo"):
            default = 1.0 if self.objective == "cpo" else 0.0
            return default if self.cpo_alpha is None else self.cpo_alpha
        return 0.0

    @property
    def nll_includes_prompt(self) -> bool:
        """ORPO's NLL runs over prompt and completion (every attended token); CPO's over the completion."""
        return self.objective == "orpo"

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        """The loss settings of a run config: the attributes named as these fields (those it lacks keep
        their defaults)."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        values["loss_type"] = tuple(_as_list(values.get("loss_type", cls.loss_type)))
        return cls(**values)
