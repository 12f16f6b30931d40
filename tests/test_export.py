"""dpo.export: adapter copy, merged HF model, and what GGUF export does without running llama.cpp.

The run is built here: a tiny random Llama (hidden 16, 2 query heads sharing 1 KV head) saved with the real
SmolLM2 tokenizer, and a LoRA adapter whose B matrices are perturbed so the merge changes the logits.
GGUF files themselves are made and checked by llama.cpp in tests/test_export_llamacpp.py.

Tolerances, and why:
- merged float32: the reload equals base+adapter up to float32 rounding (W + s*B@A is rounded once, the
  unmerged path rounds x@W and x@A@B separately; measured 1.8e-5 at logit range ~11): 1e-4 absolute.
- merged bfloat16 (reloaded and upcast): bf16 keeps 8 significant bits (relative rounding <= 2^-9 per
  weight); this toy's RMSNorm-ed residual stream amplifies that to ~3% of the logit range (measured
  0.32 of 11.6), so 0.1 x range, plus top-1 agreement >= 90%.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo.export import cli, common, merged as merging
from dpo.models import LoraSettings, add_lora

from .conftest import build_tiny_llama

PROMPTS = ("The quick brown fox jumps over the lazy dog.", "In 2024, 3 of 7 numbers were prime: 2, 3, 5, 7.")


# --------------------------------------------------------------------------------- fixtures


def make_run(root: Path, tokenizer, with_tokenizer: bool = True, model=None, b_scale: float = 0.3, **overrides) -> Path:
    """A run directory: base model folder, RUN/config.json naming it, RUN/adapter with a non-trivial LoRA
    (on `model`, a tiny random Llama unless given; its B matrices drawn with std `b_scale`)."""
    base_dir = root / "base"
    model = build_tiny_llama(len(tokenizer), **overrides) if model is None else model
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter actually change the model
                p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    run = root / "run"
    peft_model.save_pretrained(run / "adapter")
    if with_tokenizer:
        tokenizer.save_pretrained(run / "adapter")
    (run / "config.json").write_text(
        json.dumps({"model": str(base_dir), "dtype": "float32", "trust_remote_code": False}), encoding="utf-8"
    )
    return run


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok) -> Path:
    return make_run(tmp_path_factory.mktemp("export"), tok)


def base_and_adapter(run: Path):
    """(base model, base + adapter as an unmerged PeftModel), both float32, from the run's files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((run / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32).eval()
    with_adapter = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    return base, PeftModel.from_pretrained(with_adapter, str(run / "adapter")).eval()


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer.encode(p)])).logits[0].float() for p in PROMPTS]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def logit_range(a: list[torch.Tensor]) -> float:
    return max(x.abs().max().item() for x in a)


def top1(a, b) -> float:
    same = sum((x.argmax(-1) == y.argmax(-1)).sum().item() for x, y in zip(a, b))
    return same / sum(x.shape[0] for x in a)


# ---------------------------------------------------------------------------------- adapter


