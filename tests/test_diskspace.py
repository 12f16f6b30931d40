"""The disk space a run writes, checked before the model loads (dpo.run.diskspace): the estimate against what
a run really writes, the decision for each amount of free space (faked), and real small disks (tmpfs,
where this machine lets us mount one): no room for checkpoints, no room at all, a disk that fills up
during the run (CPU, tiny Llama)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo import train
from dpo.run import checkpoint
from dpo.run import diskspace
from dpo.run.checkpoint import CheckpointError
from dpo.flags import config_from_args

from .conftest import write_jsonl
from .test_resume import ROWS, metrics, one_line_error

CPU = torch.device("cpu")
DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (conftest.single_thread)."""


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def flags(model_dir, data, out, *extra, steps: int = 4, lora_r: int = 4) -> list[str]:
    """No --save-steps unless in `extra`: one checkpoint, at the end."""
    return ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", str(steps),
            "--per-device-batch-size", "2", "--learning-rate", "5e-3", "--lora-r", str(lora_r), "--max-length", "64",
            "--device", "cpu", *map(str, extra)]


def sizes_for(args: list[str]) -> diskspace.RunSizes:
    cfg = config_from_args(args)
    return diskspace.sizes_for_run(cfg, diskspace.trainable_shapes(cfg, CPU), num_rows=len(ROWS), start_step=0)


def fake_free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(real(p).total, real(p).total - free, free))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- how many checkpoints, and their sizes (pure) ----------------------------------------------------

@pytest.mark.parametrize("start, total, save_steps, written", [
    (0, 10, 3, 4),  # 3, 6, 9 and the end
    (0, 9, 3, 3),  # the end is a multiple: not twice
    (0, 10, 0, 1),  # only at the end
    (6, 10, 3, 2),  # resumed at 6: 9 and 10
    (5, 6, 3, 1),
    (10, 10, 3, 0),  # nothing left to train
])
def test_checkpoints_written_counts_every_save_and_the_end(start, total, save_steps, written):
    assert diskspace.checkpoints_written(start, total, save_steps) == written


@pytest.mark.parametrize("written, keep, at_once", [(4, 2, 3), (4, 1, 2), (4, 0, 4), (1, 2, 1), (3, 2, 3), (0, 2, 0)])
def test_checkpoints_at_once_are_the_kept_ones_and_the_one_being_written(written, keep, at_once):
    assert diskspace.checkpoints_at_once(written, keep) == at_once


def test_the_optimizer_state_estimate_covers_adamws_real_state():
    params = [torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]
    opt = torch.optim.AdamW(params)
    sum(p.float().sum() for p in params).backward()
    opt.step()
    real = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    estimate = diskspace.optimizer_state_bytes("adamw_torch", [(p.numel(), p.element_size()) for p in params])
    assert real <= estimate <= real + 4 * len(params)


def test_the_trainable_tensors_are_the_built_models_without_loading_it(tiny_llama_dir, data):
    from dpo.build import build_model

    for extra in ([], ["--lora-targets", "q_proj", "v_proj", "--lora-r", "3"], ["--dtype", "bfloat16"]):
        cfg = config_from_args(["--model", str(tiny_llama_dir), "--dataset", str(data), "--device", "cpu", *extra])
        model, _ = build_model(cfg, CPU)
        built = sorted((p.numel(), p.element_size()) for p in model.parameters() if p.requires_grad)
        assert sorted(diskspace.trainable_shapes(cfg, CPU)) == built, extra


