"""Checkpoints that lose nothing: exact resume, atomic writes, verified and pickle-free loading.

A checkpoint is one folder, OUTPUT_DIR/checkpoints/step-000123/, holding

    adapter.safetensors   the trainable (LoRA) tensors by parameter name; safetensors, never pickle
    optimizer.pt          optimizer.state_dict()   } torch.save of tensors and plain values only,
    scheduler.pt          scheduler.state_dict()   } so every one loads with weights_only=True
    rng.pt                dpo.run.state.capture_rng()   }
    trainer_state.json    step, num_tokens, ... (whatever the loop needs to continue)
    config.json           the resolved run config
    <extra files>         e.g. a PEFT adapter/ folder, written by a callback of the loop
    manifest.json         written LAST: every other file's name, size and sha256

It is built in a hidden temporary folder beside its final place (".tmp-..."), every file fsync'd,
and then renamed into place with one os.replace, so a crash at any moment leaves either the
complete checkpoint under its real name or nothing under a real name. Loading re-checks every file
against the manifest before a byte of it is trusted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpo.files import remove_tree

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (ADAPTER_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, TRAINER_STATE_FILE, CONFIG_FILE)
MANIFEST_FORMAT = 1

# Hidden names: list_checkpoints never sees them, and a save removes the stale ones a crash left.
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")

class CheckpointError(RuntimeError):
    """A checkpoint or output folder that cannot be written, read or trusted; the message names the path."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    adapter_state: dict[str, torch.Tensor]  # trainable LoRA tensors by parameter name
    optimizer_state: dict  # optimizer.state_dict()
    scheduler_state: dict  # scheduler.state_dict()
    trainer_state: dict  # JSON-able: step, num_tokens, epoch, anything the loop needs
    config: dict  # the resolved config (JSON-able)
    rng_state: dict  # from capture_rng()


# --- saving ------------------------------------------------------------------------------------


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _check_plain(obj: Any, where: str) -> int:
    """Raise unless obj holds only what torch.load(weights_only=True) accepts; return its tensor bytes.

    Checked before saving, so an optimizer that puts an arbitrary object into its state fails at the
    first save with the key's path, not at resume time when the run is already lost.
    """
    # Exact types: a subclass (np.float64 is a float, a namedtuple a tuple) pickles as its own
    # class, which weights_only=True refuses.
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"cannot save {where}: a {type(obj).__name__} tensor subclass would not load "
                                  "with weights_only=True")
        return obj.numel() * obj.element_size()
    if obj is None or type(obj) in (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size):
        return 0
    if type(obj) in (dict, OrderedDict):
        return sum(_check_plain(k, f"{where} key") + _check_plain(v, f"{where}[{k!r}]") for k, v in obj.items())
    if type(obj) in (list, tuple, set):  # not frozenset: weights_only refuses it
        return sum(_check_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise CheckpointError(f"cannot save {where}: a {type(obj).__module__}.{type(obj).__qualname__} would not load "
                          "with weights_only=True (only tensors and plain values are saved)")


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save {what}: it is not JSON-able ({e})") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (a file's fsync does not cover its folder's entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot fsync a folder
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_adapter(path: Path, adapter_state: dict[str, torch.Tensor], step: int) -> None:
    from safetensors.torch import save_file

    # safetensors wants contiguous CPU tensors that share no storage; LoRA tensors are small, so copy.
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in adapter_state.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "step": str(step)})
    _fsync_file(path)


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _free_bytes(path: Path) -> int:
    """Free bytes on the disk holding `path` (its own function so tests can pretend a disk is full)."""
    return shutil.disk_usage(path).free


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _remove_stale_tmp(checkpoints: Path, keep: Path | None = None) -> None:
    """Remove what crashed saves and deletions left behind (one writer per output dir is assumed)."""
    for entry in checkpoints.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or entry == keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _check_extra_name(name: str) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) != 1 or name in REQUIRED_FILES + (MANIFEST_FILE,) \
            or name.startswith(TMP_PREFIX):
        raise ValueError(f"extra_files: {name!r} must be a plain new name inside the checkpoint folder")


