"""Held-out evaluation: TRL's eval metrics, a before-training accuracy that means something, and generations.

`evaluate_pairs` runs, under no_grad, the policy and the reference on tokenized pairs and returns TRL's
eval metric names (`eval_loss`, `eval_rewards/chosen`, ... `eval_logps/rejected`), each the mean over
batches of the batch's mean, as TRL's DPOTrainer.evaluate reports them (HF Trainer's eval_loss is the
same mean of batch losses). Before training the policy is the reference, so TRL's implicit-reward
metrics are trivial there (margins 0, accuracy 0, loss log 2); hence also:

    eval_length_normalised_accuracy = share of pairs where the policy's mean per-token log-prob of the
                                      chosen completion is higher than that of the rejected one
    eval_ref_length_normalised_accuracy = the same for the reference (= the policy before training)

`generation_report` generates greedily from the policy and from the reference (adapter disabled) and
scores both with a task's ground-truth reward; it also measures how far the policy has moved (see
`kl_to_reference`).

`python -m dpo.evaluate` does both for a model (+ optional adapter) and a dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dpo import models
from dpo.data import Batch, TokenizedPair, collate
from dpo.losses import PreferenceLogps, preference_loss

METRIC_NAMES = (
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_logps/chosen",
    "eval_logps/rejected",
)

KL_DEFINITION = (
    "Along the policy's own greedy completions (teacher-forced, every generated token up to and including "
    "the first end-of-turn token): kl_per_token = mean over those positions of the exact next-token "
    "KL(pi(.|x,y<t) || pi_ref(.|x,y<t)) summed over the whole vocabulary; logratio_per_token = mean over the "
    "same positions of log pi(y_t|x,y<t) - log pi_ref(y_t|x,y<t) for the greedy token y_t; "
    "logratio_per_sequence = mean over prompts of that log-ratio summed over the completion. Pooled over all "
    "generated tokens of all prompts."
)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _as_reference(model, ref_model):
    """Yield the module that computes the reference: ref_model, or `model` in models.reference_mode."""
    if ref_model is not None:
        with _eval_mode(ref_model):
            yield ref_model
    else:
        with models.reference_mode(model):
            yield model


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class PairLogps:
    """Summed completion log-probs of N pairs under one model, with the scored-token counts ([N] each)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.chosen.shape[0])


