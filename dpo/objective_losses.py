"""Objectives beyond DPO as small pure functions on tensors: SimPO, CPO, ORPO (reference-free, paired)
and KTO (unpaired), each with its equation in the docstring and matching TRL 1.15's trainers
(`trl.experimental.cpo`, `trl.experimental.orpo`, `trl.KTOTrainer`). Their inputs differ from DPO's:
`dpo/objective_logps.py` says how a forward pass makes them; `dpo/loss_settings.py` dispatches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.losses import smoothed_logistic

# Each names a whole objective: it stands alone in --loss-type (no mixing with the DPO types).
OBJECTIVES: tuple[str, ...] = ("simpo", "cpo", "orpo", "kto")


def simpo_loss(
    chosen_mean_logps: Tensor,
    rejected_mean_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-normalised, with a target margin.  [B] -> [B]

    With c, r the MEAN completion-token log-probs (log pi(y|x) / |y|):
        z = beta * ((c - r) - gamma / beta)  (= beta (c - r) - gamma),
        loss = -(1 - eps) log sigma(z) - eps log sigma(-z)
    as TRL 1.15's CPOTrainer(loss_type="simpo") computes it (eps = label_smoothing, 0 in the paper).
    """
    z = beta * ((chosen_mean_logps - rejected_mean_logps) - gamma / beta)
    return smoothed_logistic(z, label_smoothing)


def cpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """CPO's preference term (Xu et al. 2024, Eq. 3): DPO with a uniform reference.  [B] -> [B]

    With c, r the SUMMED completion log-probs: -(1 - eps) log sigma(beta (c - r)) - eps log sigma(-beta (c - r)).
    The full CPO loss adds cpo_alpha * NLL(chosen) (`chosen_nll`), as TRL's CPOTrainer(loss_type="sigmoid").
    """
    return smoothed_logistic(beta * (chosen_logps - rejected_logps), label_smoothing)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation (branch at -ln 2, Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> Tensor:
    """ORPO's log odds ratio (Hong et al. 2024, Eq. 4 and 7).  [B] -> [B] float32

    With p = exp(mean token log-prob), odds(y) = p / (1 - p):
        log odds(y_w) - log odds(y_l) = (c - r) - (log(1 - e^c) - log(1 - e^r)).
    """
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    return (c - r) - (log1mexp(c) - log1mexp(r))


def orpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, *, beta: float) -> Tensor:
    """ORPO's odds-ratio term, lambda * L_OR (Hong et al. 2024, Eq. 6), with beta as lambda.  [B] -> [B]

    -beta * log sigma(log_odds); the full ORPO loss is NLL(chosen, prompt included) + mean of this,
    as TRL 1.15's ORPOTrainer computes it (there: loss = nll - mean(beta * logsigmoid(log_odds))).
    """
    return -(beta * F.logsigmoid(orpo_log_odds(chosen_mean_logps, rejected_mean_logps)))


def chosen_nll(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Token-mean negative log-likelihood over a batch: -sum(logps) / sum(tokens).  [B], [B] -> scalar

    PyTorch's CrossEntropyLoss(mean) over every scored token of the chosen rows, as TRL's CPO and ORPO
    trainers compute `nll_loss` (for ORPO the log-probs and counts include the prompt tokens).
    """
    return -chosen_logps.sum() / chosen_tokens.sum().to(chosen_logps.dtype)


def kto_kl_estimate(
    kl_logps: Tensor, ref_kl_logps: Tensor, average_over_ranks: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Eq. 6), as TRL 1.15 estimates it.  [N], [N] -> scalar

    z0 = max(0, mean_i (log pi(y'_i|x_i) - log pi_ref(y'_i|x_i))) over mismatched pairs (x_i, y'_i),
    detached. Under data parallelism TRL averages the per-rank means before the clamp: pass
    `average_over_ranks` (e.g. an all-reduce mean), applied to this rank's unclamped mean.
    """
    mean = (kl_logps - ref_kl_logps).mean().detach()
    if average_over_ranks is not None:
        mean = average_over_ranks(mean)
    return mean.clamp(min=0)


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 7), per unpaired row.  [N], [N] bool, scalar -> [N]

    With rho = log pi(y|x) - log pi_ref(y|x) and z0 = kl (detached):
        desirable:    lambda_D * (1 - sigma(beta (rho - z0)))
        undesirable:  lambda_U * (1 - sigma(beta (z0 - rho)))
    TRL's loss is the plain mean of these over the N rows (not a weight-normalised mean).
    """
    kl = kl.detach()
    desirable = desirable.bool()
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, good, bad)


@dataclass(frozen=True)
class UnpairedLogps:
    """One batch of N unpaired rows (KTO): every field [N] except `kl` (a detached scalar)."""

    logps: Tensor  # summed completion log-probs under the policy
    ref_logps: Tensor  # the same under the reference
    desirable: Tensor  # bool: True = desirable (label true)
    kl: Tensor  # kto_kl_estimate of this batch's mismatched pairs
