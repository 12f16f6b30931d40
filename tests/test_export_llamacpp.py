"""GGUF exports run in llama.cpp itself (the `gguf` extra: llama-cpp-python, which builds llama.cpp).

Skipped where the bindings are not installed (CI's 2-core runner cannot afford the 10-16 minute build):
run these with `pip install -e '.[gguf]' && pytest tests/test_export_llamacpp.py`.

Tolerances (max |logit diff| <= rtol x logit range, dpo.export.LLAMACPP_RTOL), and why:
- llama.cpp keeps K and V in an f16 cache by default, so even an f32 file sees f16 rounding
  (relative 2^-11) of every key and value: measured on the tiny models 2e-4 to 6.5e-4 of the range,
  bound 1e-2 (the bound of f16 storage through transformers).
  GELU models (Gemma 2/3) get 1e-2 more for f32 and f16 files: ggml's CPU GELU reads an f16 table
  (tiny Gemma 3 with a random LoRA: 1.1e-2 for f32, 4.4e-3 with an f32 KV cache; 2.06e-2 for f16),
  see dpo.export.llamacpp_rtol.
- f16 files: ggml's CPU matmul also rounds the activations to f16: 2e-2.
- q8_0: activations go to q8 blocks as well: the transformers bound, 0.1.
- k-quants and q4_0 are not judged on logits (a 4-bit 135M model moves them by whole nats); they must
  load, tokenize as transformers does, agree on the top-1 token mostly, and be nearer the merged model
  than the base (the adapter is in the file).
"""

from __future__ import annotations

import json

import pytest
import torch

from dpo import export, llamacpp

from .test_export import ARCHITECTURES, build_tiny, make_run, trained_run

pytest.importorskip("llama_cpp", reason=f"llama.cpp's Python bindings are not installed: {llamacpp.EXTRA_HINT}")


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


# Settings transformers' GGUF reader would not read back but llama.cpp must honour: Gemma 2's final soft-cap
# at a value that reshapes these logits (|logit| ~ 1), so a file without the key fails the comparison.
# (Not the attention soft-cap: the merged reference now applies it (models.load_model picks eager attention
# for Gemma 2), but these tiny models' attention scores are so small that even a cap of 0.1 moves the logits
# by under 2% of their range, inside the f16 bound GELU models get.)
LLAMACPP_ONLY = {"gemma2": {"final_logit_softcapping": 0.3}}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_each_architecture_runs_in_llama_cpp(kind, tok, tmp_path):
    run = export.open_run(make_run(tmp_path, tok, model=build_tiny(kind, len(tok), **LLAMACPP_ONLY.get(kind, {}))))
    out, _, merged, tokenizer = export.export_gguf(run, tmp_path / "m.gguf", "f16")
    v = export.verify_gguf_in_llamacpp(out, merged, tokenizer, "f16", base=export.base_model(run))
    assert v.ok, v.line()
    assert v.tokenizer_ok and v.adapter_visible and v.top1_agreement >= 0.95
    assert any(n.startswith("generation, llama.cpp") for n in v.notes)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_each_architectures_trained_run_runs_in_llama_cpp(kind, tok, tmp_path):
    """The f32 GGUF of a run trained by dpo.train.run (2 steps, default LoRA targets), run by llama.cpp."""
    run = export.open_run(trained_run(tmp_path, tok, kind))
    out, _, merged, tokenizer = export.export_gguf(run, tmp_path / "m.gguf", "f32")
    v = export.verify_gguf_in_llamacpp(out, merged, tokenizer, "f32", base=export.base_model(run))
    assert v.ok and v.tokenizer_ok and v.adapter_visible and v.top1_agreement >= 0.95, v.line()


@pytest.mark.parametrize("quantization", export.K_QUANTS)
def test_k_quants_are_made_by_llama_cpp(quantization, tok, tmp_path):
    """Hidden 256 so every matrix row is a whole k-quant super-block: the file holds real K types."""
    run = export.open_run(make_run(tmp_path, tok, model=build_tiny("llama", len(tok), hidden=256)))
    out, summary, merged, tokenizer = export.export_gguf(run, tmp_path / "m.gguf", quantization)
    assert set(summary["tensor_types"]) <= {"F32", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    main_type = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[quantization]
    assert summary["tensor_types"].get(main_type, 0) >= 8, summary
    v = export.verify_gguf_in_llamacpp(out, merged, tokenizer, quantization, base=export.base_model(run))
    assert v.ok and v.adapter_visible, v.line()


def test_k_quant_fallback_is_reported(tok, tmp_path):
    """Rows of 64 values are no whole 256-value super-block: llama.cpp stores them in a legacy type, and says so."""
    run = export.open_run(make_run(tmp_path, tok, model=build_tiny("llama", len(tok))))
    _, summary, _, _ = export.export_gguf(run, tmp_path / "m.gguf", "q4_k_m")
    assert not any(t.endswith("_K") for t in summary["tensor_types"]), summary
    assert any("multiples of 256" in n for n in summary["notes"])


def test_q4_k_m_cli_end_to_end_in_llama_cpp(tok, tmp_path, capsys):
    run = make_run(tmp_path, tok, model=build_tiny("llama", len(tok), hidden=256))
    rc = export.main(["--run-dir", str(run), "--format", "gguf", "--quantization", "q4_k_m", "--output", str(tmp_path / "o.gguf")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "GGUF q4_k_m in llama.cpp vs float32 merge" in printed and "adapter in the file" in printed
    assert "generation, llama.cpp:" in printed and "generation, merged model:" in printed


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, tok):
    """A run on the real default model, SmolLM2-135M-Instruct, with a random LoRA (B scaled so the adapter
    moves the logits by more than 4-bit rounding does)."""
    from dpo import smollm2
    from dpo.models import LoraSettings, add_lora, load_model

    try:
        base_dir = smollm2.plain_copy(with_model=True)
    except smollm2.MissingDefaultModel as e:
        pytest.skip(str(e))
    model = load_model(str(base_dir), dtype=torch.float32)
    peft_model = add_lora(model, LoraSettings(r=8, alpha=16))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    run = tmp_path_factory.mktemp("smollm2") / "run"
    peft_model.save_pretrained(run / "adapter")
    tok.save_pretrained(run / "adapter")
    (run / "config.json").write_text(json.dumps({"model": str(base_dir), "dtype": "float32"}), encoding="utf-8")
    return export.open_run(run)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["f16", "q8_0", "q4_k_m"])
def test_smollm2_round_trip_in_llama_cpp(smollm2_run, quantization, tmp_path):
    """The default model's export, run by llama.cpp, against the float32 merge on the verification prompts.
    SmolLM2-135M's rows are 576 values (not a multiple of 256), so most of a q4_k_m file is Q5_0/Q8_0."""
    out, summary, merged, tokenizer = export.export_gguf(smollm2_run, tmp_path / "m.gguf", quantization)
    v = export.verify_gguf_in_llamacpp(out, merged, tokenizer, quantization, base=export.base_model(smollm2_run))
    assert v.ok and v.tokenizer_ok and v.adapter_visible, v.line()
    assert v.top1_agreement >= {"f16": 0.95, "q8_0": 0.9, "q4_k_m": 0.6}[quantization], v.line()
