"""Packed micro-batches: every sequence of a micro-batch in one row, no pad tokens.

A padded micro-batch holds 2B rows (B chosen, then B rejected, each prompt+completion) of width
T = the longest row; a packed one holds the same 2B sequences end to end in one row of
N = sum of their lengths tokens:

    input_ids[1, N], position_ids[1, N] (0, 1, ... restarting at each sequence),
    completion_mask[1, N], seq_index[N] (which of the 2B sequences a token belongs to),
    cu_seqlens[2B + 1] (int32 start offsets, flash-attn's varlen format), max_seqlen.

Attention must never cross a sequence boundary. The model gets `position_ids` and no
`attention_mask`; transformers then finds the sequence starts in the positions and builds, per
attention implementation, the block-diagonal causal mask (sdpa, eager), a document BlockMask
(flex_attention) or varlen cu_seqlens (flash_attention_2/3, to which we also hand our own
cu_seqlens so that no device sync is needed).

Log-probs, the contract of dpo/logps.py per sequence: position t scores token t+1 only when t+1
is in the same sequence (position_ids[t+1] != 0), and only on completion tokens:

    logps[s] = sum over t with seq_index[t+1] = s of completion_mask[t+1] * log p(input_ids[t+1] | ..t)

which is term for term the padded path's sum; only the float rounding of the attention and
matmuls over a different layout differs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from dpo import logps as logps_math
from dpo import models
from dpo.data.pairs import Batch, TokenizedPair, collate

ROUTES = ("flash_varlen", "flex", "sdpa", "eager")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, N] long
    position_ids: torch.Tensor  # [1, N] long, restarting at 0 per sequence
    completion_mask: torch.Tensor  # [1, N] long
    seq_index: torch.Tensor  # [N] long: sequence of each token, 0 .. 2B-1 (chosen rows, then rejected)
    cu_seqlens: torch.Tensor  # [2B + 1] int32: start of each sequence, then N
    max_seqlen: int
    row_ids: list[int] = field(default_factory=list)  # [B]
    host_input_ids: torch.Tensor | None = None  # input_ids in CPU memory, for HostEmbedding lookups

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_pairs(self) -> int:
        return self.num_sequences // 2

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "PackedBatch":
        host = self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.completion_mask.to(device),
                           self.seq_index.to(device), self.cu_seqlens.to(device), self.max_seqlen, self.row_ids, host)


def pack_batch(batch: Batch) -> PackedBatch:
    """A right-padded Batch ([2B, T], attention_mask 1 on real tokens) -> the same 2B sequences packed.

    Sequence order is the Batch's row order, so logps[:B] are chosen and logps[B:] rejected, as
    in the padded path. Truncation is the Batch's: pack the output of `collate`.
    """
    lengths = batch.attention_mask.sum(dim=1).to(torch.long).cpu()  # [2B]
    if (lengths < 1).any():
        raise ValueError("cannot pack an empty sequence (a row with no tokens)")
    keep = batch.attention_mask.bool().cpu()
    if not torch.equal(keep, torch.arange(keep.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("pack_batch needs right-padded rows (real tokens first, then padding)")
    ids = batch.input_ids.cpu()[keep]  # row-major: row 0's tokens, then row 1's, ...
    completion = batch.completion_mask.cpu()[keep]
    seq_index = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    positions = torch.arange(ids.shape[0]) - cu[:-1].to(torch.long)[seq_index]
    packed = PackedBatch(ids[None], positions[None], completion[None], seq_index, cu, int(lengths.max()),
                         list(batch.row_ids))
    return packed.to(batch.input_ids.device)


def pack_pairs(pairs: list[TokenizedPair], max_length: int | None = None) -> PackedBatch:
    """collate (truncation, [chosen; rejected] order) then pack: the packed twin of data.collate."""
    return pack_batch(collate(pairs, pad_token_id=0, max_length=max_length))


def scored_positions(packed: PackedBatch) -> torch.Tensor:
    """[N-1] bool: position t scores token t+1 (same sequence, a completion token)."""
    same_sequence = packed.position_ids[0, 1:] != 0
    return same_sequence & packed.completion_mask[0, 1:].bool()


def packed_logps_from_logits(logits: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """logits[1, N, V] of the packed row -> logps[2B] float32 (the plain path, packed)."""
    mask = scored_positions(packed)
    labels = packed.input_ids[0, 1:].masked_fill(~mask, 0)
    per_token = logps_math.token_logps_from_logits(logits[0, :-1], labels) * mask
    return _sum_per_sequence(per_token, packed.seq_index[1:], packed.num_sequences)


def packed_logps_from_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, packed: PackedBatch,
                             chunk_size: int = 256) -> torch.Tensor:
    """hidden[1, N, H] (last hidden states) -> logps[2B] float32 (the chunked LM-head path, packed)."""
    mask = scored_positions(packed)
    h = hidden[0, :-1][mask]  # [M, H]: scored positions only
    targets = packed.input_ids[0, 1:][mask]
    per_token = logps_math.ChunkedTokenLogps.apply(h, lm_head.weight, lm_head.bias, targets, chunk_size)
    return _sum_per_sequence(per_token, packed.seq_index[1:][mask], packed.num_sequences)


def _sum_per_sequence(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    # index_add keeps the graph even for a sequence with no scored token (its sum is 0, as padded).
    return torch.zeros(n, dtype=torch.float32, device=values.device).index_add(0, index, values.float())


# --- the attention route ------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionRoute:
    name: str  # one of ROUTES
    attn_implementation: str  # what to load the model with (transformers' attn_implementation)
    reason: str  # one line a user reads: why this route


def choose_attention(device_type: str, has_flash_attn: bool | None = None, has_flex: bool | None = None,
                     requested: str = "auto") -> AttentionRoute:
    """The fastest installed route that keeps packed sequences apart, or the one asked for.

    CUDA: flash-attn's varlen kernel (no mask at all) > sdpa with a block-diagonal causal mask. CPU: sdpa.
    FlexAttention (a document mask) only when asked for: on the H200 with torch 2.11 its kernel did not
    compile for a 4-bit Llama (Inductor: "NoValidChoicesError"), while sdpa and eager equalled the padded path.
    """
    has_flash_attn = _installed("flash_attn") if has_flash_attn is None else has_flash_attn
    has_flex = _has_flex() if has_flex is None else has_flex
    if requested != "auto":
        return _requested_route(requested, device_type, has_flash_attn, has_flex)
    if device_type == "cuda" and has_flash_attn:
        return AttentionRoute("flash_varlen", "flash_attention_2", "flash-attn installed: varlen kernel, no mask")
    why = "on CPU" if device_type != "cuda" else "no flash-attn"
    return AttentionRoute("sdpa", "sdpa", f"{why}: sdpa with a dense block-diagonal causal mask")


def _requested_route(name: str, device_type: str, has_flash_attn: bool, has_flex: bool) -> AttentionRoute:
    if name not in ROUTES:
        raise ValueError(f"unknown attention route {name!r}: use auto or one of {', '.join(ROUTES)}")
    if name == "flash_varlen" and not (device_type == "cuda" and has_flash_attn):
        raise ValueError("attention route flash_varlen needs CUDA and the flash-attn package (pip install flash-attn)")
    if name == "flex" and not has_flex:
        raise ValueError("attention route flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
    implementation = {"flash_varlen": "flash_attention_2", "flex": "flex_attention"}.get(name, name)
    return AttentionRoute(name, implementation, "asked for")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_flex() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


PACKING_IMPLEMENTATIONS = {"flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager"}


def check_model_can_pack(model) -> str:
    """The model's attention implementation, or ValueError where packed sequences would see each other."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKING_IMPLEMENTATIONS:
        raise ValueError(f"packing needs one of the attention implementations {sorted(PACKING_IMPLEMENTATIONS)}; "
                         f"this model uses {implementation!r}: run without --packing")
    return implementation