def test_adapter_export_copies_adapter_and_tokenizer(run_dir, tmp_path, capsys):
    out = tmp_path / "adapter-out"
    assert cli.main(["--run-dir", str(run_dir), "--format", "adapter", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote adapter" in printed and str(out) in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (run_dir / "adapter" / name).read_bytes()
    assert not (tmp_path / "adapter-out.tmp").exists()


def test_adapter_export_adds_the_base_tokenizer_when_the_adapter_has_none(tmp_path, tok):
    run = make_run(tmp_path, tok, with_tokenizer=False)
    out = merging.export_adapter(common.open_run(run), tmp_path / "out")
    assert (out / "tokenizer.json").is_file() and (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------- merged


def test_merged_float32_reloads_to_base_plus_adapter(run_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, peft_model = base_and_adapter(run_dir)
    want = logits(peft_model, tok)
    assert max_diff(want, logits(base, tok)) > 0.5, "the adapter should change the logits"

    out, _, _ = merging.export_merged(common.open_run(run_dir), tmp_path / "merged32", dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(want, logits(reloaded, tok)) < 1e-4
    assert AutoTokenizer.from_pretrained(out).encode(PROMPTS[1]) == tok.encode(PROMPTS[1])
    assert not any("lora" in k for k in reloaded.state_dict())


def test_merged_bfloat16_via_cli(run_dir, tok, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli.main(["--run-dir", str(run_dir), "--format", "merged", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote merged bfloat16 model" in printed and "verification OK" in printed

    stored = AutoModelForCausalLM.from_pretrained(out)
    assert stored.dtype == torch.bfloat16  # saved in 16 bits by default
    reloaded = stored.float().eval()
    _, peft_model = base_and_adapter(run_dir)
    want = logits(peft_model, tok)
    assert max_diff(want, logits(reloaded, tok)) < 0.1 * logit_range(want)
    assert top1(want, logits(reloaded, tok)) >= 0.9


# ----------------------------------------------------------------------------------- errors


def _cli_error(capsys, args) -> str:
    capsys.readouterr()  # drop what the setup printed
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("dpo.export: error: "), err  # as dpo.evaluate's and dpo.data's (dpo.train's: "dpo: error: ")
    return err


def test_missing_run_dir(tmp_path, capsys):
    err = _cli_error(capsys, ["--run-dir", str(tmp_path / "nope"), "--format", "adapter", "--output", str(tmp_path / "o")])
    assert "run directory not found" in err


def test_missing_adapter(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "x"}))
    err = _cli_error(capsys, ["--run-dir", str(tmp_path / "run"), "--format", "merged", "--output", str(tmp_path / "o")])
    assert "no adapter" in err


def test_missing_config_and_bad_config(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    assert "config.json is missing" in _cli_error(capsys, ["--run-dir", str(run), "--format", "gguf", "--output", "o"])
    (run / "config.json").write_text("{not json")
    assert "not valid JSON" in _cli_error(capsys, ["--run-dir", str(run), "--format", "gguf", "--output", "o"])


def test_bad_format_and_misplaced_options(run_dir, tmp_path, capsys):
    assert "invalid choice: 'onnx'" in _cli_error(
        capsys, ["--run-dir", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "o")]
    )
    assert "invalid choice: 'q3'" in _cli_error(
        capsys, ["--run-dir", str(run_dir), "--format", "gguf", "--quantization", "q3", "--output", "o"]
    )
    assert "--quantization applies to --format gguf and gguf-lora only" in _cli_error(
        capsys, ["--run-dir", str(run_dir), "--format", "merged", "--quantization", "f16", "--output", "o"]
    )


def test_existing_output_needs_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert "already exists" in _cli_error(capsys, ["--run-dir", str(run_dir), "--format", "adapter", "--output", str(out)])
    assert cli.main(["--run-dir", str(run_dir), "--format", "adapter", "--output", str(out), "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_unreachable_base_model_is_one_line(tmp_path, tok, capsys):
    run = make_run(tmp_path, tok)
    shutil.rmtree(tmp_path / "base")
    err = _cli_error(capsys, ["--run-dir", str(run), "--format", "merged", "--output", str(tmp_path / "o")])
    assert "base model folder not found" in err


def test_unexpected_errors_are_one_line_too(run_dir, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(cli, "export_adapter", broken)
    err = _cli_error(capsys, ["--run-dir", str(run_dir), "--format", "adapter", "--output", str(tmp_path / "o")])
    assert "unexpected RuntimeError: something odd" in err and "--traceback" in err


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dpo.export", "--run-dir", str(tmp_path / "missing"), "--format", "gguf", "--output", "x"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("dpo.export: error: run directory not found") and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ architectures


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text")


def build_tiny(kind: str, vocab_size: int, hidden: int = 64, **overrides):
    """A tiny random model of one family (4 query heads sharing 2 KV heads). Biases and norms are randomised
    so a misnamed one changes the logits."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    common.update(overrides)
    torch.manual_seed(0)
    if kind == "llama":
        return build_tiny_llama(vocab_size, **{k: v for k, v in common.items() if k != "vocab_size"})
    if kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**{"head_dim": hidden // 4, **common}, tie_word_embeddings=True))
    elif kind == "qwen3_moe":  # 4 experts, 2 per token, every layer sparse; the chosen experts' weights
        # normalised as in the released models (llama.cpp's qwen3moe graph always does)
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**{"head_dim": hidden // 4, **common}, num_experts=4,
                                                         num_experts_per_tok=2, moe_intermediate_size=hidden,
                                                         decoder_sparse_step=1, norm_topk_prob=True,
                                                         tie_word_embeddings=False))
    elif kind == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{"sliding_window": 8, "head_dim": hidden // 4, **common},
                                                     query_pre_attn_scalar=hidden // 4, tie_word_embeddings=True))
    elif kind == "gemma3_text":  # 6 layers: llama.cpp's pattern makes the 6th global
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{"sliding_window": 8, "head_dim": hidden // 4, **common,
                                                            "num_hidden_layers": 6},
                                                         query_pre_attn_scalar=hidden // 4, tie_word_embeddings=True))
    elif kind == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, sliding_window=None, tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


# ------------------------------------------------------------------------------- model card


def test_adapter_and_merged_exports_carry_a_model_card(tmp_path, tok, capsys):
    run = make_run(tmp_path, tok)
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(dataset="pairs.jsonl", loss_type=["sigmoid"], beta=0.25, learning_rate=5e-4, lora_r=4)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_loss": 0.69}) + "\n" + json.dumps({"step": 8, "loss": 0.31, "rewards/margins": 1.2}) + "\n"
    )
    (run / "eval.json").write_text(json.dumps({"task": "sentiment", "num_pairs": 48,
                                               "before": {"eval_loss": 0.693}, "after": {"eval_loss": 0.282}}))
    for fmt in ("adapter", "merged"):
        out = tmp_path / fmt
        args = ["--run-dir", str(run), "--format", fmt, "--output", str(out), "--no-verify"]
        assert cli.main(args) == 0
        text = (out / "README.md").read_text()
        assert f"base_model: {cfg['model']}" in text and "pairs.jsonl" in text
        assert "| beta | 0.25 |" in text and "| loss types | sigmoid |" in text and "| optimizer steps | 8 |" in text
        assert "| eval_loss | 0.693 | 0.282 |" in text and "48 held-out pairs (sentiment)" in text
        assert "-m dpo.export --run-dir" in text and f"--config {run / 'config.json'}" in text
        assert ("PeftModel.from_pretrained" in text) == (fmt == "adapter")
    assert "library_name: peft" in (tmp_path / "adapter" / "README.md").read_text()


def test_the_default_models_adapter_names_the_hub_model(tmp_path, run_dir):
    run = common.open_run(run_dir)
    run.config = {**run.config, "model": "smollm2-135m-instruct"}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/.cache/dpo/x", "r": 4}))
    merging._portable_base_name(run, tmp_path / "adapter_config.json")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 4}


# ---------------------------------------------------------------------------- read-only place


def test_export_to_a_read_only_place_is_one_line_before_any_model_loads(run_dir, capsys, no_model_load):
    target = Path("/sys/dpo-export-test")  # sysfs refuses new files even to root
    try:
        target.touch()
        target.unlink()
        pytest.skip("/sys is writable here: no read-only place to export to")
    except OSError:
        pass
    for fmt in ("adapter", "merged", "gguf"):
        err = _cli_error(capsys, ["--run-dir", str(run_dir), "--format", fmt, "--output", str(target)])
        assert f"cannot write the export to {target}" in err and "Permission denied" in err, err


def test_an_oserror_while_writing_names_the_path_and_cause(run_dir, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "o.tmp" / "adapter_model.safetensors"))

    monkeypatch.setattr(common.shutil, "copytree", full)
    err = _cli_error(capsys, ["--run-dir", str(run_dir), "--format", "adapter", "--output", str(tmp_path / "o")])
    assert f"could not write the export to {tmp_path / 'o.tmp' / 'adapter_model.safetensors'}: No space left on device" in err


def test_a_finished_run_gets_its_own_adapter_card(tmp_path, tok):
    from dpo.run import card

    run = make_run(tmp_path, tok)
    (run / "eval.json").write_text(json.dumps({"num_pairs": 8, "before": {"eval_loss": 0.693}, "after": {"eval_loss": 0.5}}))
    path = card.write_run_card(run)
    text = path.read_text()
    assert path == run / "adapter" / "README.md"
    assert "| eval_loss | 0.693 | 0.5 |" in text and f"--config {run / 'config.json'}" in text
    assert f"PeftModel.from_pretrained(base, {str(run / 'adapter')!r})" in text


# ------------------------------------------------------------- each architecture, trained then exported


def trained_run(root: Path, tokenizer, kind: str) -> Path:
    """A tiny random `kind` model saved with the real tokenizer, LoRA-trained for 2 steps by dpo.train.run
    with the default LoRA targets (Phi-3's fused qkv_proj/gate_up_proj stand in for q/k/v and gate/up)."""
    from dpo.config import TrainConfig
    from dpo.train import run

    from .conftest import write_jsonl

    base = root / "base"
    build_tiny(kind, len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = [{"prompt": f"Question {i}?", "chosen": " yes" * (i % 3 + 1), "rejected": " no" * (i % 2 + 1)}
            for i in range(4)]
    cfg = TrainConfig(model=str(base), dataset=str(write_jsonl(root / "d.jsonl", rows)), output_dir=str(root / "run"),
                      max_steps=2, per_device_batch_size=2, grad_accum=1, learning_rate=1e-2, lora_r=4,
                      max_length=32, device="cpu", dtype="float32", shuffle=False)
    result = run(cfg)
    assert result["steps"] == 2
    return root / "run"


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_each_architecture_trains_then_exports_adapter_and_merged(kind, tok, tmp_path):
    """Adapter and float32 merge of a trained run: the merge equals base + adapter, and the trained adapter
    visibly moved the logits (its GGUF files: tests/test_export_llamacpp.py)."""
    import safetensors.torch

    run_dir = trained_run(tmp_path, tok, kind)
    run = common.open_run(run_dir)
    adapter = merging.export_adapter(run, tmp_path / "adapter")
    trained = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    # Phi-3's fused projections; Qwen3-MoE's experts are 3-D tensors in transformers 5, no Linear to wrap
    fused = {"phi3": {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"},
             "qwen3_moe": {"q_proj", "k_proj", "v_proj", "o_proj"}}.get(kind)
    names = {k.split(".")[-3] for k in trained if "lora_A" in k}
    assert names == (fused or {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)

    base, with_adapter = base_and_adapter(run_dir)
    want = logits(with_adapter, tok)
    assert max_diff(want, logits(base, tok)) > 1e-3, "two steps should move the logits"
    merged_dir, _, _ = merging.export_merged(run, tmp_path / "merged", dtype="float32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert max_diff(want, logits(merged, tok)) < 1e-4 * max(1.0, logit_range(want))


def test_default_lora_targets_follow_fused_projections_or_are_refused_in_one_line(tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from dpo.models import DEFAULT_LORA_TARGETS, lora_targets_for

    assert lora_targets_for(build_tiny("phi3", len(tok)), DEFAULT_LORA_TARGETS) == [
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets_for(build_tiny("qwen2", len(tok)), ("v_proj", "q_proj")) == ["v_proj", "q_proj"]
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2))
    with pytest.raises(ValueError) as e:
        lora_targets_for(neox, DEFAULT_LORA_TARGETS)
    assert "\n" not in str(e.value) and "no such module in this gpt_neox model" in str(e.value)
    assert "query_key_value" in str(e.value)


def test_gelu_models_f32_and_f16_files_get_the_gelu_tables_bound_on_top_in_llama_cpp(tok):
    assert common.llamacpp_rtol("f32", build_tiny("gemma2", len(tok)).config) == pytest.approx(
        common.LLAMACPP_RTOL["f32"] + common.GELU_TABLE_RTOL)
    assert common.llamacpp_rtol("f16", build_tiny("gemma2", len(tok)).config) == pytest.approx(
        common.LLAMACPP_RTOL["f16"] + common.GELU_TABLE_RTOL)
    assert common.llamacpp_rtol("f16", build_tiny("qwen2", len(tok)).config) == common.LLAMACPP_RTOL["f16"]
    assert common.llamacpp_rtol("f32", build_tiny("qwen2", len(tok)).config) == common.LLAMACPP_RTOL["f32"]
    assert common.llamacpp_rtol("q8_0", build_tiny("gemma2", len(tok)).config) == common.LLAMACPP_RTOL["q8_0"]


# ------------------------------------------------------------------- GGUF, without running llama.cpp


def test_the_default_models_byte_fallback_tokenizer_is_saved_as_byte_level_bpe(tmp_path, tok):
    """transformers 5 writes SmolLM2's tokenizer (read from its GGUF) with byte_fallback and a ByteFallback
    decoder, which llama.cpp's converter takes for SentencePiece; the saved folder says byte-level BPE and
    encodes and decodes exactly as before."""
    from transformers import AutoTokenizer

    saved = json.loads(tok.backend_tokenizer.to_str())
    assert saved["model"]["byte_fallback"] and saved["decoder"]["type"] != "ByteLevel"  # what makes this test bite
    merging.save_folder(build_tiny_llama(len(tok)), tok, tmp_path / "m", "float32")
    written = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    assert written["model"]["byte_fallback"] is False and written["decoder"]["type"] == "ByteLevel"
    again = AutoTokenizer.from_pretrained(tmp_path / "m")
    for text in common.VERIFY_TEXTS + ("<|im_start|>user\nHi<|im_end|>\n",):
        assert again.encode(text) == tok.encode(text)
        assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text


def test_a_chatml_models_modelfile_has_ollamas_template_and_stop_tokens(tok):
    from dpo.export import modelfile

    text = modelfile.modelfile("run-q4_k_m.gguf", tok.chat_template, tok.eos_token)
    lines = text.splitlines()
    assert "FROM ./run-q4_k_m.gguf" in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert text.count('TEMPLATE """') == 1 and '<|im_start|>assistant\n"""' in text
    assert [ln for ln in lines if ln.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    assert "ADAPTER" not in text


def test_a_modelfile_without_a_known_template_says_so_and_keeps_the_stop_token():
    from dpo.export import modelfile

    text = modelfile.modelfile("m.gguf", "{% for m in messages %}{{ m.content }}{% endfor %}", "</end>", "m-lora.gguf")
    assert "TEMPLATE" not in text.replace("# TEMPLATE omitted", "")
    assert "# TEMPLATE omitted: its chat template is not one of ChatML, Llama 3, Gemma, Phi-3, Mistral" in text
    assert 'PARAMETER stop "</end>"' in text and "ADAPTER ./m-lora.gguf" in text
    llama3 = "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}{{ m.content + '<|eot_id|>' }}"
    assert modelfile.chat_format(llama3).name == "Llama 3"


def test_the_weights_tell_a_small_adapter_from_8_and_4_bit_rounding():
    """An adapter 20x smaller than the rounding step (Q8_0 or Q4_0): the quantised merged weights are still
    told from the quantised base (z of several tens, from a million weights); with no adapter at all the
    check cannot tell, and says so (None)."""
    import gguf
    import numpy as np

    from dpo.export import gguf_weights

    rng = np.random.default_rng(0)
    base = [rng.normal(0, 0.02, (256, 256)).astype(np.float32) for _ in range(4)]

    def rounded(w, kind):
        return gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape)

    # a block's step: its largest |weight| (~3 sigma) over 127 (Q8_0) or 8 (Q4_0)
    for kind, step in ((gguf.GGMLQuantizationType.Q8_0, 0.06 / 127), (gguf.GGMLQuantizationType.Q4_0, 0.06 / 8)):
        merged = [b + rng.normal(0, step / 20, b.shape).astype(np.float32) for b in base]
        good = gguf_weights.weight_check((rounded(m, kind), m, b) for m, b in zip(merged, base))
        bare = gguf_weights.weight_check((rounded(b, kind), m, b) for m, b in zip(merged, base))
        assert good.verdict is True and good.z > 2 * gguf_weights.Z_DECIDES, good.line()
        assert bare.verdict is False and bare.z < -2 * gguf_weights.Z_DECIDES, bare.line()
        assert good.to_merged > 3 * good.delta  # the rounding is larger than the adapter, yet it is found
    none = gguf_weights.weight_check((rounded(b, gguf.GGMLQuantizationType.Q8_0), b, b) for b in base)
    assert none.verdict is None
    permuted = gguf_weights.weight_check([(base[0][::-1].copy(), merged[0], base[0])])
    assert permuted.tensors == 0  # laid out otherwise: skipped, not judged


def test_gguf_export_without_llama_cpp_is_one_line_before_any_model_loads(run_dir, tmp_path, capsys, monkeypatch,
                                                                          no_model_load):
    from dpo.export import llamacpp

    monkeypatch.setattr(llamacpp, "bindings", lambda: None)
    err = _cli_error(capsys, ["--run-dir", str(run_dir), "--format", "gguf", "--output", str(tmp_path / "m.gguf")])
    assert "GGUF export needs llama.cpp: bash scripts/setup.sh gguf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gguf_export_without_the_converter_names_the_setup_command(run_dir, tmp_path, capsys, monkeypatch,
                                                                  no_model_load):
    from dpo.export import llamacpp

    monkeypatch.setattr(llamacpp, "bindings", lambda: object())
    monkeypatch.setenv("DPO_LLAMACPP_CONVERTER", str(tmp_path / "nothing-here"))
    for fmt in ("gguf", "gguf-lora"):
        err = _cli_error(capsys, ["--run-dir", str(run_dir), "--format", fmt, "--output", str(tmp_path / "m.gguf")])
        assert "llama.cpp's GGUF converter is not installed" in err and "bash scripts/setup.sh gguf" in err, err


def test_a_converter_refusal_becomes_one_line_naming_the_architecture():
    from dpo.export import llamacpp_convert

    log = ("INFO:hf-to-gguf:Loading model: base\nINFO:hf-to-gguf:Model architecture: OPTForCausalLM\n"
           "ERROR:hf-to-gguf:Model OPTForCausalLM is not supported\n")
    line = llamacpp_convert.refusal(log, "m")
    assert "does not support the architecture OPTForCausalLM" in line and "\n" not in line
    other = llamacpp_convert.refusal("Traceback (most recent call last):\n  File x\nValueError: bad shape\n", "m")
    assert other == "llama.cpp's converter failed on m: ValueError: bad shape"


def test_setup_unpacks_only_the_converter_from_the_source_archive(tmp_path):
    import io
    import tarfile

    from dpo.export import llamacpp_convert

    prefix = f"llama_cpp_python-{llamacpp_convert.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    archive = tmp_path / "sdist.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py",
                     "ggml/src/big.c", "convert_hf_to_gguf_update.py"):
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = llamacpp_convert.unpack(archive, tmp_path / "share" / "0.3.36")
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["conversion/llama.py", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf/__init__.py"]
