"""Export a training run: its LoRA adapter, a merged Hugging Face model, or GGUF files for llama.cpp and Ollama.

    python -m dpo.export --run-dir RUN --format adapter   --output OUT_DIR
    python -m dpo.export --run-dir RUN --format merged    --output OUT_DIR [--dtype bfloat16|float16|float32]
    python -m dpo.export --run-dir RUN --format gguf      --output OUT.gguf [--quantization f16|f32|q8_0|q4_0|q4_k_m|...]
    python -m dpo.export --run-dir RUN --format gguf-lora --output OUT.gguf

A run directory holds `config.json` (its "model" names the base: a local path, a hub name or
`smollm2-135m-instruct`) and `adapter/` (a PEFT LoRA adapter with the tokenizer beside it).

- adapter: the adapter folder (and the tokenizer) copied to OUT_DIR.
- merged: the base model in float32, the adapter applied and merged (`merge_and_unload`), saved as
  a plain HF folder in `--dtype` (bfloat16 by default) with the tokenizer. Verified by reloading it
  and comparing logits with the in-memory float32 merged model.
- gguf: the float32 merged folder converted by llama.cpp's own `convert_hf_to_gguf.py` (dpo.llamacpp_convert:
  every architecture it knows) to f32/f16, or to f32 and then quantized by llama.cpp's quantizer
  (dpo.llamacpp). Verified in llama.cpp: logits, top-1 and a greedy generation against the float32 merge,
  its tokenizer against ours, and whether the adapter is in the file (dpo.gguf_weights: the file's
  dequantised weights against the merged and the base weights).
- gguf-lora: the adapter alone as a GGUF LoRA (f32, by `convert_lora_to_gguf.py`), and the base model as GGUF
  `--quantization` beside it (OUT-base-f16.gguf), which llama.cpp and Ollama apply it to; verified in llama.cpp
  (the LoRA over the base file) against the float32 merge.
Each GGUF gets an Ollama Modelfile beside it (dpo.modelfile).

Everything is written to `OUT.tmp` first and renamed into place. Errors print one line and exit 2;
a failed verification exits 1 (the file stays, for inspection).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dpo import gguf_weights, llamacpp, llamacpp_convert, modelfile
from dpo.run import card
from dpo.cli import Parser, first_line, python_command
from dpo.files import write_json_atomic
from dpo.data.sources import looks_local

FORMATS = ("adapter", "merged", "gguf", "gguf-lora")
MERGED_DTYPES = ("bfloat16", "float16", "float32")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SENTENCEPIECE_MODEL = "tokenizer.model"
QUANTIZATIONS = ("f16", "f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
CONVERTER_TYPES = ("f32", "f16")  # written by convert_hf_to_gguf.py; the others by llama.cpp's quantizer from f32
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")


class ExportError(Exception):
    """A problem the user can fix; printed as one line."""


# Verification tolerance: max |logit difference| must stay below rtol * max(1, max |reference logit|).
# Scaling by the logit range makes one number work for a 16-wide toy and a 135M model alike. A swapped or
# misnamed tensor gives differences of the order of the range itself. 4-bit types lose real accuracy on small
# models (SmolLM2-135M q4_0: mean KL 0.2-1.2 nats), so for them the numbers are reported, not judged (None):
# loading and the tokenizer still are, and so is whether the adapter is in the file (Verification.adapter_visible).
# In llama.cpp the same file is computed by other kernels, with K and V in an f16 cache by default (so an
# f32 file sees f16 rounding too) and, for f16 weights, activations rounded to f16 in the matmuls. Measured
# (tiny models / the default run's SmolLM2 export): f32 2e-4 to 6.5e-4 / -, f16 <= 3.3e-3 / 2.3e-3,
# q8_0 - / 6.2e-2 (tests/test_export_llamacpp.py, README "Export").
LLAMACPP_RTOL = {"f32": 1e-2, "f16": 2e-2, "q8_0": 0.1, "q4_0": None, "q4_k_m": None, "q5_k_m": None, "q6_k": None}


# ggml's CPU GELU reads an f16 table, so a GELU model's activations are f16-rounded once more in llama.cpp,
# whatever the weights: measured on the tiny Gemma 3 with a random LoRA, 1.1e-2 of the range for an f32 file
# (4.4e-3 with an f32 KV cache) and 2.06e-2 for an f16 file (against 3.3e-3 for the non-GELU tiny models).
GELU_TABLE_RTOL = 1e-2


def llamacpp_rtol(quantization: str, config) -> float | None:
    """LLAMACPP_RTOL, plus GELU_TABLE_RTOL for a GELU model's f32 and f16 files: independent f16 roundings
    (the KV cache, the matmul inputs of f16 weights, the GELU table) add their bounds. Quantized files'
    bounds are far above either."""
    rtol = LLAMACPP_RTOL[quantization]
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or ""
    if quantization in ("f32", "f16") and str(act).startswith("gelu"):
        return rtol + GELU_TABLE_RTOL
    return rtol


MERGED_RTOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 0.1}

VERIFY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 3 of the 7 numbers were prime: 2, 3, 5 and 7 -- about 42.86%.",
    "Ünïcödé, emoji 🦙 and 中文 text;\n\tindented   spaces\n\n",
    "def add(a, b):\n    return a + b  # code\n",
)
VERIFY_CHAT = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
)
GENERATION_PROMPT = ({"role": "user", "content": "Write one sentence about a restaurant you liked."},)
GENERATION_TOKENS = 24


@dataclass
class Run:
    dir: Path
    config: dict
    adapter_dir: Path
    base: str  # resolved model path or hub name
    trust_remote_code: bool

    @property
    def name(self) -> str:
        return self.dir.resolve().name


@dataclass
class Verification:
    what: str
    max_abs_diff: float
    logit_scale: float
    tolerance: float | None  # None: reported, not judged
    top1_agreement: float
    mean_kl: float
    tokenizer_ok: bool | None = None
    # Is the adapter in the file? RMS logit distance of the export to the merged model and to the bare
    # base model, and the adapter's own (merged to base); None: not checked.
    to_merged: float | None = None
    to_base: float | None = None
    adapter_shift: float | None = None
    # The same question asked of the file's dequantised weights (gguf_weights.WeightCheck), which can tell
    # where the logits cannot: a short run's adapter moves them less than 8-bit rounding does.
    weights: gguf_weights.WeightCheck | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def logits_can_tell(self) -> bool:
        """Whether the adapter moves the logits more than the file's own rounding does (else the distances
        to the merged and to the base model differ by noise)."""
        return self.adapter_shift is None or self.adapter_shift > self.to_merged

    @property
    def adapter_visible(self) -> bool | None:
        if self.weights is not None and self.weights.verdict is not None:
            return self.weights.verdict
        if self.to_merged is None or self.to_base is None or not self.logits_can_tell:
            return None
        return self.to_merged < self.to_base

    @property
    def ok(self) -> bool:
        finite = self.max_abs_diff == self.max_abs_diff and self.max_abs_diff != float("inf")
        within = self.tolerance is None or self.max_abs_diff <= self.tolerance
        return finite and within and self.tokenizer_ok is not False and self.adapter_visible is not False

    def _adapter_part(self) -> str:
        if self.to_merged is None or self.to_base is None:
            return ""
        logits = f"RMS logit distance {self.to_merged:.3g} to the merged model, {self.to_base:.3g} to the base"
        if self.weights is not None and self.weights.verdict is not None:
            where = "in the file" if self.weights.verdict else "NOT in the file"
            return f"; adapter {where}: {self.weights.line()} ({logits})"
        if not self.logits_can_tell:
            return (f"; adapter not judged: it moves the logits by RMS {self.adapter_shift:.3g}, less than the "
                    f"file's rounding ({self.to_merged:.3g}), so they cannot tell it from noise ({logits})")
        return f"; adapter {'in the file' if self.adapter_visible else 'NOT visible'}: {logits}"

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        tol = "not judged below 8 bits" if self.tolerance is None else f"tolerance {self.tolerance:.3g}"
        tok = "" if self.tokenizer_ok is None else (
            "; tokenizer encodes identically" if self.tokenizer_ok else "; tokenizer MISMATCH"
        )
        return (
            f"verification {verdict}: {self.what}: max |logit diff| {self.max_abs_diff:.3g} "
            f"(logit range {self.logit_scale:.3g}, {tol}), top-1 agreement {self.top1_agreement:.1%}, "
            f"mean KL {self.mean_kl:.2g} nats{tok}{self._adapter_part()}"
        )


# ----------------------------------------------------------------------------------------- run


def open_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path} is missing: is {run_dir} a training run directory?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not config.get("model"):
        raise ExportError(f'{config_path} has no "model" entry naming the base model')
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"no adapter in {run_dir}: {adapter_dir / 'adapter_config.json'} is missing")
    if not any((adapter_dir / w).is_file() for w in ADAPTER_WEIGHTS):
        raise ExportError(f"no adapter weights in {adapter_dir} (expected {' or '.join(ADAPTER_WEIGHTS)})")
    from dpo import smollm2
    from dpo.models import resolve_model_path

    try:
        base = resolve_model_path(str(config["model"]))
    except smollm2.MissingDefaultModel as e:
        raise ExportError(str(e)) from None
    return Run(run_dir, config, adapter_dir, base, bool(config.get("trust_remote_code", False)))


def _has_tokenizer(folder: Path) -> bool:
    return all((folder / f).is_file() for f in TOKENIZER_FILES)


def load_run_tokenizer(run: Run):
    """The tokenizer saved with the adapter (what training used), else the base model's."""
    from transformers import AutoTokenizer

    source = str(run.adapter_dir) if _has_tokenizer(run.adapter_dir) else run.base
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=run.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load the tokenizer from {source}: {first_line(e)}") from None


