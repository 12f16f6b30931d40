"""The DPO training loop, written out, and `python -m dpo.train`.

One optimizer step:
    for each of grad_accum micro-batches of B pairs:
        policy logps[2B]     = completion_logps(model, [chosen rows; rejected rows])   (one forward)
        reference logps[2B]  = the same under no_grad with the adapter off (or the frozen start adapter)
        loss                 = preference_loss(...)            mean over the B pairs
        (loss / grad_accum).backward()                          as TRL/HF Trainer scale accumulation
    clip the global grad norm, AdamW step, schedule step
Metrics carry TRL's names and are the mean over the step's micro-batches, as TRL logs them.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch

from dpo import data as data_mod
from dpo import models
from dpo.config import ConfigError, TrainConfig, config_from_args, die
from dpo.data import TokenizedPair, collate
from dpo.losses import PreferenceLogps, preference_loss
from dpo.schedule import build_optimizer, build_scheduler

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


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


def total_steps(cfg: TrainConfig, num_pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * steps_per_epoch(num_pairs, cfg.per_device_batch_size, cfg.grad_accum)))


def step_plan(num_pairs: int, cfg: TrainConfig):
    """Yield (epoch, [[pair indices of micro-batch] * k]) for each optimizer step, forever.

    As HF Trainer: the last micro-batch of an epoch may hold fewer pairs, and the last step of an
    epoch may hold fewer micro-batches (its loss is then divided by that smaller count).
    """
    b, ga = cfg.per_device_batch_size, cfg.grad_accum
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


class Trainer:
    """Our loop. `model` is a PEFT model (LoRA) or a full model with an explicit `ref_model`."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, train_pairs: list[TokenizedPair], ref_model=None,
                 device: torch.device | None = None):
        if not train_pairs:
            raise ValueError("no training pairs")
        self.model, self.tokenizer, self.cfg, self.pairs, self.ref_model = model, tokenizer, cfg, train_pairs, ref_model
        self.device = device or next(model.parameters()).device
        # bf16 runs use autocast on CUDA (LoRA weights stay float32, as PEFT makes them)
        self.autocast_bf16 = self.device.type == "cuda" and resolve_dtype(cfg.dtype, self.device) == torch.bfloat16
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.total_steps = total_steps(cfg, len(train_pairs))
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
        self.ref_cache: torch.Tensor | None = None  # [num_pairs, 2] after precompute_reference()
        self._plan = step_plan(len(train_pairs), cfg)

    # -- one micro-batch ---------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def reference_logps(self, batch) -> torch.Tensor:
        if self.cfg.reference_free:
            return torch.zeros(batch.input_ids.shape[0], device=self.device)
        with torch.no_grad(), self._autocast():
            if self.ref_model is not None:
                return models.completion_logps(self.ref_model, batch, self.cfg.logprobs)
            with models.reference_mode(self.model):
                return models.completion_logps(self.model, batch, self.cfg.logprobs)

    def precompute_reference(self, batch_size: int | None = None) -> None:
        """Reference log-probs of every pair, once, before training (no_grad, length-sorted batches).

        The reference never changes, so each step then runs only the policy; the batches here can be
        larger than training's, since nothing is kept for a backward pass.
        """
        batch_size = batch_size or self.cfg.precompute_ref_batch_size or 4 * self.cfg.per_device_batch_size
        # Only the pairs this run will train on (a --max-steps run may see a fraction of the data).
        plan = step_plan(len(self.pairs), self.cfg)
        needed = {i for _ in range(self.total_steps) for micro in next(plan)[1] for i in micro}
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

    def micro_batch_loss(self, pairs: list[TokenizedPair], ref: torch.Tensor | None = None):
        """Loss of one micro-batch; `ref` ([2B] reference log-probs) is computed here unless given."""
        batch = collate(pairs, self.pad_id, self.cfg.max_length).to(self.device)
        if ref is None:
            ref = self.reference_logps(batch)
        with self._autocast():
            policy = models.completion_logps(self.model, batch, self.cfg.logprobs)
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
        self.model.train()
        _, micro_batches = next(self._plan)
        metrics = StepMetrics()
        for idx in micro_batches:
            ref = None
            if self.ref_cache is not None:
                ref = torch.cat([self.ref_cache[idx, 0], self.ref_cache[idx, 1]]).to(self.device)
            out, logps, batch = self.micro_batch_loss([self.pairs[i] for i in idx], ref)
            (out.loss / len(micro_batches)).backward()
            metrics.add(batch_metrics(out.loss.detach(), logps, out.chosen_rewards, out.rejected_rewards))
            self.num_tokens += int(batch.attention_mask.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        )
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (TRL logs the same)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        row = {"step": self.step, **metrics.means(), "grad_norm": float(grad_norm), "learning_rate": lr,
               "num_tokens": self.num_tokens}
        return row

    def train(self, on_step=None) -> list[dict[str, float]]:
        history = []
        while self.step < self.total_steps:
            row = self.train_step()
            history.append(row)
            if on_step is not None:
                on_step(row)
        return history


