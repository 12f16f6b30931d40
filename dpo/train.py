"""The DPO training loop, written out, and `python -m dpo.train`.

One optimizer step:
    for each of grad_accum micro-batches of B pairs:
        policy logps[2B]     = completion_logps(model, [chosen rows; rejected rows])   (one forward)
        reference logps[2B]  = the same under no_grad with the adapter off (or the frozen start adapter)
        loss                 = preference_loss(...)            mean over the B pairs
        (loss / grad_accum).backward()                          as TRL/HF Trainer scale accumulation
    clip the global grad norm, AdamW step, schedule step
Metrics carry TRL's names and are the mean over the step's micro-batches, as TRL logs them.

Nothing lost (dpo.lifecycle writes, checkpoints, resumes and handles signals; dpo.checkpoint stores):
- A checkpoint every --save-steps and at the end: trainable tensors, optimizer, scheduler, RNG
  states, the step (= the data position: step_plan is deterministic) and the run's config; with
  --precompute-ref also the reference log-probs (ref_logps.safetensors), so a resume need not
  recompute them. --resume / --resume-from continue a run exactly as if it had never stopped.
- SIGINT/SIGTERM: the current optimizer step finishes, a checkpoint is written, and the run exits
  with 130/143 and the command that resumes it. A second signal stops at once (a checkpoint write
  in progress is let finish first, so no half-written folder appears).
- A non-finite loss or gradient norm never reaches the weights: --on-nan stop (exit 3, naming the
  step, the rows and the checkpoint of the last good step) or --on-nan skip (no update; counted).
Exit codes of main(): 0 done, 2 refused (bad flags, data, output dir or checkpoint), 3 non-finite
step, 128+signal when stopped by a signal.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import sys
import time
import warnings
from array import array
from dataclasses import dataclass, field

import torch

from dpo import data as data_mod
from dpo import distributed, tasks
from dpo.run_eval import RunEvaluation
from dpo import models
from dpo.checkpoint import Checkpoint, CheckpointError, capture_rng, check_output_dir, restore_rng, restore_trainable_state
from dpo.lifecycle import (
    Checkpointer,
    Commands,
    RunWriter,
    StopNow,
    StopSignals,
    TrainingStopped,
    drop_later_checkpoints,
    load_reference_cache,
    load_resume_checkpoint,
)
from dpo.config import ConfigError, TrainConfig, config_from_args
from dpo.data import TokenizedPair, collate
from dpo.losses import PreferenceLogps, preference_loss
from dpo.schedule import build_optimizer, build_scheduler
from dpo.smollm2 import MissingDefaultModel

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
EXIT_REFUSED = 2
EXIT_NONFINITE = 3


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def epoch_order(num_pairs: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the pairs for one epoch: a seeded permutation (different each epoch) or file order."""
    if not shuffle:
        return list(range(num_pairs))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_pairs, generator=g).tolist()


def steps_per_epoch(num_pairs: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(num_pairs / batch_size) / grad_accum))


