"""Export a training run: its LoRA adapter, a merged Hugging Face model, or a GGUF file for llama.cpp.

    python -m dpo.export --run-dir RUN --format adapter --output OUT_DIR
    python -m dpo.export --run-dir RUN --format merged  --output OUT_DIR [--dtype bfloat16|float16|float32]
    python -m dpo.export --run-dir RUN --format gguf    --output OUT.gguf [--quantization f16|f32|q8_0|q4_0|q4_k_m]

A run directory holds `config.json` (its "model" names the base: a local path, a hub name or
`smollm2-135m-instruct`) and `adapter/` (a PEFT LoRA adapter with the tokenizer beside it).

- adapter: the adapter folder (and the tokenizer) copied to OUT_DIR.
- merged: the base model in float32, the adapter applied and merged (`merge_and_unload`), saved as
  a plain HF folder in `--dtype` (bfloat16 by default) with the tokenizer. Verified by reloading it
  and comparing logits with the in-memory float32 merged model.
- gguf: the float32 merged model written with the `gguf` package (Llama architecture only):
  architecture metadata, the byte-level BPE tokenizer (tokens, merges, token types, special ids,
  chat template), tensors under llama.cpp's names with Q/K rows permuted the way llama.cpp's RoPE
  expects (per KV head for K, so GQA works). f32/f16/q8_0/q4_0 are quantized in numpy by
  `gguf.quants`; q4_k_m needs llama.cpp's `llama-quantize` on PATH (it quantizes our f16 file).
  Verified by loading the file back with transformers (`gguf_file=`) and comparing its logits and
  its tokenizer with the merged model's.

Everything is written to `OUT.tmp` first and renamed into place. Errors print one line and exit 2;
a failed verification exits 1 (the file stays, for inspection).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("adapter", "merged", "gguf")
QUANTIZATIONS = ("f16", "f32", "q8_0", "q4_0", "q4_k_m")
MERGED_DTYPES = ("bfloat16", "float16", "float32")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

LLAMA_QUANTIZE = "llama-quantize"
LLAMA_QUANTIZE_HINT = (
    "build llama.cpp (git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp && "
    "cmake -B build && cmake --build build --target llama-quantize -j, then put build/bin on PATH), "
    "or install a release (e.g. `brew install llama.cpp`); "
    "or export --quantization q8_0 / q4_0, which need nothing else"
)

# Verification tolerance: max |logit difference| must stay below rtol * max(1, max |reference logit|).
# Scaling by the logit range makes one number work for a 16-wide toy and a 135M model alike. Measured
# (tiny test Llama / SmolLM2-135M + random LoRA): f32 0 / -, f16 2.7e-3 / 1.3e-3, q8_0 4.3e-2 / 3.9e-2,
# bf16 merged 2.8e-2 / -. A wrong Q/K permutation or a swapped tensor gives differences of the order of
# the range itself. 4-bit types lose real accuracy on small models (SmolLM2-135M q4_0: mean KL 0.2-1.2
# nats), so for them the numbers are reported, not judged (None): loading and the tokenizer still are.
VERIFY_RTOL = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.1, "q4_0": None, "q4_k_m": None}
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


class ExportError(Exception):
    """A problem the user can fix; printed as one line."""


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
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        finite = self.max_abs_diff == self.max_abs_diff and self.max_abs_diff != float("inf")
        within = self.tolerance is None or self.max_abs_diff <= self.tolerance
        return finite and within and self.tokenizer_ok is not False

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        tol = "not judged for 4-bit" if self.tolerance is None else f"tolerance {self.tolerance:.3g}"
        tok = "" if self.tokenizer_ok is None else (
            "; tokenizer encodes identically" if self.tokenizer_ok else "; tokenizer MISMATCH"
        )
        return (
            f"verification {verdict}: {self.what}: max |logit diff| {self.max_abs_diff:.3g} "
            f"(logit range {self.logit_scale:.3g}, {tol}), top-1 agreement {self.top1_agreement:.1%}, "
            f"mean KL {self.mean_kl:.2g} nats{tok}"
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
        raise ExportError(f"could not load the tokenizer from {source}: {_first_line(e)}") from None


def merged_model(run: Run):
    """Base model in float32 with the run's adapter merged in (a plain transformers model, eval mode)."""
    import torch
    from peft import PeftModel

    from dpo.models import load_model

    # A hub id is "name" or "org/name"; anything else (absolute, ./relative, deeper) is a local folder.
    looks_local = run.base.startswith(("/", ".", "~")) or run.base.count("/") > 1
    if looks_local and not Path(run.base).expanduser().is_dir():
        raise ExportError(f"base model folder not found: {run.base} (the \"model\" in {run.dir / 'config.json'})")
    try:
        base = load_model(run.base, dtype=torch.float32, trust_remote_code=run.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load the base model {run.base!r}: {_first_line(e)}") from None
    try:
        peft_model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ExportError(f"could not apply the adapter {run.adapter_dir} to {run.base!r}: {_first_line(e)}") from None
    model = peft_model.merge_and_unload()
    model.eval()
    return model


# ------------------------------------------------------------------------------------ outputs


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    _remove(tmp)
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


def export_adapter(run: Run, out, overwrite: bool = False) -> Path:
    out = Path(out)
    tmp = _prepare_output(out, overwrite)
    try:
        shutil.copytree(run.adapter_dir, tmp)
        if not _has_tokenizer(tmp):
            load_run_tokenizer(run).save_pretrained(tmp)
        _move_into_place(tmp, out)
    finally:
        _remove(tmp)
    return out


# ------------------------------------------------------------------------------------- merged


def export_merged(run: Run, out, dtype: str = "bfloat16", overwrite: bool = False, model=None, tokenizer=None):
    """Save the merged model in `dtype`; returns (path, float32 merged model, tokenizer)."""
    import torch

    if dtype not in MERGED_DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}: use one of {', '.join(MERGED_DTYPES)}")
    out = Path(out)
    tmp = _prepare_output(out, overwrite)
    model = merged_model(run) if model is None else model
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        # Cast a copy: the float32 model stays the reference for verification.
        to_save = copy.deepcopy(model).to(getattr(torch, dtype))
        to_save.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del to_save
        _move_into_place(tmp, out)
    finally:
        _remove(tmp)
    return out, model, tokenizer


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


