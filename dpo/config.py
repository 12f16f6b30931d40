"""The one typed configuration of a training run, filled from flags and an optional config file.

Every field carries its flag's help text. Precedence: dataclass defaults < `--config FILE`
(YAML or JSON) < flags on the command line. Values are checked here, before any model loads,
so a typo costs a second, not a model load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from dpo.loss_settings import LossSettings
from dpo.losses import LOSS_TYPES, OBJECTIVES
from dpo.paths import OR_NAME, local_path, looks_local, model_folder_problem
from dpo.smollm2 import DEFAULT_MODEL

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
# The default max length of prompt+completion tokens, as TRL's DPOConfig and `python -m dpo.train`.
DEFAULT_MAX_LENGTH = 1024
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TRACKERS = ("tensorboard", "wandb", "mlflow")


class TrackerError(ValueError):
    """A --report-to value that cannot work; str() is the one line to show."""


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); "none", "" or None -> (). One-line TrackerError
    for an unknown name, or for "none" beside a tracker."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    for name in names:
        if name != "none" and name not in TRACKERS:
            raise TrackerError(f"--report-to: unknown tracker {name!r} (choose from {', '.join(TRACKERS)}, "
                               "or none; several with commas: tensorboard,wandb)")
    if "none" in names and len(set(names)) > 1:
        raise TrackerError(f"--report-to: 'none' cannot be combined with a tracker (got {text!r})")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


LR_SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")
DTYPES = ("auto", "float32", "bfloat16")
# float16 is not offered, on purpose: say why rather than "invalid choice".
FLOAT16_NAMES = ("float16", "fp16", "half")
FLOAT16_REFUSAL = ("float16 is not supported: DPO sums the log-probs of every completion token (sums in the "
                   "hundreds to thousands) and takes differences of such sums, which overflow float16's range "
                   "(max 65504) or lose the precision the reward margins need; use bfloat16 (same memory, "
                   "float32's range) or float32")
LOGPROB_MODES = ("chunked", "full")
BACKENDS = ("auto", "hf", "unsloth")
ON_NAN = ("stop", "skip")
ATTENTION_ROUTES = ("auto", "flash_varlen", "flex", "sdpa", "eager")
RESUME_POLICIES = ("locked", "free")
PREFIX_SHARING = ("auto", "on", "off")


def _opt(default, help: str, *, resume: str, start: bool = False, planned: bool = False, card: str | None = None,
         only_for: str | None = None, path: bool | str = False, **kw):
    """A config field with its help and its policy, which every list of field names is derived from:

    resume    "locked": a resume must keep the value (it defines the run: its data, loss, optimizer and
              sequence of steps; a checkpoint continued under another value would be another run stitched
              onto the first); "free": may change (hardware and speed choices, outputs, logging)
    start     how this invocation starts (fresh, resumed, replacing), not what the run is: left out of the
              config.json a run writes, so that file can be passed back with --config --resume
    planned   set by the memory planner (dpo/plan.py); a resumed run takes it from its checkpoint
    card      the model card's label for the setting (None: the card does not show it)
    only_for  the one objective or loss type that reads it (python -m dpo.evaluate says when it is unused)
    path      True: a file or folder path; OR_NAME: one, or else a hub or builtin: name. A local path is
              recorded (config.json) and printed (the resume command) absolute: both work from any folder
    """
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume policy must be one of {RESUME_POLICIES}, got {resume!r}")
    return field(default=default, metadata={"help": help, "resume": resume, "start": start, "planned": planned,
                                            "card": card, "only_for": only_for, "path": path, **kw})


def path_rules(cls=None) -> dict[str, bool | str]:
    """{"dataset": OR_NAME, "output_dir": True, ...}: each path-valued field of `cls` (TrainConfig) and its rule."""
    return {f.name: f.metadata["path"] for f in fields(cls or TrainConfig) if f.metadata.get("path")}


def with_absolute_paths(values: dict[str, Any], cls=None) -> dict[str, Any]:
    """`values` (field name -> value, e.g. a config.json) with each path-valued field's value absolute."""
    rules = path_rules(cls)
    return {k: (local_path(v, rules[k]) or v) if k in rules else v for k, v in values.items()}


