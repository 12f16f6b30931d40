"""What every export reads and writes: the run folder, the base and merged models, the output paths
(written to OUT.tmp first and renamed into place), and a verification's numbers and verdict."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dpo import smollm2
from dpo.models import load_model, resolve_model_path
from dpo.cli import first_line
from dpo.data.sources import looks_local
from dpo.export import gguf_weights


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

    try:
        base = resolve_model_path(str(config["model"]))
    except smollm2.MissingDefaultModel as e:
        raise ExportError(str(e)) from None
    return Run(run_dir, config, adapter_dir, base, bool(config.get("trust_remote_code", False)))


def has_tokenizer(folder: Path) -> bool:
    return all((folder / f).is_file() for f in TOKENIZER_FILES)


def load_run_tokenizer(run: Run):
    """The tokenizer saved with the adapter (what training used), else the base model's."""
    from transformers import AutoTokenizer

    source = str(run.adapter_dir) if has_tokenizer(run.adapter_dir) else run.base
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=run.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load the tokenizer from {source}: {first_line(e)}") from None


def base_model(run: Run):
    """The run's base model in float32, eval mode (no adapter)."""
    import torch


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


def prepare_output(out: Path, overwrite: bool) -> Path:
    """The temporary path to build `out` in, once we know it can be written (before any model loads)."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        remove_path(tmp)
        tmp.touch()  # a probe: a read-only place is refused now, not after minutes of merging
        tmp.unlink()
    except OSError as e:
        raise ExportError(f"cannot write the export to {e.filename or out}: {e.strerror or first_line(e)}") from None
    return tmp


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (only with --overwrite) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        remove_path(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        remove_path(old)


def describe_path(path: Path) -> str:
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
