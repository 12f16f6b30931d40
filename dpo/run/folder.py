"""The run folder, OUTPUT_DIR: what a run writes there, which runs may share it, what a resume keeps.

    config.json     the run's config (its RESUME_LOCKED_KEYS decide whether a later run may continue it)
    metrics.jsonl   one JSON row per optimizer step and per evaluation: the first of the metric sinks
    checkpoints/    step-NNNNNN/ folders, written by dpo.run.checkpoint
    adapter/        the trained PEFT adapter, loadable anywhere (its base is the model's hub name)

- check_output_dir: refuse a folder that holds another run or cannot be written, before a model loads;
  it leaves no folder behind (a refused run leaves the place as it found it).
- RunWriter: writes config.json, the metric rows (to metrics.jsonl and to every tracker sink) and
  adapter/, main rank only; it creates the folder at its first write, and a failing tracker never costs
  a metrics.jsonl row. (The room on disk for all this is checked before the model loads: dpo.run.diskspace.)
- find/load_resume_checkpoint, set_aside_later_checkpoints, trim_metrics, clear_previous_run: what
  --resume, --resume-from and --overwrite keep, set aside and remove.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dpo import smollm2
from dpo.run.checkpoint import (
    CHECKPOINTS_DIR, CONFIG_FILE, TMP_PREFIX, Checkpoint, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint)
from dpo.cli import one_line
from dpo.config import field_names, with_absolute_paths
from dpo.files import remove_tree, replace_dir, write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"

# Flag names quoted in check_output_dir's messages (the command line owns the real flags).
RESUME_FLAG = "--resume"
OVERWRITE_FLAG = "--overwrite-output-dir"

# Config keys that must be equal when a run is resumed: the fields that declare resume="locked"
# (dpo/config.py says why each kind is locked or free). check_output_dir and load_resume_checkpoint both
# compare against it.
RESUME_LOCKED_KEYS: tuple[str, ...] = field_names(resume="locked")


# --- comparing configs ---------------------------------------------------------------------------

_ABSENT = object()


def _normalise(value: Any) -> Any:
    """Tuples as lists (JSON has no tuples): ("sigmoid",) in memory equals ["sigmoid"] from config.json."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    try:
        return json.dumps(_normalise(value))
    except (TypeError, ValueError):
        return repr(value)


def config_differences(saved: dict, current: dict, keys: Iterable[str] = RESUME_LOCKED_KEYS) -> list[str]:
    """["beta: 0.1 -> 0.2", ...]: each of `keys` whose value differs between saved and current config.
    (Its callers compare paths absolute: a config.json of an older version may hold relative ones, which
    are taken from the current folder, as then.)"""
    out = []
    for key in keys:
        a, b = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if (a is _ABSENT) != (b is _ABSENT) or _normalise(a) != _normalise(b):
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


# --- before a run: may it use this folder? ---------------------------------------------------------


def _run_artifacts(out: Path) -> list[str]:
    """What in `out` shows that a run already wrote there."""
    found = []
    metrics = out / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    n = len(list_checkpoints(out))
    if n:
        found.append(f"{n} checkpoint(s)")
    if (out / ADAPTER_DIR).exists():
        found.append(f"{ADAPTER_DIR}/")
    return found


def _saved_config_differences(out: Path, config: dict) -> list[str]:
    saved_config_path = out / CONFIG_FILE
    if not saved_config_path.is_file():
        return []
    try:
        saved = json.loads(saved_config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return [f"its {CONFIG_FILE} cannot be read"]
    return config_differences(with_absolute_paths(saved), with_absolute_paths(config), RESUME_LOCKED_KEYS)


def check_output_dir(output_dir: str | os.PathLike, config: dict, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that would mix two runs or cannot be written; call it before loading a model.

    - It holds another run (a config.json differing in RESUME_LOCKED_KEYS, or metrics.jsonl rows,
      checkpoints or a final adapter/): refused unless `overwrite` or `resume`.
    - `resume` with a config.json that differs in RESUME_LOCKED_KEYS: refused, listing the changes.
    - `overwrite`: the old run's checkpoints/ folder is removed here, so a later resume can never
      pick up a checkpoint of the run that was replaced (config.json, metrics.jsonl and adapter/ are
      rewritten by the new run).
    - A probe file is written and removed, so a read-only or missing-permission folder fails now,
      naming the path, not after the first training step. Folders made for the probe are removed
      again: a run refused later (bad data, say) leaves no empty output folder; RunWriter makes it.
    """
    out = Path(output_dir)
    if resume and overwrite:
        raise CheckpointError(f"output dir {out}: {RESUME_FLAG} and {OVERWRITE_FLAG} contradict each other; "
                              "pass one of them")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output dir {out} is a file, not a folder")
    if out.is_dir():
        differences = _saved_config_differences(out, config)
        artifacts = _run_artifacts(out)
        if resume and differences:
            raise CheckpointError(f"cannot resume the run in {out}: these settings differ from its {CONFIG_FILE}: "
                                  + "; ".join(differences))
        if not resume and not overwrite and (differences or artifacts):
            what = "; ".join(artifacts + ([f"a different {CONFIG_FILE} ({'; '.join(differences)})"]
                                          if differences else []))
            raise CheckpointError(f"output dir {out} already holds another run ({what}); pass {RESUME_FLAG} to "
                                  f"continue it, {OVERWRITE_FLAG} to replace it, or choose another folder")
        if overwrite and (out / CHECKPOINTS_DIR).exists():
            try:
                remove_tree(out / CHECKPOINTS_DIR)
            except OSError as e:
                raise CheckpointError(f"cannot remove the old checkpoints in {out / CHECKPOINTS_DIR}: "
                                      f"{e.strerror or e}") from e
    _probe_writable(out)


def _probe_writable(out: Path) -> None:
    """Create `out` (and missing parents), write and remove a probe file, then remove the folders made here."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create output dir {out}: {e.strerror or e}") from e
        probe = out / f"{TMP_PREFIX}write-probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with open(probe, "wb") as f:
                f.write(b"probe")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"output dir {out} is not writable: {e.strerror or e}") from e
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass


