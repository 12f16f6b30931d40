"""Data parallelism on CPU (gloo): 2 ranks of b pairs equal 1 process of 2b pairs (issue: past one GPU).

Runs the real CLI under torchrun. The gradients are averaged across ranks, so the steps agree up to
float32 summation order (an average of two rank means against one mean over all pairs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
         "rejected": f" Maybe {2 * i + 1}, or {i}?" + " hmm" * (i % 4)} for i in range(16)]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train(launcher: list[str], out, data, tiny_llama_dir, batch: int) -> list[dict]:
    cmd = launcher + ["-m", "dpo.train", "--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir",
                      str(out), "--per-device-batch-size", str(batch), "--grad-accum", "2", "--max-steps", "3",
                      "--learning-rate", "1e-2", "--lora-r", "4", "--device", "cpu", "--max-length", "64",
                      "--no-gradient-checkpointing", "--seed", "3"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_twice_the_batch(tmp_path, tiny_llama_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = _train(torchrun, tmp_path / "k2", data, tiny_llama_dir, batch=2)
    one = _train([sys.executable], tmp_path / "k1", data, tiny_llama_dir, batch=4)

    assert len(one) == len(two) == 3
    for a, b in zip(two, one):
        assert a["num_tokens"] == b["num_tokens"]  # the same pairs were seen
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
    assert abs(one[-1]["rewards/margins"]) > 1e-4  # the run moved, so the comparison means something
    w2 = load_file(tmp_path / "k2" / "adapter" / "adapter_model.safetensors")
    w1 = load_file(tmp_path / "k1" / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"max abs difference of the final adapters (K=2 vs K=1): {worst:.2e}")
    assert worst < 1e-5
    # Only rank 0 wrote: one metrics row per step, one checkpoint folder.
    assert len(list((tmp_path / "k2" / "checkpoints").iterdir())) == 1
