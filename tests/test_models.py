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


def _capped_gemma2(path, cap=0.5):
    """A tiny Gemma 2 whose attention scores are far above its soft-cap, so leaving the cap out shows."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=8, attn_logit_softcapping=cap))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(30)
    model.save_pretrained(path)
    return path


def test_gemma2_loads_with_eager_attention_so_its_softcap_is_applied(tmp_path):
    """transformers' default SDPA drops Gemma 2's attention soft-cap without a word; load_model keeps it."""
    from transformers import AutoModelForCausalLM

    path = str(_capped_gemma2(tmp_path / "g2"))
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    ours = models.load_model(path, torch.float32).eval()
    assert ours.config._attn_implementation == "eager"
    by_default = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got, without_cap, with_cap = (m(ids).logits for m in (ours, by_default, eager))
    assert by_default.config._attn_implementation == "sdpa"
    assert (without_cap - with_cap).abs().max() > 0.05  # the cap matters for this model
    torch.testing.assert_close(got, with_cap)


def test_packing_keeps_gemma2_on_eager_where_sdpa_is_chosen(tmp_path):
    from dpo import packing

    model = models.load_model(str(_capped_gemma2(tmp_path / "g2")), torch.float32)
    assert packing.use_attention(model, packing.choose_attention("cpu")) == "eager"


def test_models_without_softcap_keep_sdpa(tiny_llama_dir):
    assert models.load_model(str(tiny_llama_dir), torch.float32).config._attn_implementation == "sdpa"


def test_the_default_models_cached_copy_moves_its_ready_marker_in_last(tmp_path, monkeypatch):
    """Two test workers (pytest-xdist) may make the cached plain copy at once; the one that finds
    tokenizer_config.json (what says the copy is ready) must find every other file beside it."""
    import os
    from pathlib import Path

    from dpo import smollm2

    out = tmp_path / "copy"
    monkeypatch.setattr(smollm2, "cache_dir", lambda: out)

    class Tokenizer:
        def save_pretrained(self, folder):
            for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "special_tokens_map.json"):
                (Path(folder) / name).write_text("{}")
    monkeypatch.setattr(smollm2, "load_tokenizer_from_gguf", Tokenizer)
    moved, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), replace(a, b))[1])
    assert smollm2.plain_copy(with_model=False) == out
    assert len(moved) == 4 and moved[-1] == "tokenizer_config.json", moved