def test_with_the_unsloth_backend_unsloth_is_imported_before_transformers(tiny_llama_dir, data, tmp_path):
    """Unsloth patches transformers and peft when imported, so it must come first (models.load_unsloth);
    the estimate builds the model before that does. A stand-in unsloth records what was there before it."""
    import sys

    (tmp_path / "unsloth.py").write_text("import sys\nCAME_AFTER = sorted({'transformers', 'peft'} & set(sys.modules))\n")
    code = (f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r})\n"
            "from dpo import models\nfrom dpo.run import diskspace\nfrom dpo.flags import config_from_args\n"
            "models.pick_backend = lambda requested: 'unsloth'\n"
            f"cfg = config_from_args(['--model', {str(tiny_llama_dir)!r}, '--dataset', {str(data)!r}])\n"
            "assert diskspace.trainable_shapes(cfg, torch.device('cpu'))\n"
            "import unsloth; print('came after', unsloth.CAME_AFTER)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "came after []"


# --- the estimate against a real run -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_unsloth_backend_the_estimate_is_the_checkpoint_the_run_writes(model_dir, data, tmp_path):
    """`python -m dpo.train --backend unsloth --load-in-4bit` on the GPU suite's Llama: the estimate (Unsloth
    imported first, the LoRA built on the meta device) runs inside the run, which trains and checkpoints;
    the checkpoint's trainable tensors hold exactly the bytes the estimate counted."""
    import json
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--save-steps", "1", "--per-device-batch-size", "2", "--lora-r", "8", "--max-length", "64",
            "--device", "cuda", "--backend", "unsloth", "--load-in-4bit", "--memory-budget", "none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "TQDM_DISABLE": "1",
           "UNSLOTH_COMPILE_LOCATION": str(tmp_path / "unsloth-cache")}
    done = subprocess.run([sys.executable, "-m", "dpo.train", *args], capture_output=True, text=True, timeout=600,
                          cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not enough disk space" not in done.stderr
    code = ("import json, torch\nfrom dpo.run import diskspace\nfrom dpo.flags import config_from_args\n"
            f"cfg = config_from_args({args!r})\n"
            "print(json.dumps(diskspace.trainable_shapes(cfg, torch.device('cuda'))))\n")
    estimate = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root,
                              env=env)
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    shapes = json.loads(estimate.stdout.strip().splitlines()[-1])
    saved = load_file(str(checkpoint.list_checkpoints(out)[-1] / checkpoint.ADAPTER_FILE))
    assert sum(t.numel() * t.element_size() for t in saved.values()) == sum(n * s for n, s in shapes)
    assert len(checkpoint.list_checkpoints(out)) >= 1 and (out / "adapter").is_dir()


def test_the_estimate_covers_what_a_run_really_writes(tiny_llama_dir, data, tmp_path, monkeypatch):
    """Checkpoints every 2 of 7 steps keeping 2: 3 at once (pruning waits for the new one), each no
    larger than estimated; adapter/ and the rest no larger than estimated; the estimate not far above."""
    out = tmp_path / "run"
    args = flags(tiny_llama_dir, data, out, "--save-steps", 2, "--eval-dataset", data, steps=7, lora_r=1024)
    at_once, largest = [], []
    real_prune = checkpoint._prune

    def prune(output_dir, keep_last, just_written):
        ckpts = checkpoint.list_checkpoints(output_dir)
        at_once.append(len(ckpts))
        largest.append(max(folder_bytes(p) for p in ckpts))
        real_prune(output_dir, keep_last, just_written)

    monkeypatch.setattr(checkpoint, "_prune", prune)
    assert train.main(args) == 0
    sizes = sizes_for(args)
    assert sizes.at_once == max(at_once) == 3
    assert max(largest) <= sizes.checkpoint <= 1.3 * max(largest) + 2**20
    assert folder_bytes(out / "adapter") <= sizes.adapter
    rest = folder_bytes(out) - folder_bytes(out / "adapter") - folder_bytes(out / "checkpoints")
    assert rest <= sizes.outputs
    assert folder_bytes(out) <= sizes.total
    saved = load_file(str(checkpoint.list_checkpoints(out)[-1] / checkpoint.ADAPTER_FILE))
    assert sum(t.numel() * t.element_size() for t in saved.values()) == sum(
        n * s for n, s in diskspace.trainable_shapes(config_from_args(args), CPU))