# --- resuming --------------------------------------------------------------------------------------


def step_of(path: Path) -> int:
    """The step of a checkpoint folder, step-000123 -> 123."""
    return int(path.name.rsplit("-", 1)[1])


def find_resume_checkpoint(cfg) -> Path | None:
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
        if (Path(cfg.output_dir) / METRICS_FILE).is_file():
            what_now = "its run stopped before its first checkpoint: start over with --overwrite instead"
        else:
            what_now = "run without --resume to start a new run"
        raise CheckpointError(f"--resume: no checkpoint in {Path(cfg.output_dir) / CHECKPOINTS_DIR}; nothing to "
                              f"resume ({what_now})")
    return found


def load_resume_checkpoint(cfg, run_config: dict) -> Checkpoint | None:
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
    differences = config_differences(with_absolute_paths(ckpt.config), with_absolute_paths(run_config),
                                     RESUME_LOCKED_KEYS)
    if differences:
        raise CheckpointError(f"cannot resume from {path}: these settings differ from the checkpoint's: "
                              + "; ".join(differences) + " (use the same flags, or start a new run in "
                              "another --output-dir)")
    steps = run_config.get("max_steps", -1)
    if 0 < steps < ckpt.step:
        raise CheckpointError(f"cannot resume from {path}: --max-steps {steps} is below its step {ckpt.step} (give "
                              f"--max-steps {ckpt.step} or more, or start a new run in another --output-dir)")
    return ckpt


ABANDONED_PREFIX = "abandoned-"  # checkpoints/abandoned-<UTC time>/: set aside by a resume from an older one


def set_aside_later_checkpoints(output_dir: str | os.PathLike, step: int) -> Path | None:
    """Resuming from an older checkpoint: the newer ones belong to the branch being redone, and a later
    --resume (or pruning) must not take them for this run's latest. Nothing a user saved is deleted
    unasked: they move to checkpoints/abandoned-<UTC time>/ (with metrics.jsonl as it was), where
    neither --resume nor --save-total-limit looks, and --resume-from can still take one. Returns that
    folder (None: there was no newer checkpoint)."""
    later = [p for p in list_checkpoints(output_dir) if step_of(p) > step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = Path(output_dir) / CHECKPOINTS_DIR / f"{ABANDONED_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{ABANDONED_PREFIX}{stamp}-{n}")
    try:
        aside.mkdir()
        metrics = Path(output_dir) / METRICS_FILE
        if metrics.is_file():
            shutil.copyfile(metrics, aside / METRICS_FILE)
        for path in later:
            os.replace(path, aside / path.name)
    except OSError as e:
        raise CheckpointError(f"cannot move the checkpoints after step {step} aside to {aside}: "
                              f"{e.strerror or e}") from e
    print(f"dpo: moved {len(later)} checkpoint(s) after step {step} ({', '.join(p.name for p in later)}) aside to "
          f"{aside} (their steps are redone; delete that folder when it is not wanted)")
    return aside


def clear_previous_run(output_dir: str | os.PathLike) -> None:
    """--overwrite: the old adapter/ goes now, so an interrupted new run never sits beside it."""
    remove_tree(Path(output_dir) / ADAPTER_DIR)


def trim_metrics(metrics_path: str | os.PathLike, step: int) -> int:
    """Keep only metrics.jsonl rows with "step" <= `step` (the steps a resume will not redo); return how many.

    Rows after the checkpoint are dropped because the resumed run writes them again, and so is a
    torn last line from a crash mid-write. Rewritten whole or not at all (dpo.files).
    """
    path = Path(metrics_path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] <= step:
            kept.append(line)
    try:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    except OSError as e:
        raise CheckpointError(f"cannot rewrite {path}: {e.strerror or e}") from e
    return len(kept)


