"""The adapter and the merged Hugging Face model: copy, merge, save (the tokenizer as llama.cpp's converter
reads it), and verify by logits against the float32 merge."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from dpo.export.common import (
    ExportError, MERGED_DTYPES, MERGED_RTOL, Run, SENTENCEPIECE_MODEL, VERIFY_CHAT, VERIFY_TEXTS, Verification,
    has_tokenizer, move_into_place, prepare_output, remove_path, load_run_tokenizer, merged_model)
from dpo.files import write_json_atomic
from dpo.run import card


# ------------------------------------------------------------------------------------ adapter


def export_adapter(run: Run, out, overwrite: bool = False, commands: list[str] | None = None) -> Path:
    """The adapter folder with the tokenizer, a base model name that loads anywhere, and a model card."""
    out = Path(out)
    tmp = prepare_output(out, overwrite)
    try:
        shutil.copytree(run.adapter_dir, tmp)
        if not has_tokenizer(tmp):
            load_run_tokenizer(run).save_pretrained(tmp)
        _portable_base_name(run, tmp / "adapter_config.json")
        loading = card.adapter_loading(card.base_model_name(str(run.config["model"])), out)
        card.write_model_card(tmp, run.dir, "adapter", loading, commands or [])
        move_into_place(tmp, out)
    finally:
        remove_path(tmp)
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
    tmp = prepare_output(out, overwrite)
    model = merged_model(run) if model is None else model
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        save_folder(model, tokenizer, tmp, dtype, tokenizer_sources(run))
        card.write_model_card(tmp, run.dir, "merged", card.merged_loading(out), commands or [])
        move_into_place(tmp, out)
    finally:
        remove_path(tmp)
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


def tokenizer_sources(run: Run) -> tuple[Path, ...]:
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



def verify_prompts(tokenizer) -> list[list[int]]:
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
    prompts = verify_prompts(tokenizer)
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