def compare_logits(reference, candidate, tokenizer, rtol: float | None, what: str) -> Verification:
    """Both models on the verification prompts: max |logit diff|, top-1 agreement, mean KL(ref || cand)."""
    import torch

    diff, scale, agree, total, kl_sum = 0.0, 0.0, 0, 0, 0.0
    with torch.no_grad():
        for ids in _verify_prompts(tokenizer):
            x = torch.tensor([ids])
            a = reference(input_ids=x).logits.float()[0]
            b = candidate(input_ids=x).logits.float()[0]
            diff = max(diff, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            total += a.shape[0]
            la, lb = a.log_softmax(-1), b.log_softmax(-1)
            kl_sum += (la.exp() * (la - lb)).sum().item()
    tolerance = None if rtol is None else rtol * max(1.0, scale)
    return Verification(what, diff, scale, tolerance, agree / max(total, 1), kl_sum / max(total, 1))


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(tok_json: dict) -> tuple[str, str | None]:
    """llama.cpp's `tokenizer.ggml.pre` for this byte-level BPE's pre-tokenizer, with a note when guessed.

    llama.cpp itself identifies pre-tokenizers by hashing the token ids of a probe text; we instead
    read the tokenizers pre-tokenizer config, which is what the training-time tokenization did."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", None  # the GPT-2 regex, as tokenizers' ByteLevel(use_regex=True)
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm", None  # single digits, then the GPT-2 regex (SmolLM/SmolLM2 upstream)
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == llama3:
        return "llama-bpe", None
    return "default", (
        f"pre-tokenizer {kinds} not recognised; wrote tokenizer.ggml.pre='default', so llama.cpp may split "
        "text slightly differently from transformers"
    )


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """Tokens, token types, merges and special ids of a byte-level BPE tokenizer, as GGUF wants them."""
    import gguf

    tok_json = _tokenizer_json(tokenizer)
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or not any(
        p.get("type") == "ByteLevel"
        for p in ([tok_json.get("pre_tokenizer") or {}] + (tok_json.get("pre_tokenizer") or {}).get("pretokenizers", []))
    ):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers only (GPT-2 style, as SmolLM2 and Llama 3 use); "
            f"this one is {model.get('type')!r} with pre-tokenizer {(tok_json.get('pre_tokenizer') or {}).get('type')!r}"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) and max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model has only {vocab_size} embeddings"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = []
    for m in model.get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ExportError(f"BPE merge {m!r} cannot be written to GGUF (a token contains a space)")
        merges.append(f"{pair[0]} {pair[1]}")
    pre, note = _pre_tokenizer_name(tok_json)

    probe = tokenizer.encode("a", add_special_tokens=False)
    with_special = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(with_special) > len(probe) and bos is not None and with_special[0] == bos
    add_eos = len(with_special) > len(probe) and eos is not None and with_special[-1] == eos
    specials = {
        "bos": bos,
        "eos": eos,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    }
    template = getattr(tokenizer, "chat_template", None)
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": pre,
        "note": note,
        "special_ids": {k: v for k, v in specials.items() if v is not None},
        "add_bos": add_bos,
        "add_eos": add_eos,
        "chat_template": template if isinstance(template, str) else None,
    }


def _permute_qk(w, n_head: int):
    """HF's rotate-half RoPE layout -> llama.cpp's interleaved pairs, per head (n_head = KV heads for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], quantization: str):
    """Storage type of one tensor, as llama.cpp's converter chooses: norms and 1-D tensors in F32;
    rows that are not a whole number of quant blocks fall back to F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or quantization == "f32":
        return T.F32
    if quantization in ("f16", "q4_k_m"):  # q4_k_m: llama-quantize requantizes our f16 file
        return T.F16
    if quantization == "q8_0":
        qtype = T.Q8_0
    elif gguf_name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0  # q4_0: keep the embedding/output matrix at 8 bits (llama-quantize keeps it higher too)
    else:
        qtype = T.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else T.F16


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_k_m": "MOSTLY_F16"}


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _rope_scaling(config):
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return float(params["factor"])
    raise ExportError(f"GGUF export does not handle rope scaling {kind!r} (only none or linear)")


def write_gguf(model, tokenizer, path, quantization: str = "f16", name: str = "model") -> dict:
    """Write `model` (a float32 LlamaForCausalLM) and `tokenizer` to the GGUF file `path`.

    Returns a summary: the tensor-type counts and any notes."""
    import gguf
    import numpy as np
    import torch

    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown --quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(
            f"GGUF export supports the Llama architecture only; this model is {getattr(config, 'model_type', '?')!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}). Use --format merged instead."
        )
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    linear_factor = _rope_scaling(config)

    writer = gguf.GGUFWriter(path=str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    if linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_factor)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quantization]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["special_ids"].items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    writer.add_add_space_prefix(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])

    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r}: this Llama variant is not supported")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
            data = _permute_qk(data, n_head)
        elif gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
            data = _permute_qk(data, n_kv)
        qtype = _tensor_type(gguf_name, data.shape, quantization)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": counts, "notes": [vocab["note"]] if vocab["note"] else [], "pre": vocab["pre"]}


def check_quantization_tool(quantization: str) -> str | None:
    """Path of llama-quantize when the quantization needs it; a clear error when it is missing."""
    if quantization != "q4_k_m":
        return None
    tool = shutil.which(LLAMA_QUANTIZE)
    if tool is None:
        raise ExportError(f"--quantization q4_k_m needs llama.cpp's `{LLAMA_QUANTIZE}` on PATH: {LLAMA_QUANTIZE_HINT}")
    return tool


def export_gguf(run: Run, out, quantization: str = "f16", overwrite: bool = False, model=None, tokenizer=None):
    """Write the run as GGUF; returns (path, summary, float32 merged model, tokenizer)."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown --quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    tool = check_quantization_tool(quantization)
    out = Path(out)
    if out.is_dir():
        out = out / f"{run.name}-{quantization}.gguf"
    tmp = _prepare_output(out, overwrite)
    model = merged_model(run) if model is None else model
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        if tool is None:
            summary = write_gguf(model, tokenizer, tmp, quantization, name=run.name)
        else:
            with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
                f16 = Path(scratch) / "f16.gguf"
                summary = write_gguf(model, tokenizer, f16, "q4_k_m", name=run.name)
                proc = subprocess.run([tool, str(f16), str(tmp), "Q4_K_M"], capture_output=True, text=True)
                if proc.returncode != 0 or not tmp.is_file():
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise ExportError(f"{LLAMA_QUANTIZE} failed (exit {proc.returncode}): {tail[0]}")
                summary["tensor_types"] = {"Q4_K_M mix by llama-quantize from F16": summary["tensor_types"].get("F16", 0)}
        _move_into_place(tmp, out)
    finally:
        _remove(tmp)
    return out, summary, model, tokenizer


