"""Prefix-shared micro-batches: each pair's prompt computed once, not twice.

A padded or packed DPO micro-batch runs 2B sequences, prompt+chosen and prompt+rejected, so every prompt
token goes through the model twice. Here each pair is one row [prompt | chosen | rejected], B rows
right-padded to the longest, L = max over pairs of (P + C + R); or all B pairs one after another in one
row with no padding (`one_row`, L = the sum of P + C + R: the form a shared-prefix kernel takes):

    input_ids[B, L]     the pair's tokens, then padding
    position_ids[B, L]  prompt 0 .. P-1; chosen P .. P+C-1; rejected P .. P+R-1 (both continue the prompt);
                        pads 0 (never past what the padded path uses: a table of learned positions has an end)
    part[B, L]          PROMPT, CHOSEN, REJECTED, or PAD
    pair[B, L]          the pair a position belongs to (0 .. B-1), -1 for a pad

Attention (`attention_allowed`): a query sees the keys of its pair up to itself, except that chosen and
rejected never see each other: prompt keys are seen by every later token, chosen keys by chosen
queries, rejected keys by rejected queries (a pad query sees only itself, so no softmax is empty). Each
completion token is then computed exactly as in its own sequence prompt+completion, at the same position.
Two routes compute it: "masked", a dense additive mask that SDPA or eager attention adds to its scores (a
row per pair keeps it at B x L x L; one row of all pairs would be (sum of lengths)^2), and "flex", the one
row through Unsloth's FlexAttention shared-prefix kernel, which skips the masked blocks
(dpo/unsloth_prefix.py).

Log-probs, the contract of dpo/logps.py: completion token j of a side is scored by the hidden state that
predicts it, the last prompt position for j = 0 (for both sides) and the side's own token j-1 after:

    predictor[M] (flat index into the B x L positions), target[M], sequence[M]   M = sum of (C + R)
    logps[s] = sum over entries with sequence = s of log p(target | hidden[predictor])   s in 0 .. 2B-1

with s < B the chosen sides and s >= B the rejected ones, as the padded path orders them. The sums are
term for term the padded path's; only the float rounding of attention over another layout differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpo import logps as logps_math
from dpo import models
from dpo import unsloth_prefix
from dpo.data.pairs import Batch

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2
ROUTES = ("masked", "flex")  # how attention keeps the sides apart: a dense mask, or a shared-prefix kernel


@dataclass
class SharedBatch:
    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long
    part: torch.Tensor  # [B, L] long: PROMPT, CHOSEN, REJECTED or PAD
    pair: torch.Tensor  # [B, L] long: the pair of each position, -1 for a pad
    predictor: torch.Tensor  # [M] long: the flat position (row * L + column) whose hidden state scores a token
    target: torch.Tensor  # [M] long: that token's id
    sequence: torch.Tensor  # [M] long: its sequence, 0 .. 2B-1 (chosen sides, then rejected sides)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # [B] (prompt, chosen, rejected) tokens
    row_ids: list[int] = field(default_factory=list)  # [B]
    host_input_ids: torch.Tensor | None = None  # input_ids in CPU memory, for HostEmbedding lookups

    @property
    def num_pairs(self) -> int:
        return len(self.segments)

    @property
    def num_tokens(self) -> int:
        """Positions the forward runs (padding included)."""
        return self.input_ids.numel()

    def to(self, device) -> "SharedBatch":
        host = self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids
        move = {k: getattr(self, k).to(device) for k in
                ("input_ids", "position_ids", "part", "pair", "predictor", "target", "sequence")}
        return SharedBatch(**move, segments=self.segments, row_ids=self.row_ids, host_input_ids=host)


def _pair_row(prompt: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor):
    """One pair's (tokens, positions, parts) and its scored entries (column of the predictor, target, side)."""
    p, c, r = prompt.numel(), chosen.numel(), rejected.numel()
    tokens = torch.cat([prompt, chosen, rejected])
    positions = torch.cat([torch.arange(p), torch.arange(p, p + c), torch.arange(p, p + r)])
    parts = torch.cat([torch.full((p,), PROMPT), torch.full((c,), CHOSEN), torch.full((r,), REJECTED)])
    scored = []
    for side, (begin, n) in enumerate(((p, c), (p + c, r))):
        if n:  # token 0 from the last prompt position, token j from the side's token j-1
            columns = torch.cat([torch.tensor([p - 1]), torch.arange(begin, begin + n - 1)])
            scored.append((columns, tokens[begin:begin + n], side))
    return tokens, positions, parts, scored


