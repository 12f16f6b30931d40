"""Held-out evaluation: one class for a training run's before/after numbers and for `python -m dpo.evaluate`.

    evaluation = Evaluation.for_run(cfg, tokenizer)   # None when the run has nothing to evaluate on
    evaluation.before(model)       # the reference's log-probs, computed once (the reference never changes)
    evaluation.metrics(model)      # the policy now (every --eval-steps)
    evaluation.after(model)        # the policy at the end, plus greedy generations for a built-in task
    print(evaluation.report())     # before/after table (+ generations side by side)
    json.dump(evaluation.to_dict())

The data is a preference file/folder/hub dataset (all its rows, or the first `eval_size`) or a built-in
task's held-out split (`builtin:NAME`), which also has a ground-truth reward: then `after` generates
greedily from the policy and the reference and scores both (dpo.generation). The metrics themselves
come from log-probs through the pure `dpo.scoring.eval_metrics` (each a mean over pairs); SimPO, CPO and
ORPO pairs (tokenized as training does) through `dpo.scoring.sided_eval_metrics`, with no reference;
KTO's unpaired rows (a paired file split as training splits it) through `dpo.scoring.kto_eval_metrics`,
in batches that each carry their own KL estimate.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from dpo import generation, models, progress, tasks
from dpo import data as data_mod
from dpo.data import TokenizedPair, collate
from dpo.loss_settings import LossSettings
from dpo.report import ObjectiveReport, kto_report, sided_report
from dpo import objective_data as od
from dpo.build import read_spec_rows
from dpo.objective_data import SidedPair, TokenizedRow, collate_sided, tokenize_sided
from dpo.objective_logps import completion_token_counts, ld_logps, ld_masks, prompt_token_mask, wpo_pair_weights
from dpo.scoring import (METRIC_NAMES, SIDED_OBJECTIVES, PairLogps, SidedLogps, UnpairedSums, eval_metrics,
                         kto_eval_metrics, sided_eval_metrics)

__all__ = ["METRIC_NAMES", "Evaluation", "GenerationSettings", "PairLogps", "evaluate_pairs", "pair_logps",
           "sided_logps", "unpaired_sums", "format_metrics", "format_before_after"]

SIDED_NO_LIMIT = 1 << 30  # CPO/ORPO tokenization with no max_length: nothing is cut (as dpo.build)


def pair_logps(model, tokenizer, pairs: list[TokenizedPair], *, batch_size: int, logprobs: str = "chunked",
               max_length: int | None = None, reference: bool = False, ref_model=None,
               ld_alpha: float | None = None, wpo: bool = False) -> PairLogps:
    """Log-probs of every pair's chosen and rejected completion (float32, on the CPU), no gradients.

    reference=True: under the reference (`ref_model`, or `model` in dpo.models.reference_mode).
    ld_alpha: LD-DPO's weighted sums (as training takes them); wpo: also WPO's pair weights.
    `max_length` must be the one the pairs were prepared with (the collator cuts completions to it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = models.pad_id(tokenizer)
    device = next(model.parameters()).device
    lps: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    scope = models.as_reference(model, ref_model) if reference else contextlib.nullcontext(model)
    desc = "eval (reference)" if reference else "eval (policy)"
    with torch.no_grad(), models.eval_mode(model), scope as net, progress.bar(len(pairs), desc, "pair") as bar:
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start : start + batch_size], pad, max_length).to(device)
            b = batch.num_pairs
            lp, w = _dpo_logps(net, batch, logprobs, ld_alpha, wpo)
            lp = lp.float().cpu()
            if w is not None:
                weights.append(w.float().cpu())
            n = batch.completion_mask.sum(dim=1).cpu()
            lps.append(torch.stack([lp[:b], lp[b:]], dim=1))
            counts.append(torch.stack([n[:b], n[b:]], dim=1))
            bar.update(b)
    lp = torch.cat(lps) if lps else torch.zeros(0, 2)
    n = torch.cat(counts) if counts else torch.zeros(0, 2, dtype=torch.long)
    return PairLogps(lp[:, 0], lp[:, 1], n[:, 0], n[:, 1], torch.cat(weights) if wpo and weights else None)


