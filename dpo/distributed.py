"""Data parallelism on PyTorch's own process group: `torchrun` and `accelerate launch` set RANK,
WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 each rank trains on its shard of every micro-batch and
the gradients are averaged across ranks before the optimizer step, so K ranks of b pairs each take the
same step as one process with K*b pairs (the loss is a mean over pairs, and the shards are equal).

Only these few collectives are used: one all-reduce of the flattened gradients per optimizer step and
one of the step's metric sums. No DistributedDataParallel wrapper: LoRA gradients are small, and an
explicit all-reduce keeps the math visible (and works the same on the hf and unsloth backends).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched with several processes; pick this rank's device."""
    info = from_env()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not info.enabled:
        return info, torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu"))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, torch.device(f"cuda:{info.local_rank}" if use_cuda else "cpu")


def shard(global_micro: list[int], info: DistInfo, per_rank: int) -> list[int]:
    """This rank's pairs of a global micro-batch of up to per_rank * world_size pair indices.

    A short last micro-batch is filled from its own start (as accelerate's even_batches does), so
    every rank holds per_rank pairs and a mean of rank means is the mean over all pairs held.
    """
    if not info.enabled:
        return global_micro
    need = per_rank * info.world_size
    filled = (global_micro * (need // max(1, len(global_micro)) + 1))[:need] if len(global_micro) < need else global_micro
    return filled[info.rank * per_rank : (info.rank + 1) * per_rank]


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace each gradient by its mean over ranks (one all-reduce of a flat buffer)."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def _all_reduce_values(values: list[float], info: DistInfo, device: torch.device, op) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def sum_across(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a list of numbers (metric sums, token counts, flags)."""
    return _all_reduce_values(values, info, device, dist.ReduceOp.SUM)


def max_across(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (flags that every rank must agree on)."""
    return _all_reduce_values(values, info, device, dist.ReduceOp.MAX)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
