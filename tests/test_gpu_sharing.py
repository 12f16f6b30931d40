"""Prefix-shared micro-batches on the GPU (`pytest -m gpu`): shared equals padded on each backend's route.

One micro-batch of 4 pairs on the suite's random Llama (4-bit NF4 base, bf16 LoRA), forward and backward
both ways (tests/gpu/runs.py `sharing`): on Unsloth through its FlexAttention shared-prefix kernel over one
row (dpo/unsloth_prefix.py), on the hf backend through sdpa with the dense mask (dpo/sharing.py). Bounds are
test_gpu_packing.py's: 2u relative on summed log-probs, 8u of the largest LoRA gradient (u = 2^-8). A route
where the two sides of a pair see each other misses by a whole completion's context. On Unsloth, 20 steps of
`dpo.train.run` with --prefix-sharing on then follow the unshared run within test_gpu_unsloth.py's 20-step
bounds (5% relative on loss and log-probs, 5% of the largest reward).
"""

from __future__ import annotations

import json

import pytest
import torch

from . import gpu_results
from .conftest import run_gpu_mode
from .test_gpu_unsloth import U, _compare_histories, _runs_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=["unsloth", "hf"])
def sharing_run(request, model_dir, tmp_path_factory) -> dict:
    out = _runs_dir(tmp_path_factory) / f"sharing_{request.param}.json"
    run_gpu_mode("sharing", model_dir, out, request.param)
    return json.loads(out.read_text())


def test_shared_equals_padded_on_the_backends_route(sharing_run):
    r, c = sharing_run, sharing_run["batch"]
    assert "error" not in c, c
    name = f"sharing/{r['backend']}/{r['route']}"
    extra = dict(padded_s=c["padded_s"], shared_s=c["shared_s"], padded_peak_gib=c["padded_peak_gib"],
                 shared_peak_gib=c["shared_peak_gib"], unshared_tokens=r["unshared_tokens"],
                 shared_tokens=r["shared_tokens"])
    entries = [gpu_results.record(f"{name}/logps", c["logp_max_abs_diff"], 2 * U * c["logp_scale"], **extra),
               gpu_results.record(f"{name}/lora_grads", c["grad_max_abs_diff"], 8 * U * c["grad_max_abs"])]
    if r["route"] == "flex":  # one row, no padding: each prompt once
        assert r["shared_tokens"] < r["unshared_tokens"], "the pairs share no prompt: sharing would prove nothing"
    for e in entries:
        assert e["passed"], e


def test_a_shared_run_follows_the_unshared_one_for_20_steps(sharing_run):
    if sharing_run["backend"] != "unsloth":
        pytest.skip("the 20-step runs are Unsloth's (the hf backend's shared run is tests/test_sharing.py's, CPU)")
    on, off = sharing_run["on"], sharing_run["off"]
    assert "error" not in on and "error" not in off, (on, off)
    assert (on["layout"], off["layout"]) == ("shared", "padded")
    entries = _compare_histories("unsloth shared vs padded", on["history"], off["history"])
    for e in entries:
        assert e["passed"], e
    computed = [(a["tokens_computed"], b["tokens_computed"]) for a, b in zip(on["history"], off["history"])]
    assert all(a < b for a, b in computed), computed
