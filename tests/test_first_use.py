"""What a new user hits first (issue 17): config-file types, the printed resume command, Ctrl-C before
the first step, the CPU thread count and the help of the default run; and (issue 29) rows every objective
drops and reports, a run of skipped steps that fails, settings that change nothing, an unreachable hub."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from dpo import build, train
from dpo.config import TrainConfig
from dpo.flags import config_from_args
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


# --- issue 29: nothing lost, nothing silent ---------------------------------------------------------


@pytest.mark.parametrize("objective, extra", [("orpo", {}), ("simpo", {}), ("cpo", {}), ("kto", {"shuffle": False})])
def test_every_objective_drops_and_reports_the_hh_rows_whose_prompt_fills_max_length(
        objective, extra, tiny_llama_dir, tmp_path, capsys, single_thread):
    """The HH file at max length 128: DPO drops the pairs whose prompt leaves no completion token; every other
    objective drops them too (an empty completion's mean log-prob is 0/0), says so, and trains on finite losses."""
    from .conftest import HH_HELPFUL, require_file

    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(require_file(HH_HELPFUL)), loss_type=[objective],
                      output_dir=str(tmp_path / "run"), max_steps=2, max_length=128, per_device_batch_size=2,
                      lora_r=4, device="cpu", **extra)
    result = train.run(cfg)
    printed = capsys.readouterr().out
    dropped = int(printed.split("  prompt_fills_max_length: ")[1].split()[0])
    kept = int(printed.split("\nkept: ")[1].split()[0])
    assert dropped > 0 and kept > 0
    assert f"data: {cfg.dataset} (for --loss-type {objective})" in printed
    assert not result["skipped_steps"] and all(math.isfinite(row["loss"]) for row in result["history"])


def test_a_run_whose_every_step_was_skipped_fails_in_one_line(tiny_llama_dir, data, tmp_path, capsys, monkeypatch,
                                                              single_thread):
    from dpo.objectives import Scorer

    real = Scorer.completion_logps

    def non_finite(scorer, model, batch):  # the policy's log-probs only (every layout): the reference stays finite
        out = real(scorer, model, batch)
        return out * float("nan") if torch.is_grad_enabled() else out
    monkeypatch.setattr(Scorer, "completion_logps", non_finite)
    out = tmp_path / "run"
    rc = train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(out),
                     "--max-steps", "2", "--per-device-batch-size", "2", "--max-length", "64", "--lora-r", "4",
                     "--device", "cpu", "--on-nan", "skip"])
    err = capsys.readouterr().err.strip()
    assert rc == train.EXIT_NONFINITE, err
    assert "\n" not in err and err.startswith("dpo: error: all 2 steps were skipped for a non-finite loss or "
                                              "gradient norm: no step updated the weights; the adapter in "), err


def test_a_run_fails_when_more_than_half_its_steps_were_skipped():
    assert train.mostly_skipped(4, []) is None
    assert train.mostly_skipped(4, [1, 3]) is None  # half: a success, with the skipped steps in its last line
    assert train.mostly_skipped(4, [1, 2, 3]).startswith("error: 3 of 4 steps were skipped")
    assert train.mostly_skipped(2, [1, 2]).startswith("error: all 2 steps were skipped")


def test_settings_that_change_nothing_are_said_at_start(tiny_llama_dir, data, tmp_path, capsys):
    """--max-length past the model's context (512 for the tiny Llama) and --eval-steps with nothing to evaluate."""
    rc = train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "1", "--per-device-batch-size", "2", "--max-length", "1024", "--lora-r", "4",
                     "--device", "cpu", "--eval-steps", "2"])
    err = capsys.readouterr().err
    assert rc == 0
    assert (f"dpo: warning: --max-length 1024 is above {tiny_llama_dir}'s context of 512 tokens "
            "(max_position_embeddings)") in err
    assert "dpo: warning: --eval-steps 2 does nothing without --eval-dataset" in err


def test_the_threads_help_says_what_the_code_does():
    """0 takes every core this process may use (not the idle ones: see cpu_threads)."""
    from dataclasses import fields

    (threads,) = [f for f in fields(TrainConfig) if f.name == "threads"]
    assert "not busy" not in threads.metadata["help"] and "every core this process may use" in threads.metadata["help"]


def test_a_hub_model_with_the_hub_unreachable_fails_in_seconds_in_one_line(data, tmp_path):
    """A misspelled hub name with no network: one line after a short connection test, not minutes of retries."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    timed = ("import sys, time; from dpo import train; t = time.time(); rc = train.main(sys.argv[1:]); "
             "print(f'seconds {time.time() - t:.1f}'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", timed, "--model", "HuggingFaceTB/SmolLM2-135M-Instrukt", "--dataset",
                           str(data), "--output-dir", str(tmp_path / "run"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dpo: error: --model: HuggingFaceTB/SmolLM2-135M-Instrukt is neither a local folder "
                                  "nor in the hub cache, and the hub (http://127.0.0.1:9) cannot be reached")
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert float(proc.stdout.split("seconds ")[1]) < 10


def test_a_finished_runs_last_line_names_commands_that_evaluate_and_export_it(tiny_llama_dir, data, tmp_path, capsys):
    from dpo import evaluate
    from dpo.export import cli

    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(out),
                       "--max-steps", "1", "--per-device-batch-size", "2", "--max-length", "64", "--lora-r", "4",
                       "--device", "cpu", "--beta", "0.2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("dpo: next: evaluate with ") and last.endswith(" (or --format adapter, gguf)")
    evaluating, exporting = last.removeprefix("dpo: next: evaluate with ").removesuffix(
        " (or --format adapter, gguf)").split(" ; export with ")
    evaluating, exporting = shlex.split(evaluating), shlex.split(exporting)
    assert evaluating[1:3] == ["-m", "dpo.evaluate"] and exporting[1:3] == ["-m", "dpo.export"]
    assert evaluating[evaluating.index("--beta") + 1] == "0.2"  # scored under the run's loss settings
    assert evaluate.main(evaluating[3:]) == 0
    assert cli.main(exporting[3:] + ["--no-verify"]) == 0
    assert (out / "merged" / "config.json").is_file()