def base_model(run: Run):
    """The run's base model in float32, eval mode (no adapter)."""
    import torch

    from dpo.models import load_model

    if looks_local(run.base) and not Path(run.base).expanduser().is_dir():
        raise ExportError(f"base model folder not found: {run.base} (the \"model\" in {run.dir / 'config.json'})")
    try:
        return load_model(run.base, dtype=torch.float32, trust_remote_code=run.trust_remote_code).eval()
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load the base model {run.base!r}: {first_line(e)}") from None


def merged_model(run: Run):
    """Base model in float32 with the run's adapter merged in (a plain transformers model, eval mode)."""
    from peft import PeftModel

    base = base_model(run)
    try:
        peft_model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ExportError(f"could not apply the adapter {run.adapter_dir} to {run.base!r}: {first_line(e)}") from None
    model = peft_model.merge_and_unload()
    model.eval()
    return model


# ------------------------------------------------------------------------------------ outputs


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """The temporary path to build `out` in, once we know it can be written (before any model loads)."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        _remove(tmp)
        tmp.touch()  # a probe: a read-only place is refused now, not after minutes of merging
        tmp.unlink()
    except OSError as e:
        raise ExportError(f"cannot write the export to {e.filename or out}: {e.strerror or first_line(e)}") from None
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (only with --overwrite) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        _remove(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        _remove(old)


def _describe(path: Path) -> str:
    if path.is_file():
        return f"{path} ({_size(path.stat().st_size)})"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    names = ", ".join(str(p.relative_to(path)) for p in files)
    return f"{path} ({len(files)} files, {_size(total)}: {names})"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ------------------------------------------------------------------------------------ adapter


def export_adapter(run: Run, out, overwrite: bool = False, commands: list[str] | None = None) -> Path:
    """The adapter folder with the tokenizer, a base model name that loads anywhere, and a model card."""
    out = Path(out)
    tmp = _prepare_output(out, overwrite)
    try:
        shutil.copytree(run.adapter_dir, tmp)
        if not _has_tokenizer(tmp):
            load_run_tokenizer(run).save_pretrained(tmp)
        _portable_base_name(run, tmp / "adapter_config.json")
        loading = card.adapter_loading(card.base_model_name(str(run.config["model"])), out)
        card.write_model_card(tmp, run.dir, "adapter", loading, commands or [])
        _move_into_place(tmp, out)
    finally:
        _remove(tmp)
    return out


def _portable_base_name(run: Run, adapter_config: Path) -> None:
    """The embedded default model is a local dequantised copy; name its hub model so the adapter loads anywhere."""
    if run.config.get("model") != card.DEFAULT_MODEL or not adapter_config.is_file():
        return
    cfg = json.loads(adapter_config.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = card.DEFAULT_MODEL_HUB_NAME
    write_json_atomic(adapter_config, cfg)


# ------------------------------------------------------------------------------------- merged


def export_merged(run: Run, out, dtype: str = "bfloat16", overwrite: bool = False, model=None, tokenizer=None,
                  commands: list[str] | None = None):
    """Save the merged model in `dtype`; returns (path, float32 merged model, tokenizer)."""
    if dtype not in MERGED_DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}: use one of {', '.join(MERGED_DTYPES)}")
    out = Path(out)
    tmp = _prepare_output(out, overwrite)
    model = merged_model(run) if model is None else model
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        save_folder(model, tokenizer, tmp, dtype, _tokenizer_sources(run))
        card.write_model_card(tmp, run.dir, "merged", card.merged_loading(out), commands or [])
        _move_into_place(tmp, out)
    finally:
        _remove(tmp)
    return out, model, tokenizer


def save_folder(model, tokenizer, folder: Path, dtype: str, sources: tuple[Path, ...] = ()) -> None:
    """The model in `dtype` (a cast copy: the float32 model stays the reference) and its tokenizer, as an HF
    folder; a SentencePiece `tokenizer.model` that transformers does not write is copied from the first of
    `sources` (the run's adapter and base folders) that has one: llama.cpp's converter reads it."""
    import torch

    to_save = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
    to_save.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    spm = next((s / SENTENCEPIECE_MODEL for s in sources if (s / SENTENCEPIECE_MODEL).is_file()), None)
    if spm is not None and not (Path(folder) / SENTENCEPIECE_MODEL).is_file():
        shutil.copyfile(spm, Path(folder) / SENTENCEPIECE_MODEL)
    tokenizer_json = Path(folder) / "tokenizer.json"
    if tokenizer_json.is_file():
        fixed = byte_level_bpe(json.loads(tokenizer_json.read_text(encoding="utf-8")))
        if fixed is not None:
            tokenizer_json.write_text(json.dumps(fixed, ensure_ascii=False, indent=2), encoding="utf-8")


def _tokenizer_sources(run: Run) -> tuple[Path, ...]:
    """Where a run's tokenizer.model may be: beside the adapter, in the base model's folder or hub snapshot."""
    base = Path(run.base).expanduser()
    if base.is_dir():
        return run.adapter_dir, base
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(run.base, SENTENCEPIECE_MODEL)
    except ValueError:  # not a hub name either (HFValidationError)
        return (run.adapter_dir,)
    return (run.adapter_dir, Path(cached).parent) if isinstance(cached, str) else (run.adapter_dir,)


def byte_level_bpe(tok: dict) -> dict | None:
    """A byte-level BPE tokenizer.json that says it falls back to bytes, written as the byte-level BPE it is
    (None when there is nothing to change).

    transformers 5 writes the tokenizer it reads from a GGUF file (the default model's) with `byte_fallback`
    and a ByteFallback decoder beside its ByteLevel pre-tokenizer. Every byte already has a token there, so
    the fallback never fires in transformers, but llama.cpp's converter reads the flag as a SentencePiece
    vocabulary and llama.cpp then aborts on the first prompt. A ByteLevel decoder decodes the same text."""
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in parts):
        return None
    decoder = tok.get("decoder") or {}
    if not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return None
    fixed = copy.deepcopy(tok)
    fixed["model"]["byte_fallback"] = False
    fixed["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return fixed


def verify_merged(path: Path, reference, tokenizer, dtype: str) -> Verification:
    """Reload the saved folder (upcast to float32, so only storage rounding is measured) and compare."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return compare_logits(reference, reloaded, tokenizer, MERGED_RTOL[dtype], f"merged {dtype} reload vs float32 merge")


# --------------------------------------------------------------------------------------- gguf


def _verify_prompts(tokenizer) -> list[list[int]]:
    prompts = [tokenizer.encode(t) for t in VERIFY_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        try:
            prompts.append(list(tokenizer.apply_chat_template(list(VERIFY_CHAT), tokenize=True, return_dict=False)))
        except Exception:  # a template that needs other roles/kwargs: skip it, the plain texts remain
            pass
    return [p for p in prompts if p]


def prompt_logits(model, prompts: list[list[int]]) -> list:
    """[len(ids), vocab] float32 logits of a torch model for each prompt."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits.float()[0] for ids in prompts]


def compare_logits(reference, candidate, tokenizer, rtol: float | None, what: str, base=None) -> Verification:
    """Both models on the verification prompts: max |logit diff|, top-1 agreement, mean KL(ref || cand);
    with `base` (the model before the adapter), also whether the candidate is nearer the reference."""
    prompts = _verify_prompts(tokenizer)
    return compare_logit_lists(
        prompt_logits(reference, prompts), prompt_logits(candidate, prompts), rtol, what,
        None if base is None else prompt_logits(base, prompts),
    )


def compare_logit_lists(reference: list, candidate: list, rtol: float | None, what: str, base: list | None = None):
    """compare_logits on logits already computed (torch tensors or numpy arrays, one per prompt)."""
    import torch

    diff, scale, agree, total, kl_sum, sq_merged, sq_base, sq_shift = 0.0, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0
    for i, (a, b) in enumerate(zip(reference, candidate)):
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        kl_sum += (la.exp() * (la - lb)).sum().item()
        sq_merged += (a - b).pow(2).mean(-1).sum().item()
        if base is not None:
            c = torch.as_tensor(base[i]).float()
            sq_base += (c - b).pow(2).mean(-1).sum().item()
            sq_shift += (c - a).pow(2).mean(-1).sum().item()
    n = max(total, 1)
    tolerance = None if rtol is None else rtol * max(1.0, scale)
    v = Verification(what, diff, scale, tolerance, agree / n, kl_sum / n)
    if base is not None:
        v.to_merged, v.to_base, v.adapter_shift = (sq_merged / n) ** 0.5, (sq_base / n) ** 0.5, (sq_shift / n) ** 0.5
    return v


def check_gguf_tools(quantization: str, run: Run | None = None) -> None:
    """One line, before any model loads, when llama.cpp (bindings or converter) is missing or its converter
    has no class for the run's architecture."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown --quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    if llamacpp.bindings() is None:
        raise ExportError(f"GGUF export needs llama.cpp: {llamacpp.EXTRA_HINT}")
    try:
        llamacpp_convert.converter_dir()
    except llamacpp_convert.ConverterError as e:
        raise ExportError(str(e)) from None
    refused = None if run is None else llamacpp_convert.refused_architecture(_architecture(run))
    if refused:
        raise ExportError(refused)


def _architecture(run: Run) -> str | None:
    """The base model's config.json "architectures"[0] (None when it cannot be read here: the converter decides)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(run.base, trust_remote_code=run.trust_remote_code)
    except (OSError, ValueError):
        return None
    names = getattr(config, "architectures", None) or []
    return names[0] if names else None


def _llama_cpp(step, *args) -> None:
    """A llama.cpp step (converter or quantizer); its refusal as one line."""
    try:
        step(*args)
    except (llamacpp.LlamaCppError, llamacpp_convert.ConverterError) as e:
        raise ExportError(str(e)) from None


def convert_folder(folder: Path, dst: Path, quantization: str, scratch: Path) -> None:
    """An HF folder -> GGUF `quantization`: by llama.cpp's converter, then (below 16 bits) its quantizer from f32."""
    if quantization in CONVERTER_TYPES:
        _llama_cpp(llamacpp_convert.convert_model, folder, dst, quantization)
        return
    f32 = scratch / "f32.gguf"
    _llama_cpp(llamacpp_convert.convert_model, folder, f32, "f32")
    _llama_cpp(llamacpp.quantize, f32, dst, quantization)
    f32.unlink()


def gguf_summary(path: Path, quantization: str) -> dict:
    """What the converter wrote: architecture, llama.cpp's pre-tokenizer name, tensor types, notes."""
    reader = gguf_weights.open_reader(path)
    fields = reader.fields
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    pre = fields.get("tokenizer.ggml.pre")
    note = _k_quant_note(quantization, types) if quantization in K_QUANTS else None
    return {"architecture": fields["general.architecture"].contents(), "pre": pre.contents() if pre else None,
            "tokenizer": fields["tokenizer.ggml.model"].contents(), "tensor_types": types,
            "notes": [note] if note else []}


def _k_quant_note(quantization: str, types: dict[str, int]) -> str | None:
    """llama.cpp stores a matrix whose rows are not a multiple of 256 values in a legacy type instead."""
    k_types = sum(n for t, n in types.items() if t.endswith("_K"))
    fallback = {t: n for t, n in types.items() if not t.endswith("_K") and t not in ("F32",)}
    if not fallback:
        return None
    kinds = ", ".join(f"{n} {t}" for t, n in fallback.items())
    return (f"{quantization}: llama.cpp stored {kinds} matrices outside the k-quant types ({k_types} in them): "
            "k-quants need rows that are multiples of 256 values, so it falls back for the others")


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".Modelfile")


def _write_modelfile(gguf_path: Path, tokenizer, adapter: Path | None = None) -> Path:
    text = modelfile.modelfile(gguf_path.name, getattr(tokenizer, "chat_template", None),
                               getattr(tokenizer, "eos_token", None), adapter.name if adapter else None)
    path = modelfile_path(adapter or gguf_path)
    path.write_text(text, encoding="utf-8")
    return path


def _gguf_out(run: Run, out, suffix: str) -> Path:
    out = Path(out)
    return out / f"{run.name}-{suffix}.gguf" if out.is_dir() else out


def export_gguf(run: Run, out, quantization: str = "f16", overwrite: bool = False, model=None, tokenizer=None):
    """Write the run as GGUF (and its Modelfile); returns (path, summary, float32 merged model, tokenizer)."""
    out = _gguf_out(run, out, quantization)
    tmp = _prepare_output(out, overwrite)
    check_gguf_tools(quantization, run)
    model = merged_model(run) if model is None else model
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".dpo-export-") as scratch:
            folder = Path(scratch) / "merged"
            save_folder(model, tokenizer, folder, "float32", _tokenizer_sources(run))
            convert_folder(folder, tmp, quantization, Path(scratch))
        _move_into_place(tmp, out)
        summary = gguf_summary(out, quantization)
        summary["modelfile"] = _write_modelfile(out, tokenizer)
    finally:
        _remove(tmp)
    return out, summary, model, tokenizer


def lora_base_path(out: Path, quantization: str) -> Path:
    return out.with_name(f"{out.stem}-base-{quantization}.gguf")


def export_gguf_lora(run: Run, out, quantization: str = "f16", overwrite: bool = False, tokenizer=None):
    """The adapter as a GGUF LoRA (f32) at `out`, and the base model as GGUF `quantization` beside it (what
    llama.cpp and Ollama apply it to), with a Modelfile naming both; returns (lora, base gguf, summary, tokenizer)."""
    out = _gguf_out(run, out, "lora")
    base_out = lora_base_path(out, quantization)
    tmp, base_tmp = _prepare_output(out, overwrite), _prepare_output(base_out, overwrite)
    check_gguf_tools(quantization, run)
    base = base_model(run)
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".dpo-export-") as scratch:
            folder = Path(scratch) / "base"
            save_folder(base, tokenizer, folder, "float32", _tokenizer_sources(run))
            convert_folder(folder, base_tmp, quantization, Path(scratch))
            _llama_cpp(llamacpp_convert.convert_lora, run.adapter_dir, folder, tmp, "f32")
        _move_into_place(base_tmp, base_out)
        _move_into_place(tmp, out)
        summary = gguf_summary(base_out, quantization)
        summary["modelfile"] = _write_modelfile(base_out, tokenizer, adapter=out)
    finally:
        _remove(tmp)
        _remove(base_tmp)
    return out, base_out, summary, tokenizer


