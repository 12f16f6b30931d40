"""A run's life on disk: what it writes, its checkpoints during the loop, resuming, and stopping.

- RunWriter: OUTPUT_DIR/config.json, metrics.jsonl (one line per step) and adapter/, each written
  atomically, by the main rank only.
- Checkpointer: OUTPUT_DIR/checkpoints/step-N through dpo.checkpoint (atomic, verified), every
  --save-steps and at the end; with --precompute-ref the reference log-probs go with it.
- find/load_resume_checkpoint: what --resume and --resume-from continue from, refusing a changed run.
- StopSignals: the first SIGINT/SIGTERM lets the step finish and saves; a second stops at once.
- Commands: the command lines the messages print (resume this run, or start it over).

The loop itself (dpo.train) only calls these; none of them knows the DPO math.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path

from dpo import distributed
from dpo.cli import python_command
from dpo.checkpoint import (
    RESUME_LOCKED_KEYS,
    Checkpoint,
    CheckpointError,
    capture_rng,
    config_differences,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
    trim_metrics,
)
from dpo.config import TrainConfig

REF_CACHE_FILE = "ref_logps.safetensors"  # extra checkpoint file: the precomputed reference log-probs
# Also locked on resume: they change which pairs there are (checkpoint.RESUME_LOCKED_KEYS predates them).
LOCKED_KEYS = RESUME_LOCKED_KEYS + ("implicit_prompt", "keep_identical", "max_prompt_length")


def _replace_dir(make, final: Path) -> None:
    """Build a folder with make(tmp) beside `final`, then swap it in; a crash leaves no half folder there."""
    tmp = final.with_name(f".tmp-{final.name}-{secrets.token_hex(4)}")
    old = final.with_name(f".tmp-old-{final.name}-{secrets.token_hex(4)}")
    try:
        make(tmp)
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old.exists():  # the previous folder goes back
                os.replace(old, final)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


class RunWriter:
    """Everything a run writes to OUTPUT_DIR: config.json, metrics.jsonl (one line per step), adapter/.

    With several ranks only the main one writes (`enabled`); the others' calls do nothing."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.dir, self.enabled = output_dir, enabled
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")

    def write_json(self, name: str, obj) -> None:
        if not self.enabled:
            return
        path = os.path.join(self.dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)

    def start_metrics(self, resumed: Checkpoint | None = None) -> None:
        """Empty for a new run; for a resumed one, the rows up to its checkpoint (later ones are redone)."""
        if not self.enabled:
            return
        if resumed is None:
            open(self.metrics_path, "w").close()
            return
        here = Path(self.metrics_path)
        source = resumed.path.parent.parent / "metrics.jsonl"  # another run folder's, with --resume-from
        if source.is_file() and not (here.exists() and source.samefile(here)):
            shutil.copyfile(source, here)
        trim_metrics(here, resumed.step)

    def append_metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def save_adapter(self, model, tokenizer) -> str:
        path = Path(self.dir) / "adapter"
        if not self.enabled:
            return str(path)

        def make(tmp: Path) -> None:
            model.save_pretrained(tmp, selected_adapters=["default"])
            tokenizer.save_pretrained(tmp)

        try:
            _replace_dir(make, path)
        except OSError as e:
            raise CheckpointError(f"cannot write the adapter to {path}: {e.strerror or e}") from e
        return str(path)

    def clear_previous_run(self) -> None:
        """--overwrite: the old adapter/ goes now, so an interrupted new run never sits beside it."""
        old = Path(self.dir) / "adapter"
        if old.exists():
            aside = old.with_name(f".tmp-delete-adapter-{secrets.token_hex(4)}")
            os.replace(old, aside)
            shutil.rmtree(aside, ignore_errors=True)


# --- resuming --------------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint --resume (latest in --output-dir) or --resume-from (a checkpoint or run folder) names."""
    if cfg.resume_from is not None:
        given = Path(cfg.resume_from)
        if (given / "manifest.json").exists() or given.name.startswith("step-"):
            return given
        found = latest_checkpoint(given)
        if found is None:
            raise CheckpointError(f"--resume-from: {given} is neither a checkpoint folder nor a run folder "
                                  f"holding checkpoints")
        return found
    if not cfg.resume:
        return None
    found = latest_checkpoint(cfg.output_dir)
    if found is None:
        if (Path(cfg.output_dir) / "metrics.jsonl").is_file():
            what_now = "its run stopped before its first checkpoint: start over with --overwrite instead"
        else:
            what_now = "run without --resume to start a new run"
        raise CheckpointError(f"--resume: no checkpoint in {Path(cfg.output_dir) / 'checkpoints'}; nothing to "
                              f"resume ({what_now})")
    return found


def load_resume_checkpoint(cfg: TrainConfig, run_config: dict) -> Checkpoint | None:
    """The verified checkpoint to continue from (None: a new run); refuses a changed run config."""
    path = find_resume_checkpoint(cfg)
    if path is None:
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        earlier = [p for p in list_checkpoints(path.parent.parent) if p != path]
        hint = f"; an earlier checkpoint may be intact: --resume-from {earlier[-1]}" if earlier else ""
        raise CheckpointError(f"{e}{hint}") from None
    differences = config_differences(ckpt.config, run_config, LOCKED_KEYS)
    if differences:
        raise CheckpointError(f"cannot resume from {path}: these settings differ from the checkpoint's: "
                              + "; ".join(differences) + " (use the same flags, or start a new run in "
                              "another --output-dir)")
    return ckpt


