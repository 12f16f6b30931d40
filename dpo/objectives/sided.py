"""SimPO, CPO and ORPO: reference-free, paired, tokenized and scored as TRL 1.15's CPOTrainer and
ORPOTrainer do (dpo.data.objective_rows.tokenize_sided), with the pure formulas of dpo/losses.py.

One micro-batch of B pairs is one forward of 2B rows (chosen rows, then rejected rows):
    chosen, rejected[B]   summed completion log-probs; SimPO and ORPO take per-token means
    nll                   the chosen rows' token-mean NLL (CPO: the completion; ORPO: prompt and completion)
    loss                  simpo_loss | cpo_loss | ORPO's -beta log sigma(log odds), mean over pairs,
                          + the NLL term (cpo_alpha for CPO/SimPO, 1 for ORPO)
Evaluation takes TRL's NLL as a token mean over each batch's chosen rows, so each pair carries its
batch's value, and each pair's loss is its own term plus its batch's NLL term: the mean over pairs is then
HF Trainer's eval_loss (batch losses weighted by batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.objectives import metrics
from dpo.data.pairs import Batch
from dpo.data.sources import DataError
from dpo.losses import LossOutput, PreferenceLogps
from dpo.data.objective_rows import SidedPair, collate_sided, cut_sided, sided_keeps, tokenize_sided
from dpo.logps import completion_token_counts, mean_logps, prompt_token_mask
from dpo.losses import chosen_nll, cpo_loss, orpo_log_odds, simpo_loss
from dpo.objectives.base import DataOptions, Objective, Scorer
from dpo.objectives.dpo import PairLogps, length_normalised_accuracy
from dpo.data.report import ObjectiveReport, sided_report

@dataclass
class SidedScores:
    """One model's scores of B SimPO/CPO/ORPO pairs ([B] each): summed completion log-probs and their
    token counts, and what the chosen NLL reads (ORPO's: prompt and completion)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    nll_logps: Tensor
    nll_tokens: Tensor

    def __len__(self) -> int:
        return int(self.chosen.shape[0])


class SidedObjective(Objective):
    """SimPO, CPO or ORPO (settings.objective names which)."""

    eval_reference = False

    def __init__(self, settings):
        super().__init__(settings)
        self.name = settings.objective
        self.metric_names = metrics.PREFERENCE_METRICS + (
            ("nll_loss", "log_odds_ratio", "log_odds_chosen") if self.name == "orpo" else ("nll_loss",))

    def prepare(self, tokenizer, rows, options: DataOptions) -> tuple[list[SidedPair], ObjectiveReport]:
        """Pairs tokenized as TRL's CPO/ORPO trainers do, those whose prompt fills max_length dropped (TRL keeps
        them with an empty completion, whose mean log-prob is 0/0: a deliberate difference), the rest cut."""
        if not rows:
            raise DataError(f"{options.source}: the dataset is empty (no rows)")
        uncut = [tokenize_sided(tokenizer, r, None) for r in rows]
        kept = [p for p in uncut if sided_keeps(p, options.max_length)]  # as DPO and KTO drop theirs
        report = sided_report(self.name, uncut, kept, options.max_length, options.source)
        if not kept:
            raise DataError(f"{options.source}: every prompt fills --max-length {options.max_length}; "
                            "nothing is left to train on")
        return [cut_sided(p, options.max_length) for p in kept], report

    def collate(self, items: list[SidedPair], pad_id: int, max_length: int | None) -> Batch:
        return collate_sided(items, pad_id)

    def score(self, scorer: Scorer, model, batch: Batch, *, extras: bool = True) -> SidedScores:
        scored = scorer.forward(model, batch)
        on_device, b = scored.batch, batch.num_pairs
        cm = on_device.completion_mask
        sums, counts = scored.sums(cm), completion_token_counts(cm)
        nll_logps, nll_tokens = sums[:b], counts[:b]
        if self.settings.nll_weight > 0 and self.settings.nll_includes_prompt:
            prompt = prompt_token_mask(on_device.attention_mask, cm)
            nll_logps = nll_logps + scored.sums(prompt, slice(0, b))
            nll_tokens = completion_token_counts(on_device.attention_mask[:b])
        return SidedScores(sums[:b], sums[b:], counts[:b], counts[b:], nll_logps, nll_tokens)

    def loss(self, policy: SidedScores, reference=None) -> tuple[LossOutput, PreferenceLogps]:
        s = self.settings
        counts = (policy.chosen_tokens, policy.rejected_tokens)
        c, r = policy.chosen, policy.rejected
        if s.length_normalised:
            c, r = mean_logps(c, counts[0]), mean_logps(r, counts[1])
        nll = chosen_nll(policy.nll_logps, policy.nll_tokens) if s.nll_weight > 0 else None
        zeros = torch.zeros_like(c)
        logps = PreferenceLogps(c, r, zeros, zeros, *counts)
        return self.output(logps, nll), logps

    def output(self, logps: PreferenceLogps, nll: Tensor | None = None) -> LossOutput:
        """The loss of B pairs: `logps` chosen/rejected are per-token MEANS (SimPO, ORPO) or sums (CPO), the
        reference fields unused; `nll` = chosen_nll(...) of the batch, required when nll_weight > 0."""
        s, obj, beta = self.settings, self.name, self.settings.beta
        c, r = logps.chosen, logps.rejected
        extra: dict[str, Tensor] = {}
        if obj == "simpo":
            per_pair = simpo_loss(c, r, beta=beta, gamma=s.simpo_gamma, label_smoothing=s.label_smoothing)
        elif obj == "cpo":
            per_pair = cpo_loss(c, r, beta=beta, label_smoothing=s.label_smoothing)
        else:  # orpo
            log_odds = orpo_log_odds(c, r)
            per_pair = -(beta * F.logsigmoid(log_odds))
            extra["log_odds_ratio"] = F.logsigmoid(log_odds).mean().detach()
            extra["log_odds_chosen"] = log_odds.mean().detach()
        loss = per_pair.mean()
        if s.nll_weight > 0:
            if nll is None:
                raise ValueError(f"the {obj} loss needs the chosen NLL of the batch (nll=chosen_nll(...)).")
            # ORPO: TRL adds the NLL unweighted (nll - mean(beta*ratio)); multiplying by 1.0 would be exact anyway.
            loss = nll + loss if obj == "orpo" else loss + s.nll_weight * nll
        # TRL logs nll_loss 0 when cpo_alpha is 0 (it skips the NLL); ORPO always has it (checked above).
        extra["nll_loss"] = (nll if nll is not None else torch.zeros((), device=c.device)).detach()
        return LossOutput(loss=loss, per_pair={obj: per_pair}, pair_loss=per_pair.detach(),
                          chosen_rewards=(beta * c).detach(), rejected_rewards=(beta * r).detach(), extra=extra)

    def batch_row(self, out: LossOutput, logps: PreferenceLogps) -> dict[str, float]:
        row = metrics.batch_row(out, logps)
        row.update({k: v.item() for k, v in out.extra.items()})
        return row

    def pair_values(self, scores: SidedScores) -> dict[str, Tensor]:
        """Each metric of one batch, per pair ([B]), as TRL's CPOTrainer/ORPOTrainer compute it on that batch
        (the NLL and its loss term are the batch's, see the module doc)."""
        out, logps = self.loss(scores)
        values = metrics.pair_values(out, logps)
        values["loss"] = out.pair_loss + (out.loss.detach() - out.pair_loss.mean())
        values["nll_loss"] = out.extra["nll_loss"].float().expand(len(scores))
        if self.name == "orpo":
            log_odds = orpo_log_odds(logps.chosen, logps.rejected).float()
            values["log_odds_ratio"] = F.logsigmoid(log_odds)
            values["log_odds_chosen"] = log_odds
        return values

    def eval_row(self, policy: list[SidedScores], reference=None, batch_size: int = 0) -> dict[str, float]:
        """TRL's names with `eval_`, each a mean over all pairs, plus ours: the length-normalised accuracy
        and the number of pairs."""
        if not policy or sum(len(b) for b in policy) == 0:
            raise ValueError("no pairs to evaluate")
        row = metrics.prefixed(metrics.mean_over_pairs([self.pair_values(b) for b in policy]), "eval_")
        whole = PairLogps(*(torch.cat([getattr(b, k) for b in policy])
                            for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")))
        row["eval_length_normalised_accuracy"] = length_normalised_accuracy(whole)
        row["eval_num_pairs"] = len(whole)
        return row
