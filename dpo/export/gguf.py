"""GGUF files through llama.cpp's own converter and quantizer, their Ollama Modelfile, and their verification
in llama.cpp: logits, top-1, tokenizer, a greedy generation, and whether the adapter is in the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from dpo.export import gguf_layout
from dpo.export import gguf_weights
from dpo.export import llamacpp
from dpo.export import llamacpp_convert
from dpo.export import modelfile
from dpo.export.common import (
    CONVERTER_TYPES, ExportError, GENERATION_PROMPT, GENERATION_TOKENS, K_QUANTS, QUANTIZATIONS, Run, VERIFY_TEXTS,
    Verification, move_into_place, prepare_output, remove_path, base_model, llamacpp_rtol, load_run_tokenizer,
    merged_model)
from dpo.export.merged import tokenizer_sources, verify_prompts, compare_logit_lists, prompt_logits, save_folder


# --------------------------------------------------------------------------------------- gguf


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
        match_transformers_vocab(dst, folder / "tokenizer.json")
        return
    f32 = scratch / "f32.gguf"
    _llama_cpp(llamacpp_convert.convert_model, folder, f32, "f32")
    match_transformers_vocab(f32, folder / "tokenizer.json")
    _llama_cpp(llamacpp.quantize, f32, dst, quantization)
    f32.unlink()


def match_transformers_vocab(path: Path, tokenizer_json: Path) -> bool:
    """Rewrite, in place, the token scores and types of a GGUF file with a SentencePiece vocabulary (llama.cpp's
    "llama" model) so that llama.cpp splits text as the tokenizer.json beside it does; False when there is
    nothing to rewrite (another vocabulary kind, or no SentencePiece-style BPE beside it).

    Scores: llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined token
    scores highest (the leftmost on ties); transformers' BPE applies the lowest-ranked merge first. The
    converter copies the tokenizer.model's scores, which put runs of spaces last ("\u2581\u2581" etc. score
    -1e9 in Llama 2, Mistral and Phi-3), whereas transformers 5 ranks the merges it converts from that file by
    piece id: it makes "\u2581\u2581\u2581\u2581" + "return" where llama.cpp made "\u2581\u2581\u2581" +
    "\u2581return". Minus the rank of the first merge that makes a token gives llama.cpp transformers' order;
    tokens no merge makes (characters, bytes, control tokens, padding) score below every merge.

    Types: the converter writes the tokenizer.model's user-defined pieces (Gemma's "[multimodal]", "<table>",
    runs of newlines) as normal ones, which llama.cpp only reaches by merging; transformers, like
    SentencePiece, matches them whole in the raw text first. They become user-defined, as llama.cpp's own
    added tokens are, except those holding "\u2581": raw text never does, and llama.cpp would print a
    user-defined token's "\u2581" instead of a space."""
    import json

    import gguf

    if not tokenizer_json.is_file():
        return False
    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    merges, vocab = model.get("merges") or [], model.get("vocab")
    # SentencePiece BPE falls back to bytes in transformers; byte-level BPE (llama.cpp's "gpt2") never does
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not merges or not isinstance(vocab, dict):
        return False
    layout = gguf_layout.read_layout(path)
    fields = layout.fields
    if (fields.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.scores" not in fields
            or "tokenizer.ggml.token_type" not in fields):
        return False
    rank: dict[int, int] = {}
    for i, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        token_id = vocab.get(left + right)
        if token_id is not None:
            rank.setdefault(token_id, i)
    scores, types = layout.array("tokenizer.ggml.scores", "r+"), layout.array("tokenizer.ggml.token_type", "r+")
    scores[:] = -float(len(merges))
    ids = np.fromiter(rank.keys(), dtype=np.int64, count=len(rank))
    first = np.fromiter(rank.values(), dtype=np.float32, count=len(rank))
    inside = ids < len(scores)
    scores[ids[inside]] = -first[inside]
    for added in tok.get("added_tokens") or []:
        i = added["id"]
        if (not added.get("special") and "\u2581" not in added["content"] and i < len(types)
                and types[i] == gguf.TokenType.NORMAL):
            types[i] = gguf.TokenType.USER_DEFINED
    scores.flush()
    types.flush()
    return True


