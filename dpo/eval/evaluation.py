"""Held-out evaluation: one class for a training run's before/after numbers and for `python -m dpo.evaluate`.

    evaluation = Evaluation.for_run(cfg, tokenizer)   # None when the run has nothing to evaluate on
    evaluation.before(model)       # the reference's log-probs, computed once (the reference never changes)
    evaluation.metrics(model)      # the policy now (every --eval-steps)
    evaluation.after(model)        # the policy at the end, plus greedy generations for a built-in task
    print(evaluation.report())     # before/after table (+ generations side by side)
    json.dump(evaluation.to_dict())

The data is a preference file/folder/hub dataset (all its rows, or the first `eval_size`) or a built-in
task's held-out split (`builtin:NAME`), which also has a ground-truth reward: then `after` generates
greedily from the policy and the reference and scores both (dpo.eval.generation). The data is prepared
and scored as training prepares and scores it, by the run's objective (dpo.objectives): the same
`prepare`, `collate` and `score` under no_grad, then the objective's `eval_row` over every item.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from dpo import models, progress
from dpo.eval import generation
from dpo.data import tasks
from dpo.data import pairs as data_mod
from dpo.data.sources import DataSpec, Rows
from dpo.data.objective_rows import read_spec_rows
from dpo.loss_settings import LossSettings
from dpo.objectives import DataOptions, Objective, Scorer, objective_for
from dpo.objectives.base import on_cpu
from dpo.objectives.dpo import METRIC_NAMES
from dpo.data.report import ObjectiveReport

__all__ = ["METRIC_NAMES", "Evaluation", "GenerationSettings", "evaluate_items", "score_items", "format_metrics",
           "format_before_after"]


def score_items(model, tokenizer, items: list, *, objective: Objective, batch_size: int, logprobs: str = "chunked",
                max_length: int | None = None, reference: bool = False, ref_model=None) -> list:
    """Every item scored as training scores a micro-batch (`objective.score`), in batches of `batch_size`
    (file order), without gradients; the scores float32 in CPU memory, one per batch.

    reference=True: under the reference (`ref_model`, or `model` in dpo.models.reference_mode).
    `max_length` must be the one the items were prepared with (the collator cuts to it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = models.pad_id(tokenizer)
    scorer = Scorer(next(model.parameters()).device, logprobs)
    out = []
    scope = models.as_reference(model, ref_model) if reference else contextlib.nullcontext(model)
    desc = "eval (reference)" if reference else "eval (policy)"
    with torch.no_grad(), models.eval_mode(model), scope as net, \
            progress.bar(len(items), desc, objective.unit) as bar:
        for start in range(0, len(items), batch_size):
            part = items[start : start + batch_size]
            out.append(on_cpu(objective.score(scorer, net, objective.collate(part, pad, max_length))))
            bar.update(len(part))
    return out


def evaluate_items(model, tokenizer, items: list, *, loss: LossSettings, batch_size: int, logprobs: str = "chunked",
                   ref_model=None, max_length: int | None = None, ref_scores: list | None = None) -> dict[str, float]:
    """The eval metrics of the policy `model` on held-out items under any objective (no gradients; train/eval
    mode restored): the objective's `eval_row` of the policy's scores and the reference's, plus
    `eval_seconds`. The reference is `ref_model` when given, else `model` under dpo.models.reference_mode
    (LoRA off, or the frozen start adapter); `ref_scores` (from `score_items(..., reference=True)`) skips it.
    """
    if not items:
        raise ValueError("no pairs to evaluate")
    objective = objective_for(loss)
    if ref_scores is not None and sum(len(s) for s in ref_scores) != len(items):
        raise ValueError(f"ref_scores hold {sum(len(s) for s in ref_scores)} items, but {len(items)} were given")
    started = time.time()
    kw = dict(objective=objective, batch_size=batch_size, logprobs=logprobs, max_length=max_length)
    if ref_scores is None and objective.eval_reference:
        ref_scores = score_items(model, tokenizer, items, reference=True, ref_model=ref_model, **kw)
    policy = score_items(model, tokenizer, items, **kw)
    metrics = objective.eval_row(policy, ref_scores, batch_size)
    metrics["eval_seconds"] = round(time.time() - started, 3)
    return metrics


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy generations of a built-in task's evaluation (ignored for data without a reward)."""

    prompts: int = tasks.DEFAULT_EVAL["generations"]  # held-out prompts to generate for (0: none)
    max_new_tokens: int = tasks.DEFAULT_EVAL["max_new_tokens"]
    batch_size: int = tasks.DEFAULT_EVAL["generation_batch_size"]


class Evaluation:
    """Before/after evaluation on held-out items under the run's objective; for a built-in task also greedy
    generations, their ground-truth reward and their KL to the reference (see the module doc).

    `task` (a dpo.data.tasks.Task) and `prompts` (its held-out prompts) make the generations; without a task
    there are none. The reference is `ref_model` when given, else the model in reference mode. An objective
    that reads no reference (SimPO, CPO, ORPO) is scored "before" as the starting model (the same model as
    the reference: the adapter off, or the frozen start adapter).
    """

    def __init__(self, name: str, tokenizer, pairs: list, *, loss: LossSettings, max_length: int | None,
                 logprobs: str = "chunked", batch_size: int = tasks.DEFAULT_EVAL["batch_size"],
                 data_report: data_mod.DataReport | ObjectiveReport | None = None, task=None,
                 prompts: list | None = None,
                 generation_settings: GenerationSettings | None = None, ref_model=None):
        if not pairs:
            raise ValueError(f"{name}: no pairs to evaluate")
        self.name, self.tokenizer, self.pairs = name, tokenizer, pairs
        self.loss, self.max_length, self.logprobs, self.batch_size = loss, max_length, logprobs, batch_size
        self.objective = objective_for(loss)
        self.data_report, self.task, self.prompts = data_report, task, list(prompts or [])
        self.generation_settings = generation_settings or GenerationSettings()
        self.ref_model = ref_model
        self.ref_scores: list | None = None  # the reference's, computed once (the reference never changes)
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
        spec = dict(prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                    rejected_column=cfg.rejected_column, implicit_prompt=cfg.implicit_prompt)
        return cls.of_dataset(name, tokenizer, loss=cfg.loss_settings(), max_length=cfg.max_length,
                              max_prompt_length=cfg.max_prompt_length, drop_identical=not cfg.keep_identical,
                              logprobs=cfg.logprobs, spec=spec)

    @classmethod
    def of_dataset(cls, dataset: str, tokenizer, *, loss: LossSettings, max_length: int | None,
                   max_prompt_length: int | None = None, drop_identical: bool = True, eval_size: int | None = None,
                   seed: int = 0, spec: dict | None = None, **kwargs) -> "Evaluation":
        """On `builtin:NAME` (`eval_size` held-out rows, default 48, made with `seed`) or on a preference
        dataset (its first `eval_size` rows, default all; `spec`: more DataSpec fields, e.g. columns),
        prepared as training prepares its data. DataError for a bad dataset; `kwargs` go to the constructor."""
        task = prompts = None
        if tasks.is_builtin(dataset):
            task, _ = tasks.parse_builtin(dataset)
            raw = task.eval_rows(eval_size or tasks.DEFAULT_EVAL["n_pairs"], seed)
            rows = tasks.preference_rows(raw, source=f"{task.dataset} (held-out)")
            prompts = [r["prompt"] for r in raw]
        else:
            rows = read_spec_rows(DataSpec(path=dataset, **(spec or {})), unpaired=loss.unpaired)
            if eval_size is not None and isinstance(rows, Rows):
                rows, fmt = Rows(rows[:eval_size]), rows.format
                rows.format = fmt
            elif eval_size is not None:
                rows = rows[:eval_size]
        options = DataOptions(max_length, max_prompt_length, drop_identical,
                              batch_size=kwargs.get("batch_size", tasks.DEFAULT_EVAL["batch_size"]), source=dataset)
        items, report = objective_for(loss).prepare(tokenizer, rows, options)
        return cls(dataset, tokenizer, items, loss=loss, max_length=max_length, data_report=report, task=task,
                   prompts=prompts, **kwargs)

    def _score(self, model, reference: bool) -> list:
        return score_items(model, self.tokenizer, self.pairs, objective=self.objective, batch_size=self.batch_size,
                           logprobs=self.logprobs, max_length=self.max_length, reference=reference,
                           ref_model=self.ref_model)

    def _reference(self, model) -> list:
        """The reference's scores of the items, computed once (the reference never changes)."""
        if self.ref_scores is None:
            self.ref_scores = self._score(model, reference=True)
        return self.ref_scores

    def _row(self, policy: list, ref: list | None, started: float) -> dict[str, float]:
        return {**self.objective.eval_row(policy, ref, self.batch_size), "eval_seconds": round(time.time() - started, 3)}

    def metrics(self, model) -> dict[str, float]:
        """The eval metrics (TRL's names with `eval_`, and ours) of the policy `model` now."""
        started = time.time()
        ref = self._reference(model) if self.objective.eval_reference else None
        return self._row(self._score(model, reference=False), ref, started)

    def before(self, model, policy_is_reference: bool = True) -> dict[str, float]:
        """The starting model's metrics. Before the first step the policy equals the reference (a fresh
        LoRA adds exactly zero; a starting --adapter is its own frozen reference), so they are the
        reference scored against itself, with no policy pass; in a resumed run they are still the
        start's. policy_is_reference=False scores the policy instead."""
        started = time.time()
        if not policy_is_reference:
            self.before_metrics = self.metrics(model)
        elif self.objective.eval_reference:
            ref = self._reference(model)
            self.before_metrics = self._row(ref, ref, started)
        else:
            self.before_metrics = self._row(self._score(model, reference=True), None, started)
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
        unit = "rows (desirable and undesirable)" if self.objective.unit == "row" else "pairs"
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
        if before is None:  # the reference against itself, where it was scored; else nothing to show
            ref = self.ref_scores
            before = self.objective.eval_row(ref, ref, self.batch_size) if ref else {}
        start = "the reference model" if self.objective.eval_reference else "the starting model"
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


