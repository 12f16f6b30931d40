"""Trackers as metric sinks: --report-to parsing, a missing package in one line naming the extra, a
failing tracker that costs no metrics.jsonl row, and each tracker for real, read back with its own
reader: TensorBoard's EventAccumulator, W&B's `wandb leet inspect` of the offline run's .wandb log,
MLflow's MlflowClient. Each compares every (metric, step) with metrics.jsonl, the config and curves.png;
one training run does so for all three at once."""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dpo.run import trackers
from dpo.run.folder import RunWriter
from dpo.run.trackers import TrackerError, make_sinks, parse_report_to

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
def test_a_tracker_without_its_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec: not installed
    with pytest.raises(TrackerError) as info:
        make_sinks([name], tmp_path / "run")
    assert str(info.value) == (f"--report-to {name}: the {module} package is not installed; install the trackers "
                               "extra: pip install -e '.[trackers]'")
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


# --- each tracker read back with its own reader ------------------------------------------------------

def expected_numbers(run_dir: Path) -> dict[tuple[str, int], float]:
    """(metric, step) -> value for every number in the run's metrics.jsonl: what each tracker must hold."""
    return {(k, r["step"]): v for r in jsonl(run_dir / "metrics.jsonl") for k, v in trackers.scalars(r).items()}


def assert_same_numbers(read_back: dict, expected: dict, rel: float = 0.0) -> None:
    assert sorted(read_back) == sorted(expected)
    for key, value in expected.items():
        assert read_back[key] == pytest.approx(value, rel=rel, abs=0.0, nan_ok=True), key


def tensorboard_read(run_dir: Path) -> tuple[dict, dict, list]:
    """TensorBoard's EventAccumulator on OUTPUT_DIR/tensorboard: the scalars, the config text, the images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    numbers = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    (config_event,) = events.Tensors("config/text_summary")
    config = json.loads(config_event.tensor_proto.string_val[0].decode().replace("\n    ", "\n"))
    return numbers, config, [(tag, events.Images(tag)) for tag in events.Tags()["images"]]


def wandb_read(run_dir: Path) -> tuple[dict, dict, list, Path]:
    """The offline run's .wandb transaction log through W&B's own reader (`wandb leet inspect --json`, which
    runs wandb-core): its history as (metric, step) -> value, its config, its files, and the run folder."""
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    numbers = {}
    for item in (r["history"]["item"] for r in records if r["type"] == "history"):
        numbers.update({(k, item["_step"]): float(v) for k, v in item.items() if not k.startswith("_")})  # "NaN"
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    files = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    return numbers, config, files, log.parent


def mlflow_read(tracking_uri: str, experiment: str = "dpo"):
    """MLflow's own client on the store: the one run's (metric, step) -> value, its params, its artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    run_id = run.info.run_id
    numbers = {(key, m.step): m.value for key in run.data.metrics for m in client.get_metric_history(run_id, key)}
    artifacts = {a.path: Path(client.download_artifacts(run_id, a.path)).read_bytes()
                 for a in client.list_artifacts(run_id)}
    return run, numbers, run.data.params, artifacts


def write_rows(run_dir: Path, report_to: str, config: dict = RUN_CONFIG) -> bytes:
    """ROWS through a RunWriter with these trackers, and a curves.png for them to keep; its bytes."""
    writer = RunWriter(run_dir, sinks=make_sinks(parse_report_to(report_to), run_dir))
    writer.start(config)
    for row in ROWS:
        writer.append_metrics(row)
    curves = run_dir / "curves.png"
    from dpo.run.plots import plot_curves

    plot_curves(run_dir / "metrics.jsonl", curves)
    writer.close(files=[curves])
    return curves.read_bytes()


