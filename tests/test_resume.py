"""Nothing lost: checkpoints, exact resume, signals, non-finite steps and the refusals (CPU, tiny Llama).

Every run goes through the command line (`dpo.train.main([...])` in-process, or `python -m dpo.train`
in a subprocess for the real signal), float32, shuffled data, LoRA dropout on (so the RNG state
matters), batch 2 x grad_accum 2 over 14 pairs: 4 steps per epoch, the last with one micro-batch,
so a resume at step 3 lands mid-epoch and then crosses an epoch boundary.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo import models, train
from dpo.run import checkpoint
from dpo.run import lifecycle
from dpo.run import folder as runfolder
from dpo.objectives import Scorer
from dpo.run.checkpoint import load_checkpoint
from dpo.cli import python_command
from dpo.schedule import lr_factor
from dpo.throughput import TIMED_FIELDS
from dpo.trainer import epoch_order
from .conftest import write_jsonl

# The command the messages print to run training again: this interpreter, by its absolute path.
TRAIN = python_command("dpo.train", [], from_anywhere=True)

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
         "rejected": f" Perhaps {3 * i + 1}, I am not sure."} for i in range(14)]


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (conftest.single_thread)."""


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def flags(model_dir, data, out, *extra, steps: int = 6) -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", str(steps),
            "--per-device-batch-size", "2", "--grad-accum", "2", "--learning-rate", "5e-3", "--lora-r", "4",
            "--max-length", "64", "--save-steps", "3", "--device", "cpu", "--no-disable-dropout",
            "--lora-dropout", "0.1", *map(str, extra)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def timeless(row: dict) -> dict:
    """A metrics row without what the wall clock sets (eval_seconds, tokens and pairs per second)."""
    return {k: v for k, v in row.items() if k != "eval_seconds" and k not in TIMED_FIELDS}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: every metrics row (but its timings) and every final adapter tensor."""
    assert [timeless(r) for r in metrics(a)] == [timeless(r) for r in metrics(b)]
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def one_line_error(capsys, rc: int, expected_rc: int = 2, after_model_load: bool = False) -> str:
    """The message: one line on stderr, no traceback (after a model load, transformers' loading bar
    may come before it)."""
    err = capsys.readouterr().err.strip()
    assert rc == expected_rc, err
    assert "Traceback" not in err, err
    if after_model_load:
        err = err.splitlines()[-1]
    assert "\n" not in err, err
    assert err.startswith("dpo: ")
    return err


class Crash(BaseException):
    """A crash no handler sees (as a kill -9 or a power cut would be)."""


def crash_before_step(monkeypatch, step: int) -> None:
    real = train.Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            raise Crash()
        return real(self)

    monkeypatch.setattr(train.Trainer, "train_step", train_step)


# --- exact resume ----------------------------------------------------------------------------


def straight_and_crashed_runs(model_dir, data, tmp_path, monkeypatch, *extra) -> tuple[Path, Path]:
    """(a 6-step run to the end, the same run crashed before step 5): the two folders a resume test compares."""
    straight = tmp_path / "straight"
    assert train.main(flags(model_dir, data, straight, *extra)) == 0
    assert len(metrics(straight)) == 6
    out = tmp_path / "crashed"
    crash_before_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(flags(model_dir, data, out, *extra))
    monkeypatch.undo()
    return straight, out


@pytest.mark.parametrize("extra", [[], ["--precompute-ref"]], ids=["reference-each-step", "precompute-ref"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_llama_dir, data, tmp_path, monkeypatch, extra):
    straight, out = straight_and_crashed_runs(tiny_llama_dir, data, tmp_path, monkeypatch, *extra)
    # Crashed before step 5: metrics.jsonl has 4 rows, the newest checkpoint is step 3.
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000003"]
    saved = load_checkpoint(out / "checkpoints" / "step-000003")
    assert saved.trainer_state["step"] == 3 and saved.trainer_state["num_tokens"] == metrics(out)[2]["num_tokens"]
    assert ((out / "checkpoints" / "step-000003" / lifecycle.REF_CACHE_FILE).is_file()) == bool(extra)
    if extra:  # the reference log-probs come from the checkpoint, not a second pass
        monkeypatch.setattr(train.Trainer, "precompute_reference",
                            lambda self, *a: pytest.fail("reference recomputed on resume"))

    assert train.main(flags(tiny_llama_dir, data, out, *extra, "--resume")) == 0
    assert_same_run(straight, out)


def test_a_resumed_run_reports_the_starting_model_as_before(tiny_llama_dir, data, tmp_path, monkeypatch):
    """--eval-dataset: eval.json's "before" (and the step-0 row) is the starting model's also after a resume,
    as in the uninterrupted run; it must not be the policy the run resumed with."""
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(flags(tiny_llama_dir, data, straight, "--eval-dataset", data)) == 0
    crash_before_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(flags(tiny_llama_dir, data, out, "--eval-dataset", data))
    monkeypatch.undo()
    assert train.main(flags(tiny_llama_dir, data, out, "--eval-dataset", data, "--resume")) == 0

    a, b = (json.loads((o / "eval.json").read_text()) for o in (straight, out))
    assert timeless(b["before"]) == timeless(a["before"]) and b["before"]["eval_rewards/margins"] == 0.0
    assert timeless(b["after"]) == timeless(a["after"])  # the resume is exact, so is what it ends with
    assert [timeless(r) for r in metrics(out) if "eval_loss" in r] == [timeless(r) for r in metrics(straight)
                                                                     if "eval_loss" in r]


def test_resume_from_a_checkpoint_into_another_folder(tiny_llama_dir, data, tmp_path, monkeypatch):
    first = tmp_path / "first"
    crash_before_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(flags(tiny_llama_dir, data, first))
    monkeypatch.undo()
    second = tmp_path / "second"
    rc = train.main(flags(tiny_llama_dir, data, second, "--resume-from", first / "checkpoints" / "step-000003"))
    assert rc == 0
    straight = tmp_path / "straight"
    assert train.main(flags(tiny_llama_dir, data, straight)) == 0
    assert_same_run(straight, second)


# --- signals ---------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes_exactly(tiny_llama_dir, data, tmp_path):
    """The real CLI in a subprocess, SIGTERM after its second step (seen in metrics.jsonl)."""
    out = tmp_path / "run"
    args = flags(tiny_llama_dir, data, out, steps=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(train.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "dpo.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    stopped_at = len(metrics(out))
    assert 2 <= stopped_at < 12
    ckpt = out / "checkpoints" / f"step-{stopped_at:06d}"
    assert last == (f"dpo: stopped by SIGTERM after step {stopped_at} of 12; checkpoint {ckpt}. "
                    f"Resume with: {TRAIN} {shlex.join(args)} --resume")
    assert load_checkpoint(ckpt).step == stopped_at
    assert not (out / "adapter").exists()

    command = shlex.split(last.split("Resume with: ", 1)[1])
    assert os.path.samefile(command[0], sys.executable) and command[1:3] == ["-m", "dpo.train"]
    assert train.main(command[3:]) == 0
    straight = tmp_path / "straight"
    assert train.main(flags(tiny_llama_dir, data, straight, steps=12)) == 0
    assert_same_run(straight, out)


def test_the_printed_resume_command_works_verbatim_from_another_folder(tiny_llama_dir, data, tmp_path, monkeypatch,
                                                                       capsys):
    """Started in one folder with relative paths (model, output dir, --config FILE naming the data) and
    stopped by SIGTERM after step 2: the printed command, run by a shell in another folder, finishes
    the run as if it had never stopped."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "model").symlink_to(tiny_llama_dir)
    (start / "pairs.jsonl").write_bytes(data.read_bytes())
    (start / "settings.json").write_text(json.dumps({"dataset": "pairs.jsonl"}))
    args = flags("model", "pairs.jsonl", "run")
    del args[args.index("--dataset"):args.index("--dataset") + 2]
    monkeypatch.chdir(start)
    send_signals(monkeypatch, 2, signal.SIGTERM)
    assert train.main(["--config", "settings.json", *args]) == 143
    command = capsys.readouterr().err.strip().splitlines()[-1].split("Resume with: ", 1)[1]
    monkeypatch.undo()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(train.__file__).resolve().parents[1])}
    done = subprocess.run(command, shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not any(elsewhere.iterdir())
    straight = tmp_path / "straight"
    assert train.main(flags(tiny_llama_dir, data, straight)) == 0
    assert_same_run(straight, start / "run")


def send_signals(monkeypatch, step: int, signum: int, again: str | None = None) -> None:
    """In-process signals. again=None / "save": the first right after optimizer step `step`, a second
    (with "save") inside the checkpoint write that follows. again="step": both at the start of step `step`
    + 1, so the second one arrives while that step runs."""
    real_step, real_save = train.Trainer.train_step, lifecycle.save_checkpoint

    def train_step(self):
        if again == "step" and self.step == step:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        row = real_step(self)
        if again != "step" and self.step == step:
            os.kill(os.getpid(), signum)
        return row

    def save_checkpoint(*a, **k):
        if again == "save":
            os.kill(os.getpid(), signum)
        return real_save(*a, **k)

    monkeypatch.setattr(train.Trainer, "train_step", train_step)
    monkeypatch.setattr(lifecycle, "save_checkpoint", save_checkpoint)


def no_hidden_leftovers(out: Path) -> None:
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_sigint_in_process_stops_after_the_step_with_130(tiny_llama_dir, data, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    send_signals(monkeypatch, 2, signal.SIGINT)
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = capfd.readouterr().err  # the "received" notice is written to fd 2 directly
    assert rc == 130
    assert "SIGINT received: finishing the current step" in err
    assert f"stopped by SIGINT after step 2 of 6; checkpoint {out / 'checkpoints' / 'step-000002'}" in err
    assert err.strip().endswith("--resume")
    assert load_checkpoint(out / "checkpoints" / "step-000002").step == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_a_second_signal_during_the_save_lets_the_save_finish_then_stops(tiny_llama_dir, data, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    send_signals(monkeypatch, 2, signal.SIGTERM, again="save")
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 143
    ckpt = out / "checkpoints" / "step-000002"
    assert err.startswith(f"dpo: stopped at once by a second SIGTERM; the last checkpoint is {ckpt} "
                          f"(step 2). Resume with: {TRAIN} ")
    assert load_checkpoint(ckpt).step == 2  # complete and verified
    no_hidden_leftovers(out)


def test_a_second_signal_during_a_step_stops_at_once(tiny_llama_dir, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    send_signals(monkeypatch, 3, signal.SIGTERM, again="step")  # both while step 4 runs
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 143
    assert f"stopped at once by a second SIGTERM; the last checkpoint is {out / 'checkpoints' / 'step-000003'}" in err
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000003"]  # no step-4 checkpoint
    no_hidden_leftovers(out)
    monkeypatch.undo()
    assert train.main(flags(tiny_llama_dir, data, out, "--resume")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


# --- non-finite steps --------------------------------------------------------------------------


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss with a non-finite gradient norm."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_step(monkeypatch, step: int, what: str) -> None:
    """Poison the policy log-prob of the first pair's chosen row in optimizer step `step` (its first
    micro-batch): a NaN loss, or with what="gradient norm" a finite loss whose gradient is NaN."""
    real_step, real_logps = train.Trainer.train_step, Scorer.completion_logps
    now = {"step": 0, "calls": 0}

    def train_step(self):
        now["step"], now["calls"] = self.step + 1, 0
        return real_step(self)

    def completion_logps(scorer, model, batch):
        out = real_logps(scorer, model, batch)
        if not torch.is_grad_enabled():  # the reference
            return out
        now["calls"] += 1
        if now["step"] == step and now["calls"] == 1:
            if what == "loss":
                out = out.clone()
                out[0] = float("nan")
            else:
                out = NanGrad.apply(out)
        return out

    monkeypatch.setattr(train.Trainer, "train_step", train_step)
    monkeypatch.setattr(Scorer, "completion_logps", completion_logps)  # every layout's plain log-probs


def first_row_of_step(step: int, cfg_seed: int = 42) -> int:
    order = epoch_order(len(ROWS), 0, cfg_seed, True)
    return order[(step - 1) * 4]  # 4 pairs per step; the first pair of the first micro-batch


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_step_stops_naming_step_rows_and_last_good_checkpoint(tiny_llama_dir, data, tmp_path,
                                                                           monkeypatch, capsys, what):
    out = tmp_path / "run"
    poison_step(monkeypatch, 2, what)
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = one_line_error(capsys, rc, train.EXIT_NONFINITE, after_model_load=True)
    ckpt = out / "checkpoints" / "step-000001"
    row = first_row_of_step(2)
    rows = (f"{row} ({data} line {row + 1})" if what == "loss"
            else ", ".join(f"{r} ({data} line {r + 1})" for r in epoch_order(len(ROWS), 0, 42, True)[4:8]))
    assert err == (f"dpo: error: non-finite {what} at step 2 (row ids {rows}); stopped before updating the weights. "
                   f"Last good checkpoint: {ckpt} (step 1). To skip such steps, resume with: {TRAIN} "
                   f"{shlex.join(flags(tiny_llama_dir, data, out))} --resume --on-nan skip")
    assert [r["step"] for r in metrics(out)] == [1]
    assert not (out / "adapter").exists()
    saved = load_checkpoint(ckpt)
    assert all(torch.isfinite(t).all() for t in saved.adapter_state.values())


def test_stop_then_resume_with_skip_equals_a_run_that_skipped(tiny_llama_dir, data, tmp_path, monkeypatch):
    """The checkpoint written at a non-finite step is exact: resuming it with --on-nan skip gives the same
    run as one that skipped from the start."""
    poison_step(monkeypatch, 5, "gradient norm")
    skipped = tmp_path / "skipped"
    assert train.main(flags(tiny_llama_dir, data, skipped, "--on-nan", "skip")) == 0
    out = tmp_path / "stopped"
    assert train.main(flags(tiny_llama_dir, data, out)) == train.EXIT_NONFINITE
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000003", "step-000004"]
    assert train.main(flags(tiny_llama_dir, data, out, "--resume", "--on-nan", "skip")) == 0
    assert_same_run(skipped, out)
    assert metrics(out)[4]["skipped"] == "non-finite gradient norm"


def test_on_nan_skip_skips_the_step_and_continues(tiny_llama_dir, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_step(monkeypatch, 2, "loss")
    rc = train.main(flags(tiny_llama_dir, data, out, "--on-nan", "skip", "--save-steps", 1, "--save-total-limit", 0))
    assert rc == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[1]["skipped"] == "non-finite loss" and rows[1]["loss"] is None
    assert all("skipped" not in r for r in rows[:1] + rows[2:])
    assert "1 skipped for a non-finite loss or gradient norm: steps [2]" in capsys.readouterr().out
    one, two = (load_checkpoint(out / "checkpoints" / f"step-00000{s}") for s in (1, 2))
    for name, t in one.adapter_state.items():  # no update at the skipped step: weights and AdamW as they were
        assert torch.equal(t, two.adapter_state[name]), name
    for k, state in one.optimizer_state["state"].items():
        assert all(torch.equal(v, two.optimizer_state["state"][k][key]) for key, v in state.items())
    assert two.trainer_state["skipped_steps"] == [2]
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


# --- refusals ------------------------------------------------------------------------------------


@pytest.fixture
def finished_run(tiny_llama_dir, data, tmp_path) -> Path:
    out = tmp_path / "run"
    assert train.main(flags(tiny_llama_dir, data, out)) == 0
    return out


@pytest.mark.parametrize("change, shown", [
    ("model", "model: "), ("dataset", "dataset: "), (["--beta", "0.2"], "beta: 0.1 -> 0.2"),
    (["--loss-type", "ipo"], 'loss_type: ["sigmoid"] -> ["ipo"]'),
])
def test_resume_with_a_changed_run_is_refused_listing_the_keys(finished_run, tiny_llama_dir, data, tmp_path, capsys,
                                                               no_model_load, change, shown):
    model_dir, data_path, extra = tiny_llama_dir, data, []
    if change == "model":
        model_dir = tmp_path / "other-model"
        model_dir.symlink_to(tiny_llama_dir)
    elif change == "dataset":
        data_path = tmp_path / "other.jsonl"
        data_path.write_bytes(data.read_bytes())
    else:
        extra = change
    rc = train.main(flags(model_dir, data_path, finished_run, *extra, "--resume"))
    err = one_line_error(capsys, rc)
    assert f"dpo: error: cannot resume the run in {finished_run}: these settings differ from its config.json: " in err
    assert shown in err


def test_resume_with_the_same_name_but_other_data_is_refused(finished_run, tiny_llama_dir, data, capsys):
    data.write_text("".join(json.dumps({**r, "chosen": r["chosen"] + "!"}) + "\n" for r in ROWS))
    rc = train.main(flags(tiny_llama_dir, data, finished_run, "--resume"))
    err = one_line_error(capsys, rc, after_model_load=True)
    assert "the training data changed since it was written (14 pairs then, 14 now; token hash" in err


def test_a_folder_holding_another_run_is_refused_unless_overwrite(finished_run, tiny_llama_dir, data, capsys,
                                                                   monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        rc = train.main(flags(tiny_llama_dir, data, finished_run))
    err = one_line_error(capsys, rc)
    assert err == (f"dpo: error: output dir {finished_run} already holds another run (metrics.jsonl; 2 checkpoint(s); "
                   "adapter/); pass --resume to continue it, --overwrite-output-dir to replace it, or choose another "
                   "folder")
    # --overwrite (alias --overwrite-output-dir) starts over: the old checkpoints are gone first.
    assert train.main(flags(tiny_llama_dir, data, finished_run, "--max-steps", "2", "--overwrite")) == 0
    assert [r["step"] for r in metrics(finished_run)] == [1, 2]
    assert [p.name for p in checkpoint.list_checkpoints(finished_run)] == ["step-000002"]


def test_a_truncated_checkpoint_is_refused_and_the_previous_one_still_loads(finished_run, tiny_llama_dir, data,
                                                                             tmp_path, capsys, no_model_load):
    latest = finished_run / "checkpoints" / "step-000006"
    weights = latest / "adapter.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    rc = train.main(flags(tiny_llama_dir, data, finished_run, "--resume"))
    err = one_line_error(capsys, rc)
    previous = finished_run / "checkpoints" / "step-000003"
    assert err == (f"dpo: error: checkpoint {latest} is incomplete or corrupted: adapter.safetensors has {size // 2} "
                   f"bytes, manifest says {size}; an earlier checkpoint may be intact: --resume-from {previous}")
    assert load_checkpoint(previous).step == 3


def test_resume_from_the_previous_checkpoint_redoes_the_later_steps_exactly(finished_run, tiny_llama_dir, data,
                                                                             tmp_path):
    before = metrics(finished_run), adapter(finished_run)
    (finished_run / "checkpoints" / "step-000006" / "adapter.safetensors").write_bytes(b"garbage")
    previous = finished_run / "checkpoints" / "step-000003"
    assert train.main(flags(tiny_llama_dir, data, finished_run, "--resume-from", previous)) == 0
    assert [timeless(r) for r in metrics(finished_run)] == [timeless(r) for r in before[0]]
    for name, t in adapter(finished_run).items():
        assert torch.equal(t, before[1][name])
    assert load_checkpoint(finished_run / "checkpoints" / "step-000006").step == 6  # rewritten, whole


def test_resume_from_an_older_checkpoint_sets_the_newer_one_aside(finished_run, tiny_llama_dir, data, capsys):
    """--resume-from step 3 of a finished 6-step run: step-000006 moves whole to checkpoints/abandoned-<time>/
    with the metrics as they were, said in one line; the redone steps write a new step-000006, the one a
    later --resume takes; the one set aside still resumes with --resume-from, with its own metrics rows."""
    old = finished_run / "checkpoints" / "step-000006"
    files = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    rows = (finished_run / "metrics.jsonl").read_text()
    assert train.main(flags(tiny_llama_dir, data, finished_run, "--resume-from",
                            finished_run / "checkpoints" / "step-000003")) == 0
    (aside,) = [p for p in (finished_run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert (f"dpo: moved 1 checkpoint(s) after step 3 (step-000006) aside to {aside} (their steps are redone; "
            "delete that folder when it is not wanted)") in capsys.readouterr().out.splitlines()
    kept = aside / "step-000006"
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == files
    assert (aside / "metrics.jsonl").read_text() == rows
    assert [p.name for p in checkpoint.list_checkpoints(finished_run)] == ["step-000003", "step-000006"]
    assert checkpoint.latest_checkpoint(finished_run) == old  # what --resume takes

    marked = [{**r, "branch": "set aside"} for r in metrics(finished_run)]
    (aside / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    assert train.main(flags(tiny_llama_dir, data, finished_run, "--resume-from", kept)) == 0
    assert metrics(finished_run) == marked


def test_a_resume_with_a_larger_max_steps_trains_to_it(finished_run, tiny_llama_dir, data, capsys):
    """A finished 6-step run resumed with --max-steps 9: steps 7 to 9 run, config.json and the checkpoint
    record 9, and the linear schedule is rebuilt over 9 steps from step 6 on: steps 7-9 run at the
    rates a 9-step schedule gives them (the first run's had decayed to 0 at its end), said in one line."""
    before = metrics(finished_run)
    assert train.main(flags(tiny_llama_dir, data, finished_run, "--resume", steps=9)) == 0
    rows = metrics(finished_run)
    assert [r["step"] for r in rows] == list(range(1, 10)) and rows[:6] == before
    assert [r["learning_rate"] for r in rows[6:]] == [5e-3 * lr_factor(s, kind="linear", warmup=0, total=9)
                                                      for s in (6, 7, 8)]
    assert json.loads((finished_run / "config.json").read_text())["max_steps"] == 9
    last = load_checkpoint(finished_run / "checkpoints" / "step-000009")
    assert last.config["max_steps"] == 9 and last.trainer_state["total_steps"] == 9
    assert ("dpo: the run now has 9 steps (it had 6): the linear learning-rate schedule is rebuilt over 9 steps "
            "and goes on from step 6: step 7 runs at 0.00167 (the first run's schedule ended at step 6)"
            in capsys.readouterr().out.splitlines())


def test_the_extended_schedule_is_the_one_a_run_planned_that_long_has(tiny_llama_dir, data, tmp_path, monkeypatch,
                                                                       capsys):
    """Crashed before step 5 of 6 (checkpoint 3), resumed with --max-steps 9: steps 4-9 run at the rates
    of a run planned for 9 steps from the start, not the 6-step schedule's."""
    out = tmp_path / "run"
    crash_before_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(flags(tiny_llama_dir, data, out))
    monkeypatch.undo()
    assert train.main(flags(tiny_llama_dir, data, out, "--resume", steps=9)) == 0
    assert "(the first run's schedule had planned 0.0025)" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert train.main(flags(tiny_llama_dir, data, straight, steps=9)) == 0
    assert [r["learning_rate"] for r in metrics(out)[3:]] == [r["learning_rate"] for r in metrics(straight)[3:]]


def test_a_max_steps_below_the_checkpoints_step_is_refused(finished_run, tiny_llama_dir, data, capsys, no_model_load):
    rc = train.main(flags(tiny_llama_dir, data, finished_run, "--resume", steps=4))
    assert one_line_error(capsys, rc) == (
        f"dpo: error: cannot resume from {finished_run / 'checkpoints' / 'step-000006'}: --max-steps 4 is below "
        "its step 6 (give --max-steps 6 or more, or start a new run in another --output-dir)")


def test_resume_without_a_checkpoint_is_refused(tiny_llama_dir, data, tmp_path, capsys, no_model_load):
    out = tmp_path / "empty"
    rc = train.main(flags(tiny_llama_dir, data, out, "--resume"))
    err = one_line_error(capsys, rc)
    assert err == (f"dpo: error: --resume: no checkpoint in {out / 'checkpoints'}; nothing to resume (run without "
                   "--resume to start a new run)")


def test_resume_and_overwrite_together_are_refused(tiny_llama_dir, data, tmp_path, capsys, no_model_load):
    rc = train.main(flags(tiny_llama_dir, data, tmp_path / "x", "--resume", "--overwrite"))
    err = one_line_error(capsys, rc)
    assert err.startswith("dpo: error: --overwrite: cannot be combined with --resume/--resume-from")


def test_an_unwritable_output_dir_is_refused_before_loading(tiny_llama_dir, data, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = train.main(flags(tiny_llama_dir, data, blocker / "out"))
    err = one_line_error(capsys, rc)
    assert err == f"dpo: error: cannot create output dir {blocker / 'out'}: Not a directory"


def test_a_full_disk_before_training_is_refused(tiny_llama_dir, data, tmp_path, capsys, no_model_load, monkeypatch):
    def full_open(path, *a, **k):
        if ".tmp-write-probe" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(runfolder, "open", full_open, raising=False)
    out = tmp_path / "out"
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = one_line_error(capsys, rc)
    assert err == f"dpo: error: output dir {out} is not writable: No space left on device"


def test_a_full_disk_at_a_save_names_the_path_and_keeps_the_previous_checkpoint(tiny_llama_dir, data, tmp_path,
                                                                                capsys, monkeypatch):
    saves = {"n": 0}
    real = checkpoint._free_bytes

    def free_bytes(path):
        saves["n"] += 1
        return 0 if saves["n"] == 2 else real(path)  # the second save (step 6) finds the disk full

    monkeypatch.setattr(checkpoint, "_free_bytes", free_bytes)
    out = tmp_path / "run"
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = one_line_error(capsys, rc, after_model_load=True)
    previous = out / "checkpoints" / "step-000003"
    assert err.startswith(f"dpo: error: cannot write checkpoint {out / 'checkpoints' / 'step-000006'}: not enough "
                          "disk space (0.0 MiB free, about ")
    assert err.endswith(f"needed); the previous checkpoint {previous} (step 3) is intact: fix that and resume with: "
                        f"{TRAIN} {shlex.join(flags(tiny_llama_dir, data, out))} --resume")
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000003"]
    no_hidden_leftovers(out)
    assert load_checkpoint(previous).step == 3
    monkeypatch.undo()
    assert train.main(flags(tiny_llama_dir, data, out, "--resume")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
