"""dpo.models helpers the command lines share: what is wrong with a model folder, and the device."""

from __future__ import annotations

import pytest
import torch

from dpo import models


def test_a_saved_model_folder_has_no_problem(tiny_llama_dir):
    assert models.model_folder_problem(str(tiny_llama_dir)) is None


def test_model_folder_problems_are_one_line_and_name_what_is_missing(tmp_path):
    assert models.model_folder_problem(str(tmp_path / "nope")) == f"no such model folder: {tmp_path / 'nope'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert models.model_folder_problem(str(empty)) == (
        f"{empty} holds no model: a model folder needs {models.MODEL_FOLDER_NEEDS}")
    a_file = tmp_path / "model.safetensors"
    a_file.write_text("x")
    assert "is a file, not a model folder" in models.model_folder_problem(str(a_file))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    problem = models.model_folder_problem(str(partial))
    assert problem == f"{partial} is not a complete model folder: it lacks weights (*.safetensors) and a " \
                      "tokenizer (tokenizer.json or tokenizer_config.json)"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_text("x")
    assert "holds a LoRA adapter, not a model" in models.model_folder_problem(str(adapter))
    for problem in map(models.model_folder_problem, map(str, (empty, a_file, partial, adapter))):
        assert "\n" not in problem


def test_resolve_device():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        models.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda:0")
