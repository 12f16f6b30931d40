"""Learning-rate schedules as plain functions of the step (the same curves as transformers')."""

from __future__ import annotations

import math

import torch


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    """TRL/transformers convention: a value >= 1 is a step count, below 1 a fraction of all steps."""
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(optimizer, *, kind: str, warmup: float, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    w = warmup_steps_for(warmup, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind=kind, warmup=w, total=total_steps))


def continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    """The optimizer's rates set to what `scheduler` gives at its restored step (`last_epoch`: the steps
    done). A resumed run whose total changed builds its schedule over the new total; the restored state
    still holds the rates the old schedule gave, and this replaces them, so every step after the resume
    runs at the new schedule's rate for that step. Returns the rates."""
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (and the metrics row logs) for the next step
    return rates


def build_optimizer(named_params, *, name: str, lr: float, weight_decay: float, betas, eps) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on biases and norms (as HF Trainer groups them)."""
    named_params = list(named_params)
    no_decay = ("bias", "norm")
    groups = [
        {"params": [p for n, p in named_params if not any(k in n.lower() for k in no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in named_params if any(k in n.lower() for k in no_decay)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}")


def steps_per_epoch(num_pairs: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(num_pairs / batch_size) / grad_accum))


def total_steps(cfg, num_pairs: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = steps_per_epoch(num_pairs, cfg.per_device_batch_size * world_size, cfg.grad_accum)
    return max(1, math.ceil(cfg.num_epochs * per_step))
