"""dpo.export: adapter copy, merged HF model, and GGUF (read back by transformers) from a training run.

The run is built here: a tiny random Llama (hidden 16, 2 query heads sharing 1 KV head, so the GGUF
Q/K permutation is exercised with GQA) saved with the real SmolLM2 tokenizer, and a LoRA adapter whose
B matrices are perturbed so the merge changes the logits.

Tolerances, and why:
- merged float32: the reload equals base+adapter up to float32 rounding (W + s*B@A is rounded once, the
  unmerged path rounds x@W and x@A@B separately; measured 1.8e-5 at logit range ~11): 1e-4 absolute.
- merged bfloat16 (reloaded and upcast): bf16 keeps 8 significant bits (relative rounding <= 2^-9 per
  weight); this toy's RMSNorm-ed residual stream amplifies that to ~3% of the logit range (measured
  0.32 of 11.6), so 0.1 x range, plus top-1 agreement >= 90%.
- GGUF: each file is first compared with an *oracle*: the float32 merged model whose weights went
  through exactly the storage rounding the file applies (f16 rounding, or gguf.quants Q8_0
  quantize->dequantize, row by row). transformers dequantizes to those same numbers and undoes the Q/K
  permutation exactly, so the oracle must match to float32 noise (1e-4): this pins tensor names, shapes,
  permutation (with GQA) and types with no slack. Then against the unrounded merge: f16 within
  1e-2 x range (measured 2.7e-3), q8_0 within 0.1 x range (measured ~4e-2) -- the library's own
  verification tolerances (dpo.export.VERIFY_RTOL).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo import export
from dpo.models import LoraSettings, add_lora

from .conftest import build_tiny_llama

PROMPTS = ("The quick brown fox jumps over the lazy dog.", "In 2024, 3 of 7 numbers were prime: 2, 3, 5, 7.")


# --------------------------------------------------------------------------------- fixtures


def make_run(root: Path, tokenizer, with_tokenizer: bool = True, model=None, **overrides) -> Path:
    """A run directory: base model folder, RUN/config.json naming it, RUN/adapter with a non-trivial LoRA
    (on `model`, a tiny random Llama unless given)."""
    base_dir = root / "base"
    model = build_tiny_llama(len(tokenizer), **overrides) if model is None else model
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter actually change the model
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
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


def rounded_like_gguf(model, quantization: str):
    """The oracle: a copy of `model` with each 2-D weight rounded as the GGUF file stores it."""
    import copy

    import gguf

    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in oracle.named_parameters():
            if p.ndim != 2:
                continue  # norms stay float32
            w = p.detach().numpy()
            if quantization == "q8_0" and w.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                w = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
            else:
                w = w.astype(np.float16).astype(np.float32)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return oracle


# ---------------------------------------------------------------------------------- adapter


def test_adapter_export_copies_adapter_and_tokenizer(run_dir, tmp_path, capsys):
    out = tmp_path / "adapter-out"
    assert export.main(["--run-dir", str(run_dir), "--format", "adapter", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote adapter" in printed and str(out) in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (run_dir / "adapter" / name).read_bytes()
    assert not (tmp_path / "adapter-out.tmp").exists()


def test_adapter_export_adds_the_base_tokenizer_when_the_adapter_has_none(tmp_path, tok):
    run = make_run(tmp_path, tok, with_tokenizer=False)
    out = export.export_adapter(export.open_run(run), tmp_path / "out")
    assert (out / "tokenizer.json").is_file() and (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------- merged


def test_merged_float32_reloads_to_base_plus_adapter(run_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, peft_model = base_and_adapter(run_dir)
    want = logits(peft_model, tok)
    assert max_diff(want, logits(base, tok)) > 0.5, "the adapter should change the logits"

    out, _, _ = export.export_merged(export.open_run(run_dir), tmp_path / "merged32", dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(want, logits(reloaded, tok)) < 1e-4
    assert AutoTokenizer.from_pretrained(out).encode(PROMPTS[1]) == tok.encode(PROMPTS[1])
    assert not any("lora" in k for k in reloaded.state_dict())


def test_merged_bfloat16_via_cli(run_dir, tok, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert export.main(["--run-dir", str(run_dir), "--format", "merged", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote merged bfloat16 model" in printed and "verification OK" in printed

    stored = AutoModelForCausalLM.from_pretrained(out)
    assert stored.dtype == torch.bfloat16  # saved in 16 bits by default
    reloaded = stored.float().eval()
    _, peft_model = base_and_adapter(run_dir)
    want = logits(peft_model, tok)
    assert max_diff(want, logits(reloaded, tok)) < 0.1 * logit_range(want)
    assert top1(want, logits(reloaded, tok)) >= 0.9


# ------------------------------------------------------------------------------------- gguf


@pytest.fixture(scope="module")
def f16_export(run_dir, tmp_path_factory):
    """`python -m dpo.export ... --format gguf` (f16, verifying), with the read-back model kept for the tests."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    loaded = {}
    real_load = export.load_gguf

    def keep(path):
        loaded["value"] = real_load(path)
        return loaded["value"]

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(export, "load_gguf", keep)
        rc = export.main(["--run-dir", str(run_dir), "--format", "gguf", "--output", str(out)])
    return rc, stdout.getvalue(), out, loaded.get("value")