def expected_checkpoint_bytes(adapter_bytes: int, state_bytes: int, n_extra_files: int = 0,
                              json_bytes: int = 0) -> int:
    """The room save_checkpoint asks for: tensors, pickling overhead (~10%), the JSON files, and for
    every extra writer (e.g. a PEFT adapter/ folder) about the adapter's size again, plus 1 MiB."""
    return int((adapter_bytes * (1 + n_extra_files) + state_bytes) * 1.1 + json_bytes + 2**20)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    adapter_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    trainer_state: dict,
    config: dict,
    rng_state: dict,
    keep_last: int | None = None,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write OUTPUT_DIR/checkpoints/step-NNNNNN/ atomically and return its path.

    Order: check the states (plain values only, JSON-able), create a hidden temporary folder beside
    the final one (this also proves the folder is writable), check free space, write and fsync
    every file, call each `extra_files[name](tmp / name)` writer, write manifest.json last, rename
    the folder into place, fsync the parent, then prune the oldest complete checkpoints beyond
    `keep_last` (never the one just written). Old checkpoints are only pruned after the new one is
    complete, so the free-space check asks for a whole new checkpoint's room.

    Any OSError (disk full, permission, I/O) becomes a CheckpointError naming the checkpoint's path;
    any failure (a writer's exception too) removes the temporary folder and leaves every earlier
    checkpoint as it was. Call it from one process only (rank 0): it removes stale .tmp- folders.
    """
    extra_files, trainer_state = _check_arguments(step, keep_last, extra_files, trainer_state)
    checkpoints = Path(output_dir) / CHECKPOINTS_DIR
    final = checkpoints / checkpoint_dir_name(step)
    # Checked before anything touches the disk: a state that cannot be saved loses nothing yet.
    expected, json_files = _check_states(final, adapter_state, optimizer_state, scheduler_state, rng_state,
                                         trainer_state, config, len(extra_files))
    tmp: Path | None = None
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(checkpoints)
        tmp = checkpoints / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # os.mkdir honours the umask (mkdtemp would make it private to this user)
        free = _free_bytes(checkpoints)
        if free < expected:
            raise CheckpointError(f"cannot write checkpoint {final}: not enough disk space "
                                  f"({_mib(free)} free, about {_mib(expected)} needed)")
        _write_adapter(tmp / ADAPTER_FILE, adapter_state, step)
        _write_torch(tmp / OPTIMIZER_FILE, optimizer_state)
        _write_torch(tmp / SCHEDULER_FILE, scheduler_state)
        _write_torch(tmp / RNG_FILE, rng_state)
        for name, data in json_files.items():
            _write_bytes(tmp / name, data)
        for name, writer in extra_files.items():
            writer(tmp / name)
        _write_manifest(tmp, step)
        _move_into_place(tmp, final)
        tmp = None
    except OSError as e:
        where = f" (at {e.filename})" if e.filename and str(e.filename) != str(final) else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}{where}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    if keep_last is not None:
        _prune(checkpoints.parent, keep_last, final)
    return final


def _check_arguments(step: int, keep_last: int | None, extra_files: dict | None,
                     trainer_state: dict) -> tuple[dict, dict]:
    """Raise ValueError for arguments no checkpoint can have; return (extra_files, trainer_state with step)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        _check_extra_name(name)
    if trainer_state.get("step", step) != step:
        raise ValueError(f"trainer_state['step'] is {trainer_state['step']} but the checkpoint is for step {step}")
    return extra_files, {**trainer_state, "step": step}


def _check_states(final: Path, adapter_state: dict, optimizer_state: dict, scheduler_state: dict, rng_state: dict,
                  trainer_state: dict, config: dict, n_extra_files: int) -> tuple[int, dict[str, bytes]]:
    """Raise CheckpointError unless every state can be saved and loaded back; return (the bytes the
    checkpoint will need, the JSON files' contents by name)."""
    adapter_bytes = _check_plain(dict(adapter_state), "adapter_state")
    if not all(isinstance(t, torch.Tensor) for t in adapter_state.values()):
        raise CheckpointError(f"cannot save {final}: adapter_state must map names to tensors")
    state_bytes = sum(_check_plain(obj, name) for name, obj in
                      (("optimizer_state", optimizer_state), ("scheduler_state", scheduler_state),
                       ("rng_state", rng_state)))
    json_files = {TRAINER_STATE_FILE: _json_bytes(trainer_state, "trainer_state"),
                  CONFIG_FILE: _json_bytes(config, "config")}
    expected = expected_checkpoint_bytes(adapter_bytes, state_bytes, n_extra_files,
                                         sum(map(len, json_files.values())))
    return expected, json_files


def _write_manifest(tmp: Path, step: int) -> None:
    """fsync what the writers wrote, then manifest.json (every file's size and sha256), written last."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        if path.parent != tmp:  # the writers' files have not been fsync'd by us
            _fsync_file(path)
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    for folder in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}, key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    _write_bytes(tmp / MANIFEST_FILE, _json_bytes(manifest, "manifest"))
    _fsync_dir(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder to its real name with one os.replace, durable once this returns."""
    checkpoints = final.parent
    aside = None
    if final.exists():
        # Re-saving a step (resumed from an older checkpoint): os.replace cannot replace a
        # non-empty folder, so the old one steps aside, and comes back if the rename fails.
        aside = checkpoints / f"{TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        raise
    _fsync_dir(checkpoints)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _prune(output_dir: Path, keep_last: int, just_written: Path) -> None:
    """Delete the oldest complete checkpoints until keep_last remain, never `just_written`.

    A failure to delete only warns: the new checkpoint is safe, and stopping training over an old
    folder would lose more than it saves.
    """
    others = [p for p in list_checkpoints(output_dir) if p != just_written]
    for old in others[: max(0, len(others) + 1 - keep_last)]:
        try:
            remove_tree(old)
        except OSError as e:
            warnings.warn(f"could not remove old checkpoint {old}: {e.strerror or e}")


# --- finding and loading -----------------------------------------------------------------------


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints (a manifest is present) under OUTPUT_DIR/checkpoints, oldest step first.

    Temporary and half-deleted folders are hidden (.tmp-) and never listed. Presence of the manifest
    is the cheap test; load_checkpoint verifies the contents.
    """
    checkpoints = Path(output_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return []
    found = [(s, p) for p in checkpoints.iterdir()
             if (s := _step_of(p)) is not None and p.is_dir() and (p / MANIFEST_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is incomplete or corrupted: {what}")


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file against manifest.json (present, size, sha256); return the manifest."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise _corrupt(path, f"{MANIFEST_FILE} is missing (it is written last, so the save never finished)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = manifest["step"]
        if not isinstance(files, dict) or not isinstance(step, int) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("unexpected layout")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"{MANIFEST_FILE} cannot be read ({e})") from None
    for name in REQUIRED_FILES:
        if name not in files:
            raise _corrupt(path, f"{MANIFEST_FILE} lists no {name}")
    for name, entry in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise _corrupt(path, f"{MANIFEST_FILE} names a file outside the checkpoint: {name}")
        file = path / rel
        if not file.is_file():
            raise _corrupt(path, f"{name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise _corrupt(path, f"{name} has {size} bytes, manifest says {entry['bytes']}")
        digest = _sha256(file)
        if digest != entry["sha256"]:
            raise _corrupt(path, f"{name} has sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}...")
    return manifest


def _reason(e: Exception) -> str:
    """The telling line of torch.load's long message ("Unsupported global: GLOBAL x.Y ..."), no colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    return lines[0] if lines else type(e).__name__


def _torch_load(path: Path, file: str, map_location) -> Any:
    try:
        # weights_only=True: only tensors and plain values are unpickled, so a tampered file cannot
        # run code. Never turn this off for a checkpoint.
        return torch.load(path / file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - one clear line naming the file
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {file} is refused by "
                              f"torch.load(weights_only=True): {_reason(e)}") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify a checkpoint folder against its manifest, then load it without unpickling any code.

    Every file must be present with the manifest's size and sha256, else CheckpointError("checkpoint X
    is incomplete or corrupted: adapter.safetensors has 123 bytes, manifest says 456"). Tensors land
    on `map_location` (the optimizer moves its state to its parameters' device by itself).
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        from safetensors.torch import load_file

        adapter_state = load_file(str(path / ADAPTER_FILE), device="cpu")
        if torch.device(map_location).type != "cpu":
            adapter_state = {k: v.to(map_location) for k, v in adapter_state.items()}
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - a file that passed the manifest but does not parse
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {e}") from e
    return Checkpoint(
        path=path,
        step=manifest["step"],
        adapter_state=adapter_state,
        optimizer_state=_torch_load(path, OPTIMIZER_FILE, map_location),
        scheduler_state=_torch_load(path, SCHEDULER_FILE, "cpu"),
        trainer_state=trainer_state,
        config=config,
        rng_state=_torch_load(path, RNG_FILE, "cpu"),  # generator states must be CPU byte tensors
    )


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "expected_checkpoint_bytes",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
