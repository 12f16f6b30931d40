"""dpo.objectives.dpo.eval_metrics: every eval metric is the mean over pairs, whatever the batch size (issue 17, item 6)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for
from dpo.objectives.dpo import METRIC_NAMES, PairLogps, eval_metrics

BETA = 0.1
LOSS = objective_for(LossSettings(beta=BETA))


def pair_logps(values: list[tuple[float, float, int, int]]) -> PairLogps:
    chosen, rejected, nc, nr = zip(*values)
    return PairLogps(torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64),
                     torch.tensor(nc), torch.tensor(nr))


logp = st.floats(-300, -0.5, allow_nan=False)
pair = st.tuples(logp, logp, st.integers(1, 60), st.integers(1, 60))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(pair, logp, logp), min_size=1, max_size=23), batch_size=st.integers(1, 30))
@example(rows=[((-1.0 - 7 * i, -2.0 - i * i, 1 + i, 2), -3.0 + i, -1.5 * i) for i in range(7)], batch_size=3)
def test_each_metric_is_the_mean_over_pairs_for_any_batch_size(rows, batch_size):
    policy = pair_logps([p for p, _, _ in rows])
    ref = pair_logps([(rc, rr, p[2], p[3]) for p, rc, rr in rows])
    got = eval_metrics(policy, ref, LOSS, batch_size)
    n = len(rows)
    pc, pr, rc, rr = policy.chosen, policy.rejected, ref.chosen, ref.rejected
    margin = (pc - rc) - (pr - rr)
    want = {
        "eval_loss": float(torch.nn.functional.softplus(-BETA * margin).mean()),
        "eval_rewards/chosen": float((BETA * (pc - rc)).mean()),
        "eval_rewards/rejected": float((BETA * (pr - rr)).mean()),
        "eval_rewards/accuracies": float(((pc - rc) > (pr - rr)).double().mean()),
        "eval_rewards/margins": float((BETA * margin).mean()),
        "eval_logps/chosen": float(pc.mean()),
        "eval_logps/rejected": float(pr.mean()),
        "eval_ref_logps/chosen": float(rc.mean()),
        "eval_ref_logps/rejected": float(rr.mean()),
    }
    assert set(METRIC_NAMES) <= set(got)
    for key, value in want.items():
        # float32 accumulation in the metric rows; values up to a few hundred nats
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    assert got["eval_num_pairs"] == n
    one_batch = eval_metrics(policy, ref, LOSS, n)
    for key in METRIC_NAMES:
        assert got[key] == pytest.approx(one_batch[key], rel=1e-5, abs=1e-4), key


def test_a_policy_equal_to_its_reference_has_the_reference_log_probs_with_a_last_short_batch():
    # The case: 61 pairs in batches of 16 (16, 16, 16, 13), the policy equal to the reference:
    # a mean of batch means put eval_logps/chosen 1.0 nat away from eval_ref_logps/chosen.
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(61, generator=g, dtype=torch.float64) * 200 - torch.arange(61) * 2.0
    rejected = -torch.rand(61, generator=g, dtype=torch.float64) * 200
    tokens = torch.randint(1, 60, (61,), generator=g)
    ref = PairLogps(chosen, rejected, tokens, tokens)
    got = eval_metrics(ref, ref, LOSS, batch_size=16)
    assert got["eval_logps/chosen"] == pytest.approx(got["eval_ref_logps/chosen"], abs=1e-4)
    assert got["eval_logps/rejected"] == pytest.approx(got["eval_ref_logps/rejected"], abs=1e-4)
    assert got["eval_logps/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert got["eval_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert got["eval_rewards/margins"] == 0.0 and got["eval_rewards/accuracies"] == 0.0


def test_no_pairs_or_mismatched_pairs_are_refused():
    ref = pair_logps([(-1.0, -2.0, 1, 1), (-3.0, -4.0, 2, 2)])
    with pytest.raises(ValueError, match="no pairs"):
        empty = PairLogps(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
        eval_metrics(empty, empty, LOSS, 2)
    with pytest.raises(ValueError, match="reference has 2"):
        eval_metrics(pair_logps([(-1.0, -2.0, 1, 1)]), ref, LOSS, 2)
    with pytest.raises(ValueError, match="batch_size"):
        eval_metrics(ref, ref, LOSS, 0)