def gguf_summary(path: Path, quantization: str) -> dict:
    """What the converter wrote: architecture, llama.cpp's pre-tokenizer name, tensor types, notes."""
    import gguf

    layout = gguf_layout.read_layout(path)
    fields = layout.fields
    types: dict[str, int] = {}
    for t in layout.tensors:
        name = gguf.GGMLQuantizationType(t.ggml_type).name
        types[name] = types.get(name, 0) + 1
    note = _k_quant_note(quantization, types) if quantization in K_QUANTS else None
    return {"architecture": fields["general.architecture"], "pre": fields.get("tokenizer.ggml.pre"),
            "tokenizer": fields["tokenizer.ggml.model"], "tensor_types": types, "notes": [note] if note else []}


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


def _convert(run: Run, model, tokenizer, name: str, dst: Path, quantization: str, then=None) -> None:
    """`model` saved as a float32 HF folder `name` in a scratch folder beside `dst` (the converter takes the
    model's name from it), converted to GGUF `quantization` at `dst`, and handed to `then(folder)` (another
    converter that reads it) before the scratch folder goes."""
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".dpo-export-") as scratch:
        folder = Path(scratch) / name
        save_folder(model, tokenizer, folder, "float32", tokenizer_sources(run))
        convert_folder(folder, dst, quantization, Path(scratch))
        if then is not None:
            then(folder)


def export_gguf(run: Run, out, quantization: str = "f16", overwrite: bool = False, model=None, tokenizer=None):
    """Write the run as GGUF (and its Modelfile); returns (path, summary, float32 merged model, tokenizer)."""
    out = _gguf_out(run, out, quantization)
    tmp = prepare_output(out, overwrite)
    check_gguf_tools(quantization, run)
    model = merged_model(run) if model is None else model
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        _convert(run, model, tokenizer, "merged", tmp, quantization)
        move_into_place(tmp, out)
        summary = gguf_summary(out, quantization)
        summary["modelfile"] = _write_modelfile(out, tokenizer)
    finally:
        remove_path(tmp)
    return out, summary, model, tokenizer


def lora_base_path(out: Path, quantization: str) -> Path:
    return out.with_name(f"{out.stem}-base-{quantization}.gguf")


def export_gguf_lora(run: Run, out, quantization: str = "f16", overwrite: bool = False, tokenizer=None):
    """The adapter as a GGUF LoRA (f32) at `out`, and the base model as GGUF `quantization` beside it (what
    llama.cpp and Ollama apply it to), with a Modelfile naming both; returns (lora, base gguf, summary, tokenizer)."""
    out = _gguf_out(run, out, "lora")
    base_out = lora_base_path(out, quantization)
    tmp, base_tmp = prepare_output(out, overwrite), prepare_output(base_out, overwrite)
    check_gguf_tools(quantization, run)
    base = base_model(run)
    tokenizer = load_run_tokenizer(run) if tokenizer is None else tokenizer
    try:
        _convert(run, base, tokenizer, "base", base_tmp, quantization,
                 then=lambda folder: _llama_cpp(llamacpp_convert.convert_lora, run.adapter_dir, folder, tmp, "f32"))
        move_into_place(base_tmp, base_out)
        move_into_place(tmp, out)
        summary = gguf_summary(base_out, quantization)
        summary["modelfile"] = _write_modelfile(base_out, tokenizer, adapter=out)
    finally:
        remove_path(tmp)
        remove_path(base_tmp)
    return out, base_out, summary, tokenizer


def verify_gguf(path: Path, reference, tokenizer, quantization: str, base=None, lora: Path | None = None) -> Verification:
    """The file run by llama.cpp itself on the verification prompts (our token ids, so the weights are
    compared), its tokenizer against ours, and a greedy generation printed beside the merged model's; with
    `base` (the model before the adapter), whether the adapter is in the file (its weights, where it holds
    them, else the logits). With `lora`, `path` is the base file and llama.cpp applies the LoRA file over it."""
    prompts = verify_prompts(tokenizer)
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
