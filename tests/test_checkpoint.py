"""dpo.run.checkpoint: exact resume, atomic writes, verified and pickle-free loading.

No model is needed: a couple of "LoRA" parameters, a real AdamW with a few steps behind it (so its
state holds real moments) and the loop's own LambdaLR stand in for a training run.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo.run import checkpoint as ckpt
from dpo.run import folder as runfolder
from dpo.run.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from dpo.run.state import capture_rng, restore_rng, restore_trainable_state, trainable_state
from dpo.run.folder import RESUME_LOCKED_KEYS, check_output_dir, config_differences, trim_metrics
from dpo.config import TrainConfig
from dpo.schedule import build_optimizer, build_scheduler, continue_schedule, lr_factor

CONFIG = TrainConfig(dataset="pairs.jsonl").to_dict()


# --- a tiny stand-in for a LoRA model and its training loop ------------------------------------


class TinyLora(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.frozen = torch.nn.Parameter(torch.randn(4, 4, generator=g), requires_grad=False)
        self.lora_A = torch.nn.Parameter(torch.randn(2, 4, generator=g))
        self.lora_B = torch.nn.Parameter(torch.randn(4, 2, generator=g))
        self.norm_bias = torch.nn.Parameter(torch.randn(4, generator=g))  # lands in the no-decay group

    def forward(self, x):
        return x @ (self.frozen + self.lora_B @ self.lora_A).T + self.norm_bias


def build(seed: int = 0, total_steps: int = 10):
    model = TinyLora(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, name="adamw_torch", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    sched = build_scheduler(opt, kind="linear", warmup=2, total_steps=total_steps)
    return model, opt, sched


def train_step(model, opt, sched, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)  # the data of step `step`
    x = torch.randn(3, 4, generator=g)
    loss = (model(x) ** 2).mean() + torch.nn.functional.dropout(model(x), 0.5).mean()  # draws from torch's RNG
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def save(out: Path, model, opt, sched, step: int, **kw) -> Path:
    return save_checkpoint(
        out, step,
        adapter_state=trainable_state(model),
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        trainer_state={"step": step, "num_tokens": 123 * step, "epoch": 0},
        config=CONFIG,
        rng_state=capture_rng(),
        **kw,
    )


def trained(out: Path, steps: int, **kw):
    """A model trained `steps` steps with a checkpoint after each; returns (model, opt, sched, paths)."""
    torch.manual_seed(0)
    model, opt, sched = build()
    paths = []
    for s in range(1, steps + 1):
        train_step(model, opt, sched, s)
        paths.append(save(out, model, opt, sched, s, **kw))
    return model, opt, sched, paths


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_is_bit_identical_and_training_continues_identically(tmp_path):
    model, opt, sched, paths = trained(tmp_path, 3)
    loaded = load_checkpoint(paths[-1])

    assert loaded.step == 3 and loaded.path == paths[-1]
    assert loaded.trainer_state == {"step": 3, "num_tokens": 369, "epoch": 0}
    assert loaded.config == json.loads(json.dumps(CONFIG))
    for name, t in trainable_state(model).items():
        assert loaded.adapter_state[name].dtype == t.dtype and torch.equal(loaded.adapter_state[name], t), name
    assert "frozen" not in loaded.adapter_state
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(loaded.optimizer_state["state"][i][k], v), (i, k)
    assert loaded.optimizer_state["param_groups"] == opt.state_dict()["param_groups"]
    assert loaded.scheduler_state == sched.state_dict()

    # A second run, built fresh (same frozen base, other LoRA init), restored from the checkpoint,
    # must take the very same next steps.
    model2, opt2, sched2 = build(seed=0)
    with torch.no_grad():
        for p in trainable_state(model2).values():
            p.add_(1.0)
    restore_trainable_state(model2, loaded.adapter_state)
    opt2.load_state_dict(loaded.optimizer_state)
    sched2.load_state_dict(loaded.scheduler_state)
    restore_rng(loaded.rng_state)  # dropout draws the same masks
    for s in (4, 5, 6):
        train_step(model2, opt2, sched2, s)
    restore_rng(loaded.rng_state)  # the uninterrupted run continues from the moment of the save
    for s in (4, 5, 6):
        train_step(model, opt, sched, s)
    for (n, p), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, p2), n
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_rng_round_trip_gives_the_same_next_numbers(tmp_path):
    random.seed(1)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    torch.manual_seed(2)
    torch.randn(3)
    np.random.seed(3)
    np.random.randn(1)  # numpy's cached Gaussian too

    def draw():
        return ([random.random(), random.gauss(0, 1)], torch.rand(5), torch.randn(5), np.random.randn(4))

    state = capture_rng()
    model, opt, sched = build()
    path = save(tmp_path, model, opt, sched, 1)  # through rng.pt as well
    first = draw()
    draw()  # move every generator on
    restore_rng(load_checkpoint(path).rng_state)
    second = draw()
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert np.array_equal(first[3], second[3])
    restore_rng(state)  # the in-memory state works the same
    assert draw()[0] == first[0]


def test_restore_trainable_state_refuses_a_model_of_another_shape():
    model, _, _ = build()
    state = trainable_state(model)
    with pytest.raises(CheckpointError, match="missing"):
        restore_trainable_state(model, {k: v for k, v in state.items() if k != "lora_A"})
    with pytest.raises(CheckpointError, match="lora_A has shape"):
        restore_trainable_state(model, {**state, "lora_A": torch.zeros(3, 4)})


def test_layout_and_manifest(tmp_path):
    model, opt, sched, paths = trained(tmp_path, 1)
    path = paths[0]
    assert path == tmp_path / "checkpoints" / "step-000001"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1
    assert set(manifest["files"]) == {"adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                      "trainer_state.json", "config.json"}
    for name, entry in manifest["files"].items():
        assert (path / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_extra_files_are_written_inside_and_verified(tmp_path):
    def write_adapter(folder: Path):
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)

    model, opt, sched = build()
    path = save(tmp_path, model, opt, sched, 1, extra_files={"adapter": write_adapter})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"]["adapter/adapter_model.safetensors"]["bytes"] == 100
    load_checkpoint(path)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 99)
    with pytest.raises(CheckpointError, match="adapter/adapter_model.safetensors has 99 bytes, manifest says 100"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="plain new name"):
        save(tmp_path, model, opt, sched, 2, extra_files={"../escape": write_adapter})
    with pytest.raises(ValueError, match="plain new name"):
        save(tmp_path, model, opt, sched, 2, extra_files={"manifest.json": write_adapter})


# --- listing and pruning ------------------------------------------------------------------------


def test_keep_last_prunes_the_oldest(tmp_path):
    trained(tmp_path, 5, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).name == "step-000005"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_keep_last_never_removes_the_checkpoint_just_written(tmp_path):
    model, opt, sched = build()
    for s in (10, 20):
        save(tmp_path, model, opt, sched, s)
    save(tmp_path, model, opt, sched, 15, keep_last=1)  # e.g. resumed from an older checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000015"]


def test_saving_a_step_again_replaces_it(tmp_path):
    model, opt, sched = build()
    save(tmp_path, model, opt, sched, 1)
    with torch.no_grad():
        model.lora_A.add_(1.0)
    path = save(tmp_path, model, opt, sched, 1)
    assert torch.equal(load_checkpoint(path).adapter_state["lora_A"], model.lora_A)
    assert len(list_checkpoints(tmp_path)) == 1


def test_list_checkpoints_sorts_by_step_and_ignores_incomplete_and_temporary(tmp_path):
    assert list_checkpoints(tmp_path / "nothing") == [] and latest_checkpoint(tmp_path) is None
    model, opt, sched = build()
    for s in (9, 1000000, 100):  # a seven-digit step still sorts by number
        save(tmp_path, model, opt, sched, s)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-002000-1-ab").mkdir()  # a crash mid-save
    (root / "step-003000").mkdir()  # no manifest
    (root / "notes.txt").write_text("hi")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000009", "step-000100", "step-1000000"]
    save(tmp_path, model, opt, sched, 101)
    assert not (root / ".tmp-step-002000-1-ab").exists()  # the next save clears a crash's leftovers


# --- damaged checkpoints ------------------------------------------------------------------------


def _truncate(path: Path):
    f = path / "adapter.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 10)
    return rf"adapter\.safetensors has {size - 10} bytes, manifest says {size}"


def _delete_manifest(path: Path):
    (path / "manifest.json").unlink()
    return r"manifest\.json is missing"


def _flip_bytes(path: Path):
    f = path / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return r"optimizer\.pt has sha256 [0-9a-f]{12}\.\.\., manifest says [0-9a-f]{12}"


def _delete_file(path: Path):
    (path / "rng.pt").unlink()
    return r"rng\.pt is missing"


def _garble_manifest(path: Path):
    (path / "manifest.json").write_text("{not json")
    return r"manifest\.json cannot be read"


def _forge_manifest_layout(path: Path):
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["config.json"]["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    return r"manifest\.json cannot be read \(unexpected layout\)"


@pytest.mark.parametrize("damage", [_truncate, _delete_manifest, _flip_bytes, _delete_file, _garble_manifest,
                                    _forge_manifest_layout])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_still_loads(tmp_path, damage):
    _, _, _, (first, second) = trained(tmp_path, 2)
    pattern = damage(second)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(second)
    message = str(info.value)
    assert message.startswith(f"checkpoint {second} is incomplete or corrupted: ")
    import re

    assert re.search(pattern, message), message
    assert load_checkpoint(first).step == 1
    if damage is _delete_manifest:
        assert latest_checkpoint(tmp_path) == first  # an unfinished save is not a checkpoint


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope'} does not exist"):
        load_checkpoint(tmp_path / "nope")


# --- crashes, full disks, permissions -----------------------------------------------------------


def _assert_only(tmp_path: Path, names: list[str]):
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == names  # no temp folder, nothing half-written
    for name in names:
        load_checkpoint(root / name)


def test_a_crash_inside_a_writer_leaves_nothing_under_a_real_name(tmp_path, monkeypatch):
    model, opt, sched, _ = trained(tmp_path, 1)
    real = ckpt._write_torch

    def crash_on_scheduler(path, obj):
        if path.name == "scheduler.pt":
            raise RuntimeError("killed mid-write")
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_torch", crash_on_scheduler)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save(tmp_path, model, opt, sched, 2)
    _assert_only(tmp_path, ["step-000001"])
    monkeypatch.undo()

    def bad_writer(folder: Path):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"12")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model, opt, sched, 2, extra_files={"adapter": bad_writer})
    _assert_only(tmp_path, ["step-000001"])


def test_a_crash_while_re_saving_a_step_keeps_no_half_checkpoint(tmp_path, monkeypatch):
    model, opt, sched, _ = trained(tmp_path, 1)
    monkeypatch.setattr(ckpt, "_write_adapter", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        save(tmp_path, model, opt, sched, 1)
    _assert_only(tmp_path, ["step-000001"])  # the old step-1 was not touched: the failure came first


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    model, opt, sched, _ = trained(tmp_path, 1)
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, model, opt, sched, 2)
    final = tmp_path / "checkpoints" / "step-000002"
    assert f"cannot write checkpoint {final}: not enough disk space (0.0 MiB free" in str(info.value)
    _assert_only(tmp_path, ["step-000001"])


@pytest.mark.parametrize("where", ["write", "replace"])
def test_disk_full_while_writing_gives_a_checkpoint_error_naming_the_path(tmp_path, monkeypatch, where):
    model, opt, sched, _ = trained(tmp_path, 1)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "write":
        monkeypatch.setattr(ckpt, "_write_adapter", enospc)
    else:
        monkeypatch.setattr(ckpt.os, "replace", enospc)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, model, opt, sched, 2)
    monkeypatch.undo()
    final = tmp_path / "checkpoints" / "step-000002"
    assert str(info.value) == f"cannot write checkpoint {final}: No space left on device"
    assert isinstance(info.value.__cause__, OSError)
    _assert_only(tmp_path, ["step-000001"])


def test_a_failed_rename_while_re_saving_a_step_keeps_the_old_one(tmp_path, monkeypatch):
    model, opt, sched, (path,) = trained(tmp_path, 1)
    before = load_checkpoint(path).adapter_state
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-step-"):  # only the new folder's rename fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with torch.no_grad():
        model.lora_A.add_(1.0)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: Input/output error"):
        save(tmp_path, model, opt, sched, 1)
    monkeypatch.undo()
    _assert_only(tmp_path, ["step-000001"])
    assert torch.equal(load_checkpoint(path).adapter_state["lora_A"], before["lora_A"])


def _deny_under(monkeypatch, folder: Path):
    """Make os.mkdir and open() fail with EACCES under `folder`, as for a non-root user on a 0o500 folder."""
    real_mkdir, real_open = os.mkdir, open

    def mkdir(path, *a, **k):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *a, **k)

    def fake_open(path, *a, **k):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(ckpt.os, "mkdir", mkdir)
    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)
    monkeypatch.setattr(runfolder, "open", fake_open, raising=False)  # check_output_dir's write probe


def test_unwritable_checkpoint_folder_gives_a_checkpoint_error(tmp_path, monkeypatch):
    model, opt, sched, _ = trained(tmp_path, 1)
    _deny_under(monkeypatch, tmp_path / "checkpoints")
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, model, opt, sched, 2)
    monkeypatch.undo()
    assert str(info.value).startswith(f"cannot write checkpoint {tmp_path / 'checkpoints' / 'step-000002'}: "
                                      "Permission denied")
    _assert_only(tmp_path, ["step-000001"])


def test_unwritable_output_dir_for_real(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, which writes into a 0o500 folder anyway; "
                    "test_unwritable_*_gives_* simulate the refusal instead")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=f"output dir {out} is not writable: Permission denied"):
            check_output_dir(out, CONFIG, resume=False, overwrite=False)
        model, opt, sched = build()
        with pytest.raises(CheckpointError, match="Permission denied"):
            save(out, model, opt, sched, 1)
    finally:
        out.chmod(0o700)


def test_unwritable_output_dir_gives_a_clear_error(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    _deny_under(monkeypatch, out)
    with pytest.raises(CheckpointError, match=f"output dir {out} is not writable: Permission denied"):
        check_output_dir(out, CONFIG, resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match=f"cannot create output dir {out / 'sub'}: Permission denied"):
        check_output_dir(out / "sub", CONFIG, resume=False, overwrite=False)


# --- no pickle ----------------------------------------------------------------------------------

EXECUTED: list[str] = []


def _mark_executed(note):
    EXECUTED.append(note)
    return {}


class Payload:
    def __reduce__(self):
        return (_mark_executed, ("the pickle ran code",))


def _rewrite_manifest(path: Path):
    """Forge a manifest that matches the files as they are now (an attacker would)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["bytes"] = (path / name).stat().st_size
        entry["sha256"] = ckpt._sha256(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_every_torch_load_uses_weights_only(tmp_path, monkeypatch):
    _, _, _, (path,) = trained(tmp_path, 1)
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(path)
    assert calls == [True, True, True]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_with_an_arbitrary_object_is_refused(tmp_path):
    _, _, _, (path,) = trained(tmp_path, 1)
    good = (path / "optimizer.pt").read_bytes()
    with open(path / "optimizer.pt", "wb") as f:
        torch.save({"state": Payload()}, f)
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"checkpoint {path} cannot be loaded: optimizer.pt is refused by "
                               "torch.load(weights_only=True): Unsupported global: GLOBAL "
                               f"{__name__}._mark_executed was not an allowed global by default")
    # nothing ran, though the file really is a pickle that runs code when loaded without weights_only
    assert EXECUTED == []
    torch.load(path / "optimizer.pt", weights_only=False)
    assert EXECUTED == ["the pickle ran code"]
    EXECUTED.clear()

    (path / "optimizer.pt").write_bytes(good)
    (path / "rng.pt").write_bytes(pickle.dumps(Payload()))  # a plain pickle, not even torch's zip format
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=r"rng\.pt is refused"):
        load_checkpoint(path)
    assert EXECUTED == []


