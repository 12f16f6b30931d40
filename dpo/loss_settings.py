"""Every loss setting as one validated object (`LossSettings`), built once from the run's config and
taken by training and evaluation, and `objective_loss`: the one call that turns a batch's log-probs
into the loss under those settings (DPO's loss types in `dpo/losses.py`, the other objectives in
`dpo/objective_losses.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.losses import LossOutput, PreferenceLogps, _as_list, preference_loss, validate_loss_config
from dpo.objective_losses import (
    OBJECTIVES,
    UnpairedLogps,
    cpo_loss,
    kto_loss,
    orpo_log_odds,
    simpo_loss,
)

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
        """The loss settings of a run config (any object with these attribute names; new ones optional)."""
        optional = {name: getattr(cfg, name) for name in (
            "discopop_tau", "simpo_gamma", "cpo_alpha", "kto_desirable_weight", "kto_undesirable_weight",
            "ld_alpha", "use_weighting") if hasattr(cfg, name)}
        return cls(beta=cfg.beta, loss_type=tuple(_as_list(cfg.loss_type)), loss_weights=cfg.loss_weights,
                   label_smoothing=cfg.label_smoothing, reference_free=cfg.reference_free, **optional)

    def __call__(self, logps, **extra) -> LossOutput:
        """The loss of one batch under these settings (see `objective_loss`)."""
        return objective_loss(self, logps, **extra)


def objective_loss(
    settings: LossSettings,
    logps: PreferenceLogps | UnpairedLogps,
    *,
    nll: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> LossOutput:
    """The loss of one micro-batch under any objective, with TRL's metric values in `extra`.

    dpo:          `logps` PreferenceLogps of summed log-probs (LD-DPO: already length-desensitised);
                  pair_weights [B] for WPO (settings.use_weighting).
    simpo, orpo:  PreferenceLogps whose chosen/rejected are per-token MEAN log-probs (ref fields unused).
    cpo:          PreferenceLogps of summed log-probs (ref fields unused).
    simpo, cpo, orpo: `nll` = chosen_nll(...) of the batch when settings.nll_weight > 0 (required then).
    kto:          UnpairedLogps; returns per-row losses in `pair_loss`, desirable rewards in
                  `chosen_rewards` and undesirable ones in `rejected_rewards` (different lengths).
    """
    obj = settings.objective
    if obj == "dpo":
        return preference_loss(
            logps, beta=settings.beta, loss_types=settings.loss_type, loss_weights=settings.loss_weights,
            label_smoothing=settings.label_smoothing, discopop_tau=settings.discopop_tau,
            reference_free=settings.reference_free,
            pair_weights=pair_weights if settings.use_weighting else None,
        )
    if obj == "kto":
        return _kto_output(settings, logps)
    return _reference_free_output(settings, logps, nll)


def _reference_free_output(settings: LossSettings, logps: PreferenceLogps, nll: Tensor | None) -> LossOutput:
    obj, beta = settings.objective, settings.beta
    c, r = logps.chosen, logps.rejected
    extra: dict[str, Tensor] = {}
    if obj == "simpo":
        per_pair = simpo_loss(c, r, beta=beta, gamma=settings.simpo_gamma, label_smoothing=settings.label_smoothing)
    elif obj == "cpo":
        per_pair = cpo_loss(c, r, beta=beta, label_smoothing=settings.label_smoothing)
    else:  # orpo
        log_odds = orpo_log_odds(c, r)
        per_pair = -(beta * F.logsigmoid(log_odds))
        extra["log_odds_ratio"] = F.logsigmoid(log_odds).mean().detach()
        extra["log_odds_chosen"] = log_odds.mean().detach()
    loss = per_pair.mean()
    weight = settings.nll_weight
    if weight > 0:
        if nll is None:
            raise ValueError(f"the {obj} loss needs the chosen NLL of the batch (nll=chosen_nll(...)).")
        # ORPO: TRL adds the NLL unweighted (nll - mean(beta*ratio)); multiplying by 1.0 would be exact anyway.
        loss = nll + loss if obj == "orpo" else loss + weight * nll
    # TRL logs nll_loss 0 when cpo_alpha is 0 (it skips the NLL); ORPO always has it (checked above).
    extra["nll_loss"] = (nll if nll is not None else torch.zeros((), device=c.device)).detach()
    return LossOutput(
        loss=loss,
        per_pair={obj: per_pair},
        pair_loss=per_pair.detach(),
        chosen_rewards=(beta * c).detach(),
        rejected_rewards=(beta * r).detach(),
        extra=extra,
    )


def _kto_output(settings: LossSettings, logps: UnpairedLogps) -> LossOutput:
    beta = settings.beta
    logratios = logps.logps - logps.ref_logps.detach()
    desirable = logps.desirable.bool()
    per_row = kto_loss(
        logratios, desirable, logps.kl, beta=beta,
        desirable_weight=settings.kto_desirable_weight, undesirable_weight=settings.kto_undesirable_weight,
    )
    rewards = (beta * logratios).detach()
    return LossOutput(
        loss=per_row.nanmean(),
        per_pair={"kto": per_row},
        pair_loss=per_row.detach(),
        chosen_rewards=rewards[desirable],
        rejected_rewards=rewards[~desirable],
        extra={"kl": logps.kl.detach()},
    )
