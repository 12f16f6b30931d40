"""Trackers as metric sinks: --report-to parsing, a missing package in one line, each tracker's calls
(through fake modules), a failing tracker that costs no metrics.jsonl row, and TensorBoard for real
(read back with its own reader) where the package is installed."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

import pytest

from dpo import trackers
from dpo.runfolder import RunWriter
from dpo.trackers import TrackerError, make_sinks, parse_report_to

RUN_CONFIG = {"beta": 0.1, "loss_type": ["sigmoid"], "model": "tiny", "learning_rate": 5e-4}
ROWS = [{"step": 0, "eval_loss": 0.693, "eval_rewards/accuracies": 0.0},
        {"step": 1, "loss": 0.69, "rewards/margins": 0.01, "learning_rate": 5e-4, "skipped": False},
        {"step": 2, "loss": float("nan"), "rewards/margins": 0.02, "learning_rate": 2.5e-4, "skipped": "nan loss"},
        {"step": 2, "eval_loss": 0.51, "eval_rewards/accuracies": 0.75}]


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec sees it as installed
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- --report-to -------------------------------------------------------------------------------------

def test_report_to_takes_a_comma_list_and_none():
    assert parse_report_to("tensorboard,wandb,mlflow") == ("tensorboard", "wandb", "mlflow")
    assert parse_report_to(" TensorBoard , mlflow,tensorboard") == ("tensorboard", "mlflow")
    assert parse_report_to("none") == parse_report_to("") == parse_report_to(None) == ()


@pytest.mark.parametrize("text, message", [
    ("tensorbord", "--report-to: unknown tracker 'tensorbord' (choose from tensorboard, wandb, mlflow, or none"),
    ("wandb,comet", "--report-to: unknown tracker 'comet'"),
    ("none,wandb", "--report-to: 'none' cannot be combined with a tracker"),
])
def test_report_to_refuses_unknown_names_in_one_line(text, message):
    with pytest.raises(TrackerError) as info:
        parse_report_to(text)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_without_its_package_is_one_line_naming_the_pip_command(monkeypatch, tmp_path, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec: not installed
    with pytest.raises(TrackerError) as info:
        make_sinks([name], tmp_path / "run")
    assert str(info.value) == (f"--report-to {name}: the {module} package is not installed; install it with: "
                               f"pip install {module}")
    assert not (tmp_path / "run").exists()


# --- RunWriter and its sinks -----------------------------------------------------------------------

class RecordingSink:
    def __init__(self, name="recording", fail_on_row: int | None = None):
        self.name, self.fail_on_row = name, fail_on_row
        self.calls: list[tuple] = []

    def start(self, run_config):
        self.calls.append(("start", run_config))

    def write(self, row):
        if self.fail_on_row is not None and len([c for c in self.calls if c[0] == "write"]) == self.fail_on_row:
            raise ConnectionError("tracker server went away\nsecond line")
        self.calls.append(("write", row))

    def add_file(self, path):
        self.calls.append(("add_file", path))

    def close(self):
        self.calls.append(("close",))


def test_every_sink_gets_the_config_once_every_row_and_a_close(tmp_path):
    sink = RecordingSink()
    writer = RunWriter(tmp_path / "run", sinks=[sink])
    writer.start(RUN_CONFIG)
    for row in ROWS:
        writer.append_metrics(row)
    writer.close(files=[tmp_path / "run" / "curves.png"])
    assert sink.calls == [("start", RUN_CONFIG), *[("write", r) for r in ROWS],
                          ("add_file", str(tmp_path / "run" / "curves.png")), ("close",)]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == RUN_CONFIG
    got = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert got[:2] == ROWS[:2] and math.isnan(got[2]["loss"]) and got[3] == ROWS[3]


def test_a_failing_tracker_loses_no_metrics_row_and_the_others_go_on(tmp_path, capsys):
    bad, good = RecordingSink("badtracker", fail_on_row=1), RecordingSink("good")
    writer = RunWriter(tmp_path / "run", sinks=[bad, good])
    writer.start(RUN_CONFIG)
    for row in ROWS:
        writer.append_metrics(row)
    writer.close()
    assert len(jsonl(tmp_path / "run" / "metrics.jsonl")) == len(ROWS)
    assert [c[0] for c in bad.calls] == ["start", "write", "close"]  # dropped after its failure, closed once
    assert [c for c in good.calls if c[0] == "write"] == [("write", r) for r in ROWS]
    err = capsys.readouterr().err.strip()
    assert err == (f"dpo: warning: tracker badtracker failed (ConnectionError: tracker server went away | second "
                   f"line); it gets no more rows ({tmp_path / 'run' / 'metrics.jsonl'} has every row)")


def test_a_writer_of_another_rank_gives_its_sinks_nothing(tmp_path):
    sink = RecordingSink()
    writer = RunWriter(tmp_path / "run", enabled=False, sinks=[sink])
    writer.start(RUN_CONFIG)
    writer.append_metrics(ROWS[1])
    assert sink.calls == [] and not (tmp_path / "run").exists()


# --- each tracker through a fake of its library -----------------------------------------------------

def test_wandb_runs_offline_without_a_key_and_logs_each_row_at_its_step(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def save(self, path, base_path, policy):
            calls.append(("save", path, policy))

        def finish(self):
            calls.append(("finish",))

    fake_module(monkeypatch, "wandb", init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run-7"
    writer = RunWriter(run_dir, sinks=make_sinks(parse_report_to("wandb"), run_dir))
    writer.start(RUN_CONFIG)
    for row in ROWS:
        writer.append_metrics(row)
    writer.close(files=[run_dir / "curves.png"])
    assert calls[0] == ("init", {"project": "dpo", "name": "run-7", "dir": str(run_dir), "config": RUN_CONFIG,
                                 "mode": "offline"})
    logged = [c for c in calls if c[0] == "log"]
    assert [(c[2], sorted(c[1])) for c in logged] == [
        (0, ["eval_loss", "eval_rewards/accuracies"]),
        (1, ["learning_rate", "loss", "rewards/margins"]),  # "skipped" is a flag, not a metric
        (2, ["learning_rate", "loss", "rewards/margins"]),
        (2, ["eval_loss", "eval_rewards/accuracies"])]
    assert logged[1][1]["loss"] == 0.69 and math.isnan(logged[2][1]["loss"])
    assert calls[-2:] == [("save", str(run_dir / "curves.png"), "now"), ("finish",)]


def test_wandb_goes_online_when_a_key_is_set(monkeypatch, tmp_path):
    seen = {}
    fake_module(monkeypatch, "wandb", init=lambda **kw: seen.update(kw) or types.SimpleNamespace())
    monkeypatch.setenv("WANDB_API_KEY", "k")
    make_sinks(["wandb"], tmp_path)[0].start(RUN_CONFIG)
    assert seen["mode"] is None


class FakeMlflowClient:
    instances: list = []

    def __init__(self, tracking_uri):
        self.tracking_uri, self.calls = tracking_uri, []
        FakeMlflowClient.instances.append(self)

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        return "7"

    def create_run(self, experiment_id, run_name):
        self.calls.append(("create_run", experiment_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_param(self, run_id, key, value):
        self.calls.append(("param", key, value))

    def log_metric(self, run_id, key, value, step):
        self.calls.append(("metric", key, value, step))

    def log_artifact(self, run_id, path):
        self.calls.append(("artifact", path))

    def set_terminated(self, run_id):
        self.calls.append(("terminated", run_id))


@pytest.mark.parametrize("env_uri", [None, "http://tracking.example:5000"])
def test_mlflow_logs_the_config_as_params_and_each_metric_at_its_step(monkeypatch, tmp_path, env_uri):
    FakeMlflowClient.instances = []
    fake_module(monkeypatch, "mlflow")
    fake_module(monkeypatch, "mlflow.tracking", MlflowClient=FakeMlflowClient)
    if env_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    writer = RunWriter(run_dir, sinks=make_sinks(["mlflow"], run_dir))
    writer.start({**RUN_CONFIG, "long": "x" * 600})
    for row in ROWS:
        writer.append_metrics(row)
    writer.close(files=[run_dir / "curves.png"])
    (client,) = FakeMlflowClient.instances
    assert client.tracking_uri == (env_uri or (run_dir / "mlruns").absolute().as_uri())
    assert client.calls[:2] == [("create_experiment", "dpo"), ("create_run", "7", "run")]
    params = {c[1]: c[2] for c in client.calls if c[0] == "param"}
    assert params["beta"] == "0.1" and params["loss_type"] == '["sigmoid"]' and params["model"] == "tiny"
    assert len(params["long"]) == 500
    metrics = [c[1:] for c in client.calls if c[0] == "metric"]
    assert ("loss", 0.69, 1) in metrics and ("eval_loss", 0.51, 2) in metrics and ("eval_loss", 0.693, 0) in metrics
    assert len(metrics) == sum(len(trackers.scalars(r)) for r in ROWS)
    assert client.calls[-2:] == [("artifact", str(run_dir / "curves.png")), ("terminated", "r1")]


def test_tensorboard_writes_each_scalar_at_its_step(monkeypatch, tmp_path):
    written = []

    class SummaryWriter:
        def __init__(self, log_dir):
            written.append(("open", log_dir))

        def add_text(self, tag, text, step):
            written.append(("text", tag, json.loads(text.replace("\n    ", "\n")), step))

        def add_scalar(self, tag, value, step):
            written.append(("scalar", tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append(("close",))

    fake_module(monkeypatch, "tensorboard")
    fake_module(monkeypatch, "torch.utils.tensorboard", SummaryWriter=SummaryWriter)
    run_dir = tmp_path / "run"
    writer = RunWriter(run_dir, sinks=make_sinks(["tensorboard"], run_dir))
    writer.start(RUN_CONFIG)
    writer.append_metrics(ROWS[1])
    writer.close()
    assert written == [("open", str(run_dir / "tensorboard")), ("text", "config", RUN_CONFIG, 0),
                       ("scalar", "loss", 0.69, 1), ("scalar", "rewards/margins", 0.01, 1),
                       ("scalar", "learning_rate", 5e-4, 1), ("close",)]


# --- TensorBoard for real -------------------------------------------------------------------------

def test_tensorboard_event_files_read_back_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    writer = RunWriter(run_dir, sinks=make_sinks(["tensorboard"], run_dir))
    writer.start(RUN_CONFIG)
    for row in ROWS:
        writer.append_metrics(row)
    writer.close()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    read_back = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    expected = {(k, r["step"]): v for r in jsonl(run_dir / "metrics.jsonl") for k, v in trackers.scalars(r).items()}
    assert read_back.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard stores float32
        assert read_back[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key


# --- through python -m dpo.train --------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, run_config):
        self.calls.append(("start", run_config))

    def write(self, row):
        self.calls.append(("write", row))

    def add_file(self, path):
        self.calls.append(("add_file", path))

    def close(self):
        self.calls.append(("close",))


def test_report_to_sends_every_row_of_a_training_run_to_the_tracker(monkeypatch, tmp_path, tiny_llama_dir):
    from dpo import train

    from .conftest import write_jsonl

    recorder = Recorder()
    monkeypatch.setattr(trackers, "make_sinks", lambda names, run_dir: [recorder] if names == ("mlflow",) else [])
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no!"}
                                              for i in range(4)])
    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(out),
                       "--max-steps", "2", "--per-device-batch-size", "2", "--max-length", "32", "--lora-r", "4",
                       "--device", "cpu", "--report-to", "mlflow"]) == 0
    kinds = [c[0] for c in recorder.calls]
    assert kinds[0] == "start" and recorder.calls[0][1]["report_to"] == "mlflow"
    assert [c[1] for c in recorder.calls if c[0] == "write"] == jsonl(out / "metrics.jsonl")
    assert ("add_file", str(out / "curves.png")) in recorder.calls and kinds[-1] == "close"


def test_report_to_a_missing_package_refuses_the_run_in_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys,
                                                                                    no_model_load):
    from dpo import train

    from .conftest import write_jsonl

    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    out = tmp_path / "run"
    assert train.main(["--dataset", str(data), "--output-dir", str(out), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dpo: error: --report-to wandb: the wandb package is not installed; install it with: "
                   "pip install wandb")
    assert not out.exists()


def test_report_to_an_unknown_tracker_is_refused_with_the_flags(capsys, no_model_load):
    from dpo import train

    assert train.main(["--dataset", "x.jsonl", "--report-to", "comet"]) == 2
    assert capsys.readouterr().err.startswith("dpo: error: --report-to: unknown tracker 'comet'")