def verify_gguf(path: Path, reference, tokenizer, quantization: str, base=None, lora: Path | None = None) -> Verification:
    """The file run by llama.cpp itself on the verification prompts (our token ids, so the weights are
    compared), its tokenizer against ours, and a greedy generation printed beside the merged model's; with
    `base` (the model before the adapter), whether the adapter is in the file (its weights, where it holds
    them, else the logits). With `lora`, `path` is the base file and llama.cpp applies the LoRA file over it."""
    prompts = _verify_prompts(tokenizer)
    what = f"GGUF {quantization}{' + LoRA' if lora else ''} in llama.cpp vs float32 merge"
    try:
        llm = llamacpp.LlamaCppModel(path, n_ctx=max(512, max(map(len, prompts)) + GENERATION_TOKENS + 64), lora=lora)
        got = [llm.logits(ids) for ids in prompts]
        v = compare_logit_lists(prompt_logits(reference, prompts), got, llamacpp_rtol(quantization, reference.config),
                                what, None if base is None else prompt_logits(base, prompts))
        problems = llamacpp_tokenizer_differences(llm, tokenizer)
        v.tokenizer_ok = not problems
        v.notes.extend(problems)
        v.notes.extend(_generations(llm, reference, tokenizer))
        llm.close()
    except llamacpp.LlamaCppError as e:
        raise ExportError(str(e)) from None
    if base is not None and lora is None:
        v.weights = gguf_weights.check_file(path, reference, base)
    return v


