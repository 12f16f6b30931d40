"""What a new user hits first (issue 17): config-file types, the printed resume command, Ctrl-C before
the first step, the CPU thread count and the help of the default run."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest

from dpo import build, train
from dpo.config import TrainConfig, config_from_args
from dpo.run.lifecycle import Commands, TrainingStopped

from .conftest import write_jsonl

ROWS = [{"prompt": f"Question {i}?", "chosen": f" yes {i}", "rejected": f" no {i} no"} for i in range(8)]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- 1. config files are type-checked --------------------------------------------------------


def test_config_file_values_are_converted_to_the_fields_types(tmp_path, data):
    # PyYAML reads 5e-6 as a string; "no" must turn shuffling off, not on; one loss type is a list of one.
    path = write(tmp_path, "c.yaml", f'dataset: {data}\nlearning_rate: 5e-6\nbeta: "0.2"\nshuffle: "no"\n'
                                     "loss_type: ipo\nmax_steps: 10.0\nmax_prompt_length: null\nthreads: '2'\n")
    cfg = config_from_args(["--config", path])
    assert cfg.learning_rate == 5e-6 and isinstance(cfg.learning_rate, float)
    assert cfg.beta == 0.2
    assert cfg.shuffle is False
    assert cfg.loss_type == ["ipo"]
    assert cfg.max_steps == 10 and isinstance(cfg.max_steps, int)
    assert cfg.max_prompt_length is None
    assert cfg.threads == 2
    assert cfg.run_dict()["shuffle"] is False  # what config.json records


def test_a_json_config_file_converts_the_same_way(tmp_path, data):
    path = write(tmp_path, "c.json", '{"dataset": "%s", "beta": "0.1", "shuffle": "yes", "loss_weights": "1"}' % data)
    cfg = config_from_args(["--config", path])
    assert cfg.beta == 0.1 and cfg.shuffle is True and cfg.loss_weights == [1.0]


@pytest.mark.parametrize("line, message", [
    ("max_steps: ten", "--config: max_steps: 'ten' is not a whole number in "),
    ("max_steps: 2.5", "--config: max_steps: 2.5 is not a whole number in "),
    ("shuffle: maybe", "--config: shuffle: 'maybe' is not true or false in "),
    ("beta: [0.1]", "--config: beta: [0.1] is not a number in "),
    ("learning_rate: true", "--config: learning_rate: True is not a number in "),
])
def test_a_config_value_of_the_wrong_type_is_one_line_before_any_model_loads(tmp_path, data, capsys, line, message,
                                                                             no_model_load):
    path = write(tmp_path, "c.yaml", f"dataset: {data}\n{line}\n")
    rc = train.main(["--config", path, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"dpo: error: {message}"), err
    assert err.endswith(path)


def test_a_negative_number_is_a_value_not_an_unknown_flag(capsys, data, no_model_load):
    rc = train.main(["--dataset", str(data), "--learning-rate", "-1e-5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "dpo: error: --learning-rate: must be >= 0, got -1e-05"


# --- 2. the printed resume command works when copied ---------------------------------------------


def test_the_default_runs_resume_command_names_its_output_dir_and_interpreter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(output_dir="runs/default-20261202-120000")
    line = Commands(cfg, argv=[]).resume()
    words = shlex.split(line)
    assert os.path.isabs(words[0]) and os.path.samefile(words[0], sys.executable)
    assert words[1:] == ["-m", "dpo.train", "--output-dir", os.path.join(os.getcwd(), "runs/default-20261202-120000"),
                         "--resume"]


def test_a_given_output_dir_is_not_repeated_in_the_printed_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(output_dir="x")
    assert shlex.split(Commands(cfg, argv=["--output-dir", "x", "--max-steps", "3"]).restart())[1:] == [
        "-m", "dpo.train", "--output-dir", os.path.join(os.getcwd(), "x"), "--max-steps", "3", "--overwrite"]


def test_every_path_in_the_printed_command_is_absolute_and_names_stay_names(tmp_path, monkeypatch):
    """Each path-valued flag (the TrainConfig fields marked `path`, and --config) in either spelling is
    printed absolute; a hub name and a builtin: task stay as typed; --resume-from is left out."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    here = os.getcwd()
    argv = ["--model", "m", "--dataset=d.jsonl", "--eval-dataset", "builtin:sentiment:eval", "--adapter", "~/a",
            "--config", "c.yaml", "--output-dir", "o", "--resume-from", "o/checkpoints/step-000002", "--beta", "0.2"]
    words = shlex.split(Commands(TrainConfig(output_dir="o"), argv).resume())[3:]
    assert words == ["--model", f"{here}/m", "--dataset", f"{here}/d.jsonl", "--eval-dataset", "builtin:sentiment:eval",
                     "--adapter", os.path.expanduser("~/a"), "--config", f"{here}/c.yaml", "--output-dir", f"{here}/o",
                     "--beta", "0.2", "--resume"]
    hub = ["--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--dataset", "trl-lib/ultrafeedback_binarized"]
    assert shlex.split(Commands(TrainConfig(output_dir="o"), hub).resume())[3:7] == hub


