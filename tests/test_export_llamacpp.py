"""GGUF exports made by llama.cpp's own converter and quantizer, and run in llama.cpp itself (the `gguf` extra:
llama-cpp-python, which builds llama.cpp, and the converter that `scripts/setup.sh gguf` unpacks).

Skipped, saying why, where either is not installed.

Tolerances (max |logit diff| <= rtol x logit range, dpo.export.LLAMACPP_RTOL), and why:
- llama.cpp keeps K and V in an f16 cache by default, so even an f32 file sees f16 rounding
  (relative 2^-11) of every key and value: measured on the tiny models 2e-4 to 6.5e-4 of the range,
  bound 1e-2. GELU models (Gemma 2/3) get 1e-2 more for f32 and f16 files: ggml's CPU GELU reads an f16
  table (dpo.export.llamacpp_rtol).
- f16 files: ggml's CPU matmul also rounds the activations to f16: 2e-2.
- q8_0: activations go to q8 blocks as well: 0.1.
- k-quants and q4_0 are not judged on logits (a 4-bit 135M model moves them by whole nats); they must
  load, tokenize as transformers does, and hold the adapter (their dequantised weights nearer the merged
  model's than the base's: dpo.export.gguf_weights).
"""

from __future__ import annotations

import json

import pytest
import torch

from dpo.export import llamacpp, llamacpp_convert

from dpo.export import cli, common, gguf

from .test_export import build_tiny, make_run, trained_run

pytest.importorskip("llama_cpp", reason=f"llama.cpp's Python bindings are not installed: {llamacpp.EXTRA_HINT}")
try:
    llamacpp_convert.converter_dir()
except llamacpp_convert.ConverterError as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


# Gemma 2's final soft-cap at a value that reshapes these logits (|logit| ~ 1), so a file without the key fails.
LLAMACPP_ONLY = {"gemma2": {"final_logit_softcapping": 0.3}}
# The families whose converter accepts the SmolLM2 tokenizer; Qwen2 (which hashes its pre-tokenizer), Phi-3 and
# Gemma 2 (which read a SentencePiece tokenizer.model) are exported with their own tokenizers in
# tests/test_export_tokenizers.py.
WITH_SMOLLM2_TOKENIZER = ("llama", "mistral", "qwen3", "qwen3_moe", "gemma3_text")


@pytest.mark.parametrize("kind", WITH_SMOLLM2_TOKENIZER)
def test_each_architectures_trained_run_converts_and_runs_in_llama_cpp(kind, tok, tmp_path):
    """A run trained by dpo.train.run (2 steps, default LoRA targets), converted by llama.cpp's converter
    and run by llama.cpp."""
    quantization = "f16"
    run = common.open_run(trained_run(tmp_path, tok, kind))
    out, summary, merged, tokenizer = gguf.export_gguf(run, tmp_path / "m.gguf", quantization)
    assert summary["architecture"] == {"mistral": "llama", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}.get(kind, kind)
    v = gguf.verify_gguf(out, merged, tokenizer, quantization, base=common.base_model(run))
    assert v.ok and v.tokenizer_ok and v.adapter_visible and v.top1_agreement >= 0.95, v.line()
    assert v.weights.verdict is True and any(n.startswith("generation, llama.cpp") for n in v.notes)