def drop_later_checkpoints(output_dir: str, step: int) -> None:
    """Resuming from an older checkpoint: the newer ones belong to the branch being redone, and a later
    --resume (or pruning) must not take them for this run's latest."""
    for path in list_checkpoints(output_dir):
        if _step_of(path) > step:
            print(f"dpo: removing {path} (after the checkpoint resumed from; its steps are redone)")
            aside = path.with_name(f".tmp-delete-{path.name}-{secrets.token_hex(4)}")
            os.replace(path, aside)
            shutil.rmtree(aside, ignore_errors=True)


def load_reference_cache(trainer, ckpt: Checkpoint) -> None:
    """The precomputed reference log-probs saved with the checkpoint (verified by its manifest), if any."""
    path = ckpt.path / REF_CACHE_FILE
    if not path.is_file():
        return
    from safetensors.torch import load_file

    cache = load_file(str(path))["ref_logps"]
    if cache.shape == (len(trainer.pairs), 2):
        trainer.ref_cache = cache


class Commands:
    """The command lines the messages print: resume this run, or start it over. Each works when copied
    as is: the interpreter that runs now and this run's --output-dir (the default run's is made up at
    start, so a bare `--resume` would look in a new folder)."""

    START_FLAGS = ("--resume", "--no-resume", "--overwrite", "--no-overwrite", "--overwrite-output-dir",
                   "--no-overwrite-output-dir")

    def __init__(self, cfg: TrainConfig, argv: list[str] | None):
        if argv is None:  # run() called from Python: config.json holds the whole run
            self.args = ["--config", str(Path(cfg.output_dir) / "config.json")]
        else:
            args, skip = [], False
            for a in argv:
                if skip:
                    skip = False
                elif a == "--resume-from":
                    skip = True
                elif a not in self.START_FLAGS and not a.startswith("--resume-from="):
                    args.append(a)
            self.args = args
        if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in self.args):
            self.args += ["--output-dir", cfg.output_dir]

    def _line(self, *extra: str) -> str:
        return python_command("dpo.train", [*self.args, *extra])

    def resume(self, *extra: str) -> str:
        return self._line("--resume", *extra)

    def restart(self) -> str:
        return self._line("--overwrite")


# --- signals and checkpoints during the loop -------------------------------------------------


class StopNow(BaseException):
    """A second SIGINT/SIGTERM: leave at once (BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrainingStopped(Exception):
    """The run stopped early after saving what it could; str() is the one line to show."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None = None):
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


class StopSignals:
    """SIGINT/SIGTERM during a run: while `immediate` (set-up, before the first step) the first stops at
    once; later, the first lets the current optimizer step finish (the loop then saves and exits); a
    second stops at once, except inside protected() (a checkpoint or adapter
    write), which is let finish first. Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.immediate = False  # set while there is nothing to save yet: the first signal stops at once
        self._protected = False
        self._pending: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.immediate and not self._protected:
            self.received = signum
            raise StopNow(signum)
        if self.received is None:
            self.received = signum
            # os.write, not print: the handler may interrupt a write to sys.stderr (tqdm's bar)
            os.write(2, f"\ndpo: {name} received: finishing the current step, then saving a checkpoint "
                        f"(send it again to stop at once)\n".encode())
        elif self._protected:
            self._pending = signum
        else:
            raise StopNow(signum)

    @contextlib.contextmanager
    def protected(self):
        self._protected = True
        try:
            yield
        finally:
            self._protected = False
        if self._pending is not None:
            raise StopNow(self._pending)


class Checkpointer:
    """Writes OUTPUT_DIR/checkpoints/step-N (dpo.checkpoint: atomic, verified) and remembers the last one."""

    def __init__(self, cfg: TrainConfig, run_config: dict, signals: StopSignals, commands: Commands,
                 enabled: bool = True):
        self.cfg, self.run_config, self.signals, self.commands = cfg, run_config, signals, commands
        self.enabled = enabled  # several ranks: the main one writes, the others only wait for it
        self.last: Path | None = latest_checkpoint(cfg.output_dir)
        # Kept on every rank (only the main one writes): all ranks must agree on whether a save happens,
        # or the main rank skips the barrier that the others then wait in.
        self.last_step: int | None = _step_of(self.last) if self.last else None

    def due(self, step: int) -> bool:
        return self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0

    def describe_last(self) -> str:
        return f"{self.last} (step {_step_of(self.last)})" if self.last else "none (no checkpoint was written yet)"

    def save(self, trainer, rng_state: dict | None = None) -> Path:
        """A checkpoint of the trainer as it is now (rng_state: the generators to store, default: now)."""
        if self.last_step == trainer.step:
            return self.last
        if not self.enabled:
            distributed.barrier(trainer.dist)  # resume needs the main rank's checkpoint to be complete
            self.last_step = trainer.step
            return self.last
        extra = None
        if trainer.ref_cache is not None:
            cache = trainer.ref_cache

            def write_ref(path: Path) -> None:
                from safetensors.torch import save_file

                save_file({"ref_logps": cache.contiguous()}, str(path))

            extra = {REF_CACHE_FILE: write_ref}
        try:
            with self.signals.protected():
                path = save_checkpoint(
                    self.cfg.output_dir, trainer.step, adapter_state=trainable_state(trainer.model),
                    optimizer_state=trainer.optimizer.state_dict(), scheduler_state=trainer.scheduler.state_dict(),
                    trainer_state=trainer.state(), config=self.run_config,
                    rng_state=rng_state if rng_state is not None else capture_rng(),
                    keep_last=self.cfg.save_total_limit or None, extra_files=extra)
                self.last, self.last_step = path, trainer.step
        except CheckpointError as e:
            if self.last is None:
                raise CheckpointError(f"{e}; no earlier checkpoint exists") from e
            raise CheckpointError(f"{e}; the previous checkpoint {self.describe_last()} is intact: fix that "
                                  f"and resume with: {self.commands.resume()}") from e
        distributed.barrier(trainer.dist)
        return path
