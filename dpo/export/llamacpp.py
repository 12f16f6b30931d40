"""llama.cpp itself, through its Python bindings (`llama-cpp-python`, the optional extra `gguf`):
its quantizer and its runtime to check an exported GGUF file the way users run it (with a LoRA file applied).

    bash scripts/setup.sh gguf   # builds llama.cpp from source: 10-16 minutes on 2 cores, then cached by pip

Nothing else in the package imports llama_cpp; without the extra, GGUF export fails in one line naming it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXTRA_HINT = ("bash scripts/setup.sh gguf (the `gguf` extra, llama-cpp-python, which builds llama.cpp: "
              "10-16 minutes on 2 cores, and llama.cpp's converter)")

# llama.cpp's llama_ftype values (include/llama.h): LLAMA_FTYPE_MOSTLY_Q4_0 = 2, Q8_0 = 7, Q4_K_M = 15,
# Q5_K_M = 17, Q6_K = 18.
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


class LlamaCppError(Exception):
    """llama.cpp refused or failed; printed as one line."""


def bindings():
    """The llama_cpp module, or None when the extra is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp's C code logs every tensor to file descriptor 2; keep the user's terminal to our lines."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quantize(src: Path, dst: Path, quantization: str, threads: int | None = None) -> None:
    """Quantize the GGUF file `src` (f32 or f16) to `dst` with llama.cpp's own quantizer (llama_model_quantize)."""
    import ctypes

    llama_cpp = bindings()
    if llama_cpp is None:
        raise LlamaCppError(f"--quantization {quantization} needs llama.cpp: {EXTRA_HINT}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quantization]
    params.nthread = threads or (os.cpu_count() or 1)
    with _quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise LlamaCppError(f"llama.cpp could not quantize {src} to {quantization} (llama_model_quantize returned {rc})")


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp (CPU), fed token ids so that only the weights are compared."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, lora: Path | None = None):
        llama_cpp = bindings()
        if llama_cpp is None:
            raise LlamaCppError(f"running a GGUF file in llama.cpp needs {EXTRA_HINT}")
        # One token per decode (n_batch=1): llama-cpp-python 0.3.36's batched CPU path segfaults on quantized
        # files (q8_0, q4_0 and every k-quant) on this project's AVX-512/AMX machine, in Llama.eval of a
        # prompt; one token at a time takes the matrix-vector path that generation runs, and works.
        try:
            with _quiet_stderr():
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=1, logits_all=True,
                                           verbose=False, n_threads=threads or (os.cpu_count() or 1), seed=0,
                                           lora_path=None if lora is None else str(lora))
        except (ValueError, RuntimeError) as e:
            what = path if lora is None else f"{lora} over {path}"
            raise LlamaCppError(f"llama.cpp could not load {what}: {str(e).strip().splitlines()[0]}") from None
        self.n_ctx = n_ctx

    def logits(self, ids: list[int]):
        """[len(ids), vocab] float32 logits for every position, as numpy."""
        import numpy as np

        if len(ids) > self.n_ctx:
            raise LlamaCppError(f"prompt of {len(ids)} tokens exceeds llama.cpp context {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy continuation of `ids` (argmax of llama.cpp's logits at each step): the new token ids."""
        self.llm.reset()
        self.llm.eval(list(ids))
        new = []
        for _ in range(max_new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if token == eos_id or self.llm.n_tokens >= self.n_ctx:
                break
            new.append(token)
            self.llm.eval([token])
        return new

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens parsed, BOS added where the file says)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