def test_a_state_that_would_not_load_is_refused_at_save_time(tmp_path):
    model, opt, sched = build()
    with pytest.raises(CheckpointError, match=r"scheduler_state\['x'\]: a builtins.frozenset"):
        save_checkpoint(tmp_path, 1, adapter_state=trainable_state(model), optimizer_state=opt.state_dict(),
                        scheduler_state={"x": frozenset()}, trainer_state={}, config=CONFIG, rng_state=capture_rng())
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = np.float64(0.1)  # a float subclass pickles as numpy's scalar
    with pytest.raises(CheckpointError, match=r"optimizer_state\['param_groups'\]\[0\]\['lr'\].*numpy"):
        save_checkpoint(tmp_path, 1, adapter_state=trainable_state(model), optimizer_state=state,
                        scheduler_state=sched.state_dict(), trainer_state={}, config=CONFIG, rng_state=capture_rng())
    with pytest.raises(CheckpointError, match="not JSON-able"):
        save_checkpoint(tmp_path, 1, adapter_state=trainable_state(model), optimizer_state=opt.state_dict(),
                        scheduler_state=sched.state_dict(), trainer_state={"x": object()}, config=CONFIG,
                        rng_state=capture_rng())
    assert list_checkpoints(tmp_path) == []


def test_every_value_kind_accepted_at_save_time_loads_with_weights_only(tmp_path):
    from collections import OrderedDict

    odd = {"t": torch.arange(3), "p": torch.nn.Parameter(torch.ones(2)), "i": 1, "f": 1.5, "b": True, "c": 1j,
           "s": "x", "y": b"x", "n": None, "l": [1], "tu": (1, 2), "se": {1},
           "od": OrderedDict(a=1), "dt": torch.float16, "dev": torch.device("cpu"), "sz": torch.Size([2]), 3: "int key"}
    model, opt, sched = build()
    path = save_checkpoint(tmp_path, 1, adapter_state=trainable_state(model), optimizer_state=opt.state_dict(),
                           scheduler_state=odd, trainer_state={}, config=CONFIG, rng_state=capture_rng())
    loaded = load_checkpoint(path).scheduler_state
    assert set(loaded) == set(odd) and torch.equal(loaded["t"], odd["t"]) and loaded["se"] == {1}


