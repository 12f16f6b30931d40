"""The disk space a run will write, checked before the model loads.

What a run writes to OUTPUT_DIR (see dpo.run.folder), and what each costs:
- checkpoints/: each as save_checkpoint asks for it (dpo.run.checkpoint.expected_checkpoint_bytes): the
  trainable tensors, the optimizer's state (AdamW: two moments of the trainable tensors' size), the
  reference log-probs with --precompute-ref, the JSON files. A new checkpoint is complete before the
  oldest beyond --save-total-limit K is pruned, so K + 1 exist at once (all of them with K = 0).
- adapter/: the trainable tensors again, the tokenizer's files, its config and card.
- metrics.jsonl (one row per step and evaluation), eval.json, curves.png, config.json.

The trainable tensors' sizes come from the model: its LoRA is built on the meta device (shapes and
dtypes, no weights read), exactly as dpo.build will build it.

room_for_checkpoints() decides, before the model loads:
- everything fits: the run goes on as asked;
- checkpoints do not fit, the adapter does, and the user set no --save-steps: one warning line, and
  the run goes on with checkpoints off (adapter/ at the end; a stopped run cannot be resumed);
- the same with --save-steps N given: refused, saying which settings fit (the user asked for them);
- even the adapter does not fit: refused in one line (nothing written, no folder left).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo import distributed, models
from dpo.run.checkpoint import CheckpointError, expected_checkpoint_bytes
from dpo.schedule import total_steps
from dpo.cli import first_line

# Files save_pretrained writes for a tokenizer (measured in the model folder: adapter/ gets the same).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
TOKENIZER_FALLBACK_BYTES = 16 * 2**20  # a hub name not on this disk (SmolLM2's take 3.5 MB, Llama-3's 9 MB)
METRIC_ROW_BYTES = 2048  # a metrics.jsonl row (TRL's names, about 400 bytes; an evaluation row up to ~1.5 KB)
PLOT_BYTES = 2**20  # curves.png: 1400 x 1200 pixels of line plots (~0.2 MB)
SMALL_FILES_BYTES = 2**20  # config.json, eval.json, adapter_config.json, the model card, tracker files
STATE_BYTES = 64 * 2**10  # a checkpoint's scheduler and RNG states


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds `path` or, while it does not exist yet, its nearest parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- the sizes (pure) --------------------------------------------------------------------------------


def checkpoints_written(start_step: int, total_steps: int, save_steps: int) -> int:
    """How many checkpoints a run from `start_step` to `total_steps` writes: one every `save_steps`
    (0: none) and one at the end."""
    if total_steps <= start_step:
        return 0
    periodic = total_steps // save_steps - start_step // save_steps if save_steps > 0 else 0
    return periodic + (0 if save_steps > 0 and total_steps % save_steps == 0 else 1)


def checkpoints_at_once(written: int, keep_last: int) -> int:
    """The most of this run's checkpoints on disk at one time: the newest `keep_last` (0: all) and the
    one being written (pruning waits until it is complete). Earlier runs' checkpoints are on disk already."""
    return written if keep_last <= 0 else min(written, keep_last + 1)


def optimizer_state_bytes(optim: str, trainable: list[tuple[int, int]]) -> int:
    """The optimizer's state for tensors of (numel, bytes per element): AdamW's two moments in each
    tensor's dtype and a step count; bitsandbytes' 8-bit AdamW one byte per moment and a float32 scale
    per 256-element block (tensors under 4096 elements keep 32-bit moments), with its 256-entry maps."""
    total = 0
    for numel, size in trainable:
        if optim == "adamw_8bit" and numel >= 4096:
            total += 2 * (numel + 4 * math.ceil(numel / 256) + 4 * 256) + 4
        elif optim == "adamw_8bit":
            total += 2 * numel * 4 + 4
        else:
            total += 2 * numel * size + 4
    return total