def llamacpp_tokenizer_differences(llm, tokenizer) -> list[str]:
    """Texts that llama.cpp's tokenizer (from the file) splits differently from the run's tokenizer."""
    problems = []
    for text in VERIFY_TEXTS:
        for add_special in (False, True):
            ours = tokenizer.encode(text, add_special_tokens=add_special)
            theirs = llm.tokenize(text, add_special)
            if ours != theirs:
                problems.append(f"llama.cpp tokenizes {text[:30]!r} (special={add_special}) as {theirs[:8]}..., "
                                f"transformers as {ours[:8]}...")
    return problems


def _generations(llm, reference, tokenizer) -> list[str]:
    """Greedy continuations of one chat prompt by llama.cpp and by the merged model, side by side."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = list(tokenizer.apply_chat_template(list(GENERATION_PROMPT), tokenize=True, add_generation_prompt=True,
                                                 return_dict=False))
    else:
        ids = tokenizer.encode(GENERATION_PROMPT[0]["content"])
    eos = tokenizer.eos_token_id
    theirs = llm.greedy(ids, GENERATION_TOKENS, eos_id=eos)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=GENERATION_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    ours = [t for t in out[0, len(ids):].tolist() if t != eos]
    return [f"generation, llama.cpp:    {tokenizer.decode(theirs)!r}",
            f"generation, merged model: {tokenizer.decode(ours)!r}"]


# ---------------------------------------------------------------------------------------- CLI


NAME = "dpo.export"  # what its error lines start with (python -m dpo.train's: "dpo")


def build_parser() -> Parser:
    p = Parser(
        prog="python -m dpo.export", name=NAME,
        description="Export a training run as its LoRA adapter, a merged HF model, or a GGUF file.",
    )
    p.add_argument("--run-dir", required=True, default=argparse.SUPPRESS, help="the training run directory (config.json, adapter/)")
    p.add_argument("--format", required=True, choices=FORMATS, default=argparse.SUPPRESS, help=" | ".join(FORMATS))
    p.add_argument("--output", required=True, default=argparse.SUPPRESS,
                   help="folder (adapter, merged) or .gguf file (gguf, gguf-lora; a folder works too)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=argparse.SUPPRESS,
                   help="gguf (for gguf-lora: the base model's file); f16 when not given")
    p.add_argument("--dtype", choices=MERGED_DTYPES, default=argparse.SUPPRESS,
                   help="merged only; bfloat16 when not given")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of unexpected errors")
    return p


def _say(text: str) -> None:
    """A progress line: the phases of an export take seconds to minutes."""
    print(f"export: {text}", flush=True)


def _commands(run: Run, argv: list[str]) -> list[str]:
    return [python_command("dpo.train", ["--config", str(run.dir / "config.json")]) + "   # the training run",
            python_command("dpo.export", argv)]


def run_export(args, argv: list[str] | None = None) -> int:
    quantization, dtype = getattr(args, "quantization", None), getattr(args, "dtype", None)
    if quantization is not None and not args.format.startswith("gguf"):
        raise ExportError("--quantization applies to --format gguf and gguf-lora only")
    if dtype is not None and args.format != "merged":
        raise ExportError("--dtype applies to --format merged only")
    run = open_run(args.run_dir)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    commands = _commands(run, argv if argv is not None else sys.argv[1:])
    if args.format == "adapter":
        out = export_adapter(run, args.output, overwrite=args.overwrite, commands=commands)
        print(f"wrote adapter: {_describe(out)}")
        print(f"base model for this adapter: {run.config['model']}")
        return 0
    if args.format == "merged":
        return _run_merged(run, args, dtype or "bfloat16", commands)
    if args.format == "gguf-lora":
        return _run_gguf_lora(run, args, quantization or "f16")
    return _run_gguf(run, args, quantization or "f16")


def _run_merged(run: Run, args, dtype: str, commands: list[str]) -> int:
    _say(f"loading {run.base} and merging the adapter (float32)")
    out, model, tokenizer = export_merged(run, args.output, dtype, overwrite=args.overwrite, commands=commands)
    print(f"wrote merged {dtype} model: {_describe(out)}")
    if args.no_verify:
        return 0
    _say("verifying: reloading the folder and comparing logits")
    return _report([verify_merged(out, model, tokenizer, dtype)])


def _print_summary(what: str, out: Path, summary: dict) -> None:
    types = ", ".join(f"{v} {k}" for k, v in summary["tensor_types"].items())
    print(f"wrote {what}: {_describe(out)}; architecture {summary['architecture']}; tensors: {types}; "
          f"tokenizer.ggml.model={summary['tokenizer']}, pre={summary['pre']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote Ollama Modelfile: {summary['modelfile']} (ollama create NAME -f {summary['modelfile']})")


def _run_gguf(run: Run, args, quantization: str) -> int:
    _say(f"loading {run.base}, merging the adapter (float32) and converting it with llama.cpp's converter "
         f"to GGUF {quantization}")
    out, summary, model, tokenizer = export_gguf(run, args.output, quantization, overwrite=args.overwrite)
    _print_summary(f"GGUF {quantization}", out, summary)
    if args.no_verify:
        return 0
    _say("verifying in llama.cpp (the base model is loaded too, to check that the adapter is in the file)")
    return _report([verify_gguf(out, model, tokenizer, quantization, base=base_model(run))])


def _run_gguf_lora(run: Run, args, quantization: str) -> int:
    _say(f"converting the adapter and the base model {run.base} (GGUF {quantization}) with llama.cpp's converters")
    out, base_out, summary, tokenizer = export_gguf_lora(run, args.output, quantization, overwrite=args.overwrite)
    print(f"wrote GGUF LoRA: {_describe(out)}")
    _print_summary(f"its base model as GGUF {quantization}", base_out, summary)
    if args.no_verify:
        return 0
    _say("verifying in llama.cpp: the LoRA over the base file against the merged model")
    model, base = merged_model(run), base_model(run)
    return _report([verify_gguf(base_out, model, tokenizer, quantization, base=base, lora=out)])


def _report(checks: list[Verification]) -> int:
    for v in checks:
        print(v.line())
        for note in v.notes:
            print(f"  {note}")
    return 0 if all(v.ok for v in checks) else 1


def main(argv: list[str] | None = None) -> int:
    # Keep the output to what was written and how it verified: the libraries' plain tqdm bars are switched
    # off only by the environment, read when tqdm is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        return run_export(args, argv)
    except ExportError as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full place: name the path and the cause, as training does
        where = e.filename or args.output
        print(f"{NAME}: error: could not write the export to {where}: {e.strerror or first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{NAME}: error: interrupted", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user; --traceback for a bug report
        if args.traceback:
            raise
        print(f"{NAME}: error: unexpected {type(e).__name__}: {first_line(e)} (rerun with --traceback for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
