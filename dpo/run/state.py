"""A training step's state beyond the files: every random generator (so that a resumed run draws what an
unstopped one would) and the trainable tensors of a model, as plain dicts of tensors that a checkpoint
stores without pickling (dpo/run/checkpoint.py)."""

from __future__ import annotations

import random
import sys
import warnings

import torch

from dpo.run.checkpoint import CheckpointError


# --- random number generators ------------------------------------------------------------------


def capture_rng() -> dict:
    """The state of every generator a training step may draw from, as tensors and plain values.

    Python's `random`, torch's CPU generator, every CUDA device's generator (only where CUDA is
    already initialised: a run that never touched CUDA drew nothing from it, and initialising it
    here would take GPU memory from a CPU run), and numpy's global generator when numpy is imported.
    Everything is a tensor or a plain value so that rng.pt loads with weights_only=True.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
        "cuda": None,
        "numpy": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")
    if np is not None:
        ns = np.random.get_state(legacy=False)  # a dict; the legacy tuple form is the same data
        state["numpy"] = {
            "bit_generator": ns["bit_generator"],
            # uint32 words as int64: a plain integer tensor, no numpy array inside the pickle
            "key": torch.from_numpy(ns["state"]["key"].astype(np.int64)),
            "pos": int(ns["state"]["pos"]),
            "has_gauss": int(ns["has_gauss"]),
            "gauss": float(ns["gauss"]),
        }
    return state


def restore_rng(state: dict) -> None:
    """Put every generator back where capture_rng() found it, so the next draws are the same.

    A CUDA state saved on more (or fewer) GPUs than are visible now restores the devices both have
    and warns: the run then continues, but not bit-identically.
    """
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("the checkpoint holds CUDA generator states but CUDA is not available; they are not restored")
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                warnings.warn(f"the checkpoint holds the generators of {len(cuda)} CUDA device(s) but {n} are visible; "
                              f"restoring the first {min(n, len(cuda))}")
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s.cpu().to(torch.uint8), i)
    ns = state.get("numpy")
    if ns is not None:
        import numpy as np

        np.random.set_state({
            "bit_generator": ns["bit_generator"],
            "state": {"key": ns["key"].numpy().astype(np.uint32), "pos": int(ns["pos"])},
            "has_gauss": int(ns["has_gauss"]),
            "gauss": float(ns["gauss"]),
        })


# --- model glue (plain torch, no PEFT needed) ---------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes (requires_grad), by parameter name: a checkpoint's adapter_state."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def restore_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's adapter_state into the model's trainable parameters, in place.

    In place (not load_state_dict's new tensors) so the optimizer, built over these very
    parameters, keeps pointing at them. Names and shapes must match exactly: a missing or extra
    tensor means the model was built differently (other LoRA targets or rank) and resuming would
    silently train something else.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's adapter does not fit the model: {len(missing)} trainable tensor(s) missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise CheckpointError(f"the checkpoint's adapter does not fit the model: {n} has shape "
                                      f"{tuple(state[n].shape)}, the model's {tuple(p.shape)}")
            p.copy_(state[n])
