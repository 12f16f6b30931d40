"""Per-sequence completion log-probabilities, log pi(completion | prompt), summed over tokens.

Contract shared by both implementations:
    input_ids[R, T], completion_mask[R, T] (1 on completion tokens), and the model's output
    -> logps[R] = sum over t of completion_mask[t+1] * log p(input_ids[t+1] | input_ids[..t])
Position t predicts token t+1, so labels are the inputs shifted left by one and the mask is
shifted with them; prompt and padding tokens contribute nothing.

- `full`: logits[R, T, V] -> log_softmax (float32) -> gather. Simple, but holds R*T*V floats.
- `chunked`: only the completion positions' hidden states go through the LM head, a few hundred
  tokens at a time; the [tokens, V] logits of a chunk are recomputed in backward instead of being
  kept. Peak extra memory is one chunk's logits, whatever the batch and vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for each position: logits[..., V], labels[...] -> [...] float32."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    return logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def sequence_logps_from_logits(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """The plain path: logits[R, T, V], input_ids[R, T], completion_mask[R, T] -> logps[R] (float32)."""
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    per_token = token_logps_from_logits(logits[:, :-1], labels.masked_fill(~mask, 0))
    return (per_token * mask).sum(dim=1)


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] for N tokens, chunk_size tokens at a time.

    hidden[N, H], weight[V, H], bias[V] or None, targets[N] -> [N] float32.
    The matmul runs in hidden's dtype (as the full path does under bf16); log-softmax in float32.
    Backward recomputes each chunk's logits: d logp / d logits = onehot(target) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = F.linear(hidden[start:end], weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
            out[start:end] = token_logps_from_logits(logits, targets[start:end])
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            probs = torch.softmax(F.linear(h, w, b).float(), dim=-1)
            # grad of sum_i g_i * logp_i w.r.t. the logits of token i: g_i * (onehot_i - p_i)
            grad_logits = probs.mul_(-grad_out[start:end, None])
            grad_logits.scatter_add_(1, targets[start:end, None], grad_out[start:end, None].float())
            if need_h:
                grad_hidden[start:end] = (grad_logits.to(h.dtype) @ w).to(hidden.dtype)
            if need_w:
                grad_weight += grad_logits.t() @ h.float()
            if need_b:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """The lean path: hidden[R, T, H] (last hidden states), the LM head (a Linear) -> logps[R] float32."""
    mask = completion_mask[:, 1:].bool()  # position t scores token t+1
    h = hidden[:, :-1][mask]  # [N, H]: completion positions only
    targets = input_ids[:, 1:][mask]  # [N]
    per_token = ChunkedTokenLogps.apply(h, lm_head.weight, lm_head.bias, targets, chunk_size)
    # Scatter back to rows; index_add keeps the graph even for rows with no scored token.
    row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(mask.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, row, per_token)


# --- what the objectives beyond plain DPO read from a forward pass ---------------------------
# Per-sequence quantities the objectives beyond plain DPO need from a forward pass, as pure functions.
#
# Contract (the same layout as `dpo/logps.py`):
#     input_ids[R, T], attention_mask[R, T], completion_mask[R, T] (1 on completion tokens), rows
#     right-padded; position t predicts token t+1, so every mask is read shifted: mask[:, 1:].
#     token_logps[R, T-1] = log p(input_ids[t+1] | input_ids[..t]) (what `token_logps_from_logits`
#     gives for logits[:, :-1] and labels input_ids[:, 1:]); summed log-probs logps[R] are
#     `sequence_logps_*` of `dpo/logps.py` with the mask given.
#
# What each objective takes from one micro-batch of B pairs (2B rows: chosen, then rejected):
#     SimPO, ORPO  per-token MEAN log-probs: mean_logps(logps, completion_token_counts(completion_mask))
#     CPO, ORPO    the chosen NLL: objective_losses.chosen_nll(nll_logps, nll_tokens) over the chosen rows, where CPO
#                  scores the completion (completion_mask) and ORPO every attended token after the
#                  first (nll_mask(..., include_prompt=True)), prompt included, as TRL does
#     LD-DPO       ld_masks(completion_mask) -> shared, tail: logps = shared_sum + ld_alpha * tail_sum,
#                  for policy and reference alike
#     WPO          wpo_sequence_weights (no gradient) -> wpo_pair_weights -> preference_loss(pair_weights=)

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