# --- the command line ------------------------------------------------------------------------


def load_training_pairs(cfg: TrainConfig, tokenizer):
    spec = data_mod.DataSpec(path=cfg.dataset, split=cfg.dataset_split, config=cfg.dataset_config,
                             prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                             rejected_column=cfg.rejected_column, implicit_prompt=cfg.implicit_prompt)
    rows = data_mod.load_rows(spec)
    return data_mod.prepare_pairs(tokenizer, rows, cfg.max_length, cfg.max_prompt_length,
                                  drop_identical=not cfg.keep_identical)


def build_model(cfg: TrainConfig, device: torch.device):
    """Base model + LoRA (fresh, or the starting adapter with its frozen reference copy)."""
    path = models.resolve_model_path(cfg.model)
    dtype = resolve_dtype(cfg.dtype, device)
    if models.pick_backend(cfg.backend) == "unsloth":
        seed_everything(cfg.seed)
        lora = models.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
        model, tokenizer = models.load_unsloth(path, max_length=cfg.max_length or 4096, load_in_4bit=cfg.load_in_4bit,
                                               dtype=dtype, lora=lora, seed=cfg.seed, adapter=cfg.adapter,
                                               gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.disable_dropout:
            models.disable_dropout(model)
        return model, tokenizer
    if cfg.load_in_4bit and device.type != "cuda":
        raise ConfigError("--load-in-4bit: needs a CUDA GPU (bitsandbytes NF4)")
    tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
    seed_everything(cfg.seed)  # LoRA init depends on it, as in TRL
    model = models.load_model(path, dtype, str(device), cfg.trust_remote_code, cfg.load_in_4bit)
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
    return model if cfg.load_in_4bit else model.to(device), tokenizer


class RunWriter:
    """Everything a run writes to OUTPUT_DIR: config.json, metrics.jsonl (one line per step), adapter/."""

    def __init__(self, output_dir: str):
        self.dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")

    def write_json(self, name: str, obj) -> None:
        path = os.path.join(self.dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)

    def start_metrics(self) -> None:
        open(self.metrics_path, "w").close()

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def save_adapter(self, model, tokenizer) -> str:
        path = os.path.join(self.dir, "adapter")
        model.save_pretrained(path, selected_adapters=["default"])
        tokenizer.save_pretrained(path)
        return path


def run(cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    started = time.time()
    device = resolve_device(cfg.device)
    writer = RunWriter(cfg.output_dir)
    model, tokenizer = build_model(cfg, device)
    pairs, report = load_training_pairs(cfg, tokenizer)
    print(report.format())
    trainer = Trainer(model, tokenizer, cfg, pairs, device=device)
    if cfg.precompute_ref and not cfg.reference_free:
        trainer.precompute_reference()
    writer.write_json("config.json", cfg.to_dict())
    writer.start_metrics()
    bar = tqdm(total=trainer.total_steps, desc="dpo", unit="step", disable=bool(os.environ.get("TQDM_DISABLE")))

    def on_step(row):
        writer.append_metrics(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")

    history = trainer.train(on_step)
    bar.close()
    adapter_dir = writer.save_adapter(model, tokenizer)
    elapsed = time.time() - started
    print(f"dpo: {trainer.step} steps in {elapsed:.1f} s; adapter saved to {adapter_dir}")
    return {"history": history, "adapter_dir": adapter_dir, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        if cfg.dataset is None:
            raise ConfigError("--dataset: required (a preference file or hub dataset name)")
        run(cfg)
    except ConfigError as e:
        die(str(e))
    except data_mod.DataError as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
