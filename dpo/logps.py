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
