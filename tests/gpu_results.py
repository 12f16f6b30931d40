"""A session-wide collector of GPU equivalence checks, written to JSON at the end of a pytest session.

Tests call `record(name, max_abs_diff, tolerance, **extra)`; `tests/gpu_conftest_plugin.py` calls
`write()` when the session finishes, which writes the checks, the device name and the package
versions to the path in the environment variable `DPO_GPU_RESULTS` (nothing is written when it is
unset). The usual target is benchmarks/results/gpu_equivalence.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path

ENV_VAR = "DPO_GPU_RESULTS"
PACKAGES = ("torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
            "unsloth", "unsloth_zoo")

_checks: list[dict] = []


def _plain(x):
    """JSON-friendly: tensors and numpy scalars to Python numbers, dtypes and the rest to str."""
    if hasattr(x, "item") and getattr(x, "numel", lambda: 1)() == 1:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return str(x)


def record(name: str, max_abs_diff, tolerance, **extra) -> dict:
    """Add one comparison; `passed` is `max_abs_diff <= tolerance`. Returns the entry."""
    max_abs_diff, tolerance = float(max_abs_diff), float(tolerance)
    entry = {
        "name": name,
        "max_abs_diff": _plain(max_abs_diff),
        "tolerance": _plain(tolerance),
        "passed": bool(max_abs_diff <= tolerance),
    }
    entry.update({k: _plain(v) for k, v in extra.items()})
    _checks.append(entry)
    return entry


def checks() -> list[dict]:
    return list(_checks)


def clear() -> None:
    _checks.clear()


def versions() -> dict:
    """Installed versions, read from package metadata (so unsloth is not imported: importing it patches
    transformers and TRL). torch's own `__version__` keeps its local tag, e.g. +cu130."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    out["python"] = platform.python_version()
    return out


def device_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001  (no CUDA runtime at all)
        pass
    return None


def write(path: str | os.PathLike | None = None) -> Path | None:
    """Write the collected checks to `path` (default: $DPO_GPU_RESULTS; nothing when neither is set)."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "device": device_name(),
        "versions": versions(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "all_passed": all(c["passed"] for c in _checks),
        "checks": list(_checks),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