# --- the decision, for each amount of free space (faked) ---------------------------------------------

SIZES = diskspace.RunSizes(checkpoint=10 * 2**20, at_once=3, adapter=4 * 2**20, outputs=2**20)  # 35 MiB in all


def test_a_disk_with_room_for_everything_keeps_the_checkpoints(capsys):
    assert diskspace.room_for_checkpoints(SIZES, SIZES.total, "out", 2, 2) is True
    assert capsys.readouterr().err == ""


def test_no_room_for_checkpoints_turns_them_off_with_one_warning_line(capsys):
    assert diskspace.room_for_checkpoints(SIZES, 20 * 2**20, "out", 0, 2) is False
    err = capsys.readouterr().err
    assert err == ("dpo: warning: not enough disk space in out for a checkpoint: 20.0 MiB free, about 35.0 MiB needed "
                   "(3 checkpoints of about 10.0 MiB at once, the adapter about 4.0 MiB, metrics and plots about "
                   "1.0 MiB); going on with checkpoints off: the adapter is saved at the end, but a stopped run "
                   "cannot be resumed (free 15.0 MiB more, or choose another --output-dir, to have them)\n")


@pytest.mark.parametrize("free, fits", [
    (26 * 2**20, "--save-total-limit 1 (25.0 MiB) or no --save-steps (one checkpoint, at the end)"),
    (16 * 2**20, "no --save-steps (one checkpoint, at the end)"),
    (6 * 2**20, "no --save-steps (no checkpoints: only the adapter)"),
])
def test_checkpoints_asked_for_that_do_not_fit_are_refused_saying_what_fits(free, fits):
    with pytest.raises(CheckpointError) as info:
        diskspace.room_for_checkpoints(SIZES, free, "out", 5, 2)
    assert str(info.value) == (
        f"not enough disk space for the checkpoints asked for in out: {free / 2**20:.1f} MiB free, about 35.0 MiB "
        f"needed with --save-steps 5 and --save-total-limit 2 (3 checkpoints of about 10.0 MiB at once, the adapter "
        f"about 4.0 MiB, metrics and plots about 1.0 MiB); this fits: {fits}; or free some space or choose another "
        f"--output-dir")


def test_no_room_for_the_adapter_is_refused():
    with pytest.raises(CheckpointError) as info:
        diskspace.room_for_checkpoints(SIZES, 4 * 2**20, "out", 0, 2)
    assert str(info.value) == ("not enough disk space for this run in out: 4.0 MiB free, at least 5.0 MiB needed even "
                               "without checkpoints (the adapter about 4.0 MiB, metrics and plots about 1.0 MiB); "
                               "free some space or choose another --output-dir")


# --- through the command line, free space faked ------------------------------------------------------

