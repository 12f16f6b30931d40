"""The paired metric rows, with TRL's names, from one place: training rows, and the same names with the
`eval_` prefix for held-out evaluation (each objective adds its own: dpo/objectives/).

`pair_values` gives each metric per pair ([B] tensors); a training row is their mean over one
micro-batch (then over the step's micro-batches, as TRL logs them); an eval row is their mean over
every held-out pair.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpo.losses import LossOutput, PreferenceLogps

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
