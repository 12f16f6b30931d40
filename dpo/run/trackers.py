"""Trackers: TensorBoard, Weights & Biases and MLflow as metric sinks of the run (`--report-to`).

Each sink gets the run config once (start), every metric row that goes to metrics.jsonl (write:
train rows and `eval_` rows, by their "step"), files worth keeping such as curves.png (add_file),
and a close. dpo.run.folder.RunWriter drives them; a sink that raises is dropped there with a
warning, and metrics.jsonl keeps every row.

- tensorboard: event files in OUTPUT_DIR/tensorboard/ (torch.utils.tensorboard, which needs the
  `tensorboard` package); the config as a text entry, curves.png as an image. Read them with
  `tensorboard --logdir OUTPUT_DIR`.
- wandb: a W&B run in OUTPUT_DIR/wandb/, offline unless WANDB_API_KEY or WANDB_MODE says otherwise
  (offline means no network at all: wandb-core's own error reports are turned off too); project
  WANDB_PROJECT or "dpo"; the config as the run's config, curves.png among the run's files. Read an
  offline run with `wandb leet OUTPUT_DIR/wandb`, upload it with `wandb sync`.
- mlflow: an MLflow run in experiment MLFLOW_EXPERIMENT_NAME or "dpo", stored in the file store
  OUTPUT_DIR/mlruns unless MLFLOW_TRACKING_URI names another store; the config as the run's
  parameters, curves.png as an artifact. MLflow 3 keeps its file store only on request
  (MLFLOW_ALLOW_FILE_STORE=true, which this sink sets for its own default store): read it with
  `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:OUTPUT_DIR/mlruns` (the UI needs the
  full `mlflow` package; the extra brings its client, mlflow-skinny).

All three come with `pip install -e '.[trackers]'`.

parse_report_to and make_sinks check everything (names, installed packages) before training starts
and touch no file: a run refused later leaves its output folder as it found it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from dpo.config import TRACKERS, TrackerError, parse_report_to

# The module each tracker imports (mlflow: from the mlflow-skinny package).
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXTRA_HINT = "pip install -e '.[trackers]'"
MLFLOW_EXPERIMENT = "dpo"
PARAM_VALUE_MAX = 500  # MLflow keeps longer values since 2.x, older stores refuse past 500 characters
MLFLOW_PARAMS_PER_BATCH = 100  # MLflow's limit on the params of one log_batch call


def check_installed(names: Sequence[str]) -> None:
    """One-line TrackerError naming the extra to install, for the first tracker whose package is missing."""
    for name in names:
        module = _MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"--report-to {name}: the {module} package is not installed; install the trackers "
                               f"extra: {EXTRA_HINT}")


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
        self.last_step = 0

    def start(self, run_config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # indented: shown as code

    def write(self, row: dict) -> None:
        step = self.last_step = _step(row)
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # the rows are on disk as they come, like metrics.jsonl's

    def add_file(self, path: str) -> None:
        """A PNG (curves.png) to the Images tab at the last step; TensorBoard keeps no other kind of file."""
        if Path(path).suffix.lower() != ".png":
            return
        from matplotlib.image import imread

        self.writer.add_image(Path(path).name, imread(path), self.last_step, dataformats="HWC")
        self.writer.flush()

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
        if offline:  # else wandb-core reports its own errors over the network, even in an offline run
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        # create_new: a run of its own even where the caller has a W&B run open (ours must not finish theirs)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpo"), name=self.run_dir.name,
                              dir=str(self.run_dir), config=run_config, mode="offline" if offline else None,
                              reinit="create_new")

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=_step(row))

    def add_file(self, path: str) -> None:
        self.run.save(str(path), base_path=str(Path(path).parent), policy="now", glob=False)

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
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow 3 opens a file store only when asked to
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri())
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", MLFLOW_EXPERIMENT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
        params = [Param(key, _param_value(value)) for key, value in run_config.items()]
        for i in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i: i + MLFLOW_PARAMS_PER_BATCH])

    def write(self, row: dict) -> None:
        from mlflow.entities import Metric

        step, now = _step(row), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(row).items()]
        if metrics:  # one call per row: one request to a tracking server, not one per metric
            self.client.log_batch(self.run_id, metrics=metrics)

    def add_file(self, path: str) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)