def unit_norms(model):
    """The model with its norms back at 1: build_tiny's randomised norms (with Qwen3's q/k norms) make a toy whose
    logits move by 12% of their range under 8-bit rounding (mean KL 8e-4), past the q8_0 bound."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    return model


def test_a_qwen3_whose_head_dim_is_not_hidden_over_heads_exports_to_q8_0(tok, tmp_path, capsys):
    """Hidden 256, 4 heads of 64: transformers' GGUF reader rebuilt it with Qwen3's default head_dim 128."""
    run = make_run(tmp_path, tok, model=unit_norms(build_tiny("qwen3", len(tok), hidden=256, head_dim=64)))
    rc = cli.main(["--run-dir", str(run), "--format", "gguf", "--quantization", "q8_0", "--output", str(tmp_path / "q.gguf")])
    printed = capsys.readouterr().out
    assert rc == 0 and "verification OK" in printed and "adapter in the file" in printed, printed


@pytest.mark.parametrize("quantization", common.K_QUANTS)
def test_k_quants_are_made_by_llama_cpp(quantization, tok, tmp_path):
    """Hidden 256 so every matrix row is a whole k-quant super-block: the file holds real K types."""
    run = common.open_run(make_run(tmp_path, tok, model=build_tiny("llama", len(tok), hidden=256)))
    out, summary, merged, tokenizer = gguf.export_gguf(run, tmp_path / "m.gguf", quantization)
    assert set(summary["tensor_types"]) <= {"F32", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    main_type = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[quantization]
    assert summary["tensor_types"].get(main_type, 0) >= 8, summary
    v = gguf.verify_gguf(out, merged, tokenizer, quantization, base=common.base_model(run))
    assert v.ok and v.adapter_visible, v.line()


def test_k_quant_fallback_is_reported(tok, tmp_path):
    """Rows of 64 values are no whole 256-value super-block: llama.cpp stores them in a legacy type, and says so."""
    run = common.open_run(make_run(tmp_path, tok, model=build_tiny("llama", len(tok))))
    _, summary, _, _ = gguf.export_gguf(run, tmp_path / "m.gguf", "q4_k_m")
    assert not any(t.endswith("_K") for t in summary["tensor_types"]), summary
    assert any("multiples of 256" in n for n in summary["notes"])


def test_q4_k_m_cli_end_to_end_in_llama_cpp_writes_a_modelfile(tok, tmp_path, capsys):
    run = make_run(tmp_path, tok, model=build_tiny("llama", len(tok), hidden=256))
    rc = cli.main(["--run-dir", str(run), "--format", "gguf", "--quantization", "q4_k_m", "--output", str(tmp_path / "o.gguf")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "GGUF q4_k_m in llama.cpp vs float32 merge" in printed and "adapter in the file" in printed
    assert "generation, llama.cpp:" in printed and "generation, merged model:" in printed
    assert "tokenizer.ggml.model=gpt2, pre=smollm" in printed
    text = (tmp_path / "o.Modelfile").read_text()
    assert "FROM ./o.gguf" in text and "<|im_start|>assistant" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "o.Modelfile", "o.gguf", "run"]  # no scratch left


def test_an_architecture_the_converter_refuses_is_one_line_naming_it_before_the_model_loads(tok, tmp_path, capsys,
                                                                                            monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    from dpo import models

    model = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                     num_attention_heads=2, word_embed_proj_dim=16, pad_token_id=2))
    run = make_run(tmp_path, tok, model=model)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    rc = cli.main(["--run-dir", str(run), "--format", "gguf", "--output", str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "does not support the architecture OPTForCausalLM" in err and not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("quantization", ["q8_0", "q4_k_m"])
def test_an_adapter_smaller_than_the_rounding_passes_while_a_bare_base_file_fails(quantization, tok, tmp_path):
    """As after `dpo.train --max-steps 2`: the adapter moves the logits less than the file's rounding does, so
    they cannot tell it is there; the file's weights can (and do: the merged file passes, the base's fails;
    the bare file is made once, as q8_0, to keep the time down: 4-bit bare weights are in test_export.py)."""
    model = unit_norms(build_tiny("llama", len(tok), hidden=256))
    run = common.open_run(make_run(tmp_path, tok, model=model, b_scale=5e-4))
    out, _, merged, tokenizer = gguf.export_gguf(run, tmp_path / "m.gguf", quantization)
    base = common.base_model(run)
    v = gguf.verify_gguf(out, merged, tokenizer, quantization, base=base)
    assert not v.logits_can_tell, v.line()  # the condition of the issue: logits alone would be noise
    assert v.ok and v.weights.verdict is True and "adapter in the file" in v.line(), v.line()
    if quantization == "q8_0":
        bare, _, _, _ = gguf.export_gguf(run, tmp_path / "bare.gguf", quantization, model=base)
        b = gguf.verify_gguf(bare, merged, tokenizer, quantization, base=base)
        assert b.weights.verdict is False and not b.ok and "adapter NOT in the file" in b.line(), b.line()


def test_gguf_lora_loads_over_the_base_file_in_llama_cpp(tok, tmp_path, capsys):
    run = make_run(tmp_path, tok, model=build_tiny("llama", len(tok), hidden=64))
    rc = cli.main(["--run-dir", str(run), "--format", "gguf-lora", "--output", str(tmp_path / "a.gguf")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "GGUF f16 + LoRA in llama.cpp vs float32 merge" in printed and "adapter in the file" in printed
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "a.gguf")).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    text = (tmp_path / "a.Modelfile").read_text()
    assert "FROM ./a-base-f16.gguf" in text and "ADAPTER ./a.gguf" in text


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
    return common.open_run(run)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["f16", "q8_0", "q4_k_m"])
def test_smollm2_round_trip_in_llama_cpp(smollm2_run, quantization, tmp_path):
    """The default model's export, run by llama.cpp, against the float32 merge on the verification prompts.
    SmolLM2-135M's rows are 576 values (not a multiple of 256), so most of a q4_k_m file is Q5_0/Q8_0."""
    out, summary, merged, tokenizer = gguf.export_gguf(smollm2_run, tmp_path / "m.gguf", quantization)
    assert summary["pre"] == "smollm"  # its byte-fallback tokenizer was saved as the byte-level BPE it is
    v = gguf.verify_gguf(out, merged, tokenizer, quantization, base=common.base_model(smollm2_run))
    assert v.ok and v.tokenizer_ok and v.adapter_visible, v.line()
    assert v.top1_agreement >= {"f16": 0.95, "q8_0": 0.9, "q4_k_m": 0.6}[quantization], v.line()
