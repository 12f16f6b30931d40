"""DPO-family preference losses as small pure functions on tensors.

Every function takes one value per preference pair (shape [B]) and returns one loss per pair ([B]).
The inputs are sequence log-probabilities summed over completion tokens:

    chosen_logratio   = log pi(y_w | x) - log pi_ref(y_w | x)        [B]
    rejected_logratio = log pi(y_l | x) - log pi_ref(y_l | x)        [B]
    margin            = chosen_logratio - rejected_logratio           [B]

`preference_loss` combines them the way TRL 1.15's DPOTrainer does (f_divergence_type="reverse_kl",
ld_alpha=None, use_weighting=False):

    loss = sum_k  weight_k * mean_over_pairs(per_pair_loss_k)

and reports TRL's implicit rewards, beta * logratio (detached).

The objectives beyond DPO, below the DPO loss types, are pure functions of the same kind: SimPO, CPO and
ORPO (reference-free, paired) and KTO (unpaired), each matching its TRL 1.15 trainer
(`trl.experimental.cpo`, `trl.experimental.orpo`, `trl.KTOTrainer`). Their inputs differ from DPO's:
dpo/logps.py says how a forward pass makes them; dpo/objectives/ says which objective takes which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

# The loss types whose formula reads `label_smoothing` (all others ignore it, as TRL's do).
SMOOTHED_LOSS_TYPES: tuple[str, ...] = ("exo_pair", "robust", "aot", "aot_unpaired")


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-pair sequence log-probs; every field has shape [B] (one entry per chosen/rejected pair)."""

    chosen: Tensor  # sum of completion-token log-probs of the chosen response under the policy
    rejected: Tensor
    ref_chosen: Tensor  # the same under the reference model (zeros in reference-free mode)
    ref_rejected: Tensor
    chosen_tokens: Tensor  # completion-token count of each chosen row (float or integer)
    rejected_tokens: Tensor


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # scalar: sum_k weight_k * mean(per_pair[k])
    per_pair: dict[str, Tensor]  # loss type -> [B] unweighted per-pair losses
    chosen_rewards: Tensor  # [B] beta * (chosen - ref_chosen), detached
    rejected_rewards: Tensor  # [B] beta * (rejected - ref_rejected), detached
    pair_loss: Tensor | None = None  # [B] sum_k weight_k * per_pair[k], detached: its mean is `loss`
    extra: dict[str, Tensor] = field(default_factory=dict)  # objective metrics (TRL's names), detached scalars


# ---------------------------------------------------------------------------------------------
# One function per loss type. c = chosen log-ratio [B], r = rejected log-ratio [B].
# ---------------------------------------------------------------------------------------------


def sigmoid_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """Original DPO (Rafailov et al. 2023, Eq. 7): -log sigma(beta * (c - r)).  [B] -> [B]

    TRL's "sigmoid" has no label smoothing (the conservative cDPO form lives in "robust"/"aot").
    """
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta * (c - r)).  [B] -> [B]"""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def _per_token(logratios: Tensor, tokens: Tensor) -> Tensor:
    # Average over completion tokens; an empty completion counts as one token so nothing divides by 0.
    return logratios / tokens.to(logratios.dtype).clamp(min=1.0)


def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float,
) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (c/|y_w| - r/|y_l| - 1/(2 beta))^2.  [B] -> [B]

    The log-ratios are length-normalised (per-token averages) so the squared target 1/(2 beta)
    does not depend on completion length; TRL does the same (the IPO authors' choice).
    """
    margin = _per_token(chosen_logratios, chosen_tokens) - _per_token(rejected_logratios, rejected_tokens)
    return (margin - 1 / (2 * beta)) ** 2


def exo_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float
) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q || p) over the two responses.  [B] -> [B]

    q = softmax of the implicit rewards over {chosen, rejected} = (sigma(z), sigma(-z)), z = beta*(c-r);
    p = the smoothed target (1 - eps, eps). eps must be in (0, 1), otherwise log p is -inf.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    log_p_chosen, log_p_rejected = math.log1p(-label_smoothing), math.log(label_smoothing)
    kl_chosen = torch.sigmoid(z) * (F.logsigmoid(z) - log_p_chosen)
    kl_rejected = torch.sigmoid(-z) * (F.logsigmoid(-z) - log_p_rejected)
    return kl_chosen + kl_rejected


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """NCA (Chen et al. 2024), pairwise: absolute, not relative, rewards.  [B] -> [B]

    -log sigma(beta c) - 1/2 log sigma(-beta c) - 1/2 log sigma(-beta r)
    """
    chosen_reward, rejected_reward = beta * chosen_logratios, beta * rejected_logratios
    return (
        -F.logsigmoid(chosen_reward)
        - 0.5 * F.logsigmoid(-chosen_reward)
        - 0.5 * F.logsigmoid(-rejected_reward)
    )