@dataclass(frozen=True)
class RunSizes:
    """Bytes a run writes: `checkpoint` each, `at_once` of them at the most, `adapter` for adapter/,
    `outputs` for metrics.jsonl, eval.json, curves.png and the small files."""

    checkpoint: int
    at_once: int
    adapter: int
    outputs: int

    @property
    def without_checkpoints(self) -> int:
        return self.adapter + self.outputs

    @property
    def total(self) -> int:
        return self.at_once * self.checkpoint + self.without_checkpoints

    def parts(self, checkpoints: bool = True) -> str:
        """'2 checkpoints of about 3.0 MiB at once, the adapter about 1.0 MiB, metrics and plots about 2.1 MiB'."""
        held = ([f"{self.at_once} checkpoints of about {mib(self.checkpoint)} at once" if self.at_once > 1
                 else f"a checkpoint of about {mib(self.checkpoint)}"] if checkpoints and self.at_once else [])
        return ", ".join(held + [f"the adapter about {mib(self.adapter)}", f"metrics and plots about {mib(self.outputs)}"])


def run_sizes(trainable: list[tuple[int, int]], *, optim: str, tokenizer_bytes: int, at_once: int,
              metric_rows: int, ref_cache_pairs: int = 0, config_bytes: int = 4096) -> RunSizes:
    """The sizes of what a run writes, for trainable tensors of (numel, bytes per element)."""
    adapter_bytes = sum(n * s for n, s in trainable)
    state = optimizer_state_bytes(optim, trainable) + STATE_BYTES
    json_bytes = 2 * config_bytes + 4096  # the run's config, trainer_state.json, manifest.json
    # save_checkpoint asks for the adapter's size again for each extra file (the reference log-probs: two
    # float32 per pair); the larger of what it asks for and what it writes
    asked = expected_checkpoint_bytes(adapter_bytes, state, 1 if ref_cache_pairs else 0, json_bytes)
    checkpoint = max(asked, expected_checkpoint_bytes(adapter_bytes, state + 8 * ref_cache_pairs, 0, json_bytes))
    adapter = int(adapter_bytes * 1.1) + tokenizer_bytes + SMALL_FILES_BYTES // 2
    outputs = metric_rows * METRIC_ROW_BYTES + PLOT_BYTES + SMALL_FILES_BYTES // 2 + config_bytes
    return RunSizes(checkpoint, at_once, adapter, outputs)


def room_for_checkpoints(sizes: RunSizes, free: int, where: str, save_steps: int, keep_last: int) -> bool:
    """True: write the checkpoints as asked; False: go on without checkpoints (printing one warning
    line). Raises CheckpointError when even the adapter does not fit, or when the checkpoints the user
    asked for with --save-steps do not (saying which settings would)."""
    if free >= sizes.total:
        return True
    if free < sizes.without_checkpoints:
        raise CheckpointError(f"not enough disk space for this run in {where}: {mib(free)} free, at least "
                              f"{mib(sizes.without_checkpoints)} needed even without checkpoints "
                              f"({sizes.parts(checkpoints=False)}); "
                              f"free some space or choose another --output-dir")
    if save_steps > 0:
        one = sizes.checkpoint + sizes.without_checkpoints
        fits = [f"--save-total-limit 1 ({mib(2 * sizes.checkpoint + sizes.without_checkpoints)})"] \
            if keep_last != 1 and sizes.at_once > 2 and free >= 2 * sizes.checkpoint + sizes.without_checkpoints \
            else []
        fits.append("no --save-steps (" + ("one checkpoint, at the end" if free >= one else
                                           "no checkpoints: only the adapter") + ")")
        raise CheckpointError(f"not enough disk space for the checkpoints asked for in {where}: {mib(free)} free, "
                              f"about {mib(sizes.total)} needed with --save-steps {save_steps} and "
                              f"--save-total-limit {keep_last} ({sizes.parts()}); this fits: {' or '.join(fits)}; "
                              f"or free some space or choose another --output-dir")
    print(f"dpo: warning: not enough disk space in {where} for a checkpoint: {mib(free)} free, about "
          f"{mib(sizes.total)} needed ({sizes.parts()}); going on with checkpoints off: the adapter is saved at "
          f"the end, but a stopped run cannot be resumed (free {mib(sizes.total - free)} more, or choose another "
          f"--output-dir, to have them)", file=sys.stderr)
    return False


# --- from the run's settings and its model (before the model loads) ----------------------------------


