"""The metric rows, with TRL's names, from one place: training rows, and the same names with the
`eval_` prefix for held-out evaluation.

`pair_values` gives each metric per pair ([B] tensors); a training row is their mean over one
micro-batch (then over the step's micro-batches, as TRL logs them); an eval row is their mean over
every held-out pair.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpo.losses import LossOutput, PreferenceLogps
from dpo.objective_losses import UnpairedLogps
from dpo.loss_settings import LossSettings

# TRL's DPOTrainer metric names, in the order it logs them.
PREFERENCE_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

# Each objective's metrics: the names its TRL 1.15 trainer logs (CPOTrainer for simpo and cpo,
# ORPOTrainer, KTOTrainer), less the logits/entropy/token statistics this project does not log.
OBJECTIVE_METRICS: dict[str, tuple[str, ...]] = {
    "dpo": PREFERENCE_METRICS,
    "simpo": PREFERENCE_METRICS + ("nll_loss",),
    "cpo": PREFERENCE_METRICS + ("nll_loss",),
    "orpo": PREFERENCE_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"),
}


def metric_names(settings: LossSettings) -> tuple[str, ...]:
    """The training metric names of a run under these loss settings (eval rows: the same with `eval_`)."""
    return OBJECTIVE_METRICS[settings.objective]


def pair_values(out: LossOutput, logps: PreferenceLogps) -> dict[str, Tensor]:
    """Each metric per pair, detached, float32: {name: [B]}."""
    c, r = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    loss = out.pair_loss if out.pair_loss is not None else out.loss.detach().expand(c.shape)
    return {
        "loss": loss.detach().float(),
        "rewards/chosen": c,
        "rewards/rejected": r,
        "rewards/accuracies": (c > r).float(),
        "rewards/margins": c - r,
        "logps/chosen": logps.chosen.detach().float(),
        "logps/rejected": logps.rejected.detach().float(),
    }


def batch_row(out: LossOutput, logps: PreferenceLogps) -> dict[str, float]:
    """One micro-batch's training metrics: each the mean over its pairs (the loss is the batch's loss)."""
    row = {k: v.mean().item() for k, v in pair_values(out, logps).items()}
    row["loss"] = out.loss.detach().item()  # exactly the number that was backpropagated
    return row


def prefixed(row: dict[str, float], prefix: str) -> dict[str, float]:
    """`{"loss": x}` -> `{"eval_loss": x}`: the eval rows' names are the training rows' with a prefix."""
    return {f"{prefix}{k}": v for k, v in row.items()}


def mean_over_pairs(values: list[dict[str, Tensor]]) -> dict[str, float]:
    """Per-pair values of several batches -> each metric's mean over every pair (not a mean of batch means)."""
    if not values:
        raise ValueError("no pairs")
    return {k: torch.cat([v[k] for v in values]).mean().item() for k in values[0]}


def objective_batch_row(out: LossOutput, logps: PreferenceLogps | UnpairedLogps) -> dict[str, float]:
    """One micro-batch's training metrics under any objective (`loss_settings.objective_loss`'s output).

    Paired objectives: `batch_row` plus the objective's scalars (`out.extra`). KTO, as TRL's
    KTOTrainer: rewards and logps of each side are means over that side's rows and are left out
    when the batch has none; the margin only when it has both.
    """
    if isinstance(logps, PreferenceLogps):
        row = batch_row(out, logps)
        row.update({k: v.item() for k, v in out.extra.items()})
        return row
    desirable = logps.desirable.bool()
    row = {"loss": out.loss.detach().item(), "kl": out.extra["kl"].item()}
    for side, rewards, mask in (("chosen", out.chosen_rewards, desirable), ("rejected", out.rejected_rewards, ~desirable)):
        if mask.any():
            row[f"rewards/{side}"] = rewards.float().mean().item()
            row[f"logps/{side}"] = logps.logps.detach()[mask].float().mean().item()
    if "rewards/chosen" in row and "rewards/rejected" in row:
        row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
    return row