@dataclass
class TrainConfig:
    # What to train on
    model: str = _opt(DEFAULT_MODEL, "Model: a local folder, a hub name, or the embedded default",
        resume="locked", path=OR_NAME)
    dataset: str | None = _opt(None, "Preference data: .jsonl, .jsonl.gz, .json, .parquet, .csv, a folder, or a hub name",
        resume="locked", path=OR_NAME)
    dataset_split: str = _opt("train", "Split of a hub dataset", resume="locked")
    dataset_config: str | None = _opt(None, "Configuration name of a hub dataset", resume="locked")
    prompt_column: str = _opt("prompt", "Column holding the prompt", resume="locked")
    chosen_column: str = _opt("chosen", "Column holding the preferred completion", resume="locked")
    rejected_column: str = _opt("rejected", "Column holding the dispreferred completion", resume="locked")
    implicit_prompt: str = _opt("last_assistant", "Prompt of chosen/rejected-only rows: last_assistant (the last "
                                "shared '\\n\\nAssistant:') or trl (TRL's common-prefix rule)",
                                choices=("last_assistant", "trl"), resume="locked")
    keep_identical: bool = _opt(False, "Keep pairs whose chosen equals rejected (dropped by default: no signal)",
        resume="locked")
    max_prompt_length: int | None = _opt(None, "Keep only the last N prompt tokens (ours; TRL has no such option)",
        resume="locked")
    eval_dataset: str | None = _opt(None, "Held-out pairs (same formats as --dataset; builtin:NAME:eval for a "
                                    "built-in task); eval_ metrics go to metrics.jsonl", resume="free",
        path=OR_NAME)
    eval_steps: int = _opt(0, "Evaluate on --eval-dataset every N steps (0: before and after training only)",
        resume="free")
    threads: int = _opt(0, "CPU threads for torch (0: every core this process may use, shared by the ranks; other "
                        "busy processes are not counted)", resume="free")
    report_to: str = _opt("none", "Also send every metrics row to trackers: a comma list of tensorboard, wandb, "
                          "mlflow (none: metrics.jsonl only)", resume="free")
    output_dir: str = _opt("runs/dpo", "Where metrics.jsonl, config.json, checkpoints/ and adapter/ are written",
        resume="free", path=True)
    adapter: str | None = _opt(None, "Start from this LoRA adapter folder; its frozen copy is then the reference",
        resume="locked", path=True)
    # How long
    # max_steps is free: a resume may extend a run or cut it short (not below its checkpoint's step), the
    # schedule then rebuilt over the new total from that step on (Trainer.load_state)
    max_steps: int = _opt(-1, "Optimizer steps to run (-1: run --num-epochs over the data)", resume="free")
    num_epochs: float = _opt(1.0, "Passes over the data when --max-steps is -1", resume="locked")
    per_device_batch_size: int = _opt(8, "Pairs per micro-batch (TRL: per_device_train_batch_size)",
        resume="locked", planned=True, card="pairs per micro-batch")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (TRL: gradient_accumulation_steps)",
        resume="locked", planned=True, card="gradient accumulation")
    # Optimisation (defaults are TRL DPOConfig's)
    learning_rate: float = _opt(1e-6, "Peak learning rate (TRL default 1e-6)", resume="locked", card="learning rate")
    lr_scheduler: str = _opt("linear", "Schedule after warmup", choices=LR_SCHEDULERS,
        resume="locked", card="schedule")
    warmup_steps: float = _opt(0.0, "Warmup steps; a value below 1 is a fraction of all steps (as TRL)",
        resume="locked", card="warmup steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay", resume="locked")
    adam_beta1: float = _opt(0.9, "AdamW beta1", resume="locked")
    adam_beta2: float = _opt(0.999, "AdamW beta2", resume="locked")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", resume="locked")
    optim: str = _opt("adamw_torch", "Optimizer (adamw_8bit needs CUDA and bitsandbytes)", choices=OPTIMIZERS,
        resume="locked")
    max_grad_norm: float = _opt(1.0, "Clip the gradient's global norm to this (0 disables clipping)", resume="locked")
    seed: int = _opt(42, "Seed for LoRA init, data order and dropout", resume="locked", card="seed")
    shuffle: bool = _opt(True, "Shuffle pairs each epoch (--no-shuffle keeps file order)", resume="locked")
    # DPO
    beta: float = _opt(0.1, "DPO beta: strength of the KL penalty to the reference (SimPO, CPO, KTO: their "
                       "beta; ORPO: its lambda, as in TRL)", resume="locked", card="beta")
    loss_type: list[str] = _opt(("sigmoid",), f"One or more DPO loss types ({', '.join(LOSS_TYPES)}), or one "
                                f"objective alone: {', '.join(OBJECTIVES)} (each equal to its TRL 1.15 trainer)",
                                    resume="locked", card="loss types")
    loss_weights: list[float] | None = _opt(None, "Weight of each --loss-type (none: 1 each)",
        resume="locked", card="loss weights")
    label_smoothing: float = _opt(0.0, "Label smoothing (robust, exo_pair, aot, aot_unpaired; simpo and cpo: "
                                  "in [0, 0.5))", resume="locked", card="label smoothing")
    discopop_tau: float = _opt(0.05, "Temperature of the discopop loss type", resume="locked", only_for="discopop")
    simpo_gamma: float = _opt(0.5, "SimPO's target reward margin gamma (--loss-type simpo)",
        resume="locked", only_for="simpo")
    cpo_alpha: float | None = _opt(None, "Weight of the chosen NLL term of --loss-type cpo (none: 1.0) or simpo "
                                   "(none: 0.0, pure SimPO), as TRL's CPOTrainer", resume="locked")
    kto_desirable_weight: float = _opt(1.0, "KTO's weight of the desirable rows' loss (lambda_D)",
        resume="locked", only_for="kto")
    kto_undesirable_weight: float = _opt(1.0, "KTO's weight of the undesirable rows' loss (lambda_U)",
        resume="locked", only_for="kto")
    ld_alpha: float | None = _opt(None, "LD-DPO: weight in [0, 1] of the completion tokens past the shorter "
                                  "completion of each pair (none: off; 1: plain DPO)", resume="locked")
    use_weighting: bool = _opt(False, "WPO: weigh each pair's DPO loss by the policy's probability of its "
                               "chosen and rejected completions (TRL's use_weighting)", resume="locked")
    reference_free: bool = _opt(False, "Use no reference model (reference log-probs are 0)",
        resume="locked", card="reference-free")
    precompute_ref: bool = _opt(False, "Compute the reference log-probs of all pairs once before training",
        resume="free", planned=True)
    precompute_ref_batch_size: int | None = _opt(None, "Pairs per batch for --precompute-ref (default: 4x the micro-batch)",
        resume="free", planned=True)
    max_length: int | None = _opt(DEFAULT_MAX_LENGTH, "Max tokens of prompt+completion; longer sequences are cut at the end",
        resume="locked", card="max length (tokens)")
    # Model and memory
    dtype: str = _opt("auto", "Weights and compute dtype (auto: bfloat16 on CUDA, float32 on CPU; no float16: "
                      "DPO's log-prob sums overflow its range)", choices=DTYPES, resume="free", card="dtype")
    gradient_checkpointing: bool = _opt(True, "Recompute activations in backward to save memory",
        resume="free", planned=True)
    packing: bool = _opt(False, "Pack each micro-batch's sequences into one row: no pad tokens, positions restart per "
                         "sequence, attention never crosses sequences (checked on the first micro-batch; padded if "
                         "the model's forward cannot keep them apart)", resume="free", planned=True)
    prefix_sharing: str = _opt("auto", "Compute each pair's prompt once: one row of [prompt | chosen | rejected] "
                               "segments per micro-batch, each side attending to the prompt and itself (plain DPO "
                               "loss types; auto: wherever the model's forward passes the check on the first "
                               "micro-batch, else as --packing says; on: refuse where it does not; off: never)",
                               choices=PREFIX_SHARING, resume="free", planned=True)
    attention: str = _opt("auto", "Attention kernel for --packing on the hf backend (auto: flash-attn varlen, else "
                          "FlexAttention, else sdpa)", choices=ATTENTION_ROUTES, resume="free")
    memory_budget: str = _opt("auto", "Memory the run may use, in GiB, for the planner: on a GPU it picks micro-batch, "
                              "checkpointing, packing, reference precompute, LM-head chunk and embedding placement "
                              "(auto: the card's free memory less 1 GiB); on the CPU it turns gradient checkpointing on "
                              "only where the run would not fit (auto: the machine's available memory); none: no plan. "
                              "Flags set to other than their default win over the plan. Runs of several ranks are not "
                              "planned",
                                  resume="free")
    plan: bool = _opt(False, "Print the plan for this run (see --memory-budget) and exit", resume="free", start=True)
    logprobs: str = _opt("chunked", "chunked: never build the full [B,T,V] logits; full: plain log_softmax", choices=LOGPROB_MODES,
        resume="free")
    logprob_chunk: int = _opt(256, "Tokens per LM-head chunk of --logprobs chunked (smaller: less memory, more "
                              "launches)", resume="free", planned=True)
    embeddings_on_cpu: bool = _opt(False, "Keep the frozen input-embedding table in CPU memory (exact; frees "
                                   "vocab x hidden x 2 bytes of GPU memory, 0.98 GiB for Llama-3-8B; not for "
                                   "models that tie it to the LM head)", resume="free", planned=True)
    disable_dropout: bool = _opt(True, "Zero every dropout, LoRA's included (as TRL's default)", resume="locked")
    lora_r: int = _opt(16, "LoRA rank", resume="locked", card="LoRA r")
    lora_alpha: int = _opt(16, "LoRA alpha (scale = alpha / r)", resume="locked", card="LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout (inactive while --disable-dropout is on)", resume="locked")
    lora_targets: list[str] = _opt(DEFAULT_LORA_TARGETS, "Module names that get LoRA adapters",
        resume="locked", card="LoRA targets")
    backend: str = _opt("auto", "auto: unsloth where CUDA and unsloth are present, else hf", choices=BACKENDS,
        resume="free")
    load_in_4bit: bool = _opt(False, "Load the base weights in 4-bit NF4 (QLoRA; needs CUDA and bitsandbytes)",
        resume="free")
    trust_remote_code: bool = _opt(False, "Allow model code from the model folder or hub (off: safer)", resume="free")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto", resume="free")
    # Checkpoints, resuming, faults
    save_steps: int = _opt(0, "Write a checkpoint (adapter, optimizer, scheduler, RNG, data position) every N "
                           "optimizer steps; 0: only at the end", resume="free")
    save_total_limit: int = _opt(2, "Keep only the newest K checkpoints (0: keep all)", resume="free")
    resume: bool = _opt(False, "Continue the run in --output-dir from its latest checkpoint, exactly as if never "
                        "interrupted", resume="free", start=True)
    resume_from: str | None = _opt(None, "Continue from this checkpoint folder (or the latest one of this run "
                                   "folder); the run goes on in --output-dir", resume="free", start=True, path=True)
    overwrite: bool = _opt(False, "Start over in an --output-dir that holds another run (its checkpoints are "
                           "deleted)", aliases=("--overwrite-output-dir",), resume="free", start=True)
    on_nan: str = _opt("stop", "A non-finite loss or gradient norm: stop (naming the step, the rows and the last "
                       "checkpoint) or skip that optimizer step (no update; counted and reported)", choices=ON_NAN,
                           resume="free")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def run_dict(self) -> dict[str, Any]:
        """The config that defines the run (to_dict without the start-up keys, local paths absolute): what
        config.json holds."""
        start = field_names(start=True)
        return with_absolute_paths({k: v for k, v in self.to_dict().items() if k not in start}, type(self))

    def loss_settings(self) -> LossSettings:
        """The loss settings of this run as one validated object (training and evaluation take it), built
        once for the values the fields hold."""
        values = tuple(_hashable(getattr(self, f.name)) for f in fields(LossSettings))
        cached = self.__dict__.get("_loss_settings")
        if cached is not None and cached[0] == values:
            return cached[1]
        try:
            settings = LossSettings.from_config(self)
        except ValueError as e:  # name the setting where the message starts with it
            named = [f.name for f in fields(LossSettings) if str(e).startswith(f.name)]
            flags = _flag(named[0]) if named else "--loss-type/--loss-weights/--label-smoothing"
            raise ConfigError(f"{flags}: {e}") from None
        self.__dict__["_loss_settings"] = (values, settings)
        return settings

    @property
    def budget(self) -> "MemoryBudget":
        """--memory-budget as a typed value (checked by validate)."""
        return MemoryBudget.parse(self.memory_budget)

    def validate(self) -> None:
        """Raise ConfigError naming the flag for every value that cannot work."""
        self._check_values()
        self._check_objective()
        self._check_files_and_start()

    def _check_values(self) -> None:
        """Numbers in range, names among the choices."""
        bad = _bad
        if not self.beta > 0:  # also NaN
            bad("beta", f"must be > 0, got {self.beta}")
        if not self.discopop_tau > 0:
            bad("discopop_tau", f"must be > 0, got {self.discopop_tau}")
        if self.max_length is not None and self.max_length < 2:
            bad("max_length", f"must be >= 2 (a prompt token and a completion token), got {self.max_length}")
        if self.eval_steps < 0:
            bad("eval_steps", f"must be >= 0, got {self.eval_steps}")
        try:
            parse_report_to(self.report_to)
        except TrackerError as e:
            raise ConfigError(str(e)) from None
        try:
            MemoryBudget.parse(self.memory_budget)
        except ValueError as e:
            bad("memory_budget", str(e))
        if self.threads < 0:
            bad("threads", f"must be >= 0, got {self.threads}")
        if self.eval_dataset is not None and looks_local(self.eval_dataset) and not _exists(self.eval_dataset):
            bad("eval_dataset", f"no such file or folder: {self.eval_dataset}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            bad("max_prompt_length", f"must be >= 1, got {self.max_prompt_length}")
        if self.per_device_batch_size < 1:
            bad("per_device_batch_size", f"must be >= 1, got {self.per_device_batch_size}")
        if self.grad_accum < 1:
            bad("grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", f"must be a positive number of steps or -1, got {self.max_steps}")
        if self.max_steps == -1 and self.num_epochs <= 0:
            bad("num_epochs", f"must be > 0, got {self.num_epochs}")
        if self.learning_rate < 0:
            bad("learning_rate", f"must be >= 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        if self.logprob_chunk < 1:
            bad("logprob_chunk", f"must be >= 1, got {self.logprob_chunk}")
        if self.lora_r < 1:
            bad("lora_r", f"must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets:
            bad("lora_targets", "name at least one module")
        if str(self.dtype).lower() in FLOAT16_NAMES:
            bad("dtype", FLOAT16_REFUSAL)
        for name, choices in (("lr_scheduler", LR_SCHEDULERS), ("optim", OPTIMIZERS), ("dtype", DTYPES),
                              ("logprobs", LOGPROB_MODES), ("attention", ATTENTION_ROUTES), ("backend", BACKENDS),
                              ("on_nan", ON_NAN), ("prefix_sharing", PREFIX_SHARING)):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def _check_objective(self) -> None:
        """The loss settings, and what each objective cannot be combined with."""
        bad = _bad
        loss = self.loss_settings()
        if loss.unpaired and self.per_device_batch_size < 2:
            bad("per_device_batch_size", "kto needs >= 2 rows per micro-batch (its KL estimate pairs each row "
                "with another row's completion; TRL refuses 1 too)")
        if self.precompute_ref and self.reference_free:
            bad("precompute_ref", "cannot be combined with --reference-free: with no reference model there are no "
                "reference log-probs to precompute")
        if self.precompute_ref and not loss.reference_per_pair:
            bad("precompute_ref", f"is for DPO loss types; {loss.objective} "
                + ("computes its reference each step" if loss.needs_reference else "uses no reference model"))

    def _check_files_and_start(self) -> None:
        """Paths that must exist, and how this invocation starts (fresh, resumed, replacing)."""
        bad = _bad
        if self.dataset is not None and looks_local(self.dataset) and not _exists(self.dataset):
            bad("dataset", f"no such file or folder: {self.dataset}")
        if looks_local(self.model) and not _exists(self.model):
            bad("model", f"no such folder: {self.model}")
        if looks_local(self.model) and (problem := model_folder_problem(self.model)) is not None:
            bad("model", problem)
        if self.adapter is not None and not os.path.isdir(self.adapter):
            bad("adapter", f"no such adapter folder: {self.adapter}")
        if self.adapter is not None and not os.path.isfile(os.path.join(self.adapter, ADAPTER_SAFETENSORS)):
            bad("adapter", f"{self.adapter} holds no {ADAPTER_SAFETENSORS} (adapters load from safetensors only; "
                "a pickled adapter_model.bin is refused)")
        if self.adapter is not None and self.reference_free:
            bad("reference_free", "cannot be combined with --adapter (the starting adapter is the reference)")
        if self.save_steps < 0:
            bad("save_steps", f"must be >= 0 (0: only at the end), got {self.save_steps}")
        if self.save_total_limit < 0:
            bad("save_total_limit", f"must be >= 1, or 0 to keep all, got {self.save_total_limit}")
        if self.overwrite and (self.resume or self.resume_from):
            bad("overwrite", "cannot be combined with --resume/--resume-from (one replaces the run, the other "
                "continues it)")
        if self.resume_from is not None and not os.path.isdir(self.resume_from):
            bad("resume_from", f"no such checkpoint folder: {self.resume_from}")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryBudget:
    """What --memory-budget asks of the planner: "auto" (the card's free memory less 1 GiB; on the CPU the
    machine's available memory), "none" (no plan: the run as configured) or `gib` GiB."""

    kind: str  # "auto", "none" or "gib"
    gib: float | None = None

    @classmethod
    def parse(cls, text: str) -> "MemoryBudget":
        if text in ("auto", "none"):
            return cls(text)
        try:
            gib = float(text)
        except (TypeError, ValueError):
            gib = float("nan")
        if not gib > 0:
            raise ValueError(f"must be a number of GiB > 0, auto or none, got {text!r}")
        return cls("gib", gib)

    @property
    def plans(self) -> bool:
        return self.kind != "none"


def field_names(cls=TrainConfig, **policy) -> tuple[str, ...]:
    """The names of the fields whose metadata matches `policy`, in field order: field_names(resume="locked"),
    field_names(planned=True), ..."""
    return tuple(f.name for f in fields(cls) if all(f.metadata.get(k) == v for k, v in policy.items()))


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _bad(flag: str, why: str):
    raise ConfigError(f"--{flag.replace('_', '-')}: {why}")


def _exists(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
