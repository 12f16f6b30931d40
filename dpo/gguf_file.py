"""Writing a float32 Hugging Face causal LM and its tokenizer (byte-level BPE or SentencePiece-style) as a GGUF
file for llama.cpp.

What llama.cpp's own converter (convert_hf_to_gguf.py) writes, for the architectures in ARCHITECTURES:
architecture metadata, the tokenizer (tokens, merges, token types, special ids, chat template), and
the tensors under llama.cpp's names. For the Llama layout (Llama, Mistral) Q/K rows are permuted from
HF's rotate-half RoPE to llama.cpp's interleaved pairs (per KV head for K, so GQA works); Qwen2/Qwen3
use llama.cpp's NEOX RoPE, which is HF's layout, so their rows stay as they are; so do Phi-3 (whose fused
qkv_proj/gate_up_proj are llama.cpp's attn_qkv/ffn_up) and Gemma 2/3 (norms written as 1 + w, since HF's
Gemma RMSNorm scales by 1 + w; soft-capping, sliding window and head_dim keys; the layouts llama.cpp's
Gemma graphs hard-code are checked, and others refused in one line).
f32/f16/q8_0/q4_0 are stored here with numpy (`gguf.quants`); the k-quants (K_QUANTS) are written
as f16 and then quantized by llama.cpp itself (dpo.llamacpp), never re-implemented here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

QUANTIZATIONS = ("f16", "f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # made from our f16 file by llama.cpp's quantizer


class ExportError(Exception):
    """A problem the user can fix; printed as one line."""


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # the member of gguf.MODEL_ARCH
    permute_qk: bool  # HF rotate-half -> llama.cpp interleaved RoPE rows (the Llama layout only)
    norm_plus_one: bool = False  # Gemma: HF's RMSNorm scales by (1 + w); llama.cpp by the stored weight


# transformers model_type -> how llama.cpp's converter writes it (Mistral is written as "llama" there too).
# Phi-3 keeps its fused qkv_proj / gate_up_proj (llama.cpp's attn_qkv / ffn_up split them at run time).
ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),
    "qwen3": Architecture("QWEN3", permute_qk=False),
    "phi3": Architecture("PHI3", permute_qk=False),
    "gemma2": Architecture("GEMMA2", permute_qk=False, norm_plus_one=True),
    "gemma3_text": Architecture("GEMMA3", permute_qk=False, norm_plus_one=True),
}
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # llama.cpp's gemma3 fixes the sliding layers' RoPE base; the file holds the global one
# llama.cpp hard-codes which layers of a Gemma attend within the sliding window: every `n`-th is global.
SLIDING_PATTERN = {"GEMMA2": 2, "GEMMA3": 6}


def architecture(config) -> Architecture:
    """The GGUF layout of this model's family, or one line saying it is not supported."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or [])
        raise ExportError(
            f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {kind!r} ({names}). "
            "Use --format merged (or llama.cpp's convert_hf_to_gguf.py on the merged folder) instead."
        )
    return ARCHITECTURES[kind]


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
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == llama3.replace(r"\p{N}{1,3}", r"\p{N}"):
        return "qwen2", None  # Llama 3's regex with single digits (Qwen2/Qwen3 tokenizers)
    return "default", (
        f"pre-tokenizer {kinds} not recognised; wrote tokenizer.ggml.pre='default', so llama.cpp may split "
        "text slightly differently from transformers"
    )


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """Tokens, token types and special ids as GGUF wants them, in llama.cpp's tokenizer model for this kind:
    "gpt2" for byte-level BPE (with merges), "llama" for SentencePiece-style ones (with scores)."""
    tok_json = _tokenizer_json(tokenizer)
    model = tok_json.get("model", {})
    vocab = tokenizer.get_vocab()
    if len(vocab) and max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model has only {vocab_size} embeddings"
        )
    if _is_byte_level(tok_json) and model.get("type") == "BPE":
        return {**_bpe_vocab(tokenizer, tok_json, vocab_size), **_special_settings(tokenizer)}
    if model.get("type") == "Unigram" or (model.get("type") == "BPE" and model.get("byte_fallback")):
        return {**_sentencepiece_vocab(tokenizer, tok_json, vocab_size), **_special_settings(tokenizer)}
    raise ExportError(
        "GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) and SentencePiece-style "
        "ones (BPE with byte fallback or Unigram: Llama 2, Mistral, Phi-3, Gemma); this one is "
        f"{model.get('type')!r} with pre-tokenizer {(tok_json.get('pre_tokenizer') or {}).get('type')!r}"
    )


def _is_byte_level(tok_json: dict) -> bool:
    pre = tok_json.get("pre_tokenizer") or {}
    return any(p.get("type") == "ByteLevel" for p in [pre] + pre.get("pretokenizers", []))