def use_attention(model, route: AttentionRoute) -> str:
    """Switch a loaded (possibly PEFT-wrapped) model to the route's attention implementation.

    ValueError (one line) where this model or install cannot (transformers checks the kernel)."""
    lm = models._causal_lm(model)
    try:
        lm.set_attn_implementation(models.attention_keeping_softcap(lm.config, route.attn_implementation))
    except (ValueError, ImportError) as e:
        raise ValueError(f"attention route {route.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return check_model_can_pack(model)


def forward_inputs(packed: PackedBatch, implementation: str) -> dict:
    """Keyword arguments for the backbone's forward: positions and no mask (transformers keeps the
    sequences apart from the restarts in position_ids); flash-attn also gets the varlen offsets."""
    kw = {"position_ids": packed.position_ids, "attention_mask": None, "use_cache": False}
    if implementation.startswith("flash_attention"):
        cu = packed.cu_seqlens.to(packed.input_ids.device)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen)
    return kw


def packed_completion_logps(model, packed: PackedBatch, mode: str = "chunked", chunk_size: int = 256) -> torch.Tensor:
    """Summed completion log-probs of every packed sequence ([2B] float32), from one forward of one row.

    The packed twin of models.completion_logps: same modes, same HostEmbedding handling.
    """
    kw = forward_inputs(packed, check_model_can_pack(model))
    if mode == "full":
        logits = model(input_ids=packed.input_ids, **kw).logits
        return packed_logps_from_logits(logits, packed)
    if mode != "chunked":
        raise ValueError(f"unknown log-prob mode {mode!r}: use 'chunked' or 'full'")
    hidden, head = models.backbone_forward(model, packed.input_ids, packed.host_input_ids, **kw)
    return packed_logps_from_hidden(hidden, head, packed, chunk_size)


def token_counts(batch: Batch) -> tuple[int, int]:
    """(tokens a padded forward runs, tokens a packed one runs) for one micro-batch."""
    return batch.input_ids.numel(), int(batch.attention_mask.sum())


def packing_agrees(model, batch: Batch, mode: str = "chunked", chunk_size: int = 256,
                   rtol: float = 2 * 2.0**-8) -> tuple[bool, float]:
    """Does this model keep packed sequences apart? (agrees, max relative difference of log-probs from the
    padded path: models.agrees_with_padded). A model whose forward ignores position_ids or builds its own
    causal mask (a patched forward, say) lets sequences see each other, and the trainer falls back to padding."""
    def packed_logps():
        return packed_completion_logps(model, pack_batch(batch), mode, chunk_size)
    return models.agrees_with_padded(model, batch, packed_logps, mode, chunk_size, rtol)