def test_checkpoints_asked_for_without_room_are_refused_before_the_model_loads(tiny_llama_dir, data, tmp_path,
                                                                              capsys, monkeypatch, no_model_load):
    out = tmp_path / "deep" / "run"
    args = flags(tiny_llama_dir, data, out, "--save-steps", 2)
    sizes = sizes_for(args)
    fake_free(monkeypatch, sizes.without_checkpoints + sizes.checkpoint // 2)
    err = one_line_error(capsys, train.main(args))
    assert err.startswith(f"dpo: error: not enough disk space for the checkpoints asked for in {out}: ")
    assert "this fits: no --save-steps (no checkpoints: only the adapter)" in err
    assert not (tmp_path / "deep").exists()


def test_no_room_for_a_checkpoint_goes_on_without_one_and_saves_the_adapter(tiny_llama_dir, data, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "run"
    args = flags(tiny_llama_dir, data, out)
    sizes = sizes_for(args)
    fake_free(monkeypatch, sizes.without_checkpoints + sizes.checkpoint // 2)
    assert train.main(args) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("dpo: warning: not enough disk space")]
    assert len(warnings) == 1 and "going on with checkpoints off" in warnings[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    summary = [line for line in captured.out.splitlines() if " steps in " in line]
    assert summary[-1].endswith(f"adapter saved to {out / 'adapter'}; checkpoint none")


def test_a_model_that_cannot_be_built_on_the_meta_device_is_left_to_each_save(tiny_llama_dir, data, tmp_path, capsys,
                                                                             monkeypatch):
    def fails(cfg, device):
        raise NotImplementedError("this architecture cannot be built on the meta device\nsecond line")

    monkeypatch.setattr(diskspace, "trainable_shapes", fails)
    fake_free(monkeypatch, 2**20)  # would be refused, were the sizes known
    out = tmp_path / "run"
    assert train.main(flags(tiny_llama_dir, data, out, "--save-steps", 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpo: warning: cannot estimate the disk space this run needs (this architecture cannot be "
                          "built on the meta device); each checkpoint still checks the disk before it is written\n")
    assert err.strip().splitlines()[-1].startswith(
        f"dpo: error: cannot write checkpoint {out / 'checkpoints' / 'step-000002'}: not enough disk space")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# --- real small disks ----------------------------------------------------------------------------------

@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(size_bytes) -> a fresh folder on a real tmpfs of that size, where this machine lets us mount."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root; the tests with faked free space cover the same decisions")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 4096 * 4096}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the tests with faked free space cover "
                        f"the same decisions")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_real_disk_without_room_for_a_checkpoint_trains_and_saves_the_adapter(tiny_llama_dir, data, mount_tmpfs,
                                                                                capsys):
    args = flags(tiny_llama_dir, data, "OUT")
    sizes = sizes_for(args)
    disk = mount_tmpfs(sizes.without_checkpoints + sizes.checkpoint // 2)
    out = disk / "run"
    assert train.main([str(out) if a == "OUT" else a for a in args]) == 0
    assert "going on with checkpoints off" in capsys.readouterr().err
    assert load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not (out / "checkpoints").exists()


def test_a_real_disk_without_room_for_the_adapter_is_refused_before_the_model_loads(tiny_llama_dir, data,
                                                                                    mount_tmpfs, capsys,
                                                                                    no_model_load):
    disk = mount_tmpfs(2 * 2**20)
    out = disk / "run"
    err = one_line_error(capsys, train.main(flags(tiny_llama_dir, data, out)))
    assert err.startswith(f"dpo: error: not enough disk space for this run in {out}: 2.0 MiB free, at least ")
    assert list(disk.iterdir()) == []


def test_a_real_disk_that_fills_up_during_the_run_still_gets_the_adapter(tiny_llama_dir, data, mount_tmpfs, capsys):
    """Room for everything at the start; after the last step a filler leaves room for the adapter and
    the outputs but not the final checkpoint: the run finishes (evaluation, card) with a warning. LoRA
    r=2048 makes a checkpoint (about 3x the adapter's tensors) larger than the adapter with the tokenizer."""
    args = flags(tiny_llama_dir, data, "OUT", "--eval-dataset", data, lora_r=2048)
    sizes = sizes_for(args)
    assert sizes.without_checkpoints < sizes.checkpoint
    disk = mount_tmpfs(sizes.total + 2**20)
    out = disk / "run"
    cfg = config_from_args([str(out) if a == "OUT" else a for a in args])

    def fill(row: dict) -> None:
        if row["step"] == cfg.max_steps:
            leave = sizes.without_checkpoints
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * (diskspace.free_bytes(disk) - leave))

    result = train.run(cfg, hooks=train.RunHooks(step_done=fill))
    err = capsys.readouterr().err
    assert result["checkpoint"] is None
    assert f"dpo: warning: cannot write checkpoint {out / 'checkpoints' / 'step-000004'}: not enough disk space" in err
    assert f"; the adapter is saved to {out / 'adapter'} as usual" in err
    assert load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert (out / "adapter" / "README.md").is_file() and (out / "eval.json").is_file()
    assert not checkpoint.list_checkpoints(out)