def _bpe_vocab(tokenizer, tok_json: dict, vocab_size: int) -> dict:
    """Byte-level BPE (llama.cpp's "gpt2" model): token strings, types and merges."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
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
    for m in tok_json["model"].get("merges", []):
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ExportError(f"BPE merge {m!r} cannot be written to GGUF (a token contains a space)")
        merges.append(f"{pair[0]} {pair[1]}")
    pre, note = _pre_tokenizer_name(tok_json)
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges, "pre": pre, "note": note}


UNUSED_SCORE = -1000.0  # what llama.cpp's converter gives added and padding tokens


def _sentencepiece_scores(model: dict) -> dict[str, float]:
    """Each token's score, which llama.cpp's SentencePiece tokenizer uses to pick the next pair to merge.

    A Unigram model stores them. A BPE model with byte fallback (how transformers holds a SentencePiece BPE
    model such as Llama 2's, Mistral's, Phi-3's, Gemma's) stores merges ranked by the merged piece's score
    instead; minus the rank of the first merge that makes a token keeps that order (llama.cpp merges the
    adjacent pair whose token scores highest, the leftmost on ties, as BPE applies the lowest rank first).
    Tokens no merge makes (single characters, bytes) are never a merge's result: their score is not read."""
    if model.get("type") == "Unigram":
        return {piece: float(score) for piece, score in model.get("vocab", [])}
    scores: dict[str, float] = {}
    for rank, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        scores.setdefault(left + right, -float(rank))
    return scores


def _sentencepiece_vocab(tokenizer, tok_json: dict, vocab_size: int) -> dict:
    """A SentencePiece-style vocabulary (llama.cpp's "llama" model): tokens, scores and types, as llama.cpp's
    converter writes them from a tokenizer.model (unknown, control, user-defined, byte and normal pieces)."""
    import re

    import gguf

    T = gguf.TokenType
    scores_by_piece = _sentencepiece_scores(tok_json["model"])
    byte_fallback = bool(tok_json["model"].get("byte_fallback"))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        piece = reverse.get(i)
        score = scores_by_piece.get(piece, 0.0) if piece is not None else UNUSED_SCORE
        if piece is None:
            piece, kind = f"[PAD{i}]", T.UNUSED
        elif i == unk:
            kind = T.UNKNOWN
        elif i in added:
            piece, score = added[i].content, UNUSED_SCORE
            kind = T.CONTROL if added[i].special else T.USER_DEFINED
            if kind == T.USER_DEFINED:  # llama.cpp finds these in the raw text, so "\u2581" must be a space again
                piece = piece.replace("\u2581", " ")
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            kind = T.BYTE
        else:
            kind = T.NORMAL
        tokens.append(piece)
        scores.append(score)
        types.append(kind)
    # llama.cpp prefixes the text with a space (as "\u2581") unless told not to; transformers' tokenizer says
    # whether it does so by how it splits a lone "a".
    probe = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    add_space_prefix = bool(probe) and probe[0].startswith("\u2581")
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "pre": "default",
            "note": _space_prefix_note(tok_json) if add_space_prefix else None, "add_space_prefix": add_space_prefix}