# --- resuming safely ----------------------------------------------------------------------------


def test_a_schedule_over_a_new_total_goes_on_from_the_restored_step(tmp_path):
    """A 6-step run (linear, warmup 2) extended to 10 after step 4: from the restore on, every step runs at
    the rate the 10-step schedule gives for that step, the first one included (the restored state alone
    keeps the 6-step schedule's rate for it, as HF Trainer's resume does)."""
    model, opt, sched = build(total_steps=6)
    for s in range(1, 5):
        train_step(model, opt, sched, s)
    model2, opt2, sched2 = build(total_steps=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr()[0] == 1e-2 * lr_factor(4, kind="linear", warmup=2, total=6)
    continue_schedule(sched2)
    for step in range(4, 10):  # 0-based: the 5th to the 10th step
        rate = 1e-2 * lr_factor(step, kind="linear", warmup=2, total=10)
        assert sched2.get_last_lr() == [rate, rate] and [g["lr"] for g in opt2.param_groups] == [rate, rate]
        train_step(model2, opt2, sched2, step + 1)


def test_config_differences():
    saved = {**CONFIG, "beta": 0.1, "loss_type": ["sigmoid"], "warmup_steps": 0}
    current = {**CONFIG, "beta": 0.2, "loss_type": ("sigmoid",), "warmup_steps": 0.0, "device": "cuda",
               "dataset": "other.jsonl"}
    assert config_differences(saved, current, RESUME_LOCKED_KEYS) == [
        'dataset: "pairs.jsonl" -> "other.jsonl"',
        "beta: 0.1 -> 0.2",
    ]
    assert config_differences({"a": 1}, {"b": [1, 2]}, ["a", "b", "c"]) == ["a: 1 -> (absent)", "b: (absent) -> [1, 2]"]
    assert config_differences(saved, saved, RESUME_LOCKED_KEYS) == []


def test_resume_locked_keys_are_config_fields():
    assert set(RESUME_LOCKED_KEYS) <= set(CONFIG), set(RESUME_LOCKED_KEYS) - set(CONFIG)
    for free in ("device", "dtype", "backend", "output_dir", "gradient_checkpointing", "logprobs"):
        assert free not in RESUME_LOCKED_KEYS


def test_check_output_dir_accepts_a_new_or_empty_or_same_config_folder(tmp_path):
    check_output_dir(tmp_path / "a" / "b", CONFIG, resume=False, overwrite=False)
    assert not (tmp_path / "a").exists()  # probed and left as found: a refused run leaves no folder
    same = tmp_path / "same"
    same.mkdir()
    (same / "config.json").write_text(json.dumps({**CONFIG, "device": "cpu"}))  # a crash before step 1
    (same / "metrics.jsonl").write_text("")
    (same / "README.md").write_text("notes")
    check_output_dir(same, {**CONFIG, "device": "cuda"}, resume=False, overwrite=False)


def test_check_output_dir_refuses_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError, match=rf"output dir {out} already holds another run \(metrics\.jsonl\); "
                                              "pass --resume to continue it, --overwrite-output-dir"):
        check_output_dir(out, CONFIG, resume=False, overwrite=False)
    check_output_dir(out, CONFIG, resume=True, overwrite=False)
    check_output_dir(out, CONFIG, resume=False, overwrite=True)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**CONFIG, "beta": 0.5}))
    with pytest.raises(CheckpointError, match=r"a different config\.json \(beta: 0\.5 -> 0\.1\)"):
        check_output_dir(other, CONFIG, resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match=rf"cannot resume the run in {other}: .*beta: 0\.5 -> 0\.1"):
        check_output_dir(other, CONFIG, resume=True, overwrite=False)
    check_output_dir(other, CONFIG, resume=False, overwrite=True)

    with pytest.raises(CheckpointError, match="contradict"):
        check_output_dir(out, CONFIG, resume=True, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=f"output dir {tmp_path / 'file'} is a file"):
        check_output_dir(tmp_path / "file", CONFIG, resume=False, overwrite=False)


def test_check_output_dir_with_checkpoints_and_overwrite(tmp_path):
    trained(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"2 checkpoint\(s\)"):
        check_output_dir(tmp_path, CONFIG, resume=False, overwrite=False)
    check_output_dir(tmp_path, CONFIG, resume=True, overwrite=False)
    assert len(list_checkpoints(tmp_path)) == 2
    check_output_dir(tmp_path, CONFIG, resume=False, overwrite=True)
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None  # no stale resume later


def test_trim_metrics_keeps_the_steps_a_resume_will_not_redo(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_metrics(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert trim_metrics(tmp_path / "absent.jsonl", 3) == 0
