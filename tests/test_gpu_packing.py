"""Packed micro-batches on the GPU (`pytest -m gpu`): packed equals padded, per attention route.

One micro-batch of 4 pairs on the suite's random Llama (4-bit NF4 base, bf16 LoRA), forward and
backward both ways (tests/gpu/runs.py `packing`). Tolerances are test_gpu_unsloth.py's for one batch
in bfloat16 (u = 2^-8): 2u relative on summed log-probs, 8u of the largest LoRA gradient. A route
where sequences see each other misses by far more (a whole sequence's context).
"""

from __future__ import annotations

import json

import pytest
import torch

from . import gpu_results
from .conftest import run_gpu_mode
from .test_gpu_unsloth import U, _runs_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_packed_equals_padded_on_every_route(backend, model_dir, tmp_path_factory):
    out = _runs_dir(tmp_path_factory) / f"packing_{backend}.json"
    run_gpu_mode("packing", model_dir, out, backend)
    r = json.loads(out.read_text())
    entries = []
    for route, c in r["routes"].items():
        if route == "flex" and "error" in c:  # FlexAttention is used only when asked for (packing.choose_attention
            print(f"flex did not run: {c['error'][:200]}")  # says why); the routes auto picks must all pass
            continue
        assert "error" not in c, (route, c)
        extra = dict(padded_s=c["padded_s"], packed_s=c["packed_s"], padded_peak_gib=c["padded_peak_gib"],
                     packed_peak_gib=c["packed_peak_gib"], padded_tokens=r["padded_tokens"],
                     packed_tokens=r["packed_tokens"])
        entries.append(gpu_results.record(f"packing/{backend}/{route}/logps", c["logp_max_abs_diff"],
                                          2 * U * c["logp_scale"], **extra))
        entries.append(gpu_results.record(f"packing/{backend}/{route}/lora_grads", c["grad_max_abs_diff"],
                                          8 * U * c["grad_max_abs"]))
    assert entries, "no attention route ran"
    assert r["packed_tokens"] < r["padded_tokens"], "the batch has no padding: packing would prove nothing"
    for e in entries:
        assert e["passed"], e
    if backend == "unsloth":  # dpo/unsloth_varlen.py: one flash varlen call per layer, not one per sequence
        assert r["varlen_calls"] > 0, "Unsloth ran the packed row's attention sequence by sequence"
