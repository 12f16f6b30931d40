"""Greedy generations of the policy and of the reference, scored by a task's ground-truth reward, and
how far the policy has moved from the reference on them (`kl_to_reference`): the generation part of
a built-in task's evaluation (dpo.eval.evaluation.Evaluation.after) and of `python -m dpo.evaluate`.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

import torch

from dpo import models, progress
from dpo.data.tasks import prompt_text
from dpo.data.pairs import Batch, TokenizedPair, collate

KL_DEFINITION = (
    "Along the policy's own greedy completions (teacher-forced, every generated token up to and including "
    "the first end-of-turn token): kl_per_token = mean over those positions of the exact next-token "
    "KL(pi(.|x,y<t) || pi_ref(.|x,y<t)) summed over the whole vocabulary; logratio_per_token = mean over the "
    "same positions of log pi(y_t|x,y<t) - log pi_ref(y_t|x,y<t) for the greedy token y_t; "
    "logratio_per_sequence = mean over prompts of that log-ratio summed over the completion. Pooled over all "
    "generated tokens of all prompts."
)


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


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                    desc: str = "generate") -> list[list[int]]:
    """Greedy completions (token ids, up to and including the first stop token) of each prompt.

    Our own loop with a KV cache, prompts left-padded with explicit position ids, so a batched
    generation equals generating each prompt alone.
    """
    stop = _stop_ids(model, tokenizer)
    pad = models.pad_id(tokenizer)
    results: list[list[int]] = []
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    # The bar counts decoding steps (max_new_tokens per batch), so a long batch shows it is moving.
    with torch.no_grad(), models.eval_mode(model), progress.bar(len(batches) * max_new_tokens, desc, "step") as bar:
        for chunk in batches:
            out = _generate_batch(model, chunk, max_new_tokens, stop, pad, on_step=bar.update)
            results.extend(out)
            bar.update(max_new_tokens - max(len(t) for t in out))  # the steps an early stop skipped
    return results


def _generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop: set[int], pad: int,
                    on_step=lambda n: None) -> list[list[int]]:
    """Greedy completions of one batch of prompts, left-padded, with a KV cache; `on_step(1)` after each
    decoding step."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    step_pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out_tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past, step_ids = None, ids
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(dim=-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out_tokens[i].append(t)
                done[i] = t in stop
        on_step(1)
        if all(done):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
    return out_tokens


def kl_to_reference(model, tokenizer, prompts: list[list[int]], completions: list[list[int]], *,
                    ref_model=None, batch_size: int = 8) -> dict[str, float]:
    """How far the policy is from the reference on its own greedy completions (see KL_DEFINITION)."""
    pad = models.pad_id(tokenizer)
    device = next(model.parameters()).device
    kl_sum = lr_sum = 0.0
    n_tokens = 0
    seq_lr: list[float] = []
    pairs = [(p, c) for p, c in zip(prompts, completions)]
    with torch.no_grad(), models.eval_mode(model), progress.bar(len(pairs), "KL to reference", "prompt") as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            bar.update(len(chunk))
            rows = [TokenizedPair(p, c, c) for p, c in chunk]
            batch = collate(rows, pad)
            k = batch.num_pairs
            batch = Batch(batch.input_ids[:k], batch.attention_mask[:k], batch.completion_mask[:k]).to(device)
            labels = batch.input_ids[:, 1:]
            mask = batch.completion_mask[:, 1:].bool()
            p_lp = _completion_token_logprobs(model, batch, mask)  # [N, V] at the generated positions
            with models.as_reference(model, ref_model) as ref:
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
        out_ids = greedy_generate(generator, tokenizer, ids, max_new_tokens, batch_size, desc=f"generate ({name})")
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
        with models.as_reference(model, ref_model) as reference:
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

    return prompt_text(prompt)


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


