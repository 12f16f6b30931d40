"""Prefix-shared micro-batches: each pair's prompt computed once, not twice.

A padded or packed DPO micro-batch runs 2B sequences, prompt+chosen and prompt+rejected, so every prompt
token goes through the model twice. Here each pair is one segment [prompt | chosen | rejected], the B
segments end to end in one row of N = sum of (P + C + R) tokens:

    input_ids[1, N]     the segments' tokens
    position_ids[1, N]  prompt 0 .. P-1; chosen P .. P+C-1; rejected P .. P+R-1 (both continue the prompt)
    segment[N], part[N] which pair a token is in, and whether it is prompt (0), chosen (1) or rejected (2)

Attention (`attention_allowed`): a query sees the keys of its own segment up to itself, except that chosen
and rejected never see each other: prompt keys are seen by every later token of the segment, chosen keys
by chosen queries, rejected keys by rejected queries. Each completion token is then computed exactly as
in its own sequence prompt+completion, at the same position.

Log-probs, the contract of dpo/logps.py: completion token j of a side is scored by the hidden state that
predicts it, the last prompt position for j = 0 (for both sides) and the side's own token j-1 after:

    predictor[M], target[M], sequence[M]   one entry per scored token, M = sum of (C + R)
    logps[s] = sum over entries with sequence = s of log p(target | hidden[predictor])   s in 0 .. 2B-1

with s < B the chosen sides and s >= B the rejected ones, as the padded path orders them. The sums are
term for term the padded path's; only the float rounding of attention over another layout differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpo import logps as logps_math
from dpo import models
from dpo.data.pairs import Batch

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class SharedBatch:
    input_ids: torch.Tensor  # [1, N] long
    position_ids: torch.Tensor  # [1, N] long
    segment: torch.Tensor  # [N] long: the pair of each token, 0 .. B-1
    part: torch.Tensor  # [N] long: PROMPT, CHOSEN or REJECTED
    predictor: torch.Tensor  # [M] long: the position whose hidden state scores each completion token
    target: torch.Tensor  # [M] long: that token's id
    sequence: torch.Tensor  # [M] long: its sequence, 0 .. 2B-1 (chosen sides, then rejected sides)
    num_pairs: int
    row_ids: list[int] = field(default_factory=list)  # [B]
    host_input_ids: torch.Tensor | None = None  # input_ids in CPU memory, for HostEmbedding lookups

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "SharedBatch":
        host = self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids
        move = {k: getattr(self, k).to(device) for k in
                ("input_ids", "position_ids", "segment", "part", "predictor", "target", "sequence")}
        return SharedBatch(**move, num_pairs=self.num_pairs, row_ids=self.row_ids, host_input_ids=host)


def share_batch(batch: Batch) -> SharedBatch:
    """A collated, right-padded DPO Batch ([2B, T]: chosen rows, then rejected rows, each cut to max_length)
    -> its B pairs as prefix-shared segments. ValueError where a pair's two rows differ in their prompt."""
    b = batch.num_pairs
    attention, completion, ids = (t.cpu() for t in (batch.attention_mask.bool(), batch.completion_mask.bool(),
                                                     batch.input_ids))
    tokens, positions, segments, parts = [], [], [], []
    predictor, target, sequence = [], [], []
    offset = 0
    for i in range(b):
        prompt = ids[i][attention[i] & ~completion[i]]
        if not torch.equal(prompt, ids[b + i][attention[b + i] & ~completion[b + i]]):
            raise ValueError(f"pair {i}: its chosen and rejected rows differ in their prompt tokens")
        if prompt.numel() == 0:
            raise ValueError(f"pair {i}: no prompt token to score the first completion token from")
        p = prompt.numel()
        sides = [ids[r][attention[r] & completion[r]] for r in (i, b + i)]
        tokens += [prompt, *sides]
        positions += [torch.arange(p)] + [torch.arange(p, p + s.numel()) for s in sides]
        segments.append(torch.full((p + sum(s.numel() for s in sides),), i))
        parts += [torch.full((p,), PROMPT)] + [torch.full((s.numel(),), part) for part, s in zip((CHOSEN, REJECTED), sides)]
        start = offset + p  # where the chosen side begins; the rejected side follows it
        for side, (begin, seq) in enumerate(((start, i), (start + sides[0].numel(), b + i))):
            n = sides[side].numel()
            if n:
                predictor.append(torch.cat([torch.tensor([offset + p - 1]), torch.arange(begin, begin + n - 1)]))
                target.append(sides[side])
                sequence.append(torch.full((n,), seq))
        offset += p + sides[0].numel() + sides[1].numel()
    empty = torch.zeros(0, dtype=torch.long)
    shared = SharedBatch(torch.cat(tokens)[None], torch.cat(positions)[None], torch.cat(segments), torch.cat(parts),
                         torch.cat(predictor) if predictor else empty, torch.cat(target) if target else empty,
                         torch.cat(sequence) if sequence else empty, b, list(batch.row_ids))
    return shared.to(batch.input_ids.device)