def share_batch(batch: Batch, one_row: bool = False) -> SharedBatch:
    """A collated, right-padded DPO Batch ([2B, T]: chosen rows, then rejected rows, each cut to max_length)
    -> its B pairs as prefix-shared rows (`one_row`: one after another in a single row, no padding).
    ValueError where a pair's two rows differ in their prompt."""
    b = batch.num_pairs
    attention, completion, ids = (t.cpu() for t in (batch.attention_mask.bool(), batch.completion_mask.bool(),
                                                     batch.input_ids))
    rows, segments = [], []  # segments: [B] (prompt, chosen, rejected) tokens
    for i in range(b):
        prompt = ids[i][attention[i] & ~completion[i]]
        if not torch.equal(prompt, ids[b + i][attention[b + i] & ~completion[b + i]]):
            raise ValueError(f"pair {i}: its chosen and rejected rows differ in their prompt tokens")
        if prompt.numel() == 0:
            raise ValueError(f"pair {i}: no prompt token to score the first completion token from")
        chosen, rejected = (ids[r][attention[r] & completion[r]] for r in (i, b + i))
        rows.append(_pair_row(prompt, chosen, rejected))
        segments.append((prompt.numel(), chosen.numel(), rejected.numel()))
    lengths = [t.numel() for t, _, _, _ in rows]
    width = sum(lengths) if one_row else max(lengths)
    shape = (1 if one_row else b, width)
    input_ids, position_ids = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    part, pair = torch.full(shape, PAD, dtype=torch.long), torch.full(shape, PAD, dtype=torch.long)
    predictor, target, sequence = [], [], []
    start = 0
    for i, (tokens, positions, parts, scored) in enumerate(rows):
        row, begin = (0, start) if one_row else (i, 0)
        where = slice(begin, begin + tokens.numel())
        input_ids[row, where], position_ids[row, where], part[row, where] = tokens, positions, parts  # pads: 0
        pair[row, where] = i
        for columns, targets, side in scored:
            predictor.append(row * width + begin + columns)
            target.append(targets)
            sequence.append(torch.full((targets.numel(),), side * b + i))
        start += tokens.numel()
    empty = torch.zeros(0, dtype=torch.long)
    shared = SharedBatch(input_ids, position_ids, part, pair, torch.cat(predictor) if predictor else empty,
                         torch.cat(target) if target else empty, torch.cat(sequence) if sequence else empty,
                         segments, list(batch.row_ids))
    return shared.to(batch.input_ids.device)


def attention_allowed(shared: SharedBatch) -> torch.Tensor:
    """[B, L, L] bool: query q may attend to key k (k not after q, k real and of q's pair, and k in the prompt
    or on q's own side); a pad query attends to itself only."""
    part = shared.part
    width = part.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=part.device).tril()
    key, query = part[:, None, :], part[:, :, None]
    same_pair = shared.pair[:, None, :] == shared.pair[:, :, None]
    allowed = causal & same_pair & (key != PAD) & (query != PAD) & ((key == PROMPT) | (key == query))
    eye = torch.eye(width, dtype=torch.bool, device=part.device)
    return allowed | (eye & (query == PAD))


def additive_mask(shared: SharedBatch, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] float: 0 where attention is allowed, the dtype's lowest value elsewhere (the form eager
    and sdpa attention add to their scores; transformers passes a 4D mask through as it is)."""
    allowed = attention_allowed(shared)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def attention_kwargs(model, shared: SharedBatch, route: str) -> dict:
    """What the forward takes to keep the sides apart: a dense additive mask ("masked") or Unsloth's
    shared-prefix segment table for the one row ("flex")."""
    if route == "flex":
        if shared.input_ids.shape[0] != 1:
            raise ValueError("the flex route takes the pairs as one row: share_batch(batch, one_row=True)")
        return {"prefix_seg_info": unsloth_prefix.segment_table(shared.segments, shared.input_ids.device)}
    if route != "masked":
        raise ValueError(f"unknown prefix-sharing route {route!r}: use one of {', '.join(ROUTES)}")
    dtype = next(p for p in models._causal_lm(model).parameters() if p.is_floating_point()).dtype
    if torch.is_autocast_enabled(shared.input_ids.device.type):
        dtype = torch.get_autocast_dtype(shared.input_ids.device.type)
    return {"attention_mask": additive_mask(shared, dtype)}


def shared_completion_logps(model, shared: SharedBatch, mode: str = "chunked", chunk_size: int = 256,
                            route: str = "masked") -> torch.Tensor:
    """Summed completion log-probs of every side ([2B] float32: chosen, then rejected) from one forward of
    the shared rows: the prefix-shared twin of models.completion_logps, same modes, same HostEmbedding use."""
    kw = {**attention_kwargs(model, shared, route), "position_ids": shared.position_ids, "use_cache": False}
    if mode == "full":
        logits = model(input_ids=shared.input_ids, **kw).logits
        per_token = logps_math.token_logps_from_logits(logits.flatten(0, 1)[shared.predictor], shared.target)
    elif mode == "chunked":
        hidden, head = models.backbone_forward(model, shared.input_ids, shared.host_input_ids, **kw)
        hidden = hidden.flatten(0, 1)
        per_token = logps_math.ChunkedTokenLogps.apply(hidden[shared.predictor], head.weight, head.bias,
                                                       shared.target, chunk_size)
    else:
        raise ValueError(f"unknown log-prob mode {mode!r}: use 'chunked' or 'full'")
    # index_add keeps the graph even for a side with no scored token (its sum is 0, as padded).
    out = torch.zeros(2 * shared.num_pairs, dtype=torch.float32, device=per_token.device)
    return out.index_add(0, shared.sequence, per_token.float())


def segment_lengths(batch: Batch) -> list[int]:
    """[B] the real length of each pair's shared row, P + C + R (each side cut as collate cuts it)."""
    attention, completion = batch.attention_mask.bool(), batch.completion_mask.bool()
    b = batch.num_pairs
    return [int(n) for n in (attention[:b].sum(1) + (attention[b:] & completion[b:]).sum(1)).tolist()]


def sharing_agrees(model, batch: Batch, mode: str = "chunked", chunk_size: int = 256,
                   rtol: float = 2 * 2.0**-8, route: str = "masked") -> tuple[bool, float]:
    """Does this model's forward honour the shared layout's mask and positions by this route? (agrees, max
    relative difference of log-probs from the padded path: models.agrees_with_padded). A forward that builds
    its own causal mask lets the rejected side see the chosen one, far past rounding."""
    def shared_logps():
        return shared_completion_logps(model, share_batch(batch, one_row=route == "flex"), mode, chunk_size, route)
    return models.agrees_with_padded(model, batch, shared_logps, mode, chunk_size, rtol)
