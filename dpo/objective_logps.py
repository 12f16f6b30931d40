"""Per-sequence quantities the objectives beyond plain DPO need from a forward pass, as pure functions.

Contract (the same layout as `dpo/logps.py`):
    input_ids[R, T], attention_mask[R, T], completion_mask[R, T] (1 on completion tokens), rows
    right-padded; position t predicts token t+1, so every mask is read shifted: mask[:, 1:].
    token_logps[R, T-1] = log p(input_ids[t+1] | input_ids[..t]) (what `token_logps_from_logits`
    gives for logits[:, :-1] and labels input_ids[:, 1:]); summed log-probs logps[R] are
    `sequence_logps_*` of `dpo/logps.py` with the mask given.

What each objective takes from one micro-batch of B pairs (2B rows: chosen, then rejected):
    SimPO, ORPO  per-token MEAN log-probs: mean_logps(logps, completion_token_counts(completion_mask))
    CPO, ORPO    the chosen NLL: objective_losses.chosen_nll(nll_logps, nll_tokens) over the chosen rows, where CPO
                 scores the completion (completion_mask) and ORPO every attended token after the
                 first (nll_mask(..., include_prompt=True)), prompt included, as TRL does
    LD-DPO       ld_masks(completion_mask) -> shared, tail: logps = shared_sum + ld_alpha * tail_sum,
                 for policy and reference alike
    WPO          wpo_sequence_weights (no gradient) -> wpo_pair_weights -> preference_loss(pair_weights=)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.logps import token_logps_from_logits


def completion_token_counts(completion_mask: Tensor) -> Tensor:
    """Scored completion tokens per row: completion_mask[R, T] -> [R] (float32)."""
    return completion_mask[:, 1:].sum(dim=1).float()


def mean_logps(logps: Tensor, token_counts: Tensor) -> Tensor:
    """Per-token mean log-prob: logps[R] / token_counts[R] -> [R].

    TRL's CPO/ORPO `get_batch_logps(average_log_prob=True)`. An empty completion counts as one token
    (TRL divides by 0 and gets NaN there; TRL's tokenization always appends EOS, so only a prompt
    that fills max_length makes one).
    """
    return logps / token_counts.to(logps.dtype).clamp(min=1.0)


def nll_mask(attention_mask: Tensor, completion_mask: Tensor, *, include_prompt: bool) -> Tensor:
    """The tokens whose NLL CPO (completion only) or ORPO (prompt and completion) averages.  [R, T] -> [R, T]

    ORPO's labels are the input ids wherever attention_mask is 1; read shifted like every mask here,
    so the first token of each row is never scored.
    """
    return attention_mask if include_prompt else completion_mask


def prompt_token_mask(attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """Attended non-completion tokens (the prompt): [R, T] -> [R, T] long.

    ORPO's NLL log-prob sum is the completion sum plus the sum over this mask, so a trainer can reuse
    its completion log-probs and score only the prompt tokens in an extra pass.
    """
    return (attention_mask.bool() & ~completion_mask.bool()).long()


def ld_masks(completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """LD-DPO's split (Liu et al. 2024) of each completion at the shorter one's length.  [2B, T] -> 2 x [2B, T]

    For pair i, l_i = min(|y_w|, |y_l|); in both rows of the pair, the first l_i completion tokens are
    `shared`, the rest `tail`. Same layout as completion_mask (read shifted), as TRL 1.15's DPOTrainer
    builds them from completion_mask[:, 1:].
    """
    shifted = completion_mask[:, 1:]
    position = shifted.cumsum(dim=1)  # 1-based index among completion tokens, 0 before the first
    chosen_len, rejected_len = shifted.sum(dim=1).chunk(2, dim=0)
    shared_len = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    shared = (position > 0) & (position <= shared_len) & shifted.bool()
    tail = (position > shared_len) & shifted.bool()
    pad = torch.zeros_like(completion_mask[:, :1])
    return torch.cat([pad, shared.long()], dim=1), torch.cat([pad, tail.long()], dim=1)


def ld_logps(shared_logps: Tensor, tail_logps: Tensor, ld_alpha: float) -> Tensor:
    """Length-desensitised sequence log-prob: shared + ld_alpha * tail.  [R], [R] -> [R]

    ld_alpha = 1 is the plain sum; 0 ignores whatever the longer completion says past the shorter one.
    """
    return shared_logps + ld_alpha * tail_logps


def ld_logps_from_token_logps(token_logps: Tensor, completion_mask: Tensor, ld_alpha: float) -> Tensor:
    """The same from per-token log-probs: token_logps[2B, T-1], completion_mask[2B, T] -> [2B]."""
    shared, tail = ld_masks(completion_mask)
    return ld_logps((token_logps * shared[:, 1:]).sum(1), (token_logps * tail[:, 1:]).sum(1), ld_alpha)


@torch.no_grad()
def wpo_token_terms_from_logits(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log p(label) and log sum_v p_v^2: logits[R, T, V], input_ids[R, T] -> 2 x [R, T-1] float32."""
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return token_logps_from_logits(logits[:, :-1], input_ids[:, 1:]), torch.logsumexp(2 * log_p, dim=-1)


@torch.no_grad()
def wpo_sequence_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, completion_mask: Tensor) -> Tensor:
    """WPO's sequence weight (Zhou et al. 2024, Eq. 2, TRL 1.15's form), no gradient.  [R, T-1] x2, [R, T] -> [R]

    w(y|x) = exp( mean over completion tokens t of (log p(y_t) - log sum_v p(v)^2) ):
    the geometric-mean token probability, aligned by each position's own sum of squared probabilities
    (the expected probability of a token sampled from the policy there).
    """
    mask = completion_mask[:, 1:].to(token_logps.dtype)
    aligned = ((token_logps - log_sum_sq_probs) * mask).sum(dim=1)
    return torch.exp(aligned / mask.sum(dim=1).clamp(min=1))


@torch.no_grad()
def wpo_weights_from_hidden(
    hidden: Tensor, lm_head: torch.nn.Module, input_ids: Tensor, completion_mask: Tensor, chunk_size: int = 256
) -> Tensor:
    """WPO weights on the lean path: hidden[R, T, H] and the LM head -> [R], one chunk of logits at a time."""
    mask = completion_mask[:, 1:].bool()
    h, targets = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    aligned = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
    weight = lm_head.weight.to(hidden.dtype)
    bias = None if lm_head.bias is None else lm_head.bias.to(hidden.dtype)
    for start in range(0, h.shape[0], chunk_size):
        log_p = torch.log_softmax(F.linear(h[start:start + chunk_size], weight, bias).float(), dim=-1)
        picked = log_p.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1)
        aligned[start:start + chunk_size] = picked - torch.logsumexp(2 * log_p, dim=-1)
    row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(mask.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, row, aligned)
    return torch.exp(sums / mask.sum(dim=1).clamp(min=1))


def wpo_pair_weights(sequence_weights: Tensor) -> Tensor:
    """Per-pair WPO weight w(y_w|x) * w(y_l|x): [2B] (chosen rows, then rejected) -> [B], detached."""
    chosen, rejected = sequence_weights.detach().chunk(2, dim=0)
    return chosen * rejected
