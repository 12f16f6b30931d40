"""KTO (Ethayarajh et al. 2024) on unpaired rows, as TRL 1.15's KTOTrainer computes it.

A paired file is unpaired as TRL does (dpo.data.objective_rows.unpair_rows); each row's mismatched completion for
the KL estimate is the previous row's inside blocks of the batch size (dpo.data.objective_rows.kl_completions).
One micro-batch of N rows is scored on the rows and on their N mismatched KL rows:
    policy on the rows (with gradient), policy on the KL rows (without), the reference on both (without)
    kl    = kto_kl_estimate(policy KL rows, reference KL rows)   the batch's reference point z0
    loss  = mean over rows of kto_loss(policy - reference, desirable, kl)
KTO's metrics are batch metrics: rewards and log-probs of each side are means over that side's rows, left
out when a batch has none; the margin only when it has both. Held-out metrics are the mean over the
batches that logged each (as TRL averages them); the loss weighs each batch by its rows (HF Trainer's
eval_loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dpo.objectives import metrics
from dpo.data.sources import DataError
from dpo.losses import LossOutput
from dpo.data.objective_rows import (
    TokenizedRow, UnpairedBatch, UnpairedRow, collate_unpaired, kl_completions, kto_keeps, tokenize_unpaired, unpair_rows)
from dpo.losses import UnpairedLogps, kto_kl_estimate, kto_loss
from dpo.objectives.base import DataOptions, Objective, Scorer
from dpo.data.report import ObjectiveReport, kto_report

METRIC_NAMES = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@dataclass
class KtoScores:
    """One model's scores of N unpaired rows ([N] each): summed completion log-probs of the rows and of
    their mismatched KL rows, and which rows are desirable."""

    logps: Tensor
    kl_logps: Tensor
    desirable: Tensor

    def __len__(self) -> int:
        return int(self.logps.shape[0])


class KtoObjective(Objective):
    name = "kto"
    unit = "row"
    metric_names = METRIC_NAMES

    def __init__(self, settings, mean_over_ranks: Callable[[Tensor], Tensor] | None = None):
        super().__init__(settings)
        self.mean_over_ranks = mean_over_ranks  # the KL estimate's all-reduce under data parallelism

    def prepare(self, tokenizer, rows, options: DataOptions) -> tuple[list[TokenizedRow], ObjectiveReport]:
        """Rows split and tokenized as KTOTrainer does, those whose prompt fills max_length dropped, each
        kept row carrying its KL row's completion (the previous kept row's, in blocks of the batch size)."""
        if not rows:
            raise DataError(f"{options.source}: the dataset is empty (no rows)")
        unpaired = rows if isinstance(rows[0], UnpairedRow) else unpair_rows(list(rows))
        tokenized = [tokenize_unpaired(tokenizer, r) for r in unpaired]
        kept = [t for t in tokenized if kto_keeps(t, options.max_length)]
        report = kto_report(len(rows), tokenized, kept, options.max_length, options.source)
        if not kept:
            raise DataError(f"{options.source}: every prompt fills --max-length {options.max_length}; "
                            "nothing is left to train on")
        partners = kl_completions([r.completion_ids for r in kept], options.batch_size)
        return [dataclasses.replace(r, kl_completion_ids=y) for r, y in zip(kept, partners)], report

    def collate(self, items: list[TokenizedRow], pad_id: int, max_length: int | None) -> UnpairedBatch:
        """The rows and their KL rows; rows prepared without partners rotate within this batch (the same
        partners where batches are the blocks they were prepared in)."""
        partners = [r.kl_completion_ids for r in items]
        if any(p is None for p in partners):
            partners = kl_completions([r.completion_ids for r in items], len(items))
        return collate_unpaired(items, pad_id, max_length, partners)

    def score(self, scorer: Scorer, model, batch: UnpairedBatch, *, extras: bool = True) -> KtoScores:
        rows, kl_rows = batch.batch, batch.kl_batch
        logps = scorer.forward(model, rows).sums(scorer.on_device(rows).completion_mask)
        with torch.no_grad():
            kl_logps = scorer.forward(model, kl_rows).sums(scorer.on_device(kl_rows).completion_mask)
        return KtoScores(logps, kl_logps, batch.desirable.to(logps.device))

    def loss(self, policy: KtoScores, reference: KtoScores | None = None) -> tuple[LossOutput, UnpairedLogps]:
        kl = kto_kl_estimate(policy.kl_logps, reference.kl_logps, self.mean_over_ranks)
        logps = UnpairedLogps(policy.logps, reference.logps, policy.desirable, kl)
        return self.output(logps), logps

    def output(self, logps: UnpairedLogps) -> LossOutput:
        """Per-row losses in `pair_loss`; desirable rewards in `chosen_rewards`, undesirable ones in
        `rejected_rewards` (different lengths)."""
        s = self.settings
        logratios = logps.logps - logps.ref_logps.detach()
        desirable = logps.desirable.bool()
        per_row = kto_loss(logratios, desirable, logps.kl, beta=s.beta, desirable_weight=s.kto_desirable_weight,
                           undesirable_weight=s.kto_undesirable_weight)
        rewards = (s.beta * logratios).detach()
        return LossOutput(loss=per_row.nanmean(), per_pair={"kto": per_row}, pair_loss=per_row.detach(),
                          chosen_rewards=rewards[desirable], rejected_rewards=rewards[~desirable],
                          extra={"kl": logps.kl.detach()})

    def batch_row(self, out: LossOutput, logps: UnpairedLogps) -> dict[str, float]:
        desirable = logps.desirable.bool()
        row = {"loss": out.loss.detach().item(), "kl": out.extra["kl"].item()}
        for side, rewards, mask in (("chosen", out.chosen_rewards, desirable),
                                    ("rejected", out.rejected_rewards, ~desirable)):
            if mask.any():
                row[f"rewards/{side}"] = rewards.float().mean().item()
                row[f"logps/{side}"] = logps.logps.detach()[mask].float().mean().item()
        if "rewards/chosen" in row and "rewards/rejected" in row:
            row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
        return row

    def eval_row(self, policy: list[KtoScores], reference: list[KtoScores] | None, batch_size: int = 0) -> dict:
        """Every eval metric of KTO rows scored in batches, as TRL's KTOTrainer.evaluate() gives them (see the
        module doc); ours: eval_num_rows and eval_num_desirable."""
        if not policy or reference is None or len(policy) != len(reference):
            raise ValueError(f"{len(policy)} policy batches but {len(reference or [])} reference batches")
        rows, sizes = [], []
        for p, r in zip(policy, reference):
            rows.append(self.batch_row(*self.loss(p, r)))
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