def test_gguf_f16_cli_writes_and_verifies(f16_export):
    rc, printed, out, loaded = f16_export
    assert rc == 0, printed
    assert out.is_file() and not out.with_name(out.name + ".tmp").exists()
    assert "wrote GGUF f16" in printed and "tokenizer.ggml.pre=gpt-2" in printed
    assert "verification OK" in printed and "tokenizer encodes identically" in printed
    assert loaded is not None


def test_gguf_f16_round_trip_through_transformers(f16_export, run_dir, tok):
    _, _, out, (model, _, _) = f16_export
    _, peft_model = base_and_adapter(run_dir)
    merged = peft_model.merge_and_unload().eval()
    got = logits(model, tok)
    assert max_diff(logits(rounded_like_gguf(merged, "f16"), tok), got) < 1e-4  # exact up to float32 noise
    want = logits(merged, tok)
    assert max_diff(want, got) < export.VERIFY_RTOL["f16"] * logit_range(want)
    assert top1(want, got) >= 0.95  # near-ties among 49k logits may flip


def test_gguf_file_contents(f16_export, tok):
    from gguf import GGUFReader

    reader = GGUFReader(str(f16_export[2]))
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.attention.head_count"].contents() == 2
    assert f["llama.attention.head_count_kv"].contents() == 1
    assert f["llama.rope.dimension_count"].contents() == 8
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id == 2
    assert f["tokenizer.chat_template"].contents() == tok.chat_template
    assert len(f["tokenizer.ggml.tokens"].data) == len(tok)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types  # the tiny model does not tie its embeddings


def test_gguf_tokenizer_round_trip(f16_export, tok):
    _, _, _, (_, loaded_tok, special_ids) = f16_export
    texts = [
        "Hello world",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "numbers 1234567 and 3.14159",
        "Ünïcödé 🦙 中文 — “quotes”",
        "<|im_start|>user\nHi<|im_end|>\n",
    ]
    for text in texts:
        assert loaded_tok.encode(text) == tok.encode(text), text
    assert loaded_tok.decode(tok.encode(texts[3])) == texts[3]
    assert export.tokenizer_differences(tok, loaded_tok) == []
    assert special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}