def trainable_shapes(cfg, device: torch.device) -> list[tuple[int, int]] | None:
    """(numel, bytes per element) of each tensor training will change, from the model's config: its LoRA
    (or the starting --adapter) built as dpo.build builds it, on the meta device (no weights read).
    None when the model's config cannot be read (loading the model then says why, in one line). The
    Unsloth backend builds the same LoRA (peft's, on the same targets)."""
    try:
        if models.pick_backend(cfg.backend) == "unsloth":
            import unsloth  # noqa: F401  (before transformers and peft, which it patches: see models.load_unsloth)
    except RuntimeError:
        return None  # dpo.build refuses the backend in one line
    from transformers import AutoConfig, AutoModelForCausalLM

    path = models.resolve_model_path(cfg.model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=models.resolve_dtype(cfg.dtype, device),
                                                 trust_remote_code=cfg.trust_remote_code)
        if cfg.adapter:
            from peft import PeftConfig, get_peft_model

            model = get_peft_model(model, PeftConfig.from_pretrained(cfg.adapter))
        else:
            model = models.add_lora(model, models.LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                               tuple(cfg.lora_targets)))
    # QLoRA keeps its adapters in bfloat16 (models.cast_trainable_to_bf16)
    return [(p.numel(), 2 if cfg.load_in_4bit else p.element_size()) for p in model.parameters() if p.requires_grad]


def tokenizer_files_bytes(model_path: str) -> int:
    """Bytes of the tokenizer's files in a local model folder (adapter/ gets the same files)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return TOKENIZER_FALLBACK_BYTES
    return sum((folder / name).stat().st_size for name in TOKENIZER_FILES if (folder / name).is_file())


def sizes_for_run(cfg, trainable: list[tuple[int, int]], *, num_rows: int, start_step: int, world_size: int = 1,
                  needs_reference: bool = True, unpaired: bool = False) -> RunSizes:
    """What this run writes, for `num_rows` rows of data (an upper bound on its pairs: some may be
    dropped; a paired file read for KTO gives two rows a pair) from `start_step` on."""
    pairs = num_rows * (2 if unpaired else 1)
    total = total_steps(cfg, pairs, world_size)
    at_once = checkpoints_at_once(checkpoints_written(start_step, total, cfg.save_steps), cfg.save_total_limit)
    rows = total - start_step
    if cfg.eval_dataset:
        rows += 2 + (total // cfg.eval_steps if cfg.eval_steps > 0 else 0)
    return run_sizes(trainable, optim=cfg.optim, tokenizer_bytes=tokenizer_files_bytes(
                         models.resolve_model_path(cfg.model)),
                     at_once=at_once, metric_rows=rows,
                     ref_cache_pairs=pairs if cfg.precompute_ref and needs_reference else 0,
                     config_bytes=len(json.dumps(cfg.run_dict(), indent=2)))


def check_disk(cfg, *, num_rows: int, start_step: int, needs_reference: bool, unpaired: bool, dist,
               device: torch.device, may_precompute: bool = False) -> bool:
    """Before the model loads: whether this run writes checkpoints (room_for_checkpoints decides, on the
    main rank, and every rank is told: they must agree on when a checkpoint is saved). Raises
    CheckpointError when the run does not fit. A model that cannot be built here on the meta device is
    reported (one warning line) and left to each save's own check. `may_precompute`: the plan, made after
    this check, may turn on --precompute-ref on a GPU: its reference cache is counted then."""
    if may_precompute and device.type == "cuda":
        cfg = dataclasses.replace(cfg, precompute_ref=True)

    checkpoints = True
    if dist.is_main:
        try:
            trainable = trainable_shapes(cfg, device)
        except Exception as e:  # noqa: BLE001 - an estimate: loading the model itself reports what is wrong
            trainable = None
            print(f"dpo: warning: cannot estimate the disk space this run needs ({first_line(e)}); each checkpoint "
                  f"still checks the disk before it is written", file=sys.stderr)
        if trainable is not None:
            sizes = sizes_for_run(cfg, trainable, num_rows=num_rows, start_step=start_step,
                                  world_size=dist.world_size, needs_reference=needs_reference, unpaired=unpaired)
            checkpoints = room_for_checkpoints(sizes, free_bytes(cfg.output_dir), cfg.output_dir, cfg.save_steps,
                                               cfg.save_total_limit)
    (off,) = distributed.max_across([0.0 if checkpoints else 1.0], dist, device)
    return not off