def test_a_path_set_in_a_config_file_is_printed_as_an_absolute_flag(tmp_path, monkeypatch):
    """--config FILE naming a relative dataset (read from the starting folder): the command names it too."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(dataset="d.jsonl", model="HuggingFaceTB/SmolLM2-135M-Instruct", output_dir="o")
    words = shlex.split(Commands(cfg, ["--config", "c.yaml"]).resume())[3:]
    here = os.getcwd()
    assert words == ["--config", f"{here}/c.yaml", "--dataset", f"{here}/d.jsonl", "--output-dir", f"{here}/o",
                     "--resume"]


def test_config_json_records_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = TrainConfig(dataset="d.jsonl", eval_dataset="builtin:sentiment:eval", output_dir="o").run_dict()
    here = os.getcwd()
    assert (run["dataset"], run["eval_dataset"], run["output_dir"], run["model"], run["adapter"]) == (
        f"{here}/d.jsonl", "builtin:sentiment:eval", f"{here}/o", TrainConfig().model, None)


def test_the_printed_default_run_command_resumes_that_run(tmp_path, monkeypatch):
    """--output-dir given with no --dataset: the default run's settings, in that folder (not a new one)."""
    seen = []
    monkeypatch.setattr(train, "run", lambda cfg, argv=None: seen.append(cfg))
    assert train.main(["--output-dir", str(tmp_path / "d"), "--resume"]) == 0
    (cfg,) = seen
    assert cfg.output_dir == str(tmp_path / "d") and cfg.resume and cfg.max_steps == 8


# --- 4. Ctrl-C before the first step ---------------------------------------------------------------


def test_a_signal_before_the_first_step_stops_at_once_without_a_checkpoint(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(out), max_steps=4,
                      per_device_batch_size=2, max_length=64, lora_r=4, device="cpu")
    hooks = train.RunHooks(model_built=lambda model: os.kill(os.getpid(), signal.SIGINT),
                           step_done=lambda row: pytest.fail("a step ran after the signal"))
    with pytest.raises(TrainingStopped) as stopped:
        train.run(cfg, argv=[], hooks=hooks)
    assert stopped.value.exit_code == 130
    assert str(stopped.value).startswith("stopped at once by SIGINT before the first step; no checkpoint was "
                                         "written. Start over with: ")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


# --- 5. CPU threads -----------------------------------------------------------------------------------


def test_cpu_threads_are_the_usable_cores_whatever_the_load_average(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0), raising=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert build.cpu_threads(0) == cores
    assert build.cpu_threads(0, ranks=cores) == 1
    assert build.cpu_threads(3) == 3


def test_the_thread_count_is_printed_at_start(tiny_llama_dir, data, tmp_path, capsys):
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                      per_device_batch_size=2, max_length=64, lora_r=4, device="cpu", threads=1)
    train.run(cfg)
    assert "dpo: 1 CPU thread(s) per process (--threads to change)" in capsys.readouterr().out


# --- 8. the help says what the default run changes -------------------------------------------------


def test_train_help_names_the_default_runs_settings():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run([sys.executable, "-m", "dpo.train", "--help"], capture_output=True, text=True, env=env,
                           timeout=120).stdout
    text = " ".join(shown.split())
    assert "With no --dataset: the built-in default run" in text
    assert "--learning-rate 0.0005" in text and "--max-steps 8" in text
    assert "(default: 1e-06)" in text  # the dataclass default, shown for --learning-rate


def test_a_finished_runs_adapter_carries_a_model_card(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(out), max_steps=1,
                      per_device_batch_size=2, max_length=64, lora_r=4, device="cpu", beta=0.25)
    train.run(cfg)
    card = (out / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card  # PEFT's blank template is replaced
    assert str(tiny_llama_dir) in card and "0.25" in card and "dpo.train" in card


def test_the_reference_precompute_shows_a_progress_bar_when_it_is_slow(tiny_llama_dir, data, tmp_path, capsys,
                                                                          monkeypatch):
    from dpo import progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)  # as if the phase ran longer than the delay
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                      per_device_batch_size=2, max_length=64, lora_r=4, device="cpu", precompute_ref=True)
    train.run(cfg)
    assert "reference log-probs (precompute)" in capsys.readouterr().err