def total_steps(cfg: TrainConfig, num_pairs: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = steps_per_epoch(num_pairs, cfg.per_device_batch_size * world_size, cfg.grad_accum)
    return max(1, math.ceil(cfg.num_epochs * per_step))


def step_plan(num_pairs: int, cfg: TrainConfig, world_size: int = 1):
    """Yield (epoch, [[pair indices of micro-batch] * k]) for each optimizer step, forever.

    As HF Trainer: the last micro-batch of an epoch may hold fewer pairs, and the last step of an
    epoch may hold fewer micro-batches (its loss is then divided by that smaller count).
    """
    b, ga = cfg.per_device_batch_size * world_size, cfg.grad_accum  # a global micro-batch over all ranks
    epoch = 0
    while True:
        order = epoch_order(num_pairs, epoch, cfg.seed, cfg.shuffle)
        micro = [order[i : i + b] for i in range(0, num_pairs, b)]
        n_steps = steps_per_epoch(num_pairs, b, ga)
        for s in range(n_steps):
            yield epoch, micro[s * ga : (s + 1) * ga]
        epoch += 1


@dataclass
class StepMetrics:
    """Running sums over one optimizer step's micro-batches."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()}


def batch_metrics(loss: torch.Tensor, logps: PreferenceLogps, chosen_rewards, rejected_rewards) -> dict[str, float]:
    """TRL's metric definitions for one micro-batch."""
    return {
        "loss": loss.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": logps.chosen.detach().mean().item(),
        "logps/rejected": logps.rejected.detach().mean().item(),
    }


def nonfinite_rows(loss: torch.Tensor, logps: PreferenceLogps, row_ids: list[int]) -> list[int]:
    """Row ids of a micro-batch whose loss is not finite: the pairs with a non-finite log-prob, else all."""
    if torch.isfinite(loss).all():
        return []
    four = torch.stack([torch.as_tensor(t).detach().float()
                        for t in (logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected)])
    bad = (~torch.isfinite(four)).any(dim=0).tolist()
    return [r for r, b in zip(row_ids, bad) if b] or list(row_ids)


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm is NaN/inf (raised under --on-nan stop, before any update)."""

    def __init__(self, step: int, what: str, row_ids: list[int]):
        super().__init__(f"non-finite {what} at step {step} (row ids {row_ids})")
        self.step, self.what, self.row_ids = step, what, row_ids


def data_fingerprint(pairs: list[TokenizedPair]) -> dict:
    """How many pairs and a hash of their token ids: a resume refuses data that changed under the same name."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in ([p.row_id], p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(array("q", ids).tobytes())
            h.update(b"|")
    return {"pairs": len(pairs), "sha256": h.hexdigest()}


class Trainer:
    """Our loop. `model` is a PEFT model (LoRA) or a full model with an explicit `ref_model`."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, train_pairs: list[TokenizedPair], ref_model=None,
                 device: torch.device | None = None, dist: distributed.DistInfo = distributed.DistInfo()):
        if not train_pairs:
            raise ValueError("no training pairs")
        self.model, self.tokenizer, self.cfg, self.pairs, self.ref_model = model, tokenizer, cfg, train_pairs, ref_model
        self.device = device or next(model.parameters()).device
        # bf16 runs use autocast on CUDA (LoRA weights stay float32, as PEFT makes them)
        self.autocast_bf16 = self.device.type == "cuda" and resolve_dtype(cfg.dtype, self.device) == torch.bfloat16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.dist = dist  # this rank and the world: each rank trains on its shard of every micro-batch
        self.total_steps = total_steps(cfg, len(train_pairs), dist.world_size)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(named, name=cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                         betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        self.scheduler = build_scheduler(self.optimizer, kind=cfg.lr_scheduler, warmup=cfg.warmup_steps,
                                         total_steps=self.total_steps)
        self.step = 0
        self.num_tokens = 0
        self.skipped_steps: list[int] = []  # steps dropped for a non-finite loss/grad norm (--on-nan skip)
        self.rng_at_step_start: dict | None = None  # for a checkpoint of the last good step
        self.ref_cache: torch.Tensor | None = None  # [num_pairs, 2] after precompute_reference()
        self.data_fingerprint = data_fingerprint(train_pairs)
        self._plan = step_plan(len(train_pairs), cfg, dist.world_size)

    # -- one micro-batch ---------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def reference_logps(self, batch) -> torch.Tensor:
        if self.cfg.reference_free:
            return torch.zeros(batch.input_ids.shape[0], device=self.device)
        with torch.no_grad(), self._autocast():
            if self.ref_model is not None:
                return models.completion_logps(self.ref_model, batch, self.cfg.logprobs, self.cfg.logprob_chunk)
            with models.reference_mode(self.model):
                return models.completion_logps(self.model, batch, self.cfg.logprobs, self.cfg.logprob_chunk)

    def precompute_reference(self, batch_size: int | None = None) -> None:
        """Reference log-probs of every pair, once, before training (no_grad, length-sorted batches).

        The reference never changes, so each step then runs only the policy; the batches here can be
        larger than training's, since nothing is kept for a backward pass.
        """
        batch_size = batch_size or self.cfg.precompute_ref_batch_size or 4 * self.cfg.per_device_batch_size
        # Only the pairs this run will train on (a --max-steps run may see a fraction of the data).
        plan = step_plan(len(self.pairs), self.cfg, self.dist.world_size)
        needed = {i for _ in range(self.total_steps) for micro in next(plan)[1] for i in self._my_shard(micro)}
        order = sorted(needed, key=lambda i: len(self.pairs[i].prompt_ids)
                       + max(len(self.pairs[i].chosen_ids), len(self.pairs[i].rejected_ids)))
        cache = torch.full((len(self.pairs), 2), float("nan"), dtype=torch.float32)
        self.model.eval()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([self.pairs[i] for i in idx], self.pad_id, self.cfg.max_length).to(self.device)
            ref = self.reference_logps(batch).float().cpu()
            cache[idx, 0], cache[idx, 1] = ref[: len(idx)], ref[len(idx) :]
        self.ref_cache = cache

    def _my_shard(self, global_micro: list[int]) -> list[int]:
        return distributed.shard(global_micro, self.dist, self.cfg.per_device_batch_size)

    def micro_batch_loss(self, pairs: list[TokenizedPair], ref: torch.Tensor | None = None):
        """Loss of one micro-batch; `ref` ([2B] reference log-probs) is computed here unless given."""
        batch = collate(pairs, self.pad_id, self.cfg.max_length).to(self.device)
        if ref is None:
            ref = self.reference_logps(batch)
        with self._autocast():
            policy = models.completion_logps(self.model, batch, self.cfg.logprobs, self.cfg.logprob_chunk)
        b = batch.num_pairs
        tokens = batch.completion_mask.sum(dim=1)
        logps = PreferenceLogps(chosen=policy[:b], rejected=policy[b:], ref_chosen=ref[:b], ref_rejected=ref[b:],
                                chosen_tokens=tokens[:b], rejected_tokens=tokens[b:])
        out = preference_loss(logps, beta=self.cfg.beta, loss_types=list(self.cfg.loss_type),
                              loss_weights=self.cfg.loss_weights, label_smoothing=self.cfg.label_smoothing,
                              reference_free=self.cfg.reference_free)
        return out, logps, batch

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step and its metrics row.

        A non-finite loss or gradient norm never reaches the weights: under on_nan="stop" this raises
        NonFiniteStep with nothing changed but the data position; under "skip" the gradients are
        dropped, only the schedule advances, and the row says "skipped".
        """
        self.model.train()
        self.rng_at_step_start = capture_rng()
        _, global_micro_batches = next(self._plan)
        micro_batches = [self._my_shard(m) for m in global_micro_batches]
        metrics, tokens, bad_rows = StepMetrics(), 0, []
        for idx in micro_batches:
            ref = None
            if self.ref_cache is not None:
                ref = torch.cat([self.ref_cache[idx, 0], self.ref_cache[idx, 1]]).to(self.device)
            out, logps, batch = self.micro_batch_loss([self.pairs[i] for i in idx], ref)
            (out.loss / len(micro_batches)).backward()
            metrics.add(batch_metrics(out.loss.detach(), logps, out.chosen_rewards, out.rejected_rewards))
            tokens += int(batch.attention_mask.sum())
            bad_rows += nonfinite_rows(out.loss.detach(), logps, batch.row_ids)
        # Several ranks: average gradients and metrics over them (equal shards: mean of means is the mean).
        distributed.average_gradients(self.params, self.dist)
        metrics, tokens, any_bad = self._gather(metrics, tokens, bad_rows)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        ))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (TRL logs the same)
        problem = "loss" if any_bad else "gradient norm" if not math.isfinite(grad_norm) else None
        if problem is None:
            self.optimizer.step()
            self.scheduler.step()
        else:
            rows = bad_rows or [self.pairs[i].row_id for m in global_micro_batches for i in m]
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.on_nan == "stop":
                raise NonFiniteStep(self.step + 1, problem, rows)
            self.skipped_steps.append(self.step + 1)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.num_tokens += tokens
        row = {"step": self.step, **metrics.means(), "grad_norm": grad_norm, "learning_rate": lr,
               "num_tokens": self.num_tokens}
        if problem is not None:  # JSON null, not NaN, for the values that are not numbers
            row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
            row["skipped"] = f"non-finite {problem}"
        return row

    def _gather(self, metrics: "StepMetrics", tokens: int, bad_rows: list[int]) -> tuple["StepMetrics", int, bool]:
        """Metrics of all ranks, as TRL gathers them: means over every pair of the step, summed tokens."""
        if not self.dist.enabled:
            return metrics, tokens, bool(bad_rows)
        keys = sorted(metrics.sums)
        summed = distributed.sum_across([metrics.sums[k] for k in keys] + [tokens, len(bad_rows)], self.dist,
                                        self.device)
        gathered = StepMetrics({k: v / self.dist.world_size for k, v in zip(keys, summed)}, metrics.count)
        # A non-finite value on any rank stops (or skips) the step on every rank.
        return gathered, int(summed[-2]), summed[-1] > 0

    def train(self, on_step=None) -> list[dict[str, float]]:
        history = []
        while self.step < self.total_steps:
            row = self.train_step()
            history.append(row)
            if on_step is not None:
                on_step(row)
        return history

    # -- checkpoint state -----------------------------------------------------------------------
    def state(self) -> dict:
        """What trainer_state.json holds: the step (hence the data position) and the counters."""
        return {"step": self.step, "num_tokens": self.num_tokens, "skipped_steps": list(self.skipped_steps),
                "total_steps": self.total_steps, "data": self.data_fingerprint, "world_size": self.dist.world_size}

    def load_state(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, counters, data position (not RNG)."""
        saved, now = ckpt.trainer_state.get("data"), self.data_fingerprint
        if saved is not None and saved != now:
            raise CheckpointError(
                f"cannot resume from {ckpt.path}: the training data changed since it was written "
                f"({saved.get('pairs')} pairs then, {now['pairs']} now; token hash {str(saved.get('sha256'))[:12]} "
                f"then, {now['sha256'][:12]} now): same --dataset name, other content or tokenizer")
        ranks = int(ckpt.trainer_state.get("world_size", 1))
        if ranks != self.dist.world_size:  # the data position is a step of a plan made for that many ranks
            raise CheckpointError(
                f"cannot resume from {ckpt.path}: it was written by a run on {ranks} rank(s) and this run has "
                f"{self.dist.world_size}; resume with the same number of processes (torchrun --nproc-per-node "
                f"{ranks})")
        restore_trainable_state(self.model, ckpt.adapter_state)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.step = ckpt.step
        self.num_tokens = int(ckpt.trainer_state.get("num_tokens", 0))
        self.skipped_steps = list(ckpt.trainer_state.get("skipped_steps", []))
        for _ in range(self.step):  # step_plan is deterministic: skip the steps already done
            next(self._plan)


# --- the command line ------------------------------------------------------------------------


def data_spec(cfg: TrainConfig) -> data_mod.DataSpec:
    return data_mod.DataSpec(path=cfg.dataset, split=cfg.dataset_split, config=cfg.dataset_config,
                             prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                             rejected_column=cfg.rejected_column, implicit_prompt=cfg.implicit_prompt)


def read_rows(cfg: TrainConfig):
    """The training rows: a built-in task's (`builtin:NAME`), else the file, folder or hub dataset."""
    rows = tasks.load_builtin(cfg.dataset)
    return rows if rows is not None else data_mod.load_rows(data_spec(cfg))


def load_training_pairs(cfg: TrainConfig, tokenizer, rows=None):
    rows = read_rows(cfg) if rows is None else rows
    return data_mod.prepare_pairs(tokenizer, rows, cfg.max_length, cfg.max_prompt_length,
                                  drop_identical=not cfg.keep_identical)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def build_model(cfg: TrainConfig, device: torch.device):
    """Base model + LoRA (fresh, or the starting adapter with its frozen reference copy)."""
    path = models.resolve_model_path(cfg.model)
    dtype = resolve_dtype(cfg.dtype, device)
    try:
        backend = models.pick_backend(cfg.backend)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    if backend == "unsloth":
        seed_everything(cfg.seed)
        lora = models.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
        model, tokenizer = models.load_unsloth(path, max_length=cfg.max_length or 4096, load_in_4bit=cfg.load_in_4bit,
                                               dtype=dtype, lora=lora, seed=cfg.seed, adapter=cfg.adapter,
                                               gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.disable_dropout:
            models.disable_dropout(model)
        return _place_embeddings(model, cfg), tokenizer
    if cfg.load_in_4bit and device.type != "cuda":
        raise ConfigError("--load-in-4bit: needs a CUDA GPU (bitsandbytes NF4)")
    try:
        tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
        seed_everything(cfg.seed)  # LoRA init depends on it, as in TRL
        model = models.load_model(path, dtype, str(device), cfg.trust_remote_code, cfg.load_in_4bit)
    except (OSError, ValueError) as e:  # no such hub model, no model.safetensors, remote code refused, ...
        raise ConfigError(f"--model: cannot load {path}: {_first_line(e)}") from None
    if cfg.adapter:
        model = models.load_starting_adapter(model, cfg.adapter)
    else:
        model = models.add_lora(model, models.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                           tuple(cfg.lora_targets)))
    if cfg.load_in_4bit:
        models.cast_trainable_to_bf16(model)
    if cfg.disable_dropout:
        models.disable_dropout(model)
    if cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    return _place_embeddings(model if cfg.load_in_4bit else model.to(device), cfg), tokenizer


def _place_embeddings(model, cfg: TrainConfig):
    """--embeddings-on-cpu: the frozen input-embedding table moves to CPU memory (see models.HostEmbedding)."""
    if cfg.embeddings_on_cpu:
        try:
            models.embeddings_to_host(model, gradient_checkpointing=cfg.gradient_checkpointing)
        except ValueError as e:
            raise ConfigError(f"--embeddings-on-cpu: {e}") from None
    return model


def describe_rows(row_ids: list[int], rows, limit: int = 8) -> str:
    """'3 (data.jsonl line 4), 7 (data.jsonl line 8)': row ids with where they came from."""
    def one(r: int) -> str:
        where = rows[r].where if rows is not None and 0 <= r < len(rows) and rows[r].row_id == r else ""
        return f"{r} ({where})" if where else str(r)
    shown = ", ".join(one(r) for r in row_ids[:limit])
    return shown + (f", ... ({len(row_ids)} in all)" if len(row_ids) > limit else "")


def cpu_threads(requested: int, ranks: int = 1) -> int:
    """Threads for torch on the CPU: as asked, else the cores other work leaves free, shared by the ranks.
    (Two threads on a core another process holds run several times slower than one.)"""
    if requested > 0:
        return requested
    free = (os.cpu_count() or 1) - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else os.cpu_count() or 1
    return max(1, free // max(1, ranks))


def agreed_signal(signals: StopSignals, trainer: Trainer) -> int | None:
    """The signal that stops the run, the same on every rank: a signal may reach the ranks at different
    steps, and a rank that left the loop alone would wait in a checkpoint barrier while the others wait
    in the next step's all-reduce. One tiny all-reduce per step settles it (every rank then stops)."""
    if trainer.dist.enabled:
        (agreed,) = distributed.max_across([float(signals.received or 0)], trainer.dist, trainer.device)
        if agreed and signals.received is None:
            signals.received = int(agreed)
    return signals.received


def train_loop(trainer: Trainer, writer: RunWriter, saver: Checkpointer, signals: StopSignals,
               held_out: RunEvaluation | None = None) -> list[dict]:
    """Optimizer steps until the last one or a signal; metrics after each, a checkpoint every --save-steps."""
    from tqdm.auto import tqdm

    history = []
    with tqdm(total=trainer.total_steps, initial=trainer.step, desc="dpo", unit="step",
              disable=bool(os.environ.get("TQDM_DISABLE")) or not trainer.dist.is_main) as bar:
        while trainer.step < trainer.total_steps and agreed_signal(signals, trainer) is None:
            row = trainer.train_step()
            writer.append_metrics(row)
            history.append(row)
            bar.update(1)
            if row.get("skipped"):
                bar.write(f"dpo: step {row['step']} skipped ({row['skipped']})")
            else:
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            if saver.due(trainer.step):
                saver.save(trainer)
            every = trainer.cfg.eval_steps
            if held_out is not None and every > 0 and trainer.step % every == 0 and trainer.step < trainer.total_steps:
                writer.append_metrics({"step": trainer.step, **held_out.metrics(trainer.model)})
    return history


def run(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """Train as `cfg` says. Returns {"history" (this process's rows), "steps", "adapter_dir", "checkpoint",
    "seconds", "model", "tokenizer", "skipped_steps"}.

    Raises ConfigError, DataError, CheckpointError or MissingDefaultModel for what it refuses (before a
    model loads where it can), and TrainingStopped after a signal or a non-finite step (--on-nan stop).
    `argv` (the command line) only shapes the resume command the messages print.
    """
    started = time.time()
    dist, device = distributed.setup(cfg.device)  # one process, or one rank of torchrun/accelerate launch
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, dist.world_size))
    run_config = cfg.run_dict()
    commands = Commands(cfg, argv)
    if dist.is_main:
        check_output_dir(cfg.output_dir, run_config, resume=bool(cfg.resume or cfg.resume_from),
                         overwrite=cfg.overwrite)
    resumed = load_resume_checkpoint(cfg, run_config)
    rows = read_rows(cfg)
    models.resolve_model_path(cfg.model)  # the default model missing: say so before anything loads
    writer = RunWriter(cfg.output_dir, enabled=dist.is_main)
    if cfg.overwrite and dist.is_main:
        writer.clear_previous_run()
    if resumed is not None and dist.is_main:
        drop_later_checkpoints(cfg.output_dir, resumed.step)
    distributed.barrier(dist)

    with StopSignals() as signals:
        saver = Checkpointer(cfg, run_config, signals, commands, enabled=dist.is_main)
        try:
            result = train_and_save(cfg, run_config, resumed, rows, writer, saver, signals, commands, dist, device)
        except StopNow as e:  # a second signal: out at once (a checkpoint write in progress was let finish)
            raise stopped_at_once(e.signum, saver, commands) from None
        finally:
            distributed.teardown(dist)
    elapsed = time.time() - started
    if not dist.is_main:
        return {**result, "seconds": elapsed}
    skipped = result["skipped_steps"]
    note = f" ({len(skipped)} skipped for a non-finite loss or gradient norm: steps {skipped})" if skipped else ""
    resumed_note = f" (resumed at step {resumed.step})" if resumed is not None else ""
    print(f"dpo: {result['steps']} steps{resumed_note}{note} in {elapsed:.1f} s; adapter saved to "
          f"{result['adapter_dir']}; checkpoint {result['checkpoint']}")
    return {**result, "seconds": elapsed}


def train_and_save(cfg: TrainConfig, run_config: dict, resumed: Checkpoint | None, rows, writer: RunWriter,
                   saver: Checkpointer, signals: StopSignals, commands: Commands,
                   dist: distributed.DistInfo = distributed.DistInfo(), device: torch.device | None = None) -> dict:
    """Build (or restore) the trainer, run the loop, then the final checkpoint and adapter/."""
    device = device or resolve_device(cfg.device)
    model, tokenizer = build_model(cfg, device)
    pairs, report = load_training_pairs(cfg, tokenizer, rows)
    if dist.is_main:
        print(report.format())
        if dist.enabled:
            print(f"dpo: {dist.world_size} ranks, {cfg.per_device_batch_size} pairs each per micro-batch "
                  f"({cfg.per_device_batch_size * dist.world_size * cfg.grad_accum} pairs per optimizer step)")
    trainer = Trainer(model, tokenizer, cfg, pairs, device=device, dist=dist)
    if resumed is not None:
        trainer.load_state(resumed)
        if cfg.precompute_ref and not cfg.reference_free:
            load_reference_cache(trainer, resumed)
        print(f"dpo: resuming from {resumed.path} at step {trainer.step} of {trainer.total_steps}")
    if cfg.precompute_ref and not cfg.reference_free and trainer.ref_cache is None:
        trainer.precompute_reference()
    held_out = RunEvaluation.for_run(cfg, tokenizer) if dist.is_main else None
    writer.start(run_config, resumed, model=model, tokenizer=tokenizer)  # disk room, config.json, metrics
    if held_out is not None:
        before = held_out.before(model)  # the starting model (the reference), in a resumed run too
        if resumed is None:
            writer.append_metrics({"step": 0, **before})
    if resumed is not None:
        restore_rng(resumed.rng_state)  # last, just before the first step
    try:
        history = train_loop(trainer, writer, saver, signals, held_out)
    except NonFiniteStep as e:
        raise stopped_on_nan(e, trainer, saver, commands, rows) from None
    if signals.received is not None and trainer.step < trainer.total_steps:
        path = saver.save(trainer)
        name = signal.Signals(signals.received).name
        raise TrainingStopped(f"stopped by {name} after step {trainer.step} of {trainer.total_steps}; "
                              f"checkpoint {path}. Resume with: {commands.resume()}", 128 + signals.received, path)
    final = saver.save(trainer)
    with signals.protected():
        adapter_dir = writer.save_adapter(model, tokenizer)
    if held_out is not None:
        writer.append_metrics({"step": trainer.step, **held_out.after(model)})
        writer.write_json("eval.json", held_out.to_dict())
        print(held_out.report())
    if dist.is_main:
        draw_curves(writer)
    return {"history": history, "steps": trainer.step, "adapter_dir": adapter_dir, "checkpoint": final, "model": model,
            "tokenizer": tokenizer, "skipped_steps": list(trainer.skipped_steps)}


def draw_curves(writer: RunWriter) -> None:
    """OUTPUT_DIR/curves.png from metrics.jsonl; a plotting failure is reported, never fatal."""
    from dpo.plots import plot_curves

    try:
        path = plot_curves(writer.metrics_path, os.path.join(writer.dir, "curves.png"))
        print(f"dpo: curves: {path}")
    except Exception as e:  # noqa: BLE001  (the run's results are saved already)
        print(f"dpo: warning: could not draw curves.png: {_first_line(e)}", file=sys.stderr)


def stopped_on_nan(e: NonFiniteStep, trainer: Trainer, saver: Checkpointer, commands: Commands,
                   rows) -> TrainingStopped:
    """--on-nan stop: keep the last good step (nothing was updated), name the step and the rows."""
    path = saver.save(trainer, rng_state=trainer.rng_at_step_start)
    return TrainingStopped(
        f"error: non-finite {e.what} at step {e.step} (row ids {describe_rows(e.row_ids, rows)}); stopped before "
        f"updating the weights. Last good checkpoint: {path} (step {trainer.step}). To skip such steps, "
        f"resume with: {commands.resume('--on-nan', 'skip')}", EXIT_NONFINITE, path)


def stopped_at_once(signum: int, saver: Checkpointer, commands: Commands) -> TrainingStopped:
    name = signal.Signals(signum).name
    if saver.last is None:
        return TrainingStopped(f"stopped at once by a second {name}; no checkpoint was written. "
                               f"Start over with: {commands.restart()}", 128 + signum)
    return TrainingStopped(f"stopped at once by a second {name}; the last checkpoint is {saver.describe_last()}. "
                           f"Resume with: {commands.resume()}", 128 + signum, saver.last)


def main(argv: list[str] | None = None) -> int:
    """`python -m dpo.train`: 0 done, 2 refused (one line, no traceback), 3 non-finite step, 128+N stopped by
    signal N (130 SIGINT, 143 SIGTERM) after saving a checkpoint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = config_from_args(argv)
        if cfg.dataset is None:  # the default run: the built-in task with settings measured to move the model
            stamp = time.strftime("%Y%m%d-%H%M%S")
            cfg = config_from_args(argv, base={**tasks.DEFAULT_RUN, "output_dir": f"runs/default-{stamp}"})
            print(f"dpo: no --dataset given: the default run ({cfg.model} on {cfg.dataset}, {cfg.max_steps} steps "
                  f"of {cfg.per_device_batch_size} pairs; --help lists every option)")
        run(cfg, argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2; it printed its one line)
        return e.code if isinstance(e.code, int) else EXIT_REFUSED
    except TrainingStopped as e:
        print(f"dpo: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, data_mod.DataError, CheckpointError, MissingDefaultModel) as e:
        print(f"dpo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("dpo: interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
