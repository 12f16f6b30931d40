"""The trainer: one optimizer step, written out, and the plan of which items each step takes.

One optimizer step:
    for each of grad_accum micro-batches:
        batch      = objective.collate(items)                         (dpo.objectives)
        reference  = objective.score(reference model, batch)          no_grad; precomputed once where it can be
        policy     = objective.score(model, batch)                    with gradients
        loss       = objective.loss(policy, reference)                mean over the micro-batch's pairs (KTO: rows)
        (loss / grad_accum).backward()                                as TRL/HF Trainer scale accumulation
    clip the global grad norm, AdamW step, schedule step
For DPO a micro-batch of B pairs is one forward of 2B rows (chosen rows, then rejected rows); each
objective's module says what it scores and how (DPO with LD-DPO and WPO; SimPO, CPO, ORPO; KTO), as its
TRL 1.15 trainer does. Metrics carry TRL's names and are the mean over the step's micro-batches, as TRL
logs them (each over the micro-batches that logged it: a KTO micro-batch without desirable rows has no
rewards/chosen). A non-finite loss or gradient norm never reaches the weights (`on_nan`: stop raises
NonFiniteStep, skip drops the update and marks the row).

The loop that calls `train_step` until the end (with checkpoints, signals, evaluation and the run
folder) is `dpo.train.run`: the one loop the CLI, the benchmarks and the tests drive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import warnings
from array import array
from dataclasses import dataclass, field

import torch

from dpo import distributed, models, packing, progress, sharing, throughput, unsloth_prefix
from dpo.cli import first_line
from dpo.run.checkpoint import Checkpoint, CheckpointError
from dpo.run.state import capture_rng, restore_trainable_state
from dpo.config import TrainConfig
from dpo.data.pairs import TokenizedPair
from dpo.losses import PreferenceLogps
from dpo.losses import UnpairedLogps
from dpo.loss_settings import LossSettings
from dpo.objectives import Scorer, objective_for
from dpo.objectives.base import region
from dpo.schedule import build_optimizer, build_scheduler, continue_schedule, steps_per_epoch, total_steps


def epoch_order(num_pairs: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the pairs for one epoch: a seeded permutation (different each epoch) or file order."""
    if not shuffle:
        return list(range(num_pairs))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_pairs, generator=g).tolist()


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
    """Running sums over one optimizer step's micro-batches; each metric is averaged over the micro-batches
    that logged it (a KTO micro-batch with no desirable row logs no rewards/chosen, as in TRL)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.counts.get(k, self.count) for k, v in self.sums.items()}


def nonfinite_rows(loss: torch.Tensor, logps: PreferenceLogps | UnpairedLogps, row_ids: list[int]) -> list[int]:
    """Row ids of a micro-batch whose loss is not finite: the pairs (KTO: rows) with a non-finite log-prob,
    else all."""
    if torch.isfinite(loss).all():
        return []
    if isinstance(logps, UnpairedLogps):
        four = torch.stack([logps.logps.detach().float(), logps.ref_logps.detach().float()])
    else:
        four = torch.stack([torch.as_tensor(t).detach().float()
                            for t in (logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected)])
    bad = (~torch.isfinite(four)).any(dim=0).tolist()
    return [r for r, b in zip(row_ids, bad) if b] or list(row_ids)


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm is NaN/inf (raised under --on-nan stop, before any update)."""

    def __init__(self, step: int, what: str, row_ids: list[int]):
        super().__init__(f"non-finite {what} at step {step} (row ids {row_ids})")
        self.step, self.what, self.row_ids = step, what, row_ids


def _token_lists(item) -> list[list[int]]:
    """The id lists that define a training item: a DPO pair, a CPO/ORPO SidedPair or a KTO TokenizedRow."""
    if isinstance(item, TokenizedPair):
        return [[item.row_id], item.prompt_ids, item.chosen_ids, item.rejected_ids]
    lists = [[item.row_id]] + [v for v in vars(item).values() if isinstance(v, list)]
    return lists + ([[int(item.label)]] if hasattr(item, "label") else [])