def _dpo_logps(model, batch, logprobs: str, ld_alpha: float | None, wpo: bool):
    """([2B] log-probs as the DPO loss takes them, [B] WPO weights or None) of one batch on the device."""
    if ld_alpha is None and not wpo:
        return models.completion_logps(model, batch, logprobs), None
    scored = models.ScoredForward(model, batch, logprobs)
    cm = batch.completion_mask
    if ld_alpha is None:
        lp = scored.sums(cm)
    else:
        shared, tail = ld_masks(cm)
        lp = ld_logps(scored.sums(shared), scored.sums(tail), ld_alpha)
    return lp, (wpo_pair_weights(scored.wpo_weights(cm)) if wpo else None)


def sided_logps(model, tokenizer, pairs: list[SidedPair], *, batch_size: int, logprobs: str = "chunked",
                include_prompt: bool = False, reference: bool = False, ref_model=None) -> list[SidedLogps]:
    """SimPO/CPO/ORPO pairs scored in batches of `batch_size` (file order), as training scores a micro-batch
    (dpo.trainer.Trainer.sided_loss): one forward of [chosen rows; rejected rows]; no gradients, float32
    on the CPU. include_prompt: the NLL reads prompt and completion (ORPO). reference=True: the starting
    model (`ref_model`, or `model` in dpo.models.reference_mode), i.e. the policy before training."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = models.pad_id(tokenizer)
    device = next(model.parameters()).device
    out: list[SidedLogps] = []
    scope = models.as_reference(model, ref_model) if reference else contextlib.nullcontext(model)
    desc = "eval (start model)" if reference else "eval (policy)"
    with torch.no_grad(), models.eval_mode(model), scope as net, progress.bar(len(pairs), desc, "pair") as bar:
        for start in range(0, len(pairs), batch_size):
            batch = collate_sided(pairs[start : start + batch_size], pad).to(device)
            b, cm = batch.num_pairs, batch.completion_mask
            scored = models.ScoredForward(net, batch, logprobs)
            sums, counts = scored.sums(cm).float().cpu(), completion_token_counts(cm).cpu()
            nll_logps, nll_tokens = sums[:b], counts[:b]
            if include_prompt:
                prompt = prompt_token_mask(batch.attention_mask, cm)
                nll_logps = nll_logps + scored.sums(prompt, slice(0, b)).float().cpu()
                nll_tokens = completion_token_counts(batch.attention_mask[:b]).cpu()
            out.append(SidedLogps(sums[:b], sums[b:], counts[:b], counts[b:], nll_logps, nll_tokens))
            bar.update(b)
    return out


def unpaired_sums(model, tokenizer, rows: list[TokenizedRow], *, batch_size: int, max_length: int | None,
                  logprobs: str = "chunked", reference: bool = False, ref_model=None) -> list[UnpairedSums]:
    """KTO rows scored in batches of `batch_size` (file order), each with its mismatched KL rows (the
    completions rotated by one inside the batch, as TRL's KTOTrainer builds them), as training scores a
    micro-batch (dpo.trainer.Trainer.kto_loss); no gradients, float32 on the CPU. reference=True: under
    the reference (`ref_model`, or `model` in dpo.models.reference_mode)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = models.pad_id(tokenizer)
    device = next(model.parameters()).device
    kl_ids = od.kl_completions([r.completion_ids for r in rows], batch_size)
    out: list[UnpairedSums] = []
    scope = models.as_reference(model, ref_model) if reference else contextlib.nullcontext(model)
    desc = "eval (reference)" if reference else "eval (policy)"
    with torch.no_grad(), models.eval_mode(model), scope as net, progress.bar(len(rows), desc, "row") as bar:
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            ub = od.collate_unpaired(rows[part], pad, max_length, kl_ids[part])
            sums = []
            for batch in (ub.batch.to(device), ub.kl_batch.to(device)):
                sums.append(models.ScoredForward(net, batch, logprobs).sums(batch.completion_mask).float().cpu())
            out.append(UnpairedSums(sums[0], sums[1], ub.desirable))
            bar.update(len(ub.desirable))
    return out


def evaluate_pairs(model, tokenizer, pairs: list[TokenizedPair], *, loss: LossSettings, batch_size: int,
                   logprobs: str = "chunked", ref_model=None, max_length: int | None = None,
                   ref_logps: PairLogps | None = None) -> dict[str, float]:
    """The eval metrics of the policy `model` on held-out pairs (no gradients; train/eval mode restored):
    `dpo.scoring.eval_metrics` of its log-probs and the reference's, plus `eval_seconds`.

    The reference is `ref_model` when given, else `model` under dpo.models.reference_mode (LoRA off, or
    the frozen start adapter); `ref_logps` (from `pair_logps(..., reference=True)`) skips computing it.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    if ref_logps is not None and len(ref_logps) != len(pairs):
        raise ValueError(f"ref_logps holds {len(ref_logps)} pairs, but {len(pairs)} pairs were given")
    started = time.time()
    kw = dict(batch_size=batch_size, logprobs=logprobs, max_length=max_length, ld_alpha=loss.ld_alpha,
              wpo=loss.use_weighting)
    if ref_logps is None:
        ref_logps = pair_logps(model, tokenizer, pairs, reference=True, ref_model=ref_model, **kw)
    policy = pair_logps(model, tokenizer, pairs, **kw)
    metrics = eval_metrics(policy, ref_logps, loss, batch_size)
    metrics["eval_seconds"] = round(time.time() - started, 3)
    return metrics


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy generations of a built-in task's evaluation (ignored for data without a reward)."""

    prompts: int = tasks.DEFAULT_EVAL["generations"]  # held-out prompts to generate for (0: none)
    max_new_tokens: int = tasks.DEFAULT_EVAL["max_new_tokens"]
    batch_size: int = tasks.DEFAULT_EVAL["generation_batch_size"]


class Evaluation:
    """Before/after evaluation on held-out pairs; for a built-in task also greedy generations, their
    ground-truth reward and their KL to the reference (see the module doc).

    `task` (a dpo.tasks.Task) and `prompts` (its held-out prompts) make the generations; without a task
    there are none. The reference is `ref_model` when given, else the model in reference mode.
    SimPO/CPO/ORPO (`pairs` are SidedPairs) use no reference: "before" is the starting model scored as the
    policy (the same model as the reference: the adapter off, or the frozen start adapter).
    """

    def __init__(self, name: str, tokenizer, pairs: list[TokenizedPair] | list[SidedPair] | list[TokenizedRow], *,
                 loss: LossSettings, max_length: int | None, logprobs: str = "chunked",
                 batch_size: int = tasks.DEFAULT_EVAL["batch_size"],
                 data_report: data_mod.DataReport | ObjectiveReport | None = None, task=None,
                 prompts: list | None = None,
                 generation_settings: GenerationSettings | None = None, ref_model=None):
        if not pairs:
            raise ValueError(f"{name}: no pairs to evaluate")
        self.name, self.tokenizer, self.pairs = name, tokenizer, pairs
        self.loss, self.max_length, self.logprobs, self.batch_size = loss, max_length, logprobs, batch_size
        self.data_report, self.task, self.prompts = data_report, task, list(prompts or [])
        self.generation_settings = generation_settings or GenerationSettings()
        self.ref_model = ref_model
        self.sided = loss.objective in SIDED_OBJECTIVES  # SimPO/CPO/ORPO: SidedPairs, no reference
        self.ref_sums: list[UnpairedSums] | None = None  # KTO: the reference's, computed once
        self.ref_logps: PairLogps | None = None
        self.before_metrics: dict | None = None
        self.after_metrics: dict | None = None
        self.generations: dict | None = None
        self.seconds = {"before": 0.0, "after": 0.0, "generations": 0.0}

    @classmethod
    def for_run(cls, cfg, tokenizer) -> "Evaluation | None":
        """The evaluation of a training run: on --eval-dataset, else on a built-in --dataset's held-out
        split; None when there is neither."""
        name = cfg.eval_dataset or (cfg.dataset if tasks.is_builtin(cfg.dataset) else None)
        if name is None:
            return None
        loss = LossSettings.from_config(cfg)
        spec = dict(prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                    rejected_column=cfg.rejected_column, implicit_prompt=cfg.implicit_prompt)
        return cls.of_dataset(name, tokenizer, loss=loss, max_length=cfg.max_length,
                              max_prompt_length=cfg.max_prompt_length, drop_identical=not cfg.keep_identical,
                              logprobs=cfg.logprobs, spec=spec)

    @classmethod
    def of_dataset(cls, dataset: str, tokenizer, *, loss: LossSettings, max_length: int | None,
                   max_prompt_length: int | None = None, drop_identical: bool = True, eval_size: int | None = None,
                   seed: int = 0, spec: dict | None = None, **kwargs) -> "Evaluation":
        """On `builtin:NAME` (`eval_size` held-out rows, default 48, made with `seed`) or on a preference
        dataset (its first `eval_size` rows, default all; `spec`: more DataSpec fields, e.g. columns).
        DataError for a bad dataset; `kwargs` go to the constructor."""
        task = prompts = None
        if tasks.is_builtin(dataset):
            task, _ = tasks.parse_builtin(dataset)
            raw = task.eval_rows(eval_size or tasks.DEFAULT_EVAL["n_pairs"], seed)
            rows = tasks.preference_rows(raw, source=f"{task.dataset} (held-out)")
            prompts = [r["prompt"] for r in raw]
        else:
            rows = read_spec_rows(data_mod.DataSpec(path=dataset, **(spec or {})), unpaired=loss.unpaired)
            if eval_size is not None and isinstance(rows, data_mod.Rows):
                rows, fmt = data_mod.Rows(rows[:eval_size]), rows.format
                rows.format = fmt
            elif eval_size is not None:
                rows = rows[:eval_size]
        if loss.unpaired:  # as training and TRL's KTOTrainer: pairs split, rows whose prompt fills max_length dropped
            unpaired = rows if rows and isinstance(rows[0], od.UnpairedRow) else od.unpair_rows(list(rows))
            tokenized = [od.tokenize_unpaired(tokenizer, r) for r in unpaired]
            pairs = [t for t in tokenized if od.kto_keeps(t, max_length)]
            report = kto_report(len(rows), tokenized, pairs, max_length, dataset)
            if not pairs:
                raise data_mod.DataError(f"{dataset}: every prompt fills max_length {max_length}; no row to evaluate")
        elif loss.objective in SIDED_OBJECTIVES:  # tokenized as training and TRL's CPO/ORPO trainers do: none dropped
            limit = max_length if max_length is not None else SIDED_NO_LIMIT
            pairs = [tokenize_sided(tokenizer, r, limit) for r in rows]
            uncut = pairs if max_length is None else [tokenize_sided(tokenizer, r, SIDED_NO_LIMIT) for r in rows]
            report = sided_report(loss.objective, uncut, max_length, dataset)
        else:
            pairs, report = data_mod.prepare_pairs(tokenizer, rows, max_length, max_prompt_length,
                                                   drop_identical=drop_identical)
        return cls(dataset, tokenizer, pairs, loss=loss, max_length=max_length, data_report=report, task=task,
                   prompts=prompts, **kwargs)

    def _reference(self, model) -> PairLogps:
        """The reference's log-probs of the pairs, computed once (the reference never changes)."""
        if self.ref_logps is None:
            self.ref_logps = pair_logps(model, self.tokenizer, self.pairs, batch_size=self.batch_size,
                                        logprobs=self.logprobs, max_length=self.max_length, reference=True,
                                        ref_model=self.ref_model, ld_alpha=self.loss.ld_alpha,
                                        wpo=self.loss.use_weighting)  # its weights: the policy's before training
        return self.ref_logps

    def _sided_metrics(self, model, reference: bool = False) -> dict[str, float]:
        started = time.time()
        batches = sided_logps(model, self.tokenizer, self.pairs, batch_size=self.batch_size, logprobs=self.logprobs,
                              include_prompt=self.loss.nll_includes_prompt, reference=reference,
                              ref_model=self.ref_model)
        return {**sided_eval_metrics(batches, self.loss), "eval_seconds": round(time.time() - started, 3)}

    def _unpaired(self, model, reference: bool) -> list[UnpairedSums]:
        return unpaired_sums(model, self.tokenizer, self.pairs, batch_size=self.batch_size, max_length=self.max_length,
                             logprobs=self.logprobs, reference=reference, ref_model=self.ref_model)

    def _kto_metrics(self, model, policy_is_reference: bool = False) -> dict[str, float]:
        started = time.time()
        if self.ref_sums is None:
            self.ref_sums = self._unpaired(model, reference=True)
        policy = self.ref_sums if policy_is_reference else self._unpaired(model, reference=False)
        return {**kto_eval_metrics(policy, self.ref_sums, self.loss), "eval_seconds": round(time.time() - started, 3)}

    def metrics(self, model) -> dict[str, float]:
        """The eval metrics (TRL's names with `eval_`, and ours) of the policy `model` now."""
        if self.sided:
            return self._sided_metrics(model)
        if self.loss.unpaired:
            return self._kto_metrics(model)
        return evaluate_pairs(model, self.tokenizer, self.pairs, loss=self.loss, batch_size=self.batch_size,
                              logprobs=self.logprobs, max_length=self.max_length, ref_model=self.ref_model,
                              ref_logps=self._reference(model))

    def before(self, model, policy_is_reference: bool = True) -> dict[str, float]:
        """The starting model's metrics. Before the first step the policy equals the reference (a fresh
        LoRA adds exactly zero; a starting --adapter is its own frozen reference), so they are the
        reference scored against itself, with no policy pass; in a resumed run they are still the
        start's. policy_is_reference=False scores the policy instead."""
        started = time.time()
        if self.sided:
            self.before_metrics = self._sided_metrics(model, reference=policy_is_reference)
        elif self.loss.unpaired:
            self.before_metrics = self._kto_metrics(model, policy_is_reference)
        elif policy_is_reference:
            ref = self._reference(model)
            self.before_metrics = {**eval_metrics(ref, ref, self.loss, self.batch_size),
                                   "eval_seconds": round(time.time() - started, 3)}
        else:
            self.before_metrics = self.metrics(model)
        self.seconds["before"] = round(time.time() - started, 2)
        return self.before_metrics

    def after(self, model) -> dict[str, float]:
        """The policy's metrics at the end; for a built-in task also its generations and the reference's."""
        started = time.time()
        self.after_metrics = self.metrics(model)
        self.seconds["after"] = round(time.time() - started, 2)
        settings = self.generation_settings
        if self.task is not None and settings.prompts > 0:
            started = time.time()
            self.generations = generation.generation_report(
                model, self.tokenizer, self.task, self.prompts[: settings.prompts], settings.max_new_tokens,
                ref=True, ref_model=self.ref_model, batch_size=settings.batch_size)
            self.seconds["generations"] = round(time.time() - started, 2)
        return self.after_metrics

    def describe_data(self) -> str:
        """One line: how many pairs of what were scored, and how many rows were dropped (and why)."""
        what = f"{self.task.dataset} (names never seen in training)" if self.task is not None else self.name
        unit = "rows (desirable and undesirable)" if self.loss.unpaired else "pairs"
        line = f"{len(self.pairs)} {unit} of {what}"
        report = self.data_report
        read = getattr(report, "items", None) or getattr(report, "rows_read", 0)  # KTO: rows after unpairing
        if report is not None and read > len(self.pairs):
            reasons = ", ".join(f"{k} {v}" for k, v in report.dropped.items())
            line += f"; {read - len(self.pairs)} of {read} rows dropped ({reasons})"
        return line

    def report(self, samples: int = 3) -> str:
        """The before/after table (before = the reference), the generations' summary and `samples` of them."""
        if self.after_metrics is None:
            raise RuntimeError("call after(model) first")
        before = self.before_metrics
        if before is None and (self.sided or self.loss.unpaired):
            before = {}  # nothing to show without a pass of the starting model (before(model) makes one)
        elif before is None:
            before = eval_metrics(self.ref_logps, self.ref_logps, self.loss, self.batch_size)
        start = "the starting model" if self.sided else "the reference model"
        lines = [f"held-out evaluation: {self.describe_data()}; before = {start}",
                 format_before_after(before, self.after_metrics, gen_after=self.generations)]
        gen = self.generations
        if gen is not None:
            lines.append(f"(generation reward: {self.task.name} reward of greedy replies to {gen['num_prompts']} "
                         f"held-out prompts, up to {gen['max_new_tokens']} tokens; after beats before on "
                         f"{100 * gen['policy_beats_reference']:.0f}% of prompts, ties "
                         f"{100 * gen['policy_ties_reference']:.0f}%)")
            if samples:
                lines += ["", generation.format_samples(gen, samples)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.name, "num_pairs": len(self.pairs),
                               "data": self.data_report.to_dict() if self.data_report is not None else None,
                               "before": self.before_metrics, "after": self.after_metrics, "seconds": self.seconds}
        if self.task is not None:
            out.update({"task": self.task.name, "task_dataset": self.task.dataset,
                        "description": self.task.description, "generations": self.generations})
        return out


# --- printing -----------------------------------------------------------------------------------

TABLE_ROWS = (
    ("eval_length_normalised_accuracy", "held-out accuracy (mean log-prob/token)"),
    ("eval_rewards/accuracies", "implicit-reward accuracy"),
    ("eval_rewards/margins", "implicit-reward margin"),
    ("eval_loss", "loss"),
    ("eval_nll_loss", "NLL of the chosen (per token)"),
    ("eval_log_odds_ratio", "log sigmoid(log odds ratio)"),
    ("eval_kl", "KL estimate (KTO's z0)"),
    ("eval_logps/chosen", "log-prob chosen"),
    ("eval_logps/rejected", "log-prob rejected"),
)


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = []
    for key in METRIC_NAMES + ("eval_kl", "eval_num_rows", "eval_num_desirable", "eval_nll_loss",
                               "eval_log_odds_ratio", "eval_log_odds_chosen",
                               "eval_length_normalised_accuracy", "eval_ref_length_normalised_accuracy",
                               "eval_ref_logps/chosen", "eval_ref_logps/rejected", "eval_num_pairs"):
        if key in metrics:
            v = metrics[key]
            lines.append(f"  {key:<38} {v:>10.4f}" if isinstance(v, float) else f"  {key:<38} {v:>10}")
    return "\n".join(lines)


def format_before_after(before: dict[str, Any], after: dict[str, Any], gen_before: dict | None = None,
                        gen_after: dict | None = None) -> str:
    """A before/after table of the eval metrics and, when given, the generations' reward.

    `gen_after` alone (a generation_report with ref=True) fills both columns: the reference is the
    model before training.
    """
    lines = [f"{'':<42} {'before':>10} {'after':>10} {'change':>10}"]
    for key, label in TABLE_ROWS:
        if key in before and key in after:
            b, a = float(before[key]), float(after[key])
            if "accura" in key:
                lines.append(f"{label:<42} {100 * b:>9.1f}% {100 * a:>9.1f}% {100 * (a - b):>+9.1f}pt")
            else:
                lines.append(f"{label:<42} {b:>10.4f} {a:>10.4f} {a - b:>+10.4f}")
    if gen_after is not None:
        g_b = gen_before["policy_reward_mean"] if gen_before else gen_after.get("reference_reward_mean")
        g_a = gen_after["policy_reward_mean"]
        if g_b is not None:
            lines.append(f"{'generation reward (greedy, mean)':<42} {g_b:>10.3f} {g_a:>10.3f} {g_a - g_b:>+10.3f}")
        for key, label in (("positive_share", "generations with reward > 0"),
                           ("negative_share", "generations with reward < 0")):
            b = gen_before.get(f"policy_{key}") if gen_before else gen_after.get(f"reference_{key}")
            a = gen_after.get(f"policy_{key}")
            if a is not None and b is not None:
                lines.append(f"{label:<42} {100 * b:>9.1f}% {100 * a:>9.1f}% {100 * (a - b):>+9.1f}pt")
        kl = gen_after.get("kl")
        if kl:
            lines.append(f"{'KL to reference per token (on generations)':<42} {0.0:>10.4f} "
                         f"{kl['kl_per_token']:>10.4f}")
    return "\n".join(lines)


