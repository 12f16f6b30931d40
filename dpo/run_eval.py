"""The held-out evaluation of a training run: --eval-dataset (or a built-in task's held-out split),
before training, every --eval-steps, and after; rows with TRL's `eval_` names go to metrics.jsonl.

For a built-in task the after-training report also holds greedy generations of the policy and of the
reference, scored by the task's ground-truth reward (dpo.evaluate.HeldOutEval).
"""

from __future__ import annotations

import time

from dpo import data as data_mod
from dpo import evaluate, tasks


class RunEvaluation:
    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        name = cfg.eval_dataset or (cfg.dataset if tasks.is_builtin(cfg.dataset) else None)
        self.name = name
        common = dict(max_length=cfg.max_length, beta=cfg.beta, logprobs=cfg.logprobs, loss_type=cfg.loss_type,
                      loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing)
        self.builtin = evaluate.HeldOutEval.for_dataset(name, tokenizer, **common) if tasks.is_builtin(name) else None
        if self.builtin is not None:
            self.pairs = self.builtin.pairs
        else:
            spec = data_mod.DataSpec(path=name, prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                                     rejected_column=cfg.rejected_column, implicit_prompt=cfg.implicit_prompt)
            self.pairs, _ = data_mod.prepare_pairs(tokenizer, data_mod.load_rows(spec), cfg.max_length,
                                                   cfg.max_prompt_length, drop_identical=not cfg.keep_identical)
        self.batch_size = 16
        self.ref_logps = None
        self.before_metrics: dict | None = None
        self.after_metrics: dict | None = None

    @classmethod
    def for_run(cls, cfg, tokenizer) -> "RunEvaluation | None":
        wanted = cfg.eval_dataset or tasks.is_builtin(cfg.dataset)
        return cls(cfg, tokenizer) if wanted else None

    def _reference(self, model) -> evaluate.PairLogps:
        """The reference's log-probs of the held-out pairs, computed once (the reference never changes)."""
        if self.ref_logps is None:
            self.ref_logps = evaluate.pair_logps(model, self.tokenizer, self.pairs, batch_size=self.batch_size,
                                                 logprobs=self.cfg.logprobs, max_length=self.cfg.max_length,
                                                 reference=True)
        return self.ref_logps

    def _loss_kw(self) -> dict:
        return dict(beta=self.cfg.beta, batch_size=self.batch_size, loss_type=self.cfg.loss_type,
                    loss_weights=self.cfg.loss_weights, label_smoothing=self.cfg.label_smoothing)

    def metrics(self, model) -> dict:
        """TRL-named eval metrics of the policy now."""
        return evaluate.evaluate_pairs(model, self.tokenizer, self.pairs, logprobs=self.cfg.logprobs,
                                       max_length=self.cfg.max_length, ref_logps=self._reference(model),
                                       **self._loss_kw())

    def before(self, model) -> dict:
        """The starting model's metrics: the reference's, scored against itself. Before the first step the
        policy equals it (a fresh LoRA adds zero; a starting --adapter is its own frozen reference); in a
        resumed run the policy has moved on, and its reference is still the start (as HeldOutEval.before)."""
        if self.builtin is not None:
            self.before_metrics = self.builtin.before(model)
            self.ref_logps = self.builtin.ref_logps
        else:
            started = time.time()
            ref = self._reference(model)
            self.before_metrics = {**evaluate.metrics_from_logps(ref, ref, **self._loss_kw()),
                                   "eval_seconds": round(time.time() - started, 3)}
        return self.before_metrics

    def after(self, model) -> dict:
        if self.builtin is not None:
            self.after_metrics = self.builtin.after(model)
        else:
            self.after_metrics = self.metrics(model)
        return self.after_metrics

    def report(self) -> str:
        if self.builtin is not None:
            return self.builtin.format()
        return evaluate.format_before_after(self.before_metrics, self.after_metrics)

    def to_dict(self) -> dict:
        if self.builtin is not None:
            return self.builtin.to_dict()
        return {"dataset": self.name, "before": self.before_metrics, "after": self.after_metrics}