def attention_allowed(shared: SharedBatch) -> torch.Tensor:
    """[N, N] bool: query q may attend to key k (same segment, k not after q, and k in the prompt or on
    q's own side)."""
    seg, part = shared.segment, shared.part
    n = seg.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    same_segment = seg[:, None] == seg[None, :]
    same_side = (part[None, :] == PROMPT) | (part[None, :] == part[:, None])
    return causal & same_segment & same_side


def additive_mask(shared: SharedBatch, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, N, N] float: 0 where attention is allowed, the dtype's lowest value elsewhere (the form eager
    and sdpa attention add to their scores; transformers passes a 4D mask through as it is)."""
    allowed = attention_allowed(shared)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def shared_completion_logps(model, shared: SharedBatch, mode: str = "chunked", chunk_size: int = 256) -> torch.Tensor:
    """Summed completion log-probs of every side ([2B] float32: chosen, then rejected) from one forward of
    the shared row: the prefix-shared twin of models.completion_logps, same modes, same HostEmbedding use."""
    lm = models._causal_lm(model)
    dtype = next(p for p in lm.parameters() if p.is_floating_point()).dtype
    if torch.is_autocast_enabled(shared.input_ids.device.type):
        dtype = torch.get_autocast_dtype(shared.input_ids.device.type)
    kw = {"attention_mask": additive_mask(shared, dtype), "position_ids": shared.position_ids, "use_cache": False}
    if mode == "full":
        logits = model(input_ids=shared.input_ids, **kw).logits[0]
        per_token = logps_math.token_logps_from_logits(logits[shared.predictor], shared.target)
    elif mode == "chunked":
        backbone = getattr(lm, lm.base_model_prefix)
        embedding = lm.get_input_embeddings()
        if isinstance(embedding, models.HostEmbedding) and shared.host_input_ids is not None:
            inputs = {"inputs_embeds": embedding.lookup(shared.host_input_ids, shared.input_ids.device)}
        else:
            inputs = {"input_ids": shared.input_ids}
        hidden = backbone(**inputs, **kw).last_hidden_state[0]
        head = lm.get_output_embeddings()
        per_token = logps_math.ChunkedTokenLogps.apply(hidden[shared.predictor], head.weight, head.bias,
                                                       shared.target, chunk_size)
    else:
        raise ValueError(f"unknown log-prob mode {mode!r}: use 'chunked' or 'full'")
    # index_add keeps the graph even for a side with no scored token (its sum is 0, as padded).
    out = torch.zeros(2 * shared.num_pairs, dtype=torch.float32, device=per_token.device)
    return out.index_add(0, shared.sequence, per_token.float())


def token_counts(batch: Batch) -> tuple[int, int]:
    """(tokens the unshared forwards run, tokens the shared one runs) for one micro-batch: 2P + C + R against
    P + C + R per pair."""
    attention, completion = batch.attention_mask.bool(), batch.completion_mask.bool()
    b = batch.num_pairs
    unshared = int(attention.sum())
    prompts = int((attention[:b] & ~completion[:b]).sum())
    return unshared, unshared - prompts


def sharing_agrees(model, batch: Batch, mode: str = "chunked", chunk_size: int = 256,
                   rtol: float = 2 * 2.0**-8) -> tuple[bool, float]:
    """Does this model's forward honour the shared layout's mask and positions? (agrees, max relative
    difference of log-probs from the padded path). One no_grad forward each way on a real micro-batch; a
    forward that builds its own causal mask lets the rejected side see the chosen one, far past rounding.
    rtol: 2 bfloat16 units of roundoff (the GPU suite's bound on summed log-probs)."""
    with torch.no_grad():
        padded = models.completion_logps(model, batch, mode, chunk_size)
        shared = shared_completion_logps(model, share_batch(batch), mode, chunk_size)
    diff = ((shared - padded).abs() / padded.abs().clamp_min(1.0)).max().item()
    return diff <= rtol, diff
