"""The held-out metrics from log-probs already computed: pure functions on tensors, no model.

Input: the summed completion log-probs of N pairs under the policy and under the reference
(`PairLogps`, [N] each). Output: TRL's metric names with the `eval_` prefix (dpo.metrics), each the
mean over all N pairs (TRL's eval metrics are means over its eval set; a mean of batch means would
weigh the pairs of a last, smaller batch more). The loss runs on batches of `batch_size` pairs
because a few loss types (aot, aot_unpaired) sort across their batch; each pair's value is then
averaged with every other pair's.

Ours, over all pairs, because before training the policy is the reference and TRL's implicit-reward
metrics are trivial there (margins 0, accuracy 0, loss log 2):

    eval_length_normalised_accuracy     = share of pairs whose chosen completion has the higher mean
                                          log-prob per token under the policy (ties count as wrong)
    eval_ref_length_normalised_accuracy = the same under the reference (= the policy before training)
    eval_ref_logps/chosen, eval_ref_logps/rejected, eval_num_pairs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo import metrics
from dpo.losses import PreferenceLogps
from dpo.loss_settings import LossSettings

METRIC_NAMES = tuple(metrics.prefixed(dict.fromkeys(metrics.PREFERENCE_METRICS), "eval_"))


@dataclass
class PairLogps:
    """Summed completion log-probs of N pairs under one model, with the scored-token counts ([N] each)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    pair_weights: torch.Tensor | None = None  # WPO's [N] weights from this model (--use-weighting), else None

    def __len__(self) -> int:
        return int(self.chosen.shape[0])


def dpo_only_reason(loss: LossSettings) -> str | None:
    """Why held-out evaluation cannot score a run under these loss settings (None: it can). These
    metrics take DPO pairs (LD-DPO's weighted sums and WPO's weights included); the other objectives
    shape their batches otherwise (dpo.trainer)."""
    return f"--loss-type {loss.objective}" if loss.objective != "dpo" else None


def eval_metrics(policy: PairLogps, ref: PairLogps, loss: LossSettings, batch_size: int) -> dict[str, float]:
    """Every eval metric of N pairs, each a mean over the N pairs (see the module doc).

    `eval_metrics(ref, ref, ...)` is the evaluation of a policy equal to its reference (before training).
    """
    n = len(policy)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    if len(ref) != n:
        raise ValueError(f"policy has {n} pairs but the reference has {len(ref)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_pair = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        logps = PreferenceLogps(chosen=policy.chosen[sl], rejected=policy.rejected[sl], ref_chosen=ref.chosen[sl],
                                ref_rejected=ref.rejected[sl], chosen_tokens=policy.chosen_tokens[sl],
                                rejected_tokens=policy.rejected_tokens[sl])
        weights = None if policy.pair_weights is None else policy.pair_weights[sl]
        per_pair.append(metrics.pair_values(loss(logps, pair_weights=weights), logps))
    row = metrics.prefixed(metrics.mean_over_pairs(per_pair), "eval_")
    row.update({
        "eval_length_normalised_accuracy": length_normalised_accuracy(policy),
        "eval_ref_length_normalised_accuracy": length_normalised_accuracy(ref),
        "eval_ref_logps/chosen": float(ref.chosen.mean()),
        "eval_ref_logps/rejected": float(ref.rejected.mean()),
        "eval_num_pairs": n,
    })
    return row


def length_normalised_accuracy(lp: PairLogps) -> float:
    """Share of pairs whose chosen completion has the higher mean log-prob per token (ties count as wrong)."""
    c = lp.chosen / lp.chosen_tokens.clamp(min=1).to(lp.chosen.dtype)
    r = lp.rejected / lp.rejected_tokens.clamp(min=1).to(lp.rejected.dtype)
    return float((c > r).float().mean())