@contextlib.contextmanager
def _shared_gguf_reader():
    """Parse each GGUF file once while transformers loads it.

    For Llama files transformers builds a `gguf.GGUFReader` four times (config and weights for the
    model, config and vocabulary for the tokenizer), and the reader walks a 49k-token vocabulary item
    by item: seconds per parse. Inside this block `gguf.GGUFReader(path)` returns one shared,
    read-only (memory-mapped) reader per path; the original class is restored on exit."""
    import gguf

    original = gguf.GGUFReader
    cache: dict[tuple[str, str], object] = {}

    def shared(path, mode="r"):
        if mode != "r":
            return original(path, mode)
        key = (os.path.realpath(path), mode)
        if key not in cache:
            cache[key] = original(path, mode)
        return cache[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
        cache.clear()


def load_gguf(path: Path, with_tokenizer: bool = True):
    """(model, tokenizer or None, special token ids in the file) read back from a GGUF file by
    transformers (weights dequantized to float32)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    with _shared_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if with_tokenizer else None
        fields = gguf.GGUFReader(str(path)).fields
        special_ids = {}
        for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            f = fields.get(f"tokenizer.ggml.{key}_token_id")
            if f is not None:
                special_ids[kind] = int(f.contents())
    return model.eval(), tokenizer, special_ids


def tokenizer_differences(reference, candidate) -> list[str]:
    """Texts (and the chat template) on which two tokenizers disagree; empty when they agree."""
    problems = []
    texts = list(VERIFY_TEXTS) + ["".join(reference.all_special_tokens[:3]) + " special tokens inline"]
    for text in texts:
        for add_special in (False, True):
            a = reference.encode(text, add_special_tokens=add_special)
            b = candidate.encode(text, add_special_tokens=add_special)
            if a != b:
                problems.append(f"{text[:30]!r} (add_special_tokens={add_special}): {a[:8]}... vs {b[:8]}...")
    if getattr(reference, "chat_template", None) != getattr(candidate, "chat_template", None):
        problems.append("chat template differs")
    elif getattr(reference, "chat_template", None):
        a = reference.apply_chat_template(list(VERIFY_CHAT), tokenize=True, return_dict=False)
        b = candidate.apply_chat_template(list(VERIFY_CHAT), tokenize=True, return_dict=False)
        if list(a) != list(b):
            problems.append("chat template renders to different ids")
    return problems


def verify_gguf(path: Path, reference, tokenizer, quantization: str) -> Verification:
    loaded, loaded_tok, written = load_gguf(path)
    v = compare_logits(reference, loaded, tokenizer, VERIFY_RTOL[quantization], f"GGUF {quantization} via transformers vs float32 merge")
    problems = tokenizer_differences(tokenizer, loaded_tok)
    expected = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id}
    for kind, token_id in expected.items():
        if token_id is not None and written.get(kind) != token_id:
            problems.append(f"{kind} id {written.get(kind)} in the file, {token_id} in the tokenizer")
    v.tokenizer_ok = not problems
    v.notes.extend(problems)
    return v


# ---------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default also prints the usage block)
        print(f"error: {message} (see python -m dpo.export --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m dpo.export",
        description="Export a training run as its LoRA adapter, a merged HF model, or a GGUF file.",
    )
    p.add_argument("--run-dir", required=True, help="the training run directory (config.json, adapter/)")
    p.add_argument("--format", required=True, choices=FORMATS, help="adapter | merged | gguf")
    p.add_argument("--output", required=True, help="folder (adapter, merged) or .gguf file (gguf; a folder works too)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None, help="gguf only (default f16)")
    p.add_argument("--dtype", choices=MERGED_DTYPES, default=None, help="merged only (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of unexpected errors")
    return p


def run_export(args) -> int:
    if args.quantization is not None and args.format != "gguf":
        raise ExportError("--quantization applies to --format gguf only")
    if args.dtype is not None and args.format != "merged":
        raise ExportError("--dtype applies to --format merged only")
    run = open_run(args.run_dir)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.format == "adapter":
        out = export_adapter(run, args.output, overwrite=args.overwrite)
        print(f"wrote adapter: {_describe(out)}")
        print(f"base model for this adapter: {run.config['model']}")
        return 0
    if args.format == "merged":
        dtype = args.dtype or "bfloat16"
        out, model, tokenizer = export_merged(run, args.output, dtype, overwrite=args.overwrite)
        print(f"wrote merged {dtype} model: {_describe(out)}")
        if args.no_verify:
            return 0
        v = verify_merged(out, model, tokenizer, dtype)
    else:
        quantization = args.quantization or "f16"
        check_quantization_tool(quantization)
        out, summary, model, tokenizer = export_gguf(run, args.output, quantization, overwrite=args.overwrite)
        types = ", ".join(f"{v} {k}" for k, v in summary["tensor_types"].items())
        print(f"wrote GGUF {quantization}: {_describe(out)}; tensors: {types}; tokenizer.ggml.pre={summary['pre']}")
        for note in summary["notes"]:
            print(f"note: {note}")
        if args.no_verify:
            return 0
        v = verify_gguf(out, model, tokenizer, quantization)
    print(v.line())
    for note in v.notes:
        print(f"  {note}")
    return 0 if v.ok else 1


def main(argv: list[str] | None = None) -> int:
    # Keep the output to what was written and how it verified: transformers' GGUF loader draws a plain
    # tqdm bar that only the environment switches off, read when tqdm is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        return run_export(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user; --traceback for a bug report
        if args.traceback:
            raise
        print(f"error: unexpected {type(e).__name__}: {_first_line(e)} (rerun with --traceback for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
