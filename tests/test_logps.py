"""The lean (chunked) log-prob path equals the plain one, in value and gradient."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo.logps import ChunkedTokenLogps, sequence_logps_from_hidden, sequence_logps_from_logits


def random_rows(rng: torch.Generator, rows: int, width: int, vocab: int, prompt_lens, completion_lens):
    """Right-padded rows of prompt+completion, with their completion masks."""
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        input_ids[r, : p + c] = torch.randint(1, vocab, (p + c,), generator=rng)
        completion_mask[r, p : p + c] = 1
    return input_ids, completion_mask


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 5))
    prompt_lens = draw(st.lists(st.integers(1, 6), min_size=rows, max_size=rows))
    completion_lens = draw(st.lists(st.integers(1, 6), min_size=rows, max_size=rows))  # one-token completions too
    width = max(p + c for p, c in zip(prompt_lens, completion_lens)) + draw(st.integers(0, 3))  # padding
    vocab = draw(st.integers(2, 50))
    hidden = draw(st.integers(1, 8))
    chunk = draw(st.integers(1, 7))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return rows, width, vocab, hidden, chunk, bias, seed, prompt_lens, completion_lens


@settings(max_examples=60, deadline=None)
@given(batches())
def test_chunked_equals_plain_values_and_gradients(case):
    rows, width, vocab, hidden_size, chunk, use_bias, seed, prompt_lens, completion_lens = case
    rng = torch.Generator().manual_seed(seed)
    input_ids, completion_mask = random_rows(rng, rows, width, vocab, prompt_lens, completion_lens)
    hidden = torch.randn(rows, width, hidden_size, generator=rng, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=use_bias).double()
    upstream = torch.randn(rows, generator=rng, dtype=torch.float64)

    plain = sequence_logps_from_logits(head(hidden), input_ids, completion_mask)
    g_plain = torch.autograd.grad((plain * upstream).sum(), [hidden, *head.parameters()])
    lean = sequence_logps_from_hidden(hidden, head, input_ids, completion_mask, chunk_size=chunk)
    g_lean = torch.autograd.grad((lean * upstream).sum(), [hidden, *head.parameters()])

    # log_softmax runs in float32 in both paths (as TRL's kernel), hence float32-level tolerances.
    torch.testing.assert_close(lean.double(), plain.double(), rtol=1e-5, atol=1e-5)
    for a, b in zip(g_lean, g_plain):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_plain_matches_a_hand_computed_sum():
    # 1 row: prompt [5], completion [7, 3]; position 0 predicts 7, position 1 predicts 3.
    logits = torch.randn(1, 3, 10)
    ids = torch.tensor([[5, 7, 3]])
    mask = torch.tensor([[0, 1, 1]])
    lp = torch.log_softmax(logits, -1)
    expected = lp[0, 0, 7] + lp[0, 1, 3]
    torch.testing.assert_close(sequence_logps_from_logits(logits, ids, mask)[0], expected)


def test_prompt_and_padding_contribute_nothing():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 11, bias=False)
    hidden = torch.randn(1, 6, 4)
    ids = torch.tensor([[1, 2, 3, 4, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 0]])
    base = sequence_logps_from_hidden(hidden, head, ids, mask)
    changed = ids.clone()
    changed[0, 4:] = 9  # padding tokens change: no effect
    hidden2 = hidden.clone()
    hidden2[0, 3:] += 5.0  # hidden states after the last scored position change: no effect
    torch.testing.assert_close(sequence_logps_from_hidden(hidden2, head, changed, mask), base)
    assert base.shape == (1,) and base.item() < 0


def test_chunk_logits_never_exceed_one_chunk():
    """The lean path's largest live tensor is one chunk of logits, not N x V (checked via a spy)."""
    seen = []

    import torch.nn.functional as F

    real_linear = F.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(out.shape[0])
        return out

    head = torch.nn.Linear(4, 100, bias=False)
    hidden = torch.randn(2, 50, 4, requires_grad=True)
    ids = torch.randint(0, 100, (2, 50))
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[:, 0] = 0
    F.linear, saved = spy, F.linear
    try:
        out = sequence_logps_from_hidden(hidden, head, ids, mask, chunk_size=16)
        out.sum().backward()
    finally:
        F.linear = saved
    assert seen and max(seen) <= 16
    assert math.isfinite(out.sum().item())


def test_bf16_lean_path_close_to_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).bfloat16()
    hidden = torch.randn(2, 20, 32, dtype=torch.bfloat16)
    ids = torch.randint(0, 500, (2, 20))
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[:, 5:] = 1
    lean = sequence_logps_from_hidden(hidden, head, ids, mask, chunk_size=7)
    plain = sequence_logps_from_logits(head(hidden), ids, mask)
    # Same bf16 matmul, float32 softmax in both: only summation order differs.
    torch.testing.assert_close(lean, plain, rtol=1e-3, atol=1e-3)


def test_autograd_function_gradcheck():
    torch.manual_seed(0)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,))
    # float32 log-softmax inside: compare against the float64 direct formula instead of gradcheck's
    direct = torch.log_softmax(h @ w.T + b, -1).gather(1, t[:, None]).squeeze(1)
    g_direct = torch.autograd.grad(direct.sum(), [h, w, b])
    lean = ChunkedTokenLogps.apply(h, w, b, t, 2)
    g_lean = torch.autograd.grad(lean.sum(), [h, w, b])
    torch.testing.assert_close(lean.double(), direct, rtol=1e-6, atol=1e-6)
    for a, c in zip(g_lean, g_direct):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
