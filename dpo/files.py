"""Writing files so that a crash never leaves half of one: every writer here goes to a temporary
name beside the target, then renames it into place (os.replace is atomic on one file system)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def _tmp_beside(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def _discard(tmp: Path) -> None:
    """Remove a temporary file if there is one; where even that fails (a read-only place) the write's own
    error is the one to report."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def output_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at `path`, as one line; None when a probe file beside it can be
    written and removed (so a read-only place fails before the work, not after it)."""
    folder = Path(os.path.abspath(os.path.expanduser(path))).parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
    if Path(path).is_dir():
        return f"{path} is a folder"
    probe = _tmp_beside(path)
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
    except OSError as e:
        return f"cannot write in {folder}: {e.strerror or e}"
    _discard(probe)
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` at `path`, whole or not at all."""
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """`obj` as indented JSON (UTF-8 kept as is) at `path`, whole or not at all."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable) -> None:
    """One JSON line per record at `path`, whole or not at all (records may be a generator)."""
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def replace_dir(make: Callable[[Path], None], final: str | os.PathLike) -> None:
    """Build a folder with make(tmp) beside `final`, then swap it in; a crash leaves no half folder there
    (and a failed swap puts the previous folder back)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{secrets.token_hex(4)}")
    old = final.with_name(f".tmp-old-{final.name}-{secrets.token_hex(4)}")
    try:
        make(tmp)
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old.exists():
                os.replace(old, final)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder by first renaming it aside, so no half-deleted folder keeps its name."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f".tmp-delete-{path.name}-{secrets.token_hex(4)}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
