"""What a run is built from: the model (base + LoRA, or Unsloth's), the training pairs, the seed, the
dtype and the CPU threads. Pure set-up: `dpo.train.run` calls these, then hands the pieces to
`dpo.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass

import torch

from dpo import cpu_plan, models, unsloth_prefix
from dpo import plan as plan_mod
from dpo.data import tasks
from dpo.data import objective_rows as od
from dpo.cli import first_line
from dpo.config import ConfigError, TrainConfig, field_names
from dpo.objectives import DataOptions, objective_for
from dpo.data.sources import DataError, DataSpec, load_rows


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def read_rows(cfg: TrainConfig):
    """The training rows: a built-in task's (`builtin:NAME`), else the file, folder or hub dataset.
    KTO also reads unpaired rows (prompt, completion, label), the format TRL's KTOTrainer reads."""
    rows = tasks.load_builtin(cfg.dataset)
    if rows is not None:
        return rows
    return od.read_spec_rows(DataSpec.from_config(cfg), unpaired=cfg.loss_settings().unpaired)


def data_options(cfg: TrainConfig) -> DataOptions:
    """How the run's rows become items (dpo.objectives.DataOptions), from its config."""
    return DataOptions(cfg.max_length, cfg.max_prompt_length, drop_identical=not cfg.keep_identical,
                       batch_size=cfg.per_device_batch_size, source=cfg.dataset or "")


@dataclass(frozen=True)
class PreparedData:
    """The run's data after its one tokenization: the rows read, the tokenizer, the items and the report."""

    rows: list
    tokenizer: object
    items: list
    report: object


def prepare_data(cfg: TrainConfig, rows) -> PreparedData:
    """The tokenizer, loaded once before the model, and the rows prepared by the run's objective."""
    path = models.resolve_model_path(cfg.model)
    try:
        tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # no such hub model, remote code refused, ...
        raise ConfigError(f"--model: cannot load {path}: {first_line(e)}") from None
    items, report = load_training_pairs(cfg, tokenizer, rows)
    return PreparedData(rows, tokenizer, items, report)


def check_same_tokenization(tokenizer, data: PreparedData, sample: int = 8) -> None:
    """The model's own tokenizer (Unsloth brings one) must tokenize as the one the data was prepared with:
    the same vocabulary, special tokens and chat template, and the same ids for the first `sample` rows'
    texts. A difference stops the run in one line."""
    prepared = data.tokenizer
    if tokenizer is prepared:
        return
    fields = [v for r in data.rows[:sample] for v in vars(r).values()]
    texts = [t for t in fields if isinstance(t, str) and t]
    compared = ("bos_token_id", "eos_token_id") + (("chat_template",) if any(isinstance(v, list) for v in fields) else ())
    same = (tokenizer.get_vocab() == prepared.get_vocab()
            and all(getattr(tokenizer, k) == getattr(prepared, k) for k in compared)
            and all(tokenizer(t, add_special_tokens=False)["input_ids"]
                    == prepared(t, add_special_tokens=False)["input_ids"] for t in texts))
    if not same:
        raise ConfigError(f"--model: the model's tokenizer ({type(tokenizer).__name__}) tokenizes unlike the one "
                          f"the data was prepared with ({type(prepared).__name__})")


def load_training_pairs(cfg: TrainConfig, tokenizer, rows=None):
    """(training items, report): the rows prepared by the run's objective (dpo.objectives): DPO's
    TokenizedPairs; SidedPairs for SimPO/CPO/ORPO (tokenized as TRL's CPO/ORPO trainers do); KTO's
    TokenizedRows (paired rows split into desirable and undesirable ones)."""
    rows = read_rows(cfg) if rows is None else rows
    return objective_for(cfg.loss_settings()).prepare(tokenizer, rows, data_options(cfg))