@pytest.fixture
def offline_env(monkeypatch):
    """No tracker key or server: what a user without an account has. The sinks' own os.environ settings are
    undone after the test."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ERROR_REPORTING", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)


def test_tensorboard_event_files_read_back_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install -e '.[trackers]')")
    run_dir = tmp_path / "run"
    write_rows(run_dir, "tensorboard")
    numbers, config, images = tensorboard_read(run_dir)
    assert_same_numbers(numbers, expected_numbers(run_dir), rel=1e-6)  # TensorBoard stores float32
    assert config == RUN_CONFIG
    ((tag, (image,)),) = images
    assert tag == "curves.png" and image.encoded_image_string.startswith(b"\x89PNG")


def test_wandb_offline_run_read_back_equals_metrics_jsonl(tmp_path, offline_env):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install -e '.[trackers]')")
    run_dir = tmp_path / "run"
    curves = write_rows(run_dir, "wandb")
    numbers, config, files, wandb_run = wandb_read(run_dir)
    assert_same_numbers(numbers, expected_numbers(run_dir))  # float64 both: exactly equal
    assert config == RUN_CONFIG
    assert "curves.png" in files and (wandb_run / "files" / "curves.png").read_bytes() == curves
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # offline: wandb-core reports nothing either


def test_mlflow_file_store_in_the_run_folder_reads_back_equal_to_metrics_jsonl(tmp_path, offline_env):
    pytest.importorskip("mlflow", reason="the mlflow package is not installed (pip install -e '.[trackers]')")
    run_dir = tmp_path / "run"
    curves = write_rows(run_dir, "mlflow", {**RUN_CONFIG, "long": "x" * 600})
    run, numbers, params, artifacts = mlflow_read((run_dir / "mlruns").absolute().as_uri())
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert_same_numbers(numbers, expected_numbers(run_dir))
    assert params == {**{k: trackers._param_value(v) for k, v in RUN_CONFIG.items()}, "long": "x" * 497 + "..."}
    assert params["beta"] == "0.1" and params["loss_type"] == '["sigmoid"]' and params["model"] == "tiny"
    assert artifacts == {"curves.png": curves}


def test_mlflow_goes_to_the_store_mlflow_tracking_uri_names(tmp_path, offline_env, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow package is not installed (pip install -e '.[trackers]')")
    store = (tmp_path / "elsewhere").absolute().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's own file store: their opt-in to give
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    run_dir = tmp_path / "run"
    write_rows(run_dir, "mlflow")
    assert not (run_dir / "mlruns").exists()
    _, numbers, _, artifacts = mlflow_read(store, experiment="mine")
    assert_same_numbers(numbers, expected_numbers(run_dir))
    assert list(artifacts) == ["curves.png"]


@pytest.mark.parametrize("env", [{"WANDB_API_KEY": "k"}, {"WANDB_MODE": "online"}, {"WANDB_MODE": "disabled"}])
def test_wandb_leaves_the_mode_to_wandb_when_a_key_or_mode_is_set(monkeypatch, tmp_path, offline_env, env):
    # A fake: the real online path needs W&B's servers.
    seen = {}
    fake_module(monkeypatch, "wandb", init=lambda **kw: seen.update(kw) or types.SimpleNamespace())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    make_sinks(["wandb"], tmp_path)[0].start(RUN_CONFIG)
    assert seen["mode"] is None and "WANDB_ERROR_REPORTING" not in os.environ


# --- through python -m dpo.train --------------------------------------------------------------------

def test_report_to_all_three_trackers_hold_a_training_run_equal_to_metrics_jsonl(tmp_path, tiny_llama_dir,
                                                                                  offline_env):
    for module in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(module, reason=f"the {module} package is not installed (pip install -e '.[trackers]')")
    from dpo import train

    from .conftest import write_jsonl

    pairs = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no!"} for i in range(4)]
    data, held_out = write_jsonl(tmp_path / "d.jsonl", pairs), write_jsonl(tmp_path / "e.jsonl", pairs[:2])
    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--eval-dataset", str(held_out),
                       "--output-dir", str(out), "--max-steps", "2", "--per-device-batch-size", "2",
                       "--max-length", "32", "--lora-r", "4", "--device", "cpu",
                       "--report-to", "tensorboard,wandb,mlflow"]) == 0
    expected, config = expected_numbers(out), json.loads((out / "config.json").read_text())
    curves = (out / "curves.png").read_bytes()
    assert {step for _, step in expected} == {0, 1, 2} and ("eval_loss", 0) in expected and ("eval_loss", 2) in expected
    assert config["report_to"] == "tensorboard,wandb,mlflow"

    tb_numbers, tb_config, tb_images = tensorboard_read(out)
    assert_same_numbers(tb_numbers, expected, rel=1e-6)
    assert tb_config == config
    assert [tag for tag, _ in tb_images] == ["curves.png"]

    wandb_numbers, wandb_config, files, wandb_run = wandb_read(out)
    assert_same_numbers(wandb_numbers, expected)
    assert wandb_config == config
    assert (wandb_run / "files" / "curves.png").read_bytes() == curves

    run, mlflow_numbers, params, artifacts = mlflow_read((out / "mlruns").absolute().as_uri())
    assert_same_numbers(mlflow_numbers, expected)
    assert params == {k: trackers._param_value(v) for k, v in config.items()} and artifacts == {"curves.png": curves}

def test_report_to_a_missing_package_refuses_the_run_in_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys,
                                                                                    no_model_load):
    from dpo import train

    from .conftest import write_jsonl

    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not installed (and only wandb)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    out = tmp_path / "run"
    assert train.main(["--dataset", str(data), "--output-dir", str(out), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dpo: error: --report-to wandb: the wandb package is not installed; install the trackers extra: "
                   "pip install -e '.[trackers]'")
    assert not out.exists()


def test_report_to_an_unknown_tracker_is_refused_with_the_flags(capsys, no_model_load):
    from dpo import train

    assert train.main(["--dataset", "x.jsonl", "--report-to", "comet"]) == 2
    assert capsys.readouterr().err.startswith("dpo: error: --report-to: unknown tracker 'comet'")
