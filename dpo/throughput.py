"""What a step costs, in its own metrics row: tokens and pairs per second, the share of computed token
positions that are padding, and on CUDA the model FLOPs utilisation (MFU) against the card's dense bf16 peak.

The trainer measures only at the edge (the step's wall time, each micro-batch's attention mask); the
arithmetic is here, in pure functions:

    tokens_per_second = real tokens of the step (attention-mask ones, the num_tokens increment) / step seconds
    pairs_per_second  = pairs of the step (KTO: rows) / step seconds
    padding_share     = (computed positions - real tokens) / computed positions          (see padding_share)
    mfu               = model FLOPs of the step / (step seconds x dense bf16 peak FLOP/s)   (see step_flops)

With several ranks, tokens and pairs are the whole step's (every rank); padding_share and mfu are this
rank's (each rank computes its own shard in the same wall time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dpo.plan import ModelShape
# The row's fields that depend on the wall clock (two runs of the same steps differ only in these).
TIMED_FIELDS = ("tokens_per_second", "pairs_per_second", "mfu")

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a pattern of torch.cuda.get_device_name().
# First match wins: the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L4").
DENSE_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM (HBM3)
    (r"H200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a card by its name (torch.cuda.get_device_name()); None when unknown."""
    for pattern, peak in DENSE_BF16_PEAKS:
        if re.search(pattern, device_name):
            return peak
    return None


# --- tokens -----------------------------------------------------------------------------------------


@dataclass
class StepTokens:
    """What one optimizer step's micro-batches held (this rank): running sums, added one micro-batch at a time.

    real:      the real (not padding) tokens of the sequences the layout runs: each row's padded or packed;
               each pair's prompt + chosen + rejected prefix-shared (the prompt once)
    computed:  token positions the forward runs: every position of the padded rows, the real tokens alone
               when packed into one row, pairs x the longest shared row when prefix-shared
    lengths:   the real length of every sequence the layout runs, for the attention FLOPs (a shared row is
               counted as one causal sequence: its two sides' attention to each other, which the mask skips,
               is counted in, a small overcount)
    """

    real: int = 0
    computed: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, lengths: Sequence[int], computed: int) -> None:
        """One micro-batch: the real lengths of the sequences its layout runs, and the positions it computes."""
        self.real += int(sum(lengths))
        self.computed += int(computed)
        self.lengths += [int(n) for n in lengths]


def padding_share(real: int, computed: int) -> float:
    """Share of the computed token positions that are padding: (computed - real) / computed, in [0, 1).

    computed: positions the forward runs (rows x longest row per padded micro-batch; the real tokens when
    packed); real: the attention mask's ones. Packed micro-batches give 0. A step with nothing computed gives 0.
    """
    if real < 0 or computed < real:
        raise ValueError(f"need 0 <= real <= computed token counts, got real={real}, computed={computed}")
    return (computed - real) / computed if computed else 0.0


# --- FLOPs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopShape:
    """The numbers a FLOP count needs (Llama-style decoder).

    layers:          decoder layers
    matmul_params:   weights of the matmuls one token passes with the adapter off: every layer's attention and
                     MLP projections, plus the LM head (vocab x hidden, tied or not); embedding lookups and
                     norms are no matmuls
    adapter_params:  weights the adapter adds to the forward (LoRA's A and B; 0 for a full model)
    trainable:       weights that get a gradient (LoRA: adapter_params; a full fine-tune: matmul_params)
    attention_width: heads x head_dim: the width of each layer's scores (Q K^T) and weighted sum (P V)
    """

    layers: int
    matmul_params: int
    adapter_params: int
    trainable: int
    attention_width: int

    @classmethod
    def from_config(cls, config, adapter_params: int, trainable: int) -> "FlopShape":
        """From a transformers config (Llama-style names); the adapter's counts from the model's parameters."""
        shape = ModelShape.from_config(config, load_in_4bit=False, lora_r=0)
        head_dim = getattr(config, "head_dim", None) or shape.hidden // shape.heads
        return cls(shape.layers, shape.layers * shape.layer_params() + shape.vocab * shape.hidden,
                   adapter_params, trainable, shape.heads * head_dim)