def robust_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 8): unbiased under label flips with rate eps.  [B] -> [B]

    ((1 - eps) * -log sigma(z) - eps * -log sigma(-z)) / (1 - 2 eps),  z = beta * (c - r), 0 <= eps < 1/2.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """BCO, pairwise (Jung et al. 2024): classify chosen up, rejected down.  [B] -> [B]

    -log sigma(beta c) - log sigma(-beta r)   (TRL's pairwise form has no running reward shift delta)
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-(beta * rejected_logratios))


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 with P = 1 / 0).  [B] -> [B]

    Regress the chosen log-ratio to +1/(2 beta) and the rejected one to -1/(2 beta).
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    # Binary cross-entropy of sigma(z) against the soft label (1 - eps): cDPO's smoothing.
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def aot_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, paired (Melnyk et al. 2024): distributional alignment via sorting.  [B] x4 -> [B]

    The policy's and reference's chosen-minus-rejected log-prob gaps are each sorted across the
    batch, then matched quantile to quantile: entry i is a quantile, no longer pair i. This is
    why it needs the raw log-probs and why its value depends on which pairs share a batch.
    """
    policy_gaps, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
    ref_gaps, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return smoothed_logistic(beta * (policy_gaps - ref_gaps), label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT, unpaired: sort chosen and rejected log-ratios separately and match quantiles.  [B] -> [B]"""
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): push chosen up and rejected down.  [B] -> [B]

    (1 - sigma(beta c)) + sigma(beta r)
    """
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-down (Eq. 8): push chosen down, and rejected down more.  [B] -> [B]

    sigma(beta c) + (1 - sigma(beta (c - r)))
    """
    return torch.sigmoid(beta * chosen_logratios) + (
        1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    )


def discopop_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, discopop_tau: float = 0.05
) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5).  [B] -> [B]

    With z = beta * (c - r) and mix = sigma(z / tau):  (1 - mix) * -log sigma(z) + mix * exp(-z).
    """
    z = beta * (chosen_logratios - rejected_logratios)
    mix = torch.sigmoid(z / discopop_tau)
    logistic = -F.logsigmoid(z)
    # mix * exp(-z) is evaluated as exp(log mix - z): the same number, but it stays finite (and so do
    # its gradients) for very negative z, where exp(-z) alone overflows and inf * 0 would give NaN.
    exponential = torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return logistic * (1 - mix) + exponential


def sft_loss(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Negative log-likelihood of the chosen completions, per token over the whole batch.  [B], [B] -> [B]

    -(sum of all chosen-token log-probs) / (number of chosen tokens). It is one batch-level scalar,
    broadcast to [B] so it combines with the per-pair losses like any other (its mean is itself).
    """
    per_token_nll = -chosen_logps.sum() / chosen_tokens.sum().to(chosen_logps.dtype).clamp(min=1.0)
    return per_token_nll.expand(chosen_logps.shape[0])


def sigmoid_norm_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float,
) -> Tensor:
    """DPO on length-normalised log-ratios: -log sigma(beta (c/|y_w| - r/|y_l|)).  [B] -> [B]"""
    margin = _per_token(chosen_logratios, chosen_tokens) - _per_token(rejected_logratios, rejected_tokens)
    return -F.logsigmoid(beta * margin)


# ---------------------------------------------------------------------------------------------
# Configuration check and the combined loss.
# ---------------------------------------------------------------------------------------------


def _as_list(loss_types: Sequence[str] | str) -> list[str]:
    # A bare string would otherwise be iterated character by character.
    return [loss_types] if isinstance(loss_types, str) else list(loss_types)


def validate_loss_config(
    loss_types: Sequence[str] | str,
    loss_weights: Sequence[float] | None,
    label_smoothing: float,
    beta: float,
) -> None:
    """Raise ValueError, with one sentence, for a configuration TRL would refuse or that cannot work."""
    types = _as_list(loss_types)
    if not types:
        raise ValueError(f"name at least one loss type, from: {', '.join(LOSS_TYPES)}.")
    for loss_type in types:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {loss_type!r}; valid ones are: {', '.join(LOSS_TYPES)}.")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(
            f"got {len(loss_weights)} loss weights for {len(types)} loss types ({', '.join(types)}); "
            "give one weight per loss type."
        )
    if not beta > 0:  # also catches NaN
        raise ValueError(f"beta must be > 0, got {beta}.")
    if "exo_pair" in types and label_smoothing == 0:
        raise ValueError("the exo_pair loss needs label_smoothing > 0 (the EXO paper suggests 1e-3); got 0.")
    if "exo_pair" in types and not 0 < label_smoothing < 1:
        raise ValueError(f"the exo_pair loss needs label_smoothing in (0, 1), got {label_smoothing}.")
    if "robust" in types and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"the robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}.")


def _per_pair_loss(
    loss_type: str,
    logps: PreferenceLogps,
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
) -> Tensor:
    c, r = chosen_logratios, rejected_logratios
    # Functions are looked up by name at call time (not frozen into a table), so tests can swap one.
    if loss_type == "sigmoid":
        return sigmoid_loss(c, r, beta=beta)
    if loss_type == "hinge":
        return hinge_loss(c, r, beta=beta)
    if loss_type == "ipo":
        return ipo_loss(c, r, logps.chosen_tokens, logps.rejected_tokens, beta=beta)
    if loss_type == "exo_pair":
        return exo_pair_loss(c, r, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "nca_pair":
        return nca_pair_loss(c, r, beta=beta)
    if loss_type == "robust":
        return robust_loss(c, r, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "bco_pair":
        return bco_pair_loss(c, r, beta=beta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(c, r, beta=beta)
    if loss_type == "aot":
        return aot_loss(
            logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected,
            beta=beta, label_smoothing=label_smoothing,
        )
    if loss_type == "aot_unpaired":
        return aot_unpaired_loss(c, r, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "apo_zero":
        return apo_zero_loss(c, r, beta=beta)
    if loss_type == "apo_down":
        return apo_down_loss(c, r, beta=beta)
    if loss_type == "discopop":
        return discopop_loss(c, r, beta=beta, discopop_tau=discopop_tau)
    if loss_type == "sft":
        return sft_loss(logps.chosen, logps.chosen_tokens)
    if loss_type == "sigmoid_norm":
        return sigmoid_norm_loss(c, r, logps.chosen_tokens, logps.rejected_tokens, beta=beta)
    raise ValueError(f"unknown loss type {loss_type!r}; valid ones are: {', '.join(LOSS_TYPES)}.")


def preference_loss(
    logps: PreferenceLogps,
    *,
    beta: float = 0.1,
    loss_types: Sequence[str] | str = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    pair_weights: Tensor | None = None,
) -> LossOutput:
    """The (weighted) DPO-family loss of one batch of B pairs, as TRL 1.15's DPOTrainer computes it.

    loss = sum_k loss_weights[k] * mean(pair_weights * per_pair[loss_types[k]]); weights default to 1 each.
    With reference_free=True the reference log-probs are taken as 0, i.e. the reference is uniform.
    pair_weights[B] (detached) are WPO's weights (`dpo.logps.wpo_pair_weights`); None: all 1.
    `per_pair` keeps the unweighted losses; `pair_loss` is the weighted sum whose mean is `loss`.
    """
    types = _as_list(loss_types)
    validate_loss_config(types, loss_weights, label_smoothing, beta)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    shape = logps.chosen.shape
    if len(shape) != 1 or any(
        t.shape != shape
        for t in (logps.rejected, logps.ref_chosen, logps.ref_rejected, logps.chosen_tokens, logps.rejected_tokens)
    ):
        raise ValueError(f"every PreferenceLogps field must have the same [B] shape; chosen has {tuple(shape)}.")

    if reference_free:
        logps = PreferenceLogps(
            chosen=logps.chosen,
            rejected=logps.rejected,
            ref_chosen=torch.zeros_like(logps.chosen),
            ref_rejected=torch.zeros_like(logps.rejected),
            chosen_tokens=logps.chosen_tokens,
            rejected_tokens=logps.rejected_tokens,
        )
    # The reference is frozen: its log-probs are constants of the loss.
    chosen_logratios = logps.chosen - logps.ref_chosen.detach()
    rejected_logratios = logps.rejected - logps.ref_rejected.detach()

    per_pair: dict[str, Tensor] = {}
    loss: Tensor | float = 0.0
    scale = 1.0 if pair_weights is None else pair_weights.detach()
    for loss_type, weight in zip(types, weights, strict=True):
        per_pair[loss_type] = _per_pair_loss(
            loss_type, logps, chosen_logratios, rejected_logratios,
            beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        )
        loss = loss + (per_pair[loss_type] * scale).mean() * weight

    pair_loss = sum(per_pair[t].detach() * scale * w for t, w in zip(types, weights))
    return LossOutput(
        loss=loss,  # a tensor: validate_loss_config guarantees at least one term
        per_pair=per_pair,
        pair_loss=pair_loss,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


# --- the objectives beyond DPO -------------------------------------------------------------

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