def check_before_loading(cfg: TrainConfig, device: torch.device) -> list[str]:
    """What the device and the model's config refuse (ConfigError, one line) before any weights load:
    bitsandbytes' needs (--optim adamw_8bit, --load-in-4bit), a hub model that cannot be fetched, LoRA
    targets the model lacks. Returns warnings: a --max-length past the model's context."""
    import importlib.util

    for flag, wanted in (("--optim adamw_8bit", cfg.optim == "adamw_8bit"), ("--load-in-4bit", cfg.load_in_4bit)):
        if wanted and device.type != "cuda":
            raise ConfigError(f"{flag}: needs a CUDA GPU (bitsandbytes); this run is on the {device.type}")
        if wanted and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{flag}: needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    path = models.resolve_model_path(cfg.model)
    if not os.path.exists(os.path.expanduser(path)) and (problem := models.hub_problem(path)) is not None:
        raise ConfigError(f"--model: {problem}")
    try:
        config = models.load_config(path, cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # no such hub model, remote code refused, ...
        raise ConfigError(f"--model: cannot load {path}: {first_line(e)}") from None
    if cfg.adapter is None:  # a starting adapter brings its own targets
        skeleton = models.weightless_model(config, cfg.trust_remote_code)
        if skeleton is not None:
            try:
                models.lora_targets_for(skeleton, cfg.lora_targets)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    context = getattr(config, "max_position_embeddings", None)
    if cfg.max_length is not None and isinstance(context, int) and cfg.max_length > context:
        return [f"--max-length {cfg.max_length} is above {cfg.model}'s context of {context} tokens "
                f"(max_position_embeddings): longer sequences are outside what it was trained on"]
    return []


def build_model(cfg: TrainConfig, device: torch.device, tokenizer=None):
    """(model, tokenizer): base model + LoRA (fresh, or the starting adapter with its frozen reference copy).
    `tokenizer`: the one the data was prepared with (loaded here when None; Unsloth brings its own)."""
    path = models.resolve_model_path(cfg.model)
    dtype = models.resolve_dtype(cfg.dtype, device)
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
    try:
        tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(path, cfg.trust_remote_code)
        seed_everything(cfg.seed)  # LoRA init depends on it, as in TRL
        model = models.load_model(path, dtype, str(device), cfg.trust_remote_code, cfg.load_in_4bit)
    except (OSError, ValueError) as e:  # no such hub model, no model.safetensors, remote code refused, ...
        raise ConfigError(f"--model: cannot load {path}: {first_line(e)}") from None
    if cfg.adapter:
        model = models.load_starting_adapter(model, cfg.adapter)
    else:
        try:  # checked on a weightless copy already where one could be built
            model = models.add_lora(model, models.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                               tuple(cfg.lora_targets)))
        except ValueError as e:
            raise ConfigError(first_line(e)) from None
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
PLANNED_FIELDS = field_names(planned=True)


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
    if cfg.prefix_sharing != default.prefix_sharing:
        fixed["sharing"] = cfg.prefix_sharing == "on"
    return fixed


