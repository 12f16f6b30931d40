"""Trackers: TensorBoard, Weights & Biases and MLflow as metric sinks of the run (`--report-to`).

Each sink gets the run config once (start), every metric row that goes to metrics.jsonl (write:
train rows and `eval_` rows, by their "step"), files worth keeping such as curves.png (add_file),
and a close. dpo.runfolder.RunWriter drives them; a sink that raises is dropped there with a
warning, and metrics.jsonl keeps every row.

- tensorboard: event files in OUTPUT_DIR/tensorboard/ (torch.utils.tensorboard, which needs the
  `tensorboard` package); the config as a text entry.
- wandb: a W&B run in OUTPUT_DIR/wandb/, offline unless WANDB_API_KEY or WANDB_MODE says otherwise;
  the config as the run's config.
- mlflow: an MLflow run in experiment "dpo", stored under OUTPUT_DIR/mlruns unless MLFLOW_TRACKING_URI
  names another store; the config as the run's parameters.

parse_report_to and make_sinks check everything (names, installed packages) before training starts
and touch no file: a run refused later leaves its output folder as it found it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The module each tracker imports, and the command that installs it.
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
             "wandb": ("wandb", "pip install wandb"),
             "mlflow": ("mlflow", "pip install mlflow")}
MLFLOW_EXPERIMENT = "dpo"
PARAM_VALUE_MAX = 500  # MLflow keeps longer values since 2.x, older stores refuse past 500 characters


class TrackerError(ValueError):
    """A --report-to value that cannot work; str() is the one line to show."""


def parse_report_to(text: str | None) -> tuple[str, ...]:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); "none", "" or None -> (). One-line TrackerError
    for an unknown name, or for "none" beside a tracker."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    for name in names:
        if name != "none" and name not in TRACKERS:
            raise TrackerError(f"--report-to: unknown tracker {name!r} (choose from {', '.join(TRACKERS)}, "
                               "or none; several with commas: tensorboard,wandb)")
    if "none" in names and len(set(names)) > 1:
        raise TrackerError(f"--report-to: 'none' cannot be combined with a tracker (got {text!r})")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_installed(names: Sequence[str]) -> None:
    """One-line TrackerError naming the pip command for the first tracker whose package is missing."""
    for name in names:
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"--report-to {name}: the {module} package is not installed; install it with: "
                               f"{install}")


def make_sinks(names: Sequence[str], run_dir: str | os.PathLike) -> list:
    """The sinks for `names` (from parse_report_to), writing under `run_dir`; nothing is opened yet (each
    opens at its start(run_config)). Refuses a missing package in one line before training starts."""
    check_installed(names)
    kinds = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
    return [kinds[name](run_dir) for name in names]


def scalars(row: dict) -> dict[str, float]:
    """The row's numeric metrics (not "step", no flags or text), as floats; NaN and inf kept as they are."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _step(row: dict) -> int:
    return int(row["step"])


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, run_dir: str | os.PathLike):
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = None

    def start(self, run_config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # indented: shown as code

    def write(self, row: dict) -> None:
        step = _step(row)
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # the rows are on disk as they come, like metrics.jsonl's

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    name = "wandb"

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.run = None

    def start(self, run_config: dict) -> None:
        import wandb

        offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpo"), name=self.run_dir.name,
                              dir=str(self.run_dir), config=run_config, mode="offline" if offline else None)

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=_step(row))

    def add_file(self, path: str) -> None:
        self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _param_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= PARAM_VALUE_MAX else text[: PARAM_VALUE_MAX - 3] + "..."


class MlflowSink:
    name = "mlflow"

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.client = self.run_id = None

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir.absolute() / "mlruns").as_uri()

    def start(self, run_config: dict) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri())
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(MLFLOW_EXPERIMENT))
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
        for key, value in run_config.items():
            self.client.log_param(self.run_id, key, _param_value(value))

    def write(self, row: dict) -> None:
        step = _step(row)
        for key, value in scalars(row).items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def add_file(self, path: str) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
