"""The run folder: one list of resume-locked keys, a refused run leaves no folder, the disk is checked
before training, a checkpoint that cannot be written still leaves the adapter, and the adapter names
its base model so that it loads anywhere (CPU, tiny Llama)."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from dpo import train
from dpo.run import checkpoint
from dpo.run.checkpoint import CheckpointError
from dpo.run.folder import RESUME_LOCKED_KEYS, check_output_dir
from dpo.config import TrainConfig
from dpo.run.folder import RunWriter

from .conftest import write_jsonl
from .test_resume import ROWS, flags, metrics, one_line_error

CONFIG = TrainConfig(dataset="pairs.jsonl").to_dict()


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here on one thread (conftest.single_thread)."""


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", ROWS)


# --- one list of resume-locked keys ----------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("implicit_prompt", "first_user"), ("keep_identical", True),
                                        ("max_prompt_length", 32)])
def test_a_folder_whose_run_had_other_pairs_is_refused_as_another_run(tmp_path, key, value):
    """These keys change which pairs there are: resuming refuses them, so the folder check must too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**CONFIG, key: value}))
    with pytest.raises(CheckpointError, match=f"a different config.json \\({key}: "):
        check_output_dir(out, CONFIG, resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match=f"cannot resume the run in {out}: .*{key}: "):
        check_output_dir(out, CONFIG, resume=True, overwrite=False)


def test_a_config_json_of_relative_paths_still_resumes_from_its_folder(tmp_path, monkeypatch):
    """An older config.json holds paths as typed: taken from the current folder, they equal the absolute
    paths a run records now; from another folder they name other files, and the resume is refused."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(CONFIG))  # "dataset": "pairs.jsonl"
    now = TrainConfig(dataset="pairs.jsonl").run_dict()
    assert Path(now["dataset"]).is_absolute()
    check_output_dir(out, now, resume=True, overwrite=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="dataset: "):
        check_output_dir(out, now, resume=True, overwrite=False)


def test_every_resume_locked_key_is_a_config_field():
    assert set(RESUME_LOCKED_KEYS) <= set(CONFIG)


# --- a refused run leaves nothing --------------------------------------------------------------------

def test_a_run_refused_for_bad_data_leaves_no_output_folder(tiny_llama_dir, tmp_path, capsys, no_model_load):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": " A"}])  # no "rejected"
    out = tmp_path / "deep" / "run"
    rc = train.main(flags(tiny_llama_dir, bad, out))
    err = one_line_error(capsys, rc)
    assert "rejected" in err
    assert not (tmp_path / "deep").exists()


def test_a_run_refused_for_bad_held_out_data_leaves_no_output_folder(tiny_llama_dir, data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad-eval.jsonl", [{"prompt": "Q", "chosen": " A"}])  # no "rejected"
    out = tmp_path / "run"
    rc = train.main(flags(tiny_llama_dir, data, out, "--eval-dataset", bad))
    err = one_line_error(capsys, rc, after_model_load=True)
    assert "rejected" in err
    assert not out.exists()


def test_a_run_refused_for_bad_data_leaves_an_empty_folder_empty(tiny_llama_dir, tmp_path, capsys, no_model_load):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": " A"}])
    out = tmp_path / "run"
    out.mkdir()
    assert train.main(flags(tiny_llama_dir, bad, out)) == 2
    assert list(out.iterdir()) == []


# --- disk space --------------------------------------------------------------------------------------

DiskUsage = namedtuple("DiskUsage", "total used free")


def test_a_disk_without_room_for_the_run_is_refused_before_the_model_loads(tiny_llama_dir, data, tmp_path, capsys,
                                                                          monkeypatch, no_model_load):
    """(The estimate, the other amounts of free space and real small disks: tests/test_diskspace.py.)"""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(real(p).total, real(p).total, 2**20))
    out = tmp_path / "run"
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = one_line_error(capsys, rc)
    assert err.startswith(f"dpo: error: not enough disk space for this run in {out}: 1.0 MiB free, at least ")
    assert "needed even without checkpoints (the adapter about " in err and err.endswith("choose another --output-dir")
    assert not out.exists()


def test_a_checkpoint_that_cannot_be_written_still_leaves_the_adapter(tiny_llama_dir, data, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 0)  # every checkpoint finds the disk full
    out = tmp_path / "run"
    rc = train.main(flags(tiny_llama_dir, data, out))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(
        f"dpo: error: cannot write checkpoint {out / 'checkpoints' / 'step-000003'}: not enough disk space")
    assert (f"the checkpoint could not be written, but the adapter as of step 3 is saved to {out / 'adapter'}"
            in err)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert not (out / "checkpoints" / "step-000003").exists()


# --- the adapter names its base model ---------------------------------------------------------------

def _peft_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return model, AutoTokenizer.from_pretrained(model_dir)


def test_the_default_models_adapter_records_its_hub_name(tiny_llama_dir, tmp_path, monkeypatch):
    from dpo import smollm2

    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_llama_dir, smollm2.cache_dir())  # stands in for the dequantised SmolLM2 copy
    model, tokenizer = _peft_model(smollm2.cache_dir())
    path = RunWriter(tmp_path / "run").save_adapter(model, tokenizer)
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_local_models_adapter_keeps_its_path(tiny_llama_dir, tmp_path):
    model, tokenizer = _peft_model(tiny_llama_dir)
    path = RunWriter(tmp_path / "run").save_adapter(model, tokenizer)
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir)