def _space_prefix_note(tok_json: dict) -> str | None:
    """Where llama.cpp will split differently from transformers, said once: llama.cpp puts its space prefix
    before every piece of text that starts the input or follows a special token, as SentencePiece and the
    hub's tokenizer.json of these families (a Prepend normalizer) do; transformers' Metaspace pre-tokenizer
    (its own conversion of a tokenizer.model) skips it on text that already starts with a space, and with
    prepend_scheme "first" after special tokens too."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    scheme = next((p.get("prepend_scheme") for p in parts if p.get("type") == "Metaspace"), None)
    if scheme is None or scheme == "never":
        return None
    where = "text that starts with a space" + (" or follows a special token" if scheme == "first" else "")
    return (f"the tokenizer's Metaspace pre-tokenizer (prepend_scheme={scheme!r}) adds no '\u2581' prefix to {where}; "
            "llama.cpp does, so it splits such text differently (SentencePiece splits as llama.cpp)")


def _special_settings(tokenizer) -> dict:
    """bos/eos/unk/pad ids, whether transformers adds BOS/EOS to a plain encode, and the chat template."""
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
    if quantization == "f16" or quantization in K_QUANTS:  # k-quants: llama.cpp requantizes our f16 file
        return T.F16
    if quantization == "q8_0":
        qtype = T.Q8_0
    elif gguf_name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0  # q4_0: keep the embedding/output matrix at 8 bits (llama-quantize keeps it higher too)
    else:
        qtype = T.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else T.F16


# The file type recorded in the header; a k-quant is an f16 file until llama.cpp quantizes it.
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              **{q: "MOSTLY_F16" for q in K_QUANTS}}


def _global_rope(params):
    """Gemma 3 keeps one RoPE per layer kind; the file's keys are the global (full-attention) layers'."""
    return params.get("full_attention", params) if isinstance(params, dict) else params


def _rope_theta(config) -> float:
    params = _global_rope(getattr(config, "rope_parameters", None) or {})
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _rope_scaling(config):
    params = _global_rope(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return float(params["factor"])
    raise ExportError(f"GGUF export does not handle rope scaling {kind!r} (only none or linear)")




def write_gguf(model, tokenizer, path, quantization: str = "f16", name: str = "model") -> dict:
    """Write `model` (a float32 causal LM of a family in ARCHITECTURES) and `tokenizer` to the GGUF file `path`.

    Returns a summary: the tensor-type counts, the pre-tokenizer name and any notes."""
    import gguf

    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown --quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    arch = architecture(model.config)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    arch_enum = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    writer = gguf.GGUFWriter(path=str(path), arch=gguf.MODEL_ARCH_NAMES[arch_enum])
    try:
        _write_hparams(writer, model.config, quantization, name)
        _write_family_hparams(writer, model.config, arch)
        _write_tokenizer(writer, vocab)
        counts = _write_tensors(writer, model, arch, arch_enum, quantization)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"tensor_types": counts, "notes": [vocab["note"]] if vocab["note"] else [], "pre": vocab["pre"],
            "architecture": gguf.MODEL_ARCH_NAMES[arch_enum]}


def _write_hparams(writer, config, quantization: str, name: str) -> None:
    """Architecture metadata: sizes, heads, RoPE, norm epsilon, file type."""
    import gguf

    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    linear_factor = _rope_scaling(config)
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


def _write_family_hparams(writer, config, arch: Architecture) -> None:
    """The keys only some families have (sliding window, soft-capping), as llama.cpp's converter writes them."""
    window = getattr(config, "sliding_window", None)
    if arch.gguf_arch == "PHI3" and window:
        writer.add_sliding_window(window)
    if arch.gguf_arch in SLIDING_PATTERN:
        _check_gemma_layout(config, arch)
        if config.head_dim == config.hidden_size // config.num_attention_heads:  # else _write_hparams wrote them
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        writer.add_sliding_window(window)
    if arch.gguf_arch == "GEMMA3":
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        if local.get("rope_type", "default") != "default" or local.get("rope_theta") != GEMMA3_LOCAL_ROPE_THETA:
            raise ExportError(f"GGUF export: llama.cpp's gemma3 runs sliding layers with plain RoPE base "
                              f"{GEMMA3_LOCAL_ROPE_THETA:g}; this model's are {local}")
    if arch.gguf_arch == "GEMMA2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _check_gemma_layout(config, arch: Architecture) -> None:
    """What llama.cpp's Gemma graphs assume and do not read from the file: refused in one line when not so."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar != config.head_dim:
        raise ExportError(f"GGUF export: llama.cpp scales {config.model_type} attention by 1/sqrt(head_dim={config.head_dim}) "
                          f"but this model uses query_pre_attn_scalar={scalar}")
    every = SLIDING_PATTERN[arch.gguf_arch]
    expected = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    layer_types = list(getattr(config, "layer_types", None) or expected)
    if layer_types != expected or not getattr(config, "sliding_window", None):
        raise ExportError(f"GGUF export: llama.cpp's {config.model_type} makes one layer in {every} global (the last of "
                          f"each {every}) and the others sliding-window; this model's layers are {layer_types} "
                          f"(window {config.sliding_window})")


def _write_tokenizer(writer, vocab: dict) -> None:
    """The vocabulary (llama.cpp's "gpt2" model with merges, or "llama" with scores), special ids and template."""
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if vocab["model"] == "llama":
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":
        writer.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["special_ids"].items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    writer.add_add_space_prefix(vocab.get("add_space_prefix", False))
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


def _write_tensors(writer, model, arch: Architecture, arch_enum, quantization: str) -> dict[str, int]:
    """Every weight under its llama.cpp name, in its storage type; returns how many of each type."""
    import gguf
    import torch

    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r}: this {config.model_type} variant is not supported")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1.0
        if arch.permute_qk and gguf_name.startswith("blk."):  # weights and biases alike, as llama.cpp
            if ".attn_q." in gguf_name:
                data = _permute_qk(data, n_head)
            elif ".attn_k." in gguf_name:
                data = _permute_qk(data, n_kv)
        qtype = _add_tensor(writer, gguf_name, data, quantization)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def _add_tensor(writer, gguf_name: str, data, quantization: str):
    """One tensor in the storage type _tensor_type picks; returns that type."""
    import gguf
    import numpy as np

    qtype = _tensor_type(gguf_name, data.shape, quantization)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float16))
    else:
        writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    return qtype