def pair_logps(model, tokenizer, pairs: list[TokenizedPair], *, batch_size: int, logprobs: str = "chunked",
               max_length: int | None = None, reference: bool = False, ref_model=None) -> PairLogps:
    """Log-probs of every pair's chosen and rejected completion (float32, on the CPU), no gradients.

    reference=True: under the reference (`ref_model`, or `model` in dpo.models.reference_mode). The
    reference's numbers never change during training, so a run computes them once and passes them to
    every `evaluate_pairs` call (`ref_logps=`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    parts: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    scope = _as_reference(model, ref_model) if reference else contextlib.nullcontext(model)
    with torch.no_grad(), _eval_mode(model), scope as net:
        for chunk in _batches(pairs, batch_size):
            batch = collate(list(chunk), pad, max_length).to(device)
            b = batch.num_pairs
            lp = models.completion_logps(net, batch, logprobs).float().cpu()
            n = batch.completion_mask.sum(dim=1).cpu()
            parts.append(torch.stack([lp[:b], lp[b:]], dim=1))
            tokens.append(torch.stack([n[:b], n[b:]], dim=1))
    lp = torch.cat(parts) if parts else torch.zeros(0, 2)
    n = torch.cat(tokens) if tokens else torch.zeros(0, 2, dtype=torch.long)
    return PairLogps(lp[:, 0], lp[:, 1], n[:, 0], n[:, 1])


def metrics_from_logps(policy: PairLogps, ref: PairLogps, *, beta: float, batch_size: int,
                       loss_type: Sequence[str] = ("sigmoid",), loss_weights: Sequence[float] | None = None,
                       label_smoothing: float = 0.0) -> dict[str, float]:
    """The eval metrics of `evaluate_pairs` from log-probs already computed (same batches, same order).

    `metrics_from_logps(ref, ref, ...)` is exactly what `evaluate_pairs` returns before training, when
    the policy is still the reference (a fresh LoRA adapter adds exactly zero).
    """
    n = len(policy)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    if len(ref) != n:
        raise ValueError(f"policy has {n} pairs but the reference has {len(ref)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sums: dict[str, float] = {}
    n_batches = 0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        logps = PreferenceLogps(chosen=policy.chosen[sl], rejected=policy.rejected[sl], ref_chosen=ref.chosen[sl],
                                ref_rejected=ref.rejected[sl], chosen_tokens=policy.chosen_tokens[sl],
                                rejected_tokens=policy.rejected_tokens[sl])
        out = preference_loss(logps, beta=beta, loss_types=list(loss_type), loss_weights=loss_weights,
                              label_smoothing=label_smoothing)
        for k, v in _batch_metrics(out, logps).items():
            sums[k] = sums.get(k, 0.0) + v
        n_batches += 1
    metrics = {k: v / n_batches for k, v in sums.items()}
    metrics.update({
        "eval_length_normalised_accuracy": _length_normalised_accuracy(policy),
        "eval_ref_length_normalised_accuracy": _length_normalised_accuracy(ref),
        "eval_ref_logps/chosen": float(ref.chosen.mean()),
        "eval_ref_logps/rejected": float(ref.rejected.mean()),
        "eval_num_pairs": n,
    })
    return metrics


def _length_normalised_accuracy(lp: PairLogps) -> float:
    """Share of pairs whose chosen completion has the higher mean log-prob per token (ties count as wrong)."""
    c = lp.chosen / lp.chosen_tokens.clamp(min=1).to(lp.chosen.dtype)
    r = lp.rejected / lp.rejected_tokens.clamp(min=1).to(lp.rejected.dtype)
    return float((c > r).float().mean())


def evaluate_pairs(model, tokenizer, pairs: list[TokenizedPair], *, beta: float, batch_size: int,
                   logprobs: str = "chunked", ref_model=None, max_length: int | None = None,
                   ref_logps: PairLogps | None = None, loss_type: Sequence[str] = ("sigmoid",),
                   loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0) -> dict[str, float]:
    """Eval metrics on held-out pairs (no gradients; the model's train/eval mode is restored).

    TRL-named metrics (`METRIC_NAMES`): per batch of `batch_size` pairs as TRL computes them, then the
    mean over batches (a last, smaller batch counts as one batch, as in TRL's evaluate). Ours, over all
    pairs: `eval_length_normalised_accuracy` and `eval_ref_length_normalised_accuracy` (see the module
    doc), `eval_ref_logps/chosen`, `eval_ref_logps/rejected`, `eval_num_pairs`, `eval_seconds`.

    The reference is `ref_model` when given, else `model` under dpo.models.reference_mode (LoRA off, or
    the frozen start adapter); `ref_logps` (from `pair_logps(..., reference=True)`) skips computing it.
    `max_length` must be the one the pairs were prepared with (the collator cuts completions to it).
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    if ref_logps is not None and len(ref_logps) != len(pairs):
        raise ValueError(f"ref_logps holds {len(ref_logps)} pairs, but {len(pairs)} pairs were given")
    started = time.time()
    kw = dict(batch_size=batch_size, logprobs=logprobs, max_length=max_length)
    if ref_logps is None:
        ref_logps = pair_logps(model, tokenizer, pairs, reference=True, ref_model=ref_model, **kw)
    policy = pair_logps(model, tokenizer, pairs, **kw)
    metrics = metrics_from_logps(policy, ref_logps, beta=beta, batch_size=batch_size, loss_type=loss_type,
                                 loss_weights=loss_weights, label_smoothing=label_smoothing)
    metrics["eval_seconds"] = round(time.time() - started, 3)
    return metrics


def _batch_metrics(out, logps: PreferenceLogps) -> dict[str, float]:
    """TRL's metric definitions for one batch (the same as dpo.train.batch_metrics, eval_-prefixed)."""
    c, r = out.chosen_rewards, out.rejected_rewards
    return {
        "eval_loss": float(out.loss),
        "eval_rewards/chosen": c.mean().item(),
        "eval_rewards/rejected": r.mean().item(),
        "eval_rewards/accuracies": (c > r).float().mean().item(),
        "eval_rewards/margins": (c - r).mean().item(),
        "eval_logps/chosen": logps.chosen.mean().item(),
        "eval_logps/rejected": logps.rejected.mean().item(),
    }


# --- generations --------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as the data layer makes them: messages through the chat template with the
    generation prompt, text as it is."""
    if isinstance(prompt, list):
        out = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
        return list(out["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16
                    ) -> list[list[int]]:
    """Greedy completions (token ids, up to and including the first stop token) of each prompt.

    Our own loop with a KV cache, prompts left-padded with explicit position ids, so a batched
    generation equals generating each prompt alone.
    """
    stop = _stop_ids(model, tokenizer)
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    results: list[list[int]] = []
    with torch.no_grad(), _eval_mode(model):
        for chunk in _batches(prompts, batch_size):
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            out_tokens = [[] for _ in chunk]
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            past = None
            step_ids, step_pos = ids, positions
            for _ in range(max_new_tokens):
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                            use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(dim=-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        out_tokens[i].append(t)
                        if t in stop:
                            done[i] = True
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=mask.dtype, device=device)], dim=1)
            results.extend(out_tokens)
    return results


def kl_to_reference(model, tokenizer, prompts: list[list[int]], completions: list[list[int]], *,
                    ref_model=None, batch_size: int = 8) -> dict[str, float]:
    """How far the policy is from the reference on its own greedy completions (see KL_DEFINITION)."""
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    kl_sum = lr_sum = 0.0
    n_tokens = 0
    seq_lr: list[float] = []
    pairs = [(p, c) for p, c in zip(prompts, completions)]
    with torch.no_grad(), _eval_mode(model):
        for chunk in _batches(pairs, batch_size):
            rows = [TokenizedPair(p, c, c) for p, c in chunk]
            batch = collate(rows, pad)
            k = batch.num_pairs
            batch = Batch(batch.input_ids[:k], batch.attention_mask[:k], batch.completion_mask[:k]).to(device)
            labels = batch.input_ids[:, 1:]
            mask = batch.completion_mask[:, 1:].bool()
            p_lp = _completion_token_logprobs(model, batch, mask)  # [N, V] at the generated positions
            with _as_reference(model, ref_model) as ref:
                r_lp = _completion_token_logprobs(ref, batch, mask)
            kl = (p_lp.exp() * (p_lp - r_lp)).sum(dim=-1)
            tok = labels[mask]
            lr = p_lp.gather(-1, tok[:, None]).squeeze(-1) - r_lp.gather(-1, tok[:, None]).squeeze(-1)
            kl_sum += float(kl.sum())
            lr_sum += float(lr.sum())
            n_tokens += int(mask.sum())
            rows_of = torch.arange(mask.shape[0], device=device)[:, None].expand_as(mask)[mask]
            per_seq = torch.zeros(mask.shape[0], device=device).index_add(0, rows_of, lr)
            seq_lr.extend(per_seq.tolist())
    return {
        "kl_per_token": kl_sum / n_tokens if n_tokens else 0.0,
        "logratio_per_token": lr_sum / n_tokens if n_tokens else 0.0,
        "logratio_per_sequence": sum(seq_lr) / len(seq_lr) if seq_lr else 0.0,
        "kl_tokens": n_tokens,
    }


def _completion_token_logprobs(model, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs over the vocabulary at the positions `mask` ([R, T-1], position t scores
    token t+1) selects: [N, V] float32. Only those positions go through the LM head."""
    lm = models._causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[:, :-1][mask])
    return torch.log_softmax(logits.float(), dim=-1)


def generation_report(model, tokenizer, task, prompts: list, max_new_tokens: int, ref: bool = True, *,
                      ref_model=None, batch_size: int = 16) -> dict[str, Any]:
    """Greedy generations of the policy (and, with ref=True, of the reference: adapter disabled, or
    `ref_model`), each scored with `task.reward`, plus how far the policy moved (`kl_to_reference`).

    `prompts` are conversational (lists of messages, rendered with the chat template and the generation
    prompt) or text. Returns per-prompt lists ("prompts", "policy_completions", "policy_rewards", and the
    "reference_" ones) and summaries ("policy_reward_mean", "reference_reward_mean",
    "policy_beats_reference", "kl": {...}).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    started = time.time()
    ids = [prompt_ids(tokenizer, p) for p in prompts]

    def scored(generator, name: str):
        """Greedy completions of `generator`, their rewards, and their summaries under `name_` keys."""
        out_ids = greedy_generate(generator, tokenizer, ids, max_new_tokens, batch_size)
        text = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out_ids]
        rewards = [float(task.reward(p, c)) for p, c in zip(prompts, text)]
        return out_ids, text, rewards, {
            f"{name}_completions": text,
            f"{name}_rewards": rewards,
            f"{name}_reward_mean": _mean(rewards),
            f"{name}_positive_share": _mean([float(r > 0) for r in rewards]),
            f"{name}_negative_share": _mean([float(r < 0) for r in rewards]),
            f"{name}_tokens_mean": _mean([len(t) for t in out_ids]),
        }

    pol_ids, _, pol_rewards, pol_summary = scored(model, "policy")
    report: dict[str, Any] = {
        "task": getattr(task, "name", None),
        "num_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "prompts": [_prompt_display(p) for p in prompts],
        **pol_summary,
    }
    if ref:
        with _as_reference(model, ref_model) as reference:
            _, _, ref_rewards, ref_summary = scored(reference, "reference")
        report.update({
            **ref_summary,
            "policy_beats_reference": _mean([float(a > b) for a, b in zip(pol_rewards, ref_rewards)]),
            "policy_ties_reference": _mean([float(a == b) for a, b in zip(pol_rewards, ref_rewards)]),
            "kl": {**kl_to_reference(model, tokenizer, ids, pol_ids, ref_model=ref_model,
                                     batch_size=max(1, batch_size // 2)),
                   "definition": KL_DEFINITION},
        })
    report["seconds"] = round(time.time() - started, 3)
    return report


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _prompt_display(prompt) -> str:
    from dpo.tasks import prompt_text

    return prompt_text(prompt)


# --- printing -----------------------------------------------------------------------------------

TABLE_ROWS = (
    ("eval_length_normalised_accuracy", "held-out accuracy (mean log-prob/token)"),
    ("eval_rewards/accuracies", "implicit-reward accuracy"),
    ("eval_rewards/margins", "implicit-reward margin"),
    ("eval_loss", "DPO loss"),
    ("eval_logps/chosen", "log-prob chosen"),
    ("eval_logps/rejected", "log-prob rejected"),
)


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = []
    for key in METRIC_NAMES + ("eval_length_normalised_accuracy", "eval_ref_length_normalised_accuracy",
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


def format_samples(report: dict[str, Any], k: int = 3, width: int = 100) -> str:
    """k prompts with the reference's and the policy's generations side by side (and their rewards)."""
    if "reference_completions" not in report:
        return "\n".join(f"{p}\n  -> {c}  [reward {r:g}]" for p, c, r in list(zip(
            report["prompts"], report["policy_completions"], report["policy_rewards"]))[:k])
    col = max(20, (width - 3) // 2)
    blocks = []
    for i in range(min(k, report["num_prompts"])):
        left = textwrap.wrap(report["reference_completions"][i] or "(empty)", col)
        right = textwrap.wrap(report["policy_completions"][i] or "(empty)", col)
        head_l = f"before (reward {report['reference_rewards'][i]:g})"
        head_r = f"after (reward {report['policy_rewards'][i]:g})"
        lines = [f"prompt: {report['prompts'][i]}", f"{head_l:<{col}} | {head_r}", f"{'-' * col}-+-{'-' * col}"]
        for j in range(max(len(left), len(right))):
            lines.append(f"{left[j] if j < len(left) else '':<{col}} | {right[j] if j < len(right) else ''}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# --- a training run's before/after evaluation ----------------------------------------------------


class HeldOutEval:
    """Before/after evaluation of a run on a built-in task's held-out split (what `python -m dpo.train`
    prints at the end of the default run).

        held_out = HeldOutEval.for_dataset(cfg.dataset, tokenizer, max_length=cfg.max_length, beta=cfg.beta,
                                           logprobs=cfg.logprobs, loss_type=cfg.loss_type)   # None: not builtin:
        held_out.before(model)      # reference log-probs, computed once
        ...train...
        held_out.after(model)       # policy pass + greedy generations of policy and reference
        print(held_out.format())    # before/after table + 3 samples side by side
        writer.write_json("eval.json", held_out.to_dict())

    `before` does not run the policy: before training it is the reference (a fresh LoRA adapter adds
    exactly zero; a starting --adapter is its own frozen reference), so the before metrics are
    `metrics_from_logps(ref, ref)`, the very numbers `evaluate_pairs` would return (tested).
    Pass `policy_is_reference=False` where that does not hold, to run the policy too.
    """

    def __init__(self, task, tokenizer, *, max_length: int | None, beta: float, n_pairs: int = 48,
                 batch_size: int = 16, generations: int = 24, max_new_tokens: int = 40,
                 generation_batch_size: int = 32, logprobs: str = "chunked", loss_type: Sequence[str] = ("sigmoid",),
                 loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0, seed: int = 0,
                 ref_model=None):
        from dpo import data as data_mod
        from dpo import tasks

        self.task, self.tokenizer = task, tokenizer
        self.rows = task.eval_rows(n_pairs, seed)
        self.pairs, self.data_report = data_mod.prepare_pairs(
            tokenizer, tasks.preference_rows(self.rows, source=f"{task.dataset} (held-out)"), max_length)
        self.max_length, self.beta, self.batch_size, self.logprobs = max_length, beta, batch_size, logprobs
        self.loss_kw = dict(loss_type=tuple(loss_type), loss_weights=loss_weights, label_smoothing=label_smoothing)
        self.generations, self.max_new_tokens = generations, max_new_tokens
        self.generation_batch_size, self.ref_model = generation_batch_size, ref_model
        self.ref_logps: PairLogps | None = None
        self.before_metrics: dict | None = None
        self.after_metrics: dict | None = None
        self.gen: dict | None = None
        self.seconds = {"before": 0.0, "after": 0.0, "generations": 0.0}

    @classmethod
    def for_dataset(cls, dataset: str | None, tokenizer, **kwargs) -> "HeldOutEval | None":
        """For a `builtin:...` dataset (DataError when the task is unknown); None for any other dataset."""
        from dpo import tasks

        if not tasks.is_builtin(dataset):
            return None
        task, _ = tasks.parse_builtin(dataset)
        return cls(task, tokenizer, **{**tasks.DEFAULT_EVAL, **kwargs})

    def _reference(self, model) -> PairLogps:
        if self.ref_logps is None:
            self.ref_logps = pair_logps(model, self.tokenizer, self.pairs, batch_size=self.batch_size,
                                        logprobs=self.logprobs, max_length=self.max_length, reference=True,
                                        ref_model=self.ref_model)
        return self.ref_logps

    def before(self, model, policy_is_reference: bool = True) -> dict[str, float]:
        t = time.time()
        ref = self._reference(model)
        if policy_is_reference:
            self.before_metrics = metrics_from_logps(ref, ref, beta=self.beta, batch_size=self.batch_size,
                                                     **self.loss_kw)
        else:
            self.before_metrics = evaluate_pairs(model, self.tokenizer, self.pairs, beta=self.beta,
                                                 batch_size=self.batch_size, logprobs=self.logprobs,
                                                 max_length=self.max_length, ref_logps=ref, **self.loss_kw)
        self.seconds["before"] = round(time.time() - t, 2)
        return self.before_metrics

    def after(self, model) -> dict[str, float]:
        t = time.time()
        self.after_metrics = evaluate_pairs(model, self.tokenizer, self.pairs, beta=self.beta,
                                            batch_size=self.batch_size, logprobs=self.logprobs,
                                            max_length=self.max_length, ref_logps=self._reference(model),
                                            ref_model=self.ref_model, **self.loss_kw)
        self.seconds["after"] = round(time.time() - t, 2)
        if self.generations > 0:
            t = time.time()
            prompts = [r["prompt"] for r in self.rows[: self.generations]]
            self.gen = generation_report(model, self.tokenizer, self.task, prompts, self.max_new_tokens, ref=True,
                                         ref_model=self.ref_model, batch_size=self.generation_batch_size)
            self.seconds["generations"] = round(time.time() - t, 2)
        return self.after_metrics

    def format(self, samples: int = 3) -> str:
        if self.after_metrics is None:
            raise RuntimeError("call after(model) first")
        before = self.before_metrics or metrics_from_logps(self.ref_logps, self.ref_logps, beta=self.beta,
                                                           batch_size=self.batch_size, **self.loss_kw)
        lines = [f"held-out evaluation: {len(self.pairs)} pairs of {self.task.dataset} (names never seen in "
                 f"training); before = the reference model",
                 format_before_after(before, self.after_metrics, gen_after=self.gen)]
        if self.gen is not None:
            lines.append(f"(generation reward: {self.task.name} reward of greedy replies to {self.gen['num_prompts']} "
                         f"held-out prompts, up to {self.max_new_tokens} tokens; after beats before on "
                         f"{100 * self.gen['policy_beats_reference']:.0f}% of prompts, ties "
                         f"{100 * self.gen['policy_ties_reference']:.0f}%)")
            if samples:
                lines += ["", format_samples(self.gen, samples)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task.name, "dataset": self.task.dataset, "description": self.task.description,
                "num_pairs": len(self.pairs), "before": self.before_metrics, "after": self.after_metrics,
                "generations": self.gen, "seconds": self.seconds}


# --- the command line: python -m dpo.evaluate ----------------------------------------------------


class EvalError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump (as python -m dpo.train)
        self.exit(2, f"python -m dpo.evaluate: error: {message} (see --help)\n")


def _parser():
    p = _Parser(
        prog="python -m dpo.evaluate",
        description="Evaluate a model (and LoRA adapter) on held-out preference pairs: TRL's eval metrics, "
                    "length-normalised accuracy, and for builtin: tasks greedy generations scored by the task's "
                    "reward and their KL to the reference (the base model).")
    p.add_argument("--model", required=True, help="a local model folder, a hub name, or smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (policy = base + adapter; reference = base)")
    p.add_argument("--dataset", required=True,
                   help="a preference file/folder/hub dataset (all its rows are evaluated), or builtin:NAME "
                        "(its held-out split)")
    p.add_argument("--max-length", type=int, default=1024, help="max tokens of prompt+completion (as training)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the implicit rewards and loss")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (and prompts per generation "
                                                             "batch)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="pairs to evaluate (builtin: held-out rows to make, default 48; files: the first N rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of a builtin task's held-out rows")
    p.add_argument("--generations", type=int, default=24,
                   help="builtin tasks: held-out prompts to generate for (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="generation length limit")
    p.add_argument("--samples", type=int, default=3, help="generations to print side by side")
    p.add_argument("--logprobs", default="chunked", choices=("chunked", "full"), help="log-prob implementation")
    p.add_argument("--output", default=None, help="write every number (and the generations) to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    return p


def _check_args(args) -> None:
    """Everything checkable before a model loads, as one-line errors."""
    from dpo.config import _looks_local

    for name, value, low in (("--max-length", args.max_length, 2), ("--batch-size", args.batch_size, 1),
                             ("--generations", args.generations, 0), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--samples", args.samples, 0)):
        if value is not None and value < low:
            raise EvalError(f"{name}: must be >= {low}, got {value}")
    if args.eval_size is not None and args.eval_size < 1:
        raise EvalError(f"--eval-size: must be >= 1, got {args.eval_size}")
    if args.beta <= 0:
        raise EvalError(f"--beta: must be > 0, got {args.beta}")
    if _looks_local(args.model) and not os.path.isdir(os.path.expanduser(args.model)):
        raise EvalError(f"--model: no such model folder: {args.model}")
    if args.adapter is not None:
        if not os.path.isdir(args.adapter):
            raise EvalError(f"--adapter: no such adapter folder: {args.adapter}")
        if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            raise EvalError(f"--adapter: {args.adapter} holds no adapter_config.json (not a PEFT adapter folder)")
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise EvalError(f"--output: the folder {folder} does not exist")


def _load_eval_data(args, tokenizer):
    """(pairs, task or None, rows); DataError for a bad dataset."""
    from dpo import data as data_mod
    from dpo import tasks

    if tasks.is_builtin(args.dataset):
        task, _ = tasks.parse_builtin(args.dataset)
        raw = task.eval_rows(args.eval_size or tasks.DEFAULT_EVAL_ROWS, args.seed)
        rows = tasks.preference_rows(raw, source=f"{task.dataset} (held-out)")
    else:
        task = None
        rows = data_mod.load_rows(data_mod.DataSpec(path=args.dataset))
        if args.eval_size is not None:
            fmt = rows.format
            rows = data_mod.Rows(rows[: args.eval_size])
            rows.format = fmt
    pairs, report = data_mod.prepare_pairs(tokenizer, rows, args.max_length)
    return pairs, task, rows, report


def _write_json_atomic(path: str, obj) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_model(args):
    from dpo import smollm2

    try:
        path = models.resolve_model_path(args.model)
    except smollm2.MissingDefaultModel as e:
        raise EvalError(f"--model: {e}") from None
    try:
        tokenizer = models.load_tokenizer(path)
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        model = models.load_model(path, dtype, args.device)
    except Exception as e:  # noqa: BLE001 - a missing/unreadable model is one line, not a traceback
        raise EvalError(f"--model: cannot load {args.model} ({type(e).__name__}: {_one_line(str(e))})") from None
    if args.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except Exception as e:  # noqa: BLE001
            raise EvalError(f"--adapter: cannot load {args.adapter} ({type(e).__name__}: "
                            f"{_one_line(str(e))})") from None
    model.eval()
    return model, tokenizer


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def run(args) -> dict[str, Any]:
    from dpo import data as data_mod

    _check_args(args)
    # Cheap dataset checks first (a missing file fails before the model loads).
    from dpo import tasks

    if tasks.is_builtin(args.dataset):
        tasks.parse_builtin(args.dataset)
    elif data_mod.looks_local(args.dataset) and not os.path.exists(os.path.expanduser(args.dataset)):
        raise data_mod.DataError(f"--dataset: no such file or folder: {args.dataset}")
    started = time.time()
    model, tokenizer = _load_model(args)
    pairs, task, rows, data_report = _load_eval_data(args, tokenizer)
    metrics = evaluate_pairs(model, tokenizer, pairs, beta=args.beta, batch_size=args.batch_size,
                             logprobs=args.logprobs, max_length=args.max_length)
    result: dict[str, Any] = {
        "model": args.model, "adapter": args.adapter, "dataset": args.dataset, "max_length": args.max_length,
        "beta": args.beta, "batch_size": args.batch_size, "data": data_report.to_dict(), "metrics": metrics,
    }
    print(f"evaluated {metrics['eval_num_pairs']} pairs of {args.dataset}"
          f"{' with adapter ' + args.adapter if args.adapter else ' (no adapter: policy = reference)'}")
    print(format_metrics(metrics))
    if task is not None and args.generations > 0:
        prompts = [r.prompt for r in rows[: args.generations]]
        gen = generation_report(model, tokenizer, task, prompts, args.max_new_tokens, ref=True,
                                batch_size=args.batch_size)
        result["generations"] = gen
        print(f"\ngenerations: {gen['num_prompts']} held-out prompts, greedy, up to {args.max_new_tokens} tokens; "
              f"task reward ({task.name}) mean: policy {gen['policy_reward_mean']:.3f}, "
              f"reference {gen['reference_reward_mean']:.3f}; reward > 0: policy "
              f"{100 * gen['policy_positive_share']:.0f}%, reference {100 * gen['reference_positive_share']:.0f}%; "
              f"policy better on "
              f"{100 * gen['policy_beats_reference']:.0f}% of prompts")
        print(f"KL to reference per generated token {gen['kl']['kl_per_token']:.4f}; log-ratio per token "
              f"{gen['kl']['logratio_per_token']:.4f}, per completion {gen['kl']['logratio_per_sequence']:.3f}")
        if args.samples:
            print()
            print(format_samples(gen, args.samples))
    result["seconds"] = round(time.time() - started, 2)
    if args.output:
        _write_json_atomic(args.output, result)
        print(f"\nwrote {args.output}")
    return result


def main(argv: list[str] | None = None) -> int:
    from dpo.data import DataError

    args = _parser().parse_args(argv)
    try:
        run(args)
    except (EvalError, DataError) as e:
        print(f"python -m dpo.evaluate: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
