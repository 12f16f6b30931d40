"""A benchmark row's process: fresh compile caches, and a child that is ended, never left behind.

The harness (benchmarks/run.py) starts each row in a process group of its own and ends it at its timeout,
or soon after it has written its row when it does not exit; before killing it, it asks where it hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


COMPILE_CACHE_VARS = ("UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def fresh_compile_caches(env: dict, root: str) -> dict:
    """`env` with Unsloth's, Inductor's and Triton's compile caches pointed at new empty folders under `root`.

    Every run then compiles from cold, as a user's first run does. Shared caches made a later run's first
    step (and so its e2e time) tens of seconds shorter than the first run's: run order favoured the later.
    """
    base = tempfile.mkdtemp(prefix="caches-", dir=root)
    return {**env, **{var: os.path.join(base, var.lower()) for var in COMPILE_CACHE_VARS}}


GRACE_S = 60.0  # how long a child may run on after writing its row (saving the adapter, exiting)


@dataclass
class Outcome:
    """How a row's process ended: on its own (`returncode`), or killed (`killed`: why; `stacks`: where it was)."""

    returncode: int | None = None
    killed: str | None = None
    stacks: str | None = None


def result_written(path: Path) -> float | None:
    """When the child last wrote its result (system.py writes it whole, then renames it: present means
    readable), None before it has."""
    try:
        json.loads(path.read_text())
        return path.stat().st_mtime
    except (OSError, ValueError):
        return None


def stacks_of(pid: int, stacks_file: Path) -> str:
    """Where a process that will not end is: its Python stacks, from the child's faulthandler (SIGUSR1, set up
    by benchmarks.system), or py-spy where installed, else what the kernel says it waits in."""
    found = []
    if stacks_file.is_file():  # the child made it when it set up the handler: SIGUSR1 then dumps, not kills
        try:
            os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            found.append(stacks_file.read_text())
        except OSError:
            pass
    if not any(found) and shutil.which("py-spy"):
        try:
            found.append(subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True,
                                        timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not any(found):
        try:
            found.append("wchan: " + Path(f"/proc/{pid}/wchan").read_text())
        except OSError:
            pass
    return "\n".join(f for f in found if f)[-8000:]


def run_child(cmd: list[str], timeout: float, env: dict | None, result: Path, grace_s: float = GRACE_S,
              stacks_file: Path | None = None) -> Outcome:
    """Run `cmd` in a process group of its own until it ends, or kill the group: at `timeout`, or `grace_s`
    after it last wrote `result` (a child that measured its row but hangs on the way out). Before the kill,
    record where it hangs. Killing the whole group: a worker left behind (torchrun's, the compiler's) would
    hold the GPU, or keep writing into a cache being removed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    deadline, written, written_at = time.monotonic() + timeout, None, None
    while True:
        try:
            return Outcome(returncode=proc.wait(timeout=0.5))
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        stamp = result_written(result)
        if stamp is not None and stamp != written:  # written at the last step, and again when the run returns
            written, written_at = stamp, now
        if written_at is not None and now - written_at > grace_s:
            why = f"hung at exit: still running {grace_s:.0f} s after writing its result"
        elif now > deadline:
            why = f"timeout after {timeout:.0f} s"
        else:
            continue
        stacks = stacks_of(proc.pid, stacks_file) if stacks_file is not None else None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return Outcome(killed=why, stacks=stacks)


def run_group(cmd: list[str], timeout: float, env: dict | None = None) -> None:
    """Run `cmd` in a process group of its own; on timeout, kill the whole group and raise TimeoutExpired."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def read_row(path: Path) -> dict | str:
    """The row a child wrote, or why there is none (FileNotFoundError, JSONDecodeError)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return type(e).__name__
