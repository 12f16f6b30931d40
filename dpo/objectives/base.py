"""The objective protocol: the one seam that training and evaluation both call, for every objective.

    items, report = objective.prepare(tokenizer, rows, options)       rows -> tokenized items, and what was dropped
    batch         = objective.collate(items, pad_id, max_length)      items -> one batch, in CPU memory
    scores        = objective.score(scorer, model, batch)             one model's pass(es) over the batch
    out, logps    = objective.loss(policy_scores, reference_scores)   the loss and TRL's metric values
    row           = objective.batch_row(out, logps)                   one micro-batch's training metrics
    row           = objective.eval_row(policy, reference, batch_size) held-out metrics over every item

Training scores the policy with gradients and the reference without, then takes the loss; evaluation
scores both without gradients over every batch and averages with `eval_row`. How a batch goes through a
model (device, log-prob path, LM-head chunk, packing) is the `Scorer`'s, so a new way to run the forward
(packed, prefix-shared) changes the scorer, not the objectives.

Shapes: a paired batch holds B pairs as 2B rows (chosen rows, then rejected rows); an unpaired one N rows.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from dpo import models, packing, sharing
from dpo.data.pairs import Batch
from dpo.loss_settings import LossSettings
from dpo.losses import LossOutput

# Named spans of a step (dpo:data, dpo:forward, ...): a profiler attributes the GPU's idle time to the one
# the host was in (benchmarks/profile.py). Without a profiler running, entering one costs about a microsecond.
region = torch.profiler.record_function


@dataclass(frozen=True)
class DataOptions:
    """How rows become items: the cut, the drops, and the batch size an objective may pair rows within."""

    max_length: int | None
    max_prompt_length: int | None = None
    drop_identical: bool = True
    batch_size: int = 8  # KTO pairs each row with the previous row's completion inside blocks of this size
    source: str = ""  # the data's name, for reports and messages


@dataclass(frozen=True)
class Scorer:
    """How a batch goes through a model: the device, the log-prob path ("chunked": hidden states and the
    LM head a chunk at a time; "full": whole logits), the LM-head chunk, and the layout of plain completion
    log-probs: padded rows, packed (one row per micro-batch, no pad tokens) or prefix-shared (each pair's
    prompt computed once: dpo/sharing.py; `sharing` names its attention route, "masked" or "flex", "" off)."""

    device: torch.device
    logprobs: str = "chunked"
    chunk_size: int = 256
    packing: bool = False
    sharing: str = ""

    def on_device(self, batch):
        with region("dpo:data"):
            return batch.to(self.device)

    @property
    def layout(self) -> str:
        """How plain completion log-probs run: "shared", "packed" or "padded"."""
        return "shared" if self.sharing else "packed" if self.packing else "padded"

    def token_counts(self, batch) -> tuple[list[int], int]:
        """(the real lengths of the sequences the layout runs, the token positions its forward computes) of a
        collated batch: padded rows count their pad positions, packed ones their real tokens; shared rows are
        each pair's prompt + chosen + rejected, computed as pairs x the longest (the masked route's rows) or
        one after another (the flex route's one row)."""
        if self.sharing:
            lengths = sharing.segment_lengths(batch)
            return lengths, sum(lengths) if self.sharing == "flex" else len(lengths) * max(lengths)
        lengths = [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]
        return lengths, sum(lengths) if self.packing else int(batch.attention_mask.numel())

    def forward(self, model, batch: Batch) -> models.ScoredForward:
        """One forward of the batch, scorable under any token mask (`ScoredForward.sums`)."""
        return models.ScoredForward(model, self.on_device(batch), self.logprobs, self.chunk_size)

    def completion_logps(self, model, batch: Batch) -> torch.Tensor:
        """[R] summed completion log-probs of every row: one shared or packed forward where on, else padded."""
        if self.sharing:
            with region("dpo:data"):
                shared = sharing.share_batch(batch, one_row=self.sharing == "flex").to(self.device)
            return sharing.shared_completion_logps(model, shared, self.logprobs, self.chunk_size, self.sharing)
        if self.packing:
            with region("dpo:data"):
                packed = packing.pack_batch(batch).to(self.device)
            return packing.packed_completion_logps(model, packed, self.logprobs, self.chunk_size)
        return models.completion_logps(model, self.on_device(batch), self.logprobs, self.chunk_size)


def on_cpu(scores: Any) -> Any:
    """The same scores dataclass with every tensor detached, float32 (bool and integer kept) and in CPU memory."""
    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.detach()
        return (v.float() if v.is_floating_point() else v).cpu()
    return dataclasses.replace(scores, **{f.name: move(getattr(scores, f.name)) for f in dataclasses.fields(scores)})


class Objective(ABC):
    """One objective family: its data preparation, its batch, its scoring, its loss and its metrics."""

    name: str  # "dpo", "simpo", "cpo", "orpo" or "kto"
    unit: str = "pair"  # what one item is: "pair" or (KTO) "row"
    metric_names: tuple[str, ...]  # TRL's names of a training row (eval rows: the same with `eval_`)
    can_pack: bool = False  # whether the scorer's packed forward serves this objective's scores
    can_precompute_reference: bool = False  # whether reference scores can be computed once before training
    plannable: bool = False  # whether dpo/plan.py models this objective's passes (memory and step time)
    eval_reference: bool = True  # whether evaluation scores the reference (SimPO/CPO/ORPO: none to score)

    def __init__(self, settings: LossSettings):
        self.settings = settings

    @property
    def needs_reference(self) -> bool:
        return self.settings.needs_reference

    @abstractmethod
    def prepare(self, tokenizer, rows, options: DataOptions) -> tuple[list, Any]:
        """(items, report): the rows tokenized as this objective's TRL trainer does, the unusable ones dropped
        (DataError when none is left); the report says what was read, kept, cut and dropped."""

    @abstractmethod
    def collate(self, items: list, pad_id: int, max_length: int | None) -> Any:
        """One batch of items, right-padded, in CPU memory."""

    @abstractmethod
    def score(self, scorer: Scorer, model, batch, *, extras: bool = True) -> Any:
        """The model's scores of one batch (gradients as the caller's context allows). extras=False skips
        what only the policy's loss reads (WPO's weights, KTO's KL rows are still needed)."""

    @abstractmethod
    def loss(self, policy, reference=None) -> tuple[LossOutput, Any]:
        """(LossOutput, the log-probs the loss read) of one batch from its policy and reference scores."""

    @abstractmethod
    def batch_row(self, out: LossOutput, logps) -> dict[str, float]:
        """One micro-batch's training metrics, TRL's names."""

    def reference_values(self, scores) -> torch.Tensor:
        """[items, k] the reference scores of a batch as rows of a cache (objectives that can precompute it)."""
        raise NotImplementedError(f"{self.name} does not precompute its reference")

    def reference_from_values(self, values: torch.Tensor):
        """The reference scores of a batch from its cache rows (the inverse of `reference_values`)."""
        raise NotImplementedError(f"{self.name} does not precompute its reference")

    @abstractmethod
    def eval_row(self, policy: list, reference: list | None, batch_size: int) -> dict[str, float]:
        """Held-out metrics (TRL's names with `eval_`, and ours) from per-batch scores of every item."""