# --- writing the run -------------------------------------------------------------------------------


def _fix_base_model_name(adapter_dir: Path) -> None:
    """The embedded default model loads from a local cache folder: record its hub name instead, so the
    adapter loads on any machine (PEFT's AutoPeftModel reads base_model_name_or_path)."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or Path(base).resolve() != smollm2.cache_dir().resolve():
        return
    config["base_model_name_or_path"] = smollm2.HUB_NAME
    write_json_atomic(config_path, config)


class MetricsFile:
    """The first metric sink: metrics.jsonl, one JSON line per row, appended as each row comes."""

    name = METRICS_FILE

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def start(self, run_config: dict) -> None:
        pass

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        pass


class RunWriter:
    """Everything a run writes to OUTPUT_DIR: config.json, the metric rows, adapter/.

    Every metric row goes to each sink: metrics.jsonl first, then the trackers (dpo.run.trackers). A
    tracker that fails is reported once and dropped; metrics.jsonl keeps every row. The folder is
    made at the first write, so a run refused before training leaves none. With several ranks only
    the main one writes (`enabled`); the others' calls do nothing."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, sinks: Sequence = ()):
        self.dir, self.enabled = str(output_dir), enabled
        self.metrics_path = os.path.join(self.dir, METRICS_FILE)
        self.trackers = list(sinks)

    def _made(self) -> None:
        os.makedirs(self.dir, exist_ok=True)

    def start(self, run_config: dict, resumed: Checkpoint | None = None) -> None:
        """Before the first step: write config.json, start metrics.jsonl (see start_metrics), give each
        tracker the config. (Whether the disk has room is dpo.run.diskspace's, before the model loads.)"""
        if not self.enabled:
            return
        self.write_json(CONFIG_FILE, run_config)
        self.start_metrics(resumed)
        for sink in list(self.trackers):
            self._call(sink, "start", run_config)

    def write_json(self, name: str, obj) -> None:
        if not self.enabled:
            return
        self._made()
        write_json_atomic(os.path.join(self.dir, name), obj)

    def start_metrics(self, resumed: Checkpoint | None = None) -> None:
        """Empty for a new run; for a resumed one, the rows up to its checkpoint (later ones are redone)."""
        if not self.enabled:
            return
        self._made()
        if resumed is None:
            open(self.metrics_path, "w").close()
            return
        here = Path(self.metrics_path)
        # The rows of the checkpoint's own run: another run folder's (--resume-from), or those kept with a
        # set-aside checkpoint (checkpoints/abandoned-*/metrics.jsonl)
        source = next((p for p in (resumed.path.parent / METRICS_FILE, resumed.path.parent.parent / METRICS_FILE)
                       if p.is_file()), here)
        if source.is_file() and not (here.exists() and source.samefile(here)):
            shutil.copyfile(source, here)
        trim_metrics(here, resumed.step)

    def append_metrics(self, row: dict) -> None:
        """The row to metrics.jsonl (an error here is the run's), then to each tracker (an error there is
        reported and that tracker dropped)."""
        if not self.enabled:
            return
        self._made()
        MetricsFile(self.metrics_path).write(row)
        for sink in list(self.trackers):
            self._call(sink, "write", row)

    def _call(self, sink, method: str, *args) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop the run or lose a row
            self.trackers.remove(sink)
            print(f"dpo: warning: tracker {sink.name} failed ({type(e).__name__}: {one_line(e)}); it gets no more rows "
                  f"({self.metrics_path} has every row)", file=sys.stderr)
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - already reported
                pass

    def close(self, files: Iterable[str | os.PathLike] = ()) -> None:
        """At the end: `files` (e.g. curves.png) to the trackers that keep files, then close them."""
        for sink in list(self.trackers):
            for path in files:
                if hasattr(sink, "add_file") and sink in self.trackers:
                    self._call(sink, "add_file", str(path))
            if sink in self.trackers:
                self._call(sink, "close")
        self.trackers = []

    def save_adapter(self, model, tokenizer) -> str:
        """OUTPUT_DIR/adapter/ (PEFT's format, with the tokenizer), replaced whole; returns its path."""
        path = Path(self.dir) / ADAPTER_DIR
        if not self.enabled:
            return str(path)

        def make(tmp: Path) -> None:
            model.save_pretrained(tmp, selected_adapters=["default"])
            tokenizer.save_pretrained(tmp)
            _fix_base_model_name(tmp)

        try:
            self._made()
            replace_dir(make, path)
        except OSError as e:
            raise CheckpointError(f"cannot write the adapter to {path}: {e.strerror or e}") from e
        return str(path)

    def clear_previous_run(self) -> None:
        """--overwrite: the old adapter/ goes now, so an interrupted new run never sits beside it."""
        clear_previous_run(self.dir)
