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

from dpo.throughput import TIMED_FIELDS

ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
         "rejected": f" Maybe {2 * i + 1}, or {i}?" + " hmm" * (i % 4)} for i in range(16)]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


CPU_FLAGS = ["--device", "cpu", "--learning-rate", "1e-2", "--lora-r", "4", "--max-length", "64",
             "--no-gradient-checkpointing"]


def _train(launcher: list[str], out, data, model_dir, batch: int, flags: list[str] = CPU_FLAGS) -> list[dict]:
    cmd = launcher + ["-m", "dpo.train", "--model", str(model_dir), "--dataset", str(data), "--output-dir",
                      str(out), "--per-device-batch-size", str(batch), "--grad-accum", "2", "--max-steps", "3",
                      "--seed", "3", *flags]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(k: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k)]


def _adapters(tmp_path):
    w2 = load_file(tmp_path / "k2" / "adapter" / "adapter_model.safetensors")
    w1 = load_file(tmp_path / "k1" / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    return w1, w2


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_twice_the_batch(tmp_path, tiny_llama_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    two = _train(_torchrun(2), tmp_path / "k2", data, tiny_llama_dir, batch=2)
    one = _train([sys.executable], tmp_path / "k1", data, tiny_llama_dir, batch=4)

    assert len(one) == len(two) == 3
    for a, b in zip(two, one):
        assert a["num_tokens"] == b["num_tokens"]  # the same pairs were seen
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
    assert abs(one[-1]["rewards/margins"]) > 1e-4  # the run moved, so the comparison means something
    w1, w2 = _adapters(tmp_path)
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"max abs difference of the final adapters (K=2 vs K=1): {worst:.2e}")
    assert worst < 1e-5
    # Only rank 0 wrote: one metrics row per step, one checkpoint folder.
    assert len(list((tmp_path / "k2" / "checkpoints").iterdir())) == 1


@pytest.mark.slow
def test_two_gloo_ranks_resume_exactly_on_the_same_number_of_ranks(tmp_path, tiny_llama_dir):
    """4 steps straight on 2 ranks, against 2 steps, then --resume-from that step-2 checkpoint on 2 ranks."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    flags = CPU_FLAGS + ["--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0"]
    straight = _train(_torchrun(2), tmp_path / "straight", data, tiny_llama_dir, batch=1, flags=flags)
    step2 = tmp_path / "straight" / "checkpoints" / "step-000002"
    resumed = _train(_torchrun(2), tmp_path / "resumed", data, tiny_llama_dir, batch=1,
                     flags=flags + ["--resume-from", str(step2)])
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    untimed = (lambda rows: [{k: v for k, v in r.items() if k not in TIMED_FIELDS} for r in rows])  # wall clock
    assert untimed(resumed) == untimed(straight)  # metrics.jsonl: steps 1-2 carried over, 3-4 redone bit for bit
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # On another number of ranks the data position means other pairs: refused, in one line.
    cmd = [sys.executable, "-m", "dpo.train", "--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir",
           str(tmp_path / "one-rank"), "--per-device-batch-size", "1", "--grad-accum", "2", "--seed", "3", *flags,
           "--resume-from", str(step2)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "written by a run on 2 rank(s) and this run has 1" in proc.stderr.strip().splitlines()[-1]


def test_a_signal_seen_by_one_rank_stops_every_rank_at_the_same_step(monkeypatch):
    """Ranks agree on stopping (max over ranks of the signal number) before each step."""
    from types import SimpleNamespace

    from dpo import distributed, train
    from dpo.run.lifecycle import StopSignals

    seen = []

    def max_across(values, info, device):
        seen.append(values)
        return [15.0]  # another rank got SIGTERM

    monkeypatch.setattr(distributed, "max_across", max_across)
    signals = StopSignals()  # this rank got nothing
    trainer = SimpleNamespace(dist=distributed.DistInfo(rank=1, world_size=2), device=torch.device("cpu"))
    assert train.agreed_signal(signals, trainer) == 15 and signals.received == 15
    assert seen == [[0.0]]
    one = SimpleNamespace(dist=distributed.DistInfo(), device=torch.device("cpu"))
    assert train.agreed_signal(StopSignals(), one) is None  # one process: no collective at all
    assert len(seen) == 1


# --- the same on GPUs (pytest -m gpu, on a machine with 2 or more) ---------------------------------
# hf backend in float32: the ranks run the same kernels on half the rows, so the tolerance is the CPU
# test's. Unsloth in 4-bit with bfloat16 compute: each rank pads its own shard, so rows meet kernels of
# other shapes and bf16 rounding (u = 2^-8) enters every layer; over 3 steps we allow 2% relative on
# loss and log-probs (about 5u) and 2% of the largest reward on rewards, as the 20-step Unsloth test
# allows 5% over 20 steps.
GPU_CASES = {
    "hf-float32": (["--device", "cuda", "--backend", "hf", "--dtype", "float32", "--learning-rate", "1e-2",
                    "--lora-r", "4", "--max-length", "64"], 1e-4),
    "unsloth-4bit": (["--device", "cuda", "--backend", "unsloth", "--load-in-4bit", "--dtype", "bfloat16",
                      "--learning-rate", "2e-4", "--max-length", "128"], 2e-2),
}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_two_nccl_ranks_equal_one_gpu_with_twice_the_batch(tmp_path, case, request):
    from . import gpu_results

    flags, rel = GPU_CASES[case]
    model_dir = request.getfixturevalue("tiny_llama_dir" if case.startswith("hf") else "model_dir")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    two = _train(_torchrun(2), tmp_path / "k2", data, model_dir, batch=2, flags=flags)
    one = _train([sys.executable], tmp_path / "k1", data, model_dir, batch=4, flags=flags)
    assert len(one) == len(two) == 3
    scale = max(abs(r[k]) for r in one for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    for a, b in zip(two, one):
        assert a["num_tokens"] == b["num_tokens"]
        for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
            gpu_results.record(f"ddp-{case}/step{a['step']}/{k}", abs(a[k] - b[k]), rel * abs(b[k]) + 1e-6)
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), (a["step"], k, a[k], b[k])
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            gpu_results.record(f"ddp-{case}/step{a['step']}/{k}", abs(a[k] - b[k]), rel * scale + 1e-6)
            assert abs(a[k] - b[k]) <= rel * scale + 1e-6, (a["step"], k, a[k], b[k])
    w1, w2 = _adapters(tmp_path)
    biggest = max(w1[k].float().abs().max().item() for k in w1)
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    gpu_results.record(f"ddp-{case}/adapter-max-abs-diff", worst, rel * biggest + 1e-6)
    assert worst <= rel * biggest + 1e-6
