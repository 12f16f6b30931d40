"""DPO and its loss types (dpo/losses.py), with LD-DPO's length-desensitised and WPO's weighted pairs, as
TRL 1.15's DPOTrainer computes them.

One micro-batch of B pairs is one forward of 2B rows (chosen rows, then rejected rows):
    logps[2B]        summed completion log-probs; LD-DPO: shared + ld_alpha * tail (objective_logps.ld_masks)
    pair_weights[B]  WPO: w(y_w|x) w(y_l|x) from the same forward, without gradient
    loss             preference_loss(policy, reference) over the B pairs (the reference: the same scores
                     without gradient under the reference model, precomputable once)

Held-out metrics, from log-probs already computed (pure functions): TRL's names with `eval_`, each the
mean over all N pairs (a mean of batch means would weigh the pairs of a last, smaller batch more). The
loss runs on batches of `batch_size` pairs because a few loss types (aot, aot_unpaired) sort across their
batch. Ours, over all pairs, because before training the policy is the reference and TRL's
implicit-reward metrics are trivial there (margins 0, accuracy 0, loss log 2):

    eval_length_normalised_accuracy     = share of pairs whose chosen completion has the higher mean
                                          log-prob per token under the policy (ties count as wrong)
    eval_ref_length_normalised_accuracy = the same under the reference (= the policy before training)
    eval_ref_logps/chosen, eval_ref_logps/rejected, eval_num_pairs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpo.objectives import metrics
from dpo.data.pairs import Batch, TokenizedPair, collate, prepare_pairs
from dpo.losses import LossOutput, PreferenceLogps, preference_loss
from dpo.logps import ld_logps, ld_masks, wpo_pair_weights
from dpo.objectives.base import DataOptions, Objective, Scorer

METRIC_NAMES = tuple(metrics.prefixed(dict.fromkeys(metrics.PREFERENCE_METRICS), "eval_"))


@dataclass
class DpoScores:
    """One model's scores of a batch of B pairs."""

    logps: Tensor  # [2B] as the loss takes them: chosen rows, then rejected rows
    tokens: Tensor  # [2B] completion tokens of each row
    pair_weights: Tensor | None = None  # [B] WPO's weights (--use-weighting), else None

    def __len__(self) -> int:
        return int(self.logps.shape[0]) // 2


@dataclass
class PairLogps:
    """Summed completion log-probs of N pairs under one model, with the scored-token counts ([N] each)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    pair_weights: Tensor | None = None  # WPO's [N] weights from this model (--use-weighting), else None

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @classmethod
    def of(cls, scores: list[DpoScores]) -> "PairLogps":
        """The pairs of several batches' scores, in order."""
        halves = [(s.logps.chunk(2), s.tokens.chunk(2)) for s in scores]
        weights = [s.pair_weights for s in scores if s.pair_weights is not None]
        return cls(torch.cat([lp[0] for lp, _ in halves]), torch.cat([lp[1] for lp, _ in halves]),
                   torch.cat([n[0] for _, n in halves]), torch.cat([n[1] for _, n in halves]),
                   torch.cat(weights) if weights else None)


class PreferenceObjective(Objective):
    name = "dpo"
    metric_names = metrics.PREFERENCE_METRICS
    can_precompute_reference = True
    plannable = True

    @property
    def can_pack(self) -> bool:
        """Packing scores plain completion sums only: not LD-DPO's split sums, not WPO's weights."""
        return self.settings.ld_alpha is None and not self.settings.use_weighting

    def prepare(self, tokenizer, rows, options: DataOptions) -> tuple[list[TokenizedPair], object]:
        return prepare_pairs(tokenizer, rows, options.max_length, options.max_prompt_length,
                             drop_identical=options.drop_identical)

    def collate(self, items: list[TokenizedPair], pad_id: int, max_length: int | None) -> Batch:
        return collate(items, pad_id, max_length)

    def score(self, scorer: Scorer, model, batch: Batch, *, extras: bool = True) -> DpoScores:
        s = self.settings
        tokens = batch.completion_mask.sum(dim=1).to(scorer.device)
        wpo = extras and s.use_weighting
        if s.ld_alpha is None and not wpo:
            return DpoScores(scorer.completion_logps(model, batch), tokens)
        scored = scorer.forward(model, batch)
        cm = scored.batch.completion_mask
        if s.ld_alpha is None:
            logps = scored.sums(cm)
        else:
            shared, tail = ld_masks(cm)
            logps = ld_logps(scored.sums(shared), scored.sums(tail), s.ld_alpha)
        return DpoScores(logps, tokens, wpo_pair_weights(scored.wpo_weights(cm)) if wpo else None)

    def loss(self, policy: DpoScores, reference: DpoScores | None = None) -> tuple[LossOutput, PreferenceLogps]:
        ref = reference.logps if reference is not None else torch.zeros_like(policy.logps)
        (c, r), (rc, rr), (nc, nr) = policy.logps.chunk(2), ref.chunk(2), policy.tokens.chunk(2)
        logps = PreferenceLogps(chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_tokens=nc,
                                rejected_tokens=nr)
        return self.output(logps, policy.pair_weights), logps

    def output(self, logps: PreferenceLogps, pair_weights: Tensor | None = None) -> LossOutput:
        """The loss of B pairs' log-probs under these settings (WPO: `pair_weights` [B])."""
        s = self.settings
        return preference_loss(logps, beta=s.beta, loss_types=s.loss_type, loss_weights=s.loss_weights,
                               label_smoothing=s.label_smoothing, discopop_tau=s.discopop_tau,
                               reference_free=s.reference_free,
                               pair_weights=pair_weights if s.use_weighting else None)

    def reference_values(self, scores: DpoScores) -> Tensor:
        """[B, 2]: each pair's (chosen, rejected) reference log-prob."""
        return torch.stack(scores.logps.chunk(2), dim=1)

    def reference_from_values(self, values: Tensor) -> DpoScores:
        return DpoScores(torch.cat([values[:, 0], values[:, 1]]), tokens=None)

    def batch_row(self, out: LossOutput, logps: PreferenceLogps) -> dict[str, float]:
        return metrics.batch_row(out, logps)

    def eval_row(self, policy: list[DpoScores], reference: list[DpoScores] | None, batch_size: int) -> dict:
        pol = PairLogps.of(policy)
        ref = PairLogps.of(reference) if reference else PairLogps.of([DpoScores(torch.zeros_like(s.logps), s.tokens)
                                                                     for s in policy])
        return eval_metrics(pol, ref, self, batch_size)


def eval_metrics(policy: PairLogps, ref: PairLogps, objective: PreferenceObjective, batch_size: int) -> dict:
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
        per_pair.append(metrics.pair_values(objective.output(logps, weights), logps))
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