def data_fingerprint(pairs: list) -> dict:
    """How many pairs and a hash of their token ids: a resume refuses data that changed under the same name."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in _token_lists(p):
            h.update(array("q", ids).tobytes())
            h.update(b"|")
    return {"pairs": len(pairs), "sha256": h.hexdigest()}


class Trainer:
    """Our loop. `model` is a PEFT model (LoRA) or a full model with an explicit `ref_model`."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, train_pairs: list, ref_model=None,
                 device: torch.device | None = None, dist: distributed.DistInfo = distributed.DistInfo(),
                 loss: LossSettings | None = None):
        if not train_pairs:
            raise ValueError("no training pairs")
        self.model, self.tokenizer, self.cfg, self.pairs, self.ref_model = model, tokenizer, cfg, train_pairs, ref_model
        self.loss = loss if loss is not None else LossSettings.from_config(cfg)
        self.device = device or next(model.parameters()).device
        self.dist = dist  # this rank and the world: each rank trains on its shard of every micro-batch
        self.objective = objective_for(self.loss, self._mean_over_ranks if dist.enabled else None)
        # the layout (padded, packed, prefix-shared) is chosen by choose_layout(), after its self-check
        self.scorer = Scorer(self.device, cfg.logprobs, cfg.logprob_chunk)
        self.backend = models.pick_backend(cfg.backend)  # hf or unsloth: which layouts its attention takes
        # bf16 runs use autocast on CUDA (LoRA weights stay float32, as PEFT makes them)
        self.autocast_bf16 = self.device.type == "cuda" and models.resolve_dtype(cfg.dtype, self.device) == torch.bfloat16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
        self.ref_cache: torch.Tensor | None = None  # [num_pairs, k] after precompute_reference()
        self.data_fingerprint = data_fingerprint(train_pairs)
        self._plan = step_plan(len(train_pairs), cfg, dist.world_size)
        self.cost = throughput.StepCost(model, self.device, counts_flops=not self.loss.unpaired)

    # -- one micro-batch ---------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    @contextlib.contextmanager
    def _reference(self):
        """The reference model: the explicit one, else the policy with its adapter off (or frozen start adapter)."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with models.reference_mode(self.model):
                yield self.model

    def reference_scores(self, batch):
        """The reference's scores of a collated batch, without gradient; None for an objective that reads none."""
        if not self.objective.needs_reference:
            return None
        with torch.no_grad(), self._autocast(), self._reference() as model:
            return self.objective.score(self.scorer, model, batch, extras=False)

    def micro_batch(self, items: list, ref=None):
        """(LossOutput, logps, batch) of one micro-batch: the objective's batch, the reference scored without
        gradient (unless `ref` is given: precomputed), the policy with gradient, then the objective's loss."""
        with region("dpo:data"):
            batch = self.objective.collate(items, self.pad_id, self.cfg.max_length)  # in CPU memory
        if ref is None:
            ref = self.reference_scores(batch)
        with self._autocast():
            policy = self.objective.score(self.scorer, self.model, batch)
        out, logps = self.objective.loss(policy, ref)
        return out, logps, batch

    def choose_layout(self) -> None:
        """How plain completion log-probs run: prefix-shared (--prefix-sharing), packed (--packing) or padded.
        Each is checked against the padded path on the first micro-batch: a model whose forward does not keep
        the layout's sequences apart falls back, saying so (an asked-for "on" that fails is refused)."""
        asked = self.cfg.prefix_sharing
        wants_sharing, wants_packing = asked != "off", self.cfg.packing
        if not (wants_sharing or wants_packing):
            return
        if not self.objective.can_pack:
            what = "prefix sharing" if asked == "on" or not wants_packing else "packing"
            if asked == "on" or wants_packing:
                print(f"dpo: warning: {what} is off: it serves plain DPO loss types only (not ld_alpha, use_weighting "
                      f"or {self.objective.name}); running padded")
            return
        hf = self.backend == "hf"
        _, first = next(step_plan(len(self.pairs), self.cfg, self.dist.world_size))
        batch = self.objective.collate([self.pairs[i] for i in self._my_shard(first[0])], self.pad_id,
                                       self.cfg.max_length).to(self.device)
        if wants_sharing:
            lm = models._causal_lm(self.model)
            original = lm.config._attn_implementation
            # hf: a dense mask through sdpa; unsloth: its own shared-prefix kernel, where its forward has one
            route, why = ("masked", None) if hf else ("flex", unsloth_prefix.unsupported(lm.config))
            if why is None:
                sdpa = packing.AttentionRoute("sdpa", "sdpa", "prefix sharing")  # the masked route's mask is dense
                agrees, why = self._layout_agrees(sharing.sharing_agrees, batch, "the prefix-shared layout", route=route,
                                                  before=(lambda: packing.use_attention(self.model, sdpa)) if hf else None)
                if agrees:
                    self.scorer = dataclasses.replace(self.scorer, sharing=route)
                    return
            if asked == "on":
                raise ValueError(f"--prefix-sharing on: {why}; use --prefix-sharing auto or off")
            print(f"dpo: prefix sharing is off: {why}; running " + ("packed if it can" if wants_packing else "padded"))
            if hf and not wants_packing:  # back to the attention the model was loaded with
                lm.set_attn_implementation(original)
        if wants_packing:
            if hf:
                packing.use_attention(self.model, packing.choose_attention(self.device.type, requested=self.cfg.attention))
            agrees, why = self._layout_agrees(packing.packing_agrees, batch, "packed sequences")
            if not agrees:
                print(f"dpo: warning: packing is off: {why}; running padded")
            self.scorer = dataclasses.replace(self.scorer, packing=agrees)

    def _layout_agrees(self, check, batch, what: str, before=None, **kw) -> tuple[bool, str]:
        """(agrees, why not) of a layout's self-check on the first micro-batch; `before` prepares the model
        (its attention route). Any failure of either is a reason to run without the layout, never a crash."""
        try:
            if before is not None:
                before()
            with self._autocast():
                agrees, diff = check(self.model, batch, self.cfg.logprobs, self.cfg.logprob_chunk, **kw)
            return agrees, (f"this model's forward does not keep {what} apart (log-probs differ by {diff:.2e} "
                            "relative from the padded path)")
        except Exception as e:  # noqa: BLE001  (a patched forward that cannot take the layout: run padded)
            return False, f"a forward of {what} failed: {first_line(e)}"

    @property
    def packing(self) -> bool:
        return self.scorer.packing

    def precompute_reference(self, batch_size: int | None = None) -> None:
        """Reference scores of every pair, once, before training (no_grad, length-sorted batches).

        The reference never changes, so each step then runs only the policy; the batches here can be
        larger than training's, since nothing is kept for a backward pass.
        """
        batch_size = batch_size or self.cfg.precompute_ref_batch_size or 4 * self.cfg.per_device_batch_size
        # Only the pairs this run will train on (a --max-steps run may see a fraction of the data).
        plan = step_plan(len(self.pairs), self.cfg, self.dist.world_size)
        needed = {i for _ in range(self.total_steps) for micro in next(plan)[1] for i in self._my_shard(micro)}
        order = sorted(needed, key=lambda i: len(self.pairs[i].prompt_ids)
                       + max(len(self.pairs[i].chosen_ids), len(self.pairs[i].rejected_ids)))
        cache = None
        self.model.eval()
        with progress.bar(len(order), "reference log-probs (precompute)", "pair") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.objective.collate([self.pairs[i] for i in idx], self.pad_id, self.cfg.max_length)
                values = self.objective.reference_values(self.reference_scores(batch))
                if cache is None:
                    cache = torch.full((len(self.pairs), values.shape[1]), float("nan"), dtype=torch.float32)
                cache[idx] = values.float().cpu()
                bar.update(len(idx))
        self.ref_cache = cache

    def _my_shard(self, global_micro: list[int]) -> list[int]:
        return distributed.shard(global_micro, self.dist, self.cfg.per_device_batch_size)

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        (total,) = distributed.sum_across([float(value)], self.dist, self.device)
        return torch.tensor(total / self.dist.world_size, dtype=value.dtype, device=value.device)

    def micro_batch_of(self, indices: list[int]):
        """(LossOutput, logps, batch) of the micro-batch of these item indices (the precomputed reference
        where there is one)."""
        ref = None
        if self.ref_cache is not None:
            ref = self.objective.reference_from_values(self.ref_cache[indices].to(self.device))
        return self.micro_batch([self.pairs[i] for i in indices], ref)

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step and its metrics row.

        A non-finite loss or gradient norm never reaches the weights: under on_nan="stop" this raises
        NonFiniteStep with nothing changed but the data position; under "skip" the gradients are
        dropped, only the schedule advances, and the row says "skipped".
        """
        started = time.perf_counter()  # the step syncs at float(grad_norm): host time is the step's time
        self.model.train()
        self.rng_at_step_start = capture_rng()
        _, global_micro_batches = next(self._plan)
        micro_batches = [self._my_shard(m) for m in global_micro_batches]
        metrics, tokens, bad_rows, counted = StepMetrics(), 0, [], throughput.StepTokens()
        for idx in micro_batches:
            with region("dpo:forward"):
                out, logps, batch = self.micro_batch_of(idx)
            with region("dpo:backward"):
                (out.loss / len(micro_batches)).backward()
            with region("dpo:metrics"):
                metrics.add(self.objective.batch_row(out, logps))
                tokens += int(batch.attention_mask.sum())
                counted.add(*self.scorer.token_counts(batch))
                bad_rows += nonfinite_rows(out.loss.detach(), logps, batch.row_ids)
        # Several ranks: average gradients and metrics over them (equal shards: mean of means is the mean).
        distributed.average_gradients(self.params, self.dist)
        metrics, tokens, any_bad = self._gather(metrics, tokens, bad_rows)
        with region("dpo:clip"):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            ))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (TRL logs the same)
        problem = "loss" if any_bad else "gradient norm" if not math.isfinite(grad_norm) else None
        if problem is None:
            with region("dpo:optimizer"):
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
               "num_tokens": self.num_tokens, "tokens_computed": counted.computed,
               **self.cost.fields(counted, tokens, sum(map(len, global_micro_batches)), time.perf_counter() - started,
                                  reference_forward=self.objective.needs_reference and self.ref_cache is None)}
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

    # -- checkpoint state -----------------------------------------------------------------------
    def state(self) -> dict:
        """What trainer_state.json holds: the step (hence the data position) and the counters."""
        return {"step": self.step, "num_tokens": self.num_tokens, "skipped_steps": list(self.skipped_steps),
                "total_steps": self.total_steps, "data": self.data_fingerprint, "world_size": self.dist.world_size}

    def load_state(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, counters, data position (not RNG). A run
        of another total (--max-steps changed) runs the schedule built over its total from the checkpoint's
        step on (schedule.continue_schedule)."""
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
        if self.total_steps < ckpt.step:
            raise CheckpointError(f"cannot resume from {ckpt.path}: this run has {self.total_steps} steps and the "
                                  f"checkpoint is at step {ckpt.step} (give --max-steps {ckpt.step} or more)")
        restore_trainable_state(self.model, ckpt.adapter_state)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        if int(ckpt.trainer_state.get("total_steps", self.total_steps)) != self.total_steps:
            continue_schedule(self.scheduler)  # extended (or cut short): the schedule over the new total, from here
        self.step = ckpt.step
        self.num_tokens = int(ckpt.trainer_state.get("num_tokens", 0))
        self.skipped_steps = list(ckpt.trainer_state.get("skipped_steps", []))
        for _ in range(self.step):  # step_plan is deterministic: skip the steps already done
            next(self._plan)
