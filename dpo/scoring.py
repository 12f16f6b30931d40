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
from dpo.objective_logps import mean_logps
from dpo.objective_losses import UnpairedLogps, chosen_nll, kto_kl_estimate, orpo_log_odds
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


SIDED_OBJECTIVES = ("simpo", "cpo", "orpo")  # scored on SidedPairs by `sided_eval_metrics`


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


# --- SimPO, CPO, ORPO ----------------------------------------------------------------------------


@dataclass
class SidedLogps:
    """One eval batch of B SimPO/CPO/ORPO pairs under the policy ([B] each): summed completion log-probs
    and their token counts, and what the chosen NLL reads (ORPO's: prompt and completion)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    nll_logps: torch.Tensor
    nll_tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.chosen.shape[0])


def sided_pair_values(loss: LossSettings, lp: SidedLogps) -> dict[str, torch.Tensor]:
    """Each metric of one batch, per pair ([B]), as TRL's CPOTrainer/ORPOTrainer compute it on that batch.

    The NLL is TRL's: a token mean over the batch's chosen rows, so each pair carries its batch's value;
    so does each pair's `loss` (its own term plus the batch's NLL term): the mean over pairs is then HF
    Trainer's eval_loss (batch losses weighted by batch size)."""
    counts = (lp.chosen_tokens, lp.rejected_tokens)
    c, r = (mean_logps(lp.chosen, counts[0]), mean_logps(lp.rejected, counts[1])) if loss.length_normalised \
        else (lp.chosen, lp.rejected)
    nll = chosen_nll(lp.nll_logps, lp.nll_tokens) if loss.nll_weight > 0 else None
    zeros = torch.zeros_like(c)
    logps = PreferenceLogps(c, r, zeros, zeros, *counts)
    out = loss(logps, nll=nll)
    values = metrics.pair_values(out, logps)
    values["loss"] = out.pair_loss + (out.loss.detach() - out.pair_loss.mean())
    values["nll_loss"] = out.extra["nll_loss"].float().expand(len(lp))
    if loss.objective == "orpo":
        log_odds = orpo_log_odds(c, r).float()
        values["log_odds_ratio"] = torch.nn.functional.logsigmoid(log_odds)
        values["log_odds_chosen"] = log_odds
    return values


def sided_eval_metrics(batches: list[SidedLogps], loss: LossSettings) -> dict[str, float]:
    """Every eval metric of SimPO/CPO/ORPO pairs scored in `batches`: TRL's names with `eval_`, each a
    mean over all pairs (the NLL per batch, see `sided_pair_values`), plus ours: the length-normalised
    accuracy and the number of pairs."""
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("no pairs to evaluate")
    row = metrics.prefixed(metrics.mean_over_pairs([sided_pair_values(loss, b) for b in batches]), "eval_")
    whole = PairLogps(*(torch.cat([getattr(b, k) for b in batches])
                        for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")))
    row["eval_length_normalised_accuracy"] = length_normalised_accuracy(whole)
    row["eval_num_pairs"] = len(whole)
    return row


# --- KTO -----------------------------------------------------------------------------------------


@dataclass
class UnpairedSums:
    """One eval batch of N KTO rows under one model ([N] each): summed completion log-probs of the rows
    and of their mismatched KL rows, and which rows are desirable."""

    logps: torch.Tensor
    kl_logps: torch.Tensor
    desirable: torch.Tensor

    def __len__(self) -> int:
        return int(self.logps.shape[0])


def kto_eval_metrics(policy: list[UnpairedSums], ref: list[UnpairedSums], loss: LossSettings) -> dict[str, float]:
    """Every eval metric of KTO rows scored in batches, as TRL's KTOTrainer.evaluate() gives them.

    KTO's KL estimate is a property of a batch (its mismatched rows), so the metrics are batch metrics
    (`dpo.metrics.objective_batch_row`, as training logs them): each the mean over the batches that
    logged it (a batch without desirable rows has no rewards/chosen), as TRL averages them; the loss
    weighs each batch by its rows, as HF Trainer's eval_loss. With batches of equal size and mix the
    rewards and log-probs are means over rows. Ours: eval_num_rows and eval_num_desirable."""
    if not policy or len(policy) != len(ref):
        raise ValueError(f"{len(policy)} policy batches but {len(ref)} reference batches")
    rows, sizes = [], []
    for p, r in zip(policy, ref):
        lp = UnpairedLogps(p.logps, r.logps, p.desirable, kto_kl_estimate(p.kl_logps, r.kl_logps))
        rows.append(metrics.objective_batch_row(loss(lp), lp))
        sizes.append(len(p))
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        logged = [row[key] for row in rows if key in row]
        out[key] = sum(logged) / len(logged)
    out["loss"] = sum(n * row["loss"] for n, row in zip(sizes, rows)) / sum(sizes)
    out = metrics.prefixed(out, "eval_")
    out["eval_num_rows"] = sum(sizes)
    out["eval_num_desirable"] = int(sum(int(p.desirable.sum()) for p in policy))
    return out
