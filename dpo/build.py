"""What a run is built from: the model (base + LoRA, or Unsloth's), the training pairs, the seed, the
dtype and the CPU threads. Pure set-up: `dpo.train.run` calls these, then hands the pieces to
`dpo.trainer.Trainer`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from dpo import data as data_mod
from dpo import models, tasks
from dpo import objective_data as od
from dpo.cli import first_line
from dpo.config import ConfigError, TrainConfig
from dpo.sources import DataError, DataSpec, load_rows, read_records


@dataclass
class ObjectiveDataReport:
    """What the data of a SimPO/CPO/ORPO or KTO run holds (the DPO pairs have dpo.report's DataReport)."""

    objective: str
    source: str
    kept: int
    dropped: int = 0

    def format(self) -> str:
        unit = "rows (desirable and undesirable)" if self.objective == "kto" else "pairs"
        why = f"; {self.dropped} dropped: the prompt alone fills --max-length" if self.dropped else ""
        return f"dpo: {self.objective}: {self.kept} {unit} from {self.source}{why}"


SIDED_NO_LIMIT = 1 << 30  # CPO/ORPO tokenization with no --max-length: nothing is cut


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def read_rows(cfg: TrainConfig):
    """The training rows: a built-in task's (`builtin:NAME`), else the file, folder or hub dataset.
    KTO also reads unpaired rows (prompt, completion, label), the format TRL's KTOTrainer reads."""
    rows = tasks.load_builtin(cfg.dataset)
    if rows is not None:
        return rows
    return read_spec_rows(DataSpec.from_config(cfg), unpaired=cfg.loss_settings().unpaired)


def read_spec_rows(spec: DataSpec, unpaired: bool = False):
    """The rows of a file, folder or hub dataset: preference pairs; with `unpaired` (KTO) a file of
    (prompt, completion, label) rows is read as UnpairedRows, each label checked (DataError naming
    file, row and problem)."""
    if unpaired:
        records = read_records(spec)
        if records and isinstance(records[0][2], dict) and {"completion", "label"} & set(records[0][2]):
            return [od.unpaired_row(value, i, f"{source} {location}")
                    for i, (source, location, value) in enumerate(records)]
    return load_rows(spec)


def load_training_pairs(cfg: TrainConfig, tokenizer, rows=None):
    """(training items, report): DPO's TokenizedPairs; SidedPairs for SimPO/CPO/ORPO (tokenized as TRL's
    CPO/ORPO trainers do); KTO's TokenizedRows (paired rows split into desirable and undesirable ones)."""
    rows = read_rows(cfg) if rows is None else rows
    loss = cfg.loss_settings()
    if loss.objective == "dpo":
        return data_mod.prepare_pairs(tokenizer, rows, cfg.max_length, cfg.max_prompt_length,
                                      drop_identical=not cfg.keep_identical)
    source = cfg.dataset or ""
    if not rows:
        raise DataError(f"{source}: the dataset is empty (no rows)")
    if loss.unpaired:
        unpaired = rows if isinstance(rows[0], od.UnpairedRow) else od.unpair_rows(list(rows))
        tokenized = [od.tokenize_unpaired(tokenizer, r) for r in unpaired]
        kept = [t for t in tokenized if od.kto_keeps(t, cfg.max_length)]
        if not kept:
            raise DataError(f"{source}: every prompt fills --max-length {cfg.max_length}; nothing is left to train on")
        return kept, ObjectiveDataReport("kto", source, len(kept), len(tokenized) - len(kept))
    max_length = cfg.max_length if cfg.max_length is not None else SIDED_NO_LIMIT
    pairs = [od.tokenize_sided(tokenizer, r, max_length) for r in rows]
    return pairs, ObjectiveDataReport(loss.objective, source, len(pairs))


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
        raise ConfigError(f"--model: cannot load {path}: {first_line(e)}") from None
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


def cpu_threads(requested: int, ranks: int = 1) -> int:
    """Threads for torch on the CPU: as asked, else the cores this process may use, shared by the ranks.

    Not from the load average: it still counts a run that just ended (an idle 2-core machine gave 1
    thread right after a run, 20 s a step against 12). Another busy process is the user's to know of:
    the count is printed at start, and --threads sets it."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, ranks))


# --- the plan (GPU runs): micro-batch, checkpointing, packing, ... chosen for the card ---------------

# TrainConfig fields the plan sets; a resumed run takes them from its checkpoint instead of planning again.
PLANNED_FIELDS = ("per_device_batch_size", "grad_accum", "gradient_checkpointing", "packing", "precompute_ref",
                  "precompute_ref_batch_size", "logprob_chunk", "embeddings_on_cpu")


def user_fixed_choices(cfg: TrainConfig) -> dict:
    """The plan's choices the user fixed: settings given other than their default (a flag at its default
    leaves the choice to the plan; --memory-budget none turns planning off)."""
    default = TrainConfig()
    fixed = {}
    if cfg.gradient_checkpointing != default.gradient_checkpointing:
        fixed["checkpointing"] = "off"
    for name in ("packing", "logprob_chunk", "embeddings_on_cpu", "precompute_ref"):
        if getattr(cfg, name) != getattr(default, name):
            fixed[name] = getattr(cfg, name)
    return fixed


def plan_run(cfg: TrainConfig, rows, device: torch.device, reference_free: bool):
    """(cfg with the plan's settings, the Plan) on a CUDA device with --memory-budget other than none;
    (cfg, None) otherwise. Raises ConfigError when no setting fits the budget."""
    import dataclasses

    from dpo import plan as plan_mod

    if device.type != "cuda" or cfg.memory_budget == "none":
        return cfg, None
    if cfg.loss_settings().objective != "dpo":  # the planner models DPO's passes only
        print(f"dpo: no plan: the planner models DPO; {cfg.loss_settings().objective} runs as configured")
        return cfg, None
    from transformers import AutoConfig

    path = models.resolve_model_path(cfg.model)
    tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
    pairs, _ = load_training_pairs(cfg, tokenizer, rows)
    shape = plan_mod.ModelShape.from_config(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code),
                                            load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                                            lora_targets=cfg.lora_targets)
    budget = (plan_mod.auto_budget_gib(torch.cuda.mem_get_info(device)[0]) if cfg.memory_budget == "auto"
              else float(cfg.memory_budget))
    try:
        chosen = plan_mod.plan(shape, plan_mod.lengths_of(pairs), budget,
                               pairs_per_step=cfg.per_device_batch_size * cfg.grad_accum, max_length=cfg.max_length,
                               backend=models.pick_backend(cfg.backend), optim=cfg.optim,
                               precompute=not reference_free, fixed=user_fixed_choices(cfg), in_order=not cfg.shuffle)
    except ValueError as e:  # DoesNotFit: one line with the numbers
        raise ConfigError(f"--memory-budget: {e}") from None
    return dataclasses.replace(cfg, **chosen.config_changes()), chosen


def planned_as_before(cfg: TrainConfig, checkpoint_config: dict) -> TrainConfig:
    """A resumed run keeps the settings its plan chose (the card's free memory may differ now)."""
    import dataclasses

    return dataclasses.replace(cfg, **{k: checkpoint_config[k] for k in PLANNED_FIELDS if k in checkpoint_config})