def test_gguf_q8_0_round_trip(tmp_path, tok):
    """Hidden 64 so rows hold whole 32-value Q8_0 blocks (the 16-wide toy would fall back to f16); 4:1 GQA."""
    from gguf import GGUFReader

    run = make_run(tmp_path, tok, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1)
    out, summary, merged, tokenizer = export.export_gguf(export.open_run(run), tmp_path / "tiny-q8_0.gguf", "q8_0")
    assert summary["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert {t.tensor_type.name for t in GGUFReader(str(out)).tensors if t.name.endswith("attn_k.weight")} == {"Q8_0"}

    model, _, _ = export.load_gguf(out, with_tokenizer=False)
    got = logits(model, tok)
    assert max_diff(logits(rounded_like_gguf(merged, "q8_0"), tok), got) < 1e-4
    want = logits(merged, tok)
    assert max_diff(want, got) < export.VERIFY_RTOL["q8_0"] * logit_range(want)
    assert top1(want, got) >= 0.9


def test_qk_permutation_is_undone_by_transformers_for_gqa():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    q = np.random.default_rng(0).normal(size=(8 * 6, 20)).astype(np.float32)
    k = q[: 2 * 6]
    assert not np.array_equal(export._permute_qk(q, 8), q)
    assert np.array_equal(proc.process(export._permute_qk(q, 8), "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(proc.process(export._permute_qk(k, 2), "blk.0.attn_k.weight").weights, k)


def test_unsupported_architecture_is_a_clear_error(tok, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, pad_token_id=2)
    )
    supported = ", ".join(export.ARCHITECTURES)
    with pytest.raises(export.ExportError, match=f"GGUF export supports {supported}; this model is 'gpt_neox'"):
        export.write_gguf(model, tok, tmp_path / "x.gguf")


# ------------------------------------------------------------------------------ q4_k_m tool


def _fake_llama_quantize(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir()
    script = bin_dir / "llama-quantize"
    script.write_text(f"#!{sys.executable}\nimport shutil, sys\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """As on a machine without the `gguf` extra (its bindings win over a llama-quantize on PATH)."""
    from dpo import llamacpp

    monkeypatch.setattr(llamacpp, "bindings", lambda: None)


def test_q4_k_m_without_llama_quantize_says_how_to_get_it(run_dir, tmp_path, capsys, monkeypatch, no_llama_cpp):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    out = tmp_path / "x.gguf"
    rc = export.main(["--run-dir", str(run_dir), "--format", "gguf", "--quantization", "q4_k_m", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1
    assert "llama-quantize" in err and "llama.cpp" in err and "PATH" in err
    assert "pip install -e '.[gguf]'" in err  # the extra that brings llama.cpp


def test_q4_k_m_runs_llama_quantize_on_the_f16_file(run_dir, tmp_path, capsys, monkeypatch, no_llama_cpp):
    # A stand-in that records its arguments and copies the f16 input: checks the plumbing, not llama.cpp.
    _fake_llama_quantize(
        tmp_path / "bin",
        f"open({str(tmp_path / 'args.txt')!r}, 'w').write(' '.join(sys.argv[1:]))\nshutil.copy(sys.argv[1], sys.argv[2])",
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    out = tmp_path / "m.gguf"
    args = ["--run-dir", str(run_dir), "--format", "gguf", "--quantization", "q4_k_m", "--output", str(out)]
    assert export.main(args + ["--no-verify"]) == 0
    src, dst, kind = (tmp_path / "args.txt").read_text().split()
    assert kind == "Q4_K_M" and dst == str(out) + ".tmp" and src.endswith("f16.gguf")
    assert out.read_bytes()[:4] == b"GGUF"
    assert "wrote GGUF q4_k_m" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.txt", "bin", "m.gguf"]  # scratch f16 removed


def test_q4_k_m_failure_is_one_line(run_dir, tmp_path, capsys, monkeypatch, no_llama_cpp):
    _fake_llama_quantize(tmp_path / "bin", "print('boom: bad things', file=sys.stderr)\nsys.exit(3)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    out = tmp_path / "m.gguf"
    rc = export.main(["--run-dir", str(run_dir), "--format", "gguf", "--quantization", "q4_k_m", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "llama-quantize failed (exit 3): boom: bad things" in err and not out.exists()
    assert not (tmp_path / "m.gguf.tmp").exists()


# ----------------------------------------------------------------------------------- errors


def _cli_error(capsys, args) -> str:
    capsys.readouterr()  # drop what the setup printed
    rc = export.main(args)
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
    assert "--quantization applies to --format gguf only" in _cli_error(
        capsys, ["--run-dir", str(run_dir), "--format", "merged", "--quantization", "f16", "--output", "o"]
    )


def test_existing_output_needs_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert "already exists" in _cli_error(capsys, ["--run-dir", str(run_dir), "--format", "adapter", "--output", str(out)])
    assert export.main(["--run-dir", str(run_dir), "--format", "adapter", "--output", str(out), "--overwrite"]) == 0
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

    monkeypatch.setattr(export, "export_adapter", broken)
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


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


def build_tiny(kind: str, vocab_size: int, hidden: int = 64, **overrides):
    """A tiny random model of one family GGUF export supports (4 query heads sharing 2 KV heads).
    Qwen3 keeps its real head_dim of 128: transformers' GGUF reader assumes it for qwen3 files.
    Biases and norms are randomised so a misnamed or unpermuted one changes the logits."""
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
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True))
    elif kind == "gemma2":  # head_dim and query_pre_attn_scalar as transformers' GGUF reader assumes them
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{"sliding_window": 8, **common}, head_dim=256,
                                                     query_pre_attn_scalar=256, tie_word_embeddings=True))
    elif kind == "gemma3_text":  # 6 layers: llama.cpp's pattern makes the 6th global
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{"sliding_window": 8, **common, "num_hidden_layers": 6},
                                                         head_dim=256, query_pre_attn_scalar=256,
                                                         tie_word_embeddings=True))
    elif kind == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, sliding_window=None, tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_each_architecture_exports_its_merged_adapter_to_gguf_exactly(kind, tok, tmp_path):
    """f32 GGUF of base + LoRA, read back by transformers: equal to the float32 merge up to float32 noise."""
    from gguf import GGUFReader

    run = make_run(tmp_path, tok, model=build_tiny(kind, len(tok)))
    out, summary, merged, tokenizer = export.export_gguf(export.open_run(run), tmp_path / "m.gguf", "f32")
    assert summary["architecture"] == {"mistral": "llama", "gemma3_text": "gemma3"}.get(kind, kind)
    assert GGUFReader(str(out)).fields["general.architecture"].contents() == summary["architecture"]
    model, _, _ = export.load_gguf(out, with_tokenizer=False)
    want, got = logits(merged, tok), logits(model, tok)
    assert max_diff(want, got) < 1e-4 * max(1.0, logit_range(want))
    base, _ = base_and_adapter(run)
    assert max_diff(logits(base, tok), got) > 1e-2  # the adapter is in the file


# ------------------------------------------------------------------------- adapter is in the file


def test_a_gguf_of_the_bare_base_model_fails_verification(run_dir, tok, tmp_path):
    run = export.open_run(run_dir)
    base = export.base_model(run)
    out, _, merged, _ = export.export_gguf(run, tmp_path / "m.gguf", "f16")
    good = export.verify_gguf(out, merged, tok, "f16", base=base)
    assert good.ok and good.adapter_visible and "adapter in the file" in good.line()
    bare, _, _, _ = export.export_gguf(run, tmp_path / "bare.gguf", "f16", model=export.base_model(run))
    v = export.verify_gguf(bare, merged, tok, "f16", base=base)
    assert v.adapter_visible is False and not v.ok and "adapter NOT visible" in v.line()


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
        assert export.main(args) == 0
        text = (out / "README.md").read_text()
        assert f"base_model: {cfg['model']}" in text and "pairs.jsonl" in text
        assert "| beta | 0.25 |" in text and "| loss types | sigmoid |" in text and "| optimizer steps | 8 |" in text
        assert "| eval_loss | 0.693 | 0.282 |" in text and "48 held-out pairs (sentiment)" in text
        assert "-m dpo.export --run-dir" in text and f"--config {run / 'config.json'}" in text
        assert ("PeftModel.from_pretrained" in text) == (fmt == "adapter")
    assert "library_name: peft" in (tmp_path / "adapter" / "README.md").read_text()


def test_the_default_models_adapter_names_the_hub_model(tmp_path, run_dir):
    run = export.open_run(run_dir)
    run.config = {**run.config, "model": "smollm2-135m-instruct"}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/.cache/dpo/x", "r": 4}))
    export._portable_base_name(run, tmp_path / "adapter_config.json")
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

    monkeypatch.setattr(export.shutil, "copytree", full)
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
def test_each_architecture_trains_then_exports_adapter_merged_and_gguf(kind, tok, tmp_path):
    """Adapter, float32 merge and f32 GGUF of a trained run: the merge equals base + adapter, the GGUF
    read back by transformers equals the merge, and the trained adapter visibly moved the logits."""
    import safetensors.torch

    run_dir = trained_run(tmp_path, tok, kind)
    run = export.open_run(run_dir)
    adapter = export.export_adapter(run, tmp_path / "adapter")
    trained = safetensors.torch.load_file(adapter / "adapter_model.safetensors")
    fused = {"phi3": {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"}}.get(kind)
    names = {k.split(".")[-3] for k in trained if "lora_A" in k}
    assert names == (fused or {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)

    base, with_adapter = base_and_adapter(run_dir)
    want = logits(with_adapter, tok)
    assert max_diff(want, logits(base, tok)) > 1e-3, "two steps should move the logits"
    merged_dir, _, _ = export.export_merged(run, tmp_path / "merged", dtype="float32")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert max_diff(want, logits(merged, tok)) < 1e-4 * max(1.0, logit_range(want))
    out, _, _, _ = export.export_gguf(run, tmp_path / "m.gguf", "f32")
    model, _, _ = export.load_gguf(out, with_tokenizer=False)
    assert max_diff(want, logits(model, tok)) < 1e-4 * max(1.0, logit_range(want))


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


def test_gemma_layouts_llama_cpp_cannot_run_are_refused_in_one_line(tok, tmp_path):
    """llama.cpp fixes Gemma's attention scale (1/sqrt(head_dim)), its sliding pattern and Gemma 3's local RoPE."""
    cases = [("gemma2", {"sliding_window": 8}, {"query_pre_attn_scalar": 128}, "query_pre_attn_scalar=128"),
             ("gemma2", {}, {"layer_types": ["full_attention", "sliding_attention"]}, "one layer in 2 global"),
             ("gemma3_text", {}, {"rope_parameters": {
                 "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "plain RoPE base 10000")]
    for kind, build, change, message in cases:
        model = build_tiny(kind, len(tok), **build)
        for key, value in change.items():
            setattr(model.config, key, value)
        with pytest.raises(export.ExportError, match=message) as e:
            export.write_gguf(model, tok, tmp_path / "x.gguf", "f32")
        assert "\n" not in str(e.value)


def test_gelu_models_f32_and_f16_files_get_the_gelu_tables_bound_on_top_in_llama_cpp(tok):
    assert export.llamacpp_rtol("f32", build_tiny("gemma2", len(tok)).config) == pytest.approx(
        export.LLAMACPP_RTOL["f32"] + export.GELU_TABLE_RTOL)
    assert export.llamacpp_rtol("f16", build_tiny("gemma2", len(tok)).config) == pytest.approx(
        export.LLAMACPP_RTOL["f16"] + export.GELU_TABLE_RTOL)
    assert export.llamacpp_rtol("f16", build_tiny("qwen2", len(tok)).config) == export.LLAMACPP_RTOL["f16"]
    assert export.llamacpp_rtol("f32", build_tiny("qwen2", len(tok)).config) == export.LLAMACPP_RTOL["f32"]
    assert export.llamacpp_rtol("q8_0", build_tiny("gemma2", len(tok)).config) == export.LLAMACPP_RTOL["q8_0"]
