"""A run's life on disk: what it writes, its checkpoints during the loop, resuming, and stopping.

- Checkpointer: OUTPUT_DIR/checkpoints/step-N through dpo.run.checkpoint (atomic, verified), every
  --save-steps and at the end (none where the disk has no room: dpo.run.diskspace); with --precompute-ref
  the reference log-probs go with it.
- StopSignals: the first SIGINT/SIGTERM lets the step finish and saves; a second stops at once.
- Commands: the command lines the messages print (resume this run, or start it over).

What the run folder holds (RunWriter, the resume rules) is dpo.run.folder's. The loop itself (dpo.train)
only calls these; none of them knows the DPO math.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from dpo import distributed
from dpo.cli import python_command
from dpo.run.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, save_checkpoint
from dpo.run.state import capture_rng, trainable_state
from dpo.cli import one_line
from dpo.config import TrainConfig, field_names, path_rules
from dpo.paths import local_path
from dpo.run.folder import RunWriter, step_of

REF_CACHE_FILE = "ref_logps.safetensors"  # extra checkpoint file: the precomputed reference log-probs


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
    as is, from any folder: the interpreter that runs now, every path-valued setting (TrainConfig fields
    marked `path`, and --config) absolute, and this run's --output-dir (the default run's is made up at
    start, so a bare `--resume` would look in a new folder)."""

    START_FLAGS = ("--resume", "--no-resume", "--overwrite", "--no-overwrite", "--overwrite-output-dir",
                   "--no-overwrite-output-dir")

    def __init__(self, cfg: TrainConfig, argv: list[str] | None):
        start = field_names(type(cfg), start=True)  # --resume-from is left out below
        rules = {"--" + name.replace("_", "-"): rule for name, rule in path_rules(type(cfg)).items()
                 if name not in start}
        rules["--config"] = True
        if argv is None:  # run() called from Python: config.json holds the whole run
            argv = ["--config", str(Path(cfg.output_dir) / "config.json")]
        args, given, words = [], set(), iter(argv)
        for a in words:
            flag, eq, value = a.partition("=")
            if flag == "--resume-from":
                if not eq:
                    next(words, None)
                continue
            if a in self.START_FLAGS:
                continue
            if flag in rules:
                given.add(flag)
                value = value if eq else next(words, "")
                args += [flag, local_path(value, rules[flag]) or value]
                continue
            args.append(a)
        # Local paths set elsewhere (a config file, the default run's made-up folder) as flags too (flags win).
        for flag, rule in rules.items():
            if flag not in given and (path := local_path(getattr(cfg, flag[2:].replace("-", "_"), None), rule)):
                args += [flag, path]
        self.args = args

    def _line(self, *extra: str) -> str:
        return python_command("dpo.train", [*self.args, *extra], from_anywhere=True)

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
    """Writes OUTPUT_DIR/checkpoints/step-N (dpo.run.checkpoint: atomic, verified) and remembers the last one."""

    def __init__(self, cfg: TrainConfig, run_config: dict, signals: StopSignals, commands: Commands,
                 enabled: bool = True, checkpoints: bool = True):
        self.cfg, self.run_config, self.signals, self.commands = cfg, run_config, signals, commands
        self.enabled = enabled  # several ranks: the main one writes, the others only wait for it
        # False: the disk has no room for them (dpo.run.diskspace): none every --save-steps nor at the end;
        # a stop (signal, non-finite step) still tries one, and saves the adapter when it cannot
        self.checkpoints = checkpoints
        self.last: Path | None = latest_checkpoint(cfg.output_dir)
        # Kept on every rank (only the main one writes): all ranks must agree on whether a save happens,
        # or the main rank skips the barrier that the others then wait in.
        self.last_step: int | None = step_of(self.last) if self.last else None

    def due(self, step: int) -> bool:
        return self.checkpoints and self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0

    def describe_last(self) -> str:
        return f"{self.last} (step {step_of(self.last)})" if self.last else "none (no checkpoint was written yet)"

    def save(self, trainer, rng_state: dict | None = None) -> Path:
        """A checkpoint of the trainer as it is now (rng_state: the generators to store, default: now).
        One that cannot be written: the adapter is saved instead, then CheckpointError (the run stops)."""
        try:
            return self._write(trainer, rng_state)
        except CheckpointError as e:
            self.save_adapter_instead(trainer)
            if self.last is None:
                raise CheckpointError(f"{e}; no earlier checkpoint exists") from e
            raise CheckpointError(f"{e}; the previous checkpoint {self.describe_last()} is intact: fix that "
                                  f"and resume with: {self.commands.resume()}") from e

    def save_final(self, trainer) -> Path | None:
        """The checkpoint at the end of training, or None: checkpoints are off, or it cannot be written (a
        disk that filled up during the run). Then a warning, and the run goes on to write adapter/ as
        usual: the training is done, and only continuing it later would need the checkpoint."""
        if not self.checkpoints:
            return None
        try:
            return self._write(trainer)
        except CheckpointError as e:
            distributed.barrier(trainer.dist)  # the other ranks wait for the main one's save
            print(f"dpo: warning: {e}; the adapter is saved to {Path(self.cfg.output_dir) / 'adapter'} as usual "
                  f"(only continuing this run later would need the checkpoint)", file=sys.stderr)
            return None

    def _write(self, trainer, rng_state: dict | None = None) -> Path:
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
        with self.signals.protected():
            path = save_checkpoint(
                self.cfg.output_dir, trainer.step, adapter_state=trainable_state(trainer.model),
                optimizer_state=trainer.optimizer.state_dict(), scheduler_state=trainer.scheduler.state_dict(),
                trainer_state=trainer.state(), config=self.run_config,
                rng_state=rng_state if rng_state is not None else capture_rng(),
                keep_last=self.cfg.save_total_limit or None, extra_files=extra)
            self.last, self.last_step = path, trainer.step
        distributed.barrier(trainer.dist)
        return path

    def save_adapter_instead(self, trainer) -> None:
        """A checkpoint that cannot be written (a full disk, say): the adapter is a fraction of its size,
        so save it to OUTPUT_DIR/adapter/ and say where, before the run stops on the checkpoint's error."""
        try:
            with self.signals.protected():
                where = RunWriter(self.cfg.output_dir).save_adapter(trainer.model, trainer.tokenizer)
        except Exception as e:  # noqa: BLE001 - the checkpoint's error is the one the run stops on
            print(f"dpo: the adapter could not be saved either: {one_line(e)}", file=sys.stderr)
            return
        print(f"dpo: the checkpoint could not be written, but the adapter as of step {trainer.step} is saved to "
              f"{where} (it loads with PEFT; it cannot resume training)", file=sys.stderr)