def attention_flops(lengths: Sequence[int], width: int, layers: int) -> float:
    """FLOPs of causal attention's two matmuls in one forward over sequences of these lengths.

    The token at position t (1-based) attends to t keys: scores 2 x width x t FLOPs, the weighted sum as
    many; over a sequence of length n that is 4 x width x n(n+1)/2 = 2 x width x n(n+1) per layer. Only the
    unmasked (query, key) pairs count, as a model FLOP count does (no padding, no masked half).
    """
    return layers * sum(2.0 * width * n * (n + 1) for n in lengths)


def step_flops(shape: FlopShape, lengths: Sequence[int], reference_forward: bool) -> float:
    """Model FLOPs of one training pass over sequences of these lengths (a step: all its micro-batches' rows).

    With T = sum(lengths) tokens, N = matmul_params, N_a = adapter_params, N_t = trainable and
    A = attention_flops(lengths) (a multiply-add is 2 FLOPs):
        policy forward                 2 (N + N_a) T + A
        policy backward                2 (N + N_a) T + 2 N_t T + 2 A
                                       (gradients of the activations through every matmul, of the trainable
                                       weights only: frozen weights get none; attention's backward is
                                       twice its forward)
        reference forward (live)       2 N T + A   (adapter off; 0 when precomputed or reference-free)
    LoRA with a live reference: (6 N + 4 N_a + 2 N_t) T + 4 A, about 6 N T. Activations recomputed by
    gradient checkpointing are not counted (model FLOPs, not hardware FLOPs), nor the norms, softmax and
    element-wise work; the first layer's input gradient is counted though nothing needs it.
    """
    tokens = float(sum(lengths))
    attention = attention_flops(lengths, shape.attention_width, shape.layers)
    forward_params = shape.matmul_params + shape.adapter_params
    policy = 2 * forward_params * tokens + attention
    backward = 2 * forward_params * tokens + 2 * shape.trainable * tokens + 2 * attention
    reference = 2 * shape.matmul_params * tokens + attention if reference_forward else 0.0
    return policy + backward + reference


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: flops / (seconds x peak FLOP/s)."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"need seconds > 0 and a peak > 0, got {seconds}, {peak}")
    return flops / (seconds * peak)


# --- the row ----------------------------------------------------------------------------------------


def cost_fields(tokens: StepTokens, step_tokens: int, pairs: int, seconds: float, flops: float | None = None,
                peak: float | None = None) -> dict[str, float]:
    """The row's cost fields: tokens_per_second (step_tokens: the step's real tokens, all ranks), pairs_per_second,
    padding_share (this rank's micro-batches) and, given flops and a peak, mfu."""
    seconds = max(seconds, 1e-9)
    row = {"tokens_per_second": step_tokens / seconds, "pairs_per_second": pairs / seconds,
           "padding_share": padding_share(tokens.real, tokens.computed)}
    if flops is not None and peak is not None:
        row["mfu"] = mfu(flops, seconds, peak)
    return row


class StepCost:
    """The run's cost accounting (the parts fixed at start): the FLOP shape and the card's peak.

    `fields` turns one step's counts into the row's fields; mfu only on CUDA with a known card and for
    objectives whose passes step_flops counts (not KTO: its KL rows' forwards are not counted)."""

    def __init__(self, model, device: torch.device, counts_flops: bool = True):
        self.shape: FlopShape | None = None
        self.peak: float | None = None
        if device.type != "cuda" or not counts_flops:
            return
        name = torch.cuda.get_device_name(device)
        self.peak = peak_flops(name)
        if self.peak is None:
            print(f"dpo: no dense bf16 peak known for {name!r}: metrics rows carry no mfu "
                  "(dpo/throughput.py DENSE_BF16_PEAKS)")
            return
        config = getattr(model, "config", None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and ".default." in n)
        try:
            self.shape = FlopShape.from_config(config, adapter, trainable)
        except (TypeError, AttributeError):  # not a Llama-style config: no FLOP count
            print("dpo: cannot count this model's FLOPs (not a Llama-style config): metrics rows carry no mfu")

    def fields(self, tokens: StepTokens, step_tokens: int, pairs: int, seconds: float,
               reference_forward: bool) -> dict[str, float]:
        flops = step_flops(self.shape, tokens.lengths, reference_forward) if self.shape is not None else None
        return cost_fields(tokens, step_tokens, pairs, seconds, flops, self.peak)