def plan_run(cfg: TrainConfig, items: list, device: torch.device, reference_free: bool):
    """(cfg with the plan's settings, the plan) on a CUDA device (dpo.plan) or the CPU (dpo.cpu_plan: gradient
    checkpointing only where the memory needs it) with --memory-budget other than none; (cfg, None) otherwise.
    Raises ConfigError when no setting fits a GPU budget."""
    if device.type not in ("cuda", "cpu") or not cfg.budget.plans:
        return cfg, None
    objective = objective_for(cfg.loss_settings())
    if not objective.plannable:
        print(f"dpo: no plan: the planner models DPO's passes; {objective.name} runs as configured")
        return cfg, None
    from transformers import AutoConfig

    path = models.resolve_model_path(cfg.model)
    backend = models.pick_backend(cfg.backend)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    shape = plan_mod.ModelShape.from_config(model_config, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                                            lora_targets=cfg.lora_targets)
    # the shared rows are offered where the backend's route can take them (Trainer.choose_layout runs it)
    can_share = objective.can_pack and (backend == "hf" or unsloth_prefix.unsupported(model_config) is None)
    if device.type == "cpu":
        return plan_cpu_run(cfg, shape, plan_mod.lengths_of(items))
    budget = (plan_mod.auto_budget_gib(torch.cuda.mem_get_info(device)[0]) if cfg.budget.kind == "auto"
              else cfg.budget.gib)
    try:
        chosen = plan_mod.plan(shape, plan_mod.lengths_of(items), budget,
                               pairs_per_step=cfg.per_device_batch_size * cfg.grad_accum, max_length=cfg.max_length,
                               backend=backend, optim=cfg.optim, precompute=not reference_free,
                               fixed=user_fixed_choices(cfg), in_order=not cfg.shuffle,
                               sharing_available=can_share)
    except ValueError as e:  # DoesNotFit: one line with the numbers
        raise ConfigError(f"--memory-budget: {e}") from None
    return dataclasses.replace(cfg, **chosen.config_changes()), chosen


def peak_after_layout(chosen, layout: str) -> float | None:
    """The predicted peak (GiB) of the rows that run: the plan's, or, where the plan counted prefix-shared rows
    and the first micro-batch's self-check left the run padded, that padded setting's. None: not planned.
    Raises ConfigError where those padded rows do not fit the budget the plan kept to."""
    if not isinstance(chosen, plan_mod.Plan):  # no plan, or the CPU plan (its peak counts the layout it was given)
        return getattr(chosen, "peak_gib", None)
    unshared = chosen.unshared() if layout != "shared" else None
    if unshared is None:
        return chosen.peak_gib
    if unshared.peak_gib > chosen.limit_gib:
        raise ConfigError(f"--memory-budget: the plan counted prefix-shared rows, which this model does not take "
                          f"(see above); padded, micro-batch {unshared.choice.micro_batch} needs {unshared.peak_gib:.2f} "
                          f"GiB, over the limit of {chosen.limit_gib:.2f} GiB. Run with --prefix-sharing off, so the "
                          f"plan counts padded rows")
    print(f"dpo: the plan's setting with padded rows instead of shared ones: {unshared.peak_gib:.2f} GiB predicted, "
          f"within the limit of {chosen.limit_gib:.2f} GiB")
    return unshared.peak_gib


def plan_cpu_run(cfg: TrainConfig, shape, lengths):
    """(cfg with the CPU plan's checkpointing, the CpuPlan): the budget is --memory-budget, or with auto the
    machine's available memory (MemAvailable); the largest training forward is the worst micro-batch."""
    if cfg.budget.kind == "auto":
        budget, source = cpu_plan.available_gib(), "available memory"
        if budget is None:  # no /proc/meminfo (macOS): run as configured
            print("dpo: no plan: the available memory is unknown here (no /proc/meminfo); --memory-budget sets it")
            return cfg, None
    else:
        budget, source = cfg.budget.gib, "--memory-budget"
    sharing = cfg.prefix_sharing != "off" and objective_for(cfg.loss_settings()).can_pack  # the CPU's hf route shares
    tokens = plan_mod.worst_tokens(lengths, cfg.per_device_batch_size, cfg.max_length, packing=cfg.packing,
                                   in_order=not cfg.shuffle, sharing=sharing)
    chosen = cpu_plan.plan_cpu(shape, tokens, budget, checkpointing_off="checkpointing" in user_fixed_choices(cfg),
                               source=source)
    return dataclasses.replace(cfg, **chosen.config_changes()), chosen


def planned_as_before(cfg: TrainConfig, checkpoint_config: dict) -> TrainConfig:
    """A resumed run keeps the settings its plan chose (the card's free memory may differ now)."""
    return dataclasses.replace(cfg, **{k: checkpoint_config[k] for k in PLANNED_FIELDS if k in checkpoint_config})
