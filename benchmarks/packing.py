"""Padded vs packed micro-batches on the GPU: the policy's forward + backward over the benchmark's
pairs, time and peak memory each way, beside the planner's predicted peak (dpo/plan.py).

    python -m benchmarks.packing --shape llama3-8b-qlora --model-dir DIR --backend unsloth \
        --micro-batches 2 8 [--no-ckpt] [--route auto] --out OUT.json

No optimizer and no reference pass: this measures what packing changes (the forward's tokens) before
the trainer runs it. `rows` in OUT.json, one per (micro-batch, packed or not):
    seconds, pairs_per_s, tokens_forward (what the forwards ran), peak_mem_gib,
    predicted_peak_gib (weights + LoRA + its gradients + the training pass: the plan's model without
    optimizer state), agrees / max_rel_diff (packing_agrees on the first micro-batch).
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks import system
from benchmarks.workload import SHAPES, pair_rows


def build(a):
    if a.backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers/peft)
    import torch

    from dpo.config import TrainConfig
    from dpo.train import build_model  # (dpo/build.py after the lead's split)

    shape = SHAPES[a.shape]
    cuda = a.device == "cuda"
    cfg = TrainConfig(model=a.model_dir, dataset="benchmark", backend=a.backend,
                      load_in_4bit=shape.load_in_4bit and cuda, max_length=system.MAX_LENGTH, lora_r=system.LORA_R,
                      lora_alpha=system.LORA_ALPHA, dtype="bfloat16" if cuda else "float32", device=a.device,
                      gradient_checkpointing=not a.no_ckpt)
    model, tok = build_model(cfg, torch.device(a.device))
    return model, tok


def sync_and_reset(cuda: bool, reset: bool = False) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def measure(model, batches, packed: bool, route_name: str) -> dict:
    import torch

    cuda = batches[0].input_ids.device.type == "cuda"
    from dpo import models, packing

    def step(batch):
        if packed:
            logps = packing.packed_completion_logps(model, packing.pack_batch(batch), "chunked", 256)
        else:
            logps = models.completion_logps(model, batch, "chunked", 256)
        logps.sum().backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: compiles, autotunes
    sync_and_reset(cuda, reset=True)
    t = time.perf_counter()
    for batch in batches:
        step(batch)
    sync_and_reset(cuda)
    seconds = time.perf_counter() - t
    tokens = sum(int(b.attention_mask.sum()) if packed else b.input_ids.numel() for b in batches)
    return {"packing": packed, "route": route_name if packed else "padded", "seconds": seconds,
            "pairs_per_s": sum(b.num_pairs for b in batches) / seconds, "tokens_forward": tokens,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def predicted_peak(a, micro_batch: int, packed: bool, lengths) -> float:
    from dpo import plan

    shape = SHAPES[a.shape]
    model_shape = plan.ModelShape.from_config(shape.config, load_in_4bit=shape.load_in_4bit, lora_r=system.LORA_R)
    ckpt = "off" if a.no_ckpt else ("offload" if a.backend == "unsloth" else "recompute")
    choice = plan.Choice(micro_batch, 1, ckpt, packed)
    micro = [lengths[i:i + micro_batch] for i in range(0, len(lengths), micro_batch)]
    train = max(plan.forward_tokens(m, system.MAX_LENGTH, packed) for m in micro)
    b = plan.FITTED.peak(model_shape, choice, train, 0, "adamw_8bit")
    without_optimizer = model_shape.lora_params() * plan.OPTIMIZER_BYTES["adamw_8bit"] / plan.GIB
    return b.fixed_gib - without_optimizer + b.train_gib


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--backend", choices=("unsloth", "hf"), default="unsloth")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--pairs", type=int, default=64, help="pairs per measurement (the 8-step benchmark's 64)")
    ap.add_argument("--no-ckpt", action="store_true", help="gradient checkpointing off")
    ap.add_argument("--route", default="auto", help="hf backend: auto, sdpa, eager, flex or flash_varlen")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the harness (tiny shape)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch

    from dpo import packing
    from dpo.data import pairs as data

    model, tok = build(a)
    route_name = f"unsloth:{model.config._attn_implementation}"
    if a.backend == "hf":
        route = packing.choose_attention(a.device, requested=a.route)
        packing.use_attention(model, route)
        route_name = route.name
    model.train()
    texts = pair_rows(a.pairs)
    pairs = [data.tokenize_row(tok, data.PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i))
             for i, r in enumerate(texts)]
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    out = {"device": device, "shape": a.shape, "backend": a.backend,
           "checkpointing": not a.no_ckpt, "pairs": a.pairs, "rows": []}
    for b in a.micro_batches:
        batches = [data.collate(pairs[i:i + b], tok.pad_token_id, system.MAX_LENGTH).to(a.device)
                   for i in range(0, len(pairs), b)]
        try:
            agrees, diff = packing.packing_agrees(model, batches[0])
        except Exception as e:  # noqa: BLE001  (the packed rows below will record the same failure)
            agrees, diff = None, f"{type(e).__name__}: {str(e)[:200]}"
        for packed in (False, True):
            try:
                row = measure(model, batches, packed, route_name)
            except Exception as e:  # noqa: BLE001  (an OOM or a route that fails: recorded, the next row runs)
                row = {"packing": packed, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                model.zero_grad(set_to_none=True)
                if a.device == "cuda":
                    torch.cuda.empty_cache()
            row.update(micro_batch=b, agrees=agrees, max_rel_diff=diff,
                       predicted_peak_gib=predicted_peak(a, b, packed, lengths))
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
