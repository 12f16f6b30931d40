"""dpo.losses: properties of the loss functions, and equality with TRL 1.15's own `_compute_loss`.

The TRL comparison runs the real `trl.trainer.dpo_trainer.DPOTrainer._compute_loss` (unbound) on a
stub `self` and a stub model whose per-token log-probs we choose, so TRL's loss code, not a copy of
it, computes the reference numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpo import losses
from dpo.losses import LOSS_TYPES, SMOOTHED_LOSS_TYPES, PreferenceLogps, preference_loss, sigmoid_loss, validate_loss_config

TOL = 1e-6  # |ours - TRL| <= TOL * max(1, |TRL|); float64 results agree far tighter (see the printed maxima)

finite = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False)
betas = st.floats(0.01, 5.0, allow_nan=False)


def logps_of(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_tokens=None, rejected_tokens=None):
    chosen = torch.as_tensor(chosen, dtype=torch.float64)
    rejected = torch.as_tensor(rejected, dtype=torch.float64)
    zeros = torch.zeros_like(chosen)
    ones = torch.ones_like(chosen)
    return PreferenceLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=zeros if ref_chosen is None else torch.as_tensor(ref_chosen, dtype=torch.float64),
        ref_rejected=zeros if ref_rejected is None else torch.as_tensor(ref_rejected, dtype=torch.float64),
        chosen_tokens=ones if chosen_tokens is None else torch.as_tensor(chosen_tokens),
        rejected_tokens=ones if rejected_tokens is None else torch.as_tensor(rejected_tokens),
    )


def default_smoothing(loss_types) -> float:
    # exo_pair refuses 0; everything else is fine with the default.
    return 0.1 if "exo_pair" in loss_types else 0.0


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(x=finite, beta=betas)
def test_sigmoid_at_zero_margin_is_ln2(x, beta):
    t = torch.tensor([x], dtype=torch.float64)
    assert sigmoid_loss(t, t, beta=beta).item() == pytest.approx(math.log(2), abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(m1=finite, m2=finite, beta=betas)
def test_sigmoid_is_monotone_decreasing_in_the_margin(m1, m2, beta):
    lo, hi = sorted((m1, m2))
    zero = torch.zeros(1, dtype=torch.float64)
    l_lo = sigmoid_loss(torch.tensor([lo], dtype=torch.float64), zero, beta=beta).item()
    l_hi = sigmoid_loss(torch.tensor([hi], dtype=torch.float64), zero, beta=beta).item()
    assert l_hi <= l_lo
    if hi - lo > 1e-3 and abs(beta * hi) < 20:  # strictly, away from saturation
        assert l_hi < l_lo


@settings(max_examples=50, deadline=None)
@given(m=finite, beta=st.floats(0.01, 1.0), k=st.floats(0.1, 10.0))
def test_sigmoid_beta_scaling(m, beta, k):
    zero = torch.zeros(1, dtype=torch.float64)
    a = sigmoid_loss(torch.tensor([m], dtype=torch.float64), zero, beta=beta * k)
    b = sigmoid_loss(torch.tensor([k * m], dtype=torch.float64), zero, beta=beta)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    vals=st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=6),
    beta=betas,
)
def test_swapping_chosen_and_rejected(vals, beta):
    c, r, rc, rr = (list(v) for v in zip(*vals))
    fwd = preference_loss(logps_of(c, r, rc, rr), beta=beta)
    rev = preference_loss(logps_of(r, c, rr, rc), beta=beta)
    margin = (fwd.chosen_rewards - fwd.rejected_rewards) / beta
    zero = torch.zeros_like(margin)
    torch.testing.assert_close(fwd.per_pair["sigmoid"], sigmoid_loss(margin, zero, beta=beta))
    torch.testing.assert_close(rev.per_pair["sigmoid"], sigmoid_loss(-margin, zero, beta=beta))
    torch.testing.assert_close(rev.chosen_rewards, fwd.rejected_rewards)
    torch.testing.assert_close(rev.rejected_rewards, fwd.chosen_rewards)
    torch.testing.assert_close(rev.chosen_rewards - rev.rejected_rewards, -(fwd.chosen_rewards - fwd.rejected_rewards))
    # sigmoid(m) - sigmoid(-m) = -m * beta: the two directions are tied by the margin.
    torch.testing.assert_close(fwd.per_pair["sigmoid"] - rev.per_pair["sigmoid"], -beta * margin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.floats(-1000.0, 0.0), st.floats(-1000.0, 0.0), st.floats(-1000.0, 0.0), st.floats(-1000.0, 0.0),
            st.integers(0, 300), st.integers(0, 300),
        ),
        min_size=1, max_size=6,
    ),
    beta=st.floats(0.01, 2.0),
    smoothing=st.floats(0.001, 0.49),
)
def test_finite_values_and_gradients_for_every_loss_type(loss_type, dtype, data, beta, smoothing):
    c, r, rc, rr, nc, nr = (list(v) for v in zip(*data))
    chosen = torch.tensor(c, dtype=dtype, requires_grad=True)
    rejected = torch.tensor(r, dtype=dtype, requires_grad=True)
    logps = PreferenceLogps(chosen, rejected, torch.tensor(rc, dtype=dtype), torch.tensor(rr, dtype=dtype),
                            torch.tensor(nc), torch.tensor(nr))
    smoothing = smoothing if loss_type in SMOOTHED_LOSS_TYPES else 0.0
    out = preference_loss(logps, beta=beta, loss_types=[loss_type], label_smoothing=smoothing)
    assert out.loss.dtype == dtype and out.per_pair[loss_type].shape == chosen.shape
    assert torch.isfinite(out.per_pair[loss_type]).all()
    grads = torch.autograd.grad(out.loss, [chosen, rejected], allow_unused=True)  # sft never reads rejected
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert grads[0] is not None


@settings(max_examples=40, deadline=None)
@given(
    types=st.lists(st.sampled_from(LOSS_TYPES), min_size=1, max_size=5, unique=True),
    weights=st.lists(st.floats(-3.0, 3.0), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 6),
)
def test_weighted_combination_is_weighted_sum_of_single_losses(types, weights, seed, batch):
    g = torch.Generator().manual_seed(seed)
    logps = random_logps(g, batch)
    weights = weights[: len(types)]
    ls = default_smoothing(types)
    combined = preference_loss(logps, loss_types=types, loss_weights=weights, label_smoothing=ls)
    expected = 0.0
    for t, w in zip(types, weights):
        single = preference_loss(logps, loss_types=[t], label_smoothing=ls)
        torch.testing.assert_close(combined.per_pair[t], single.per_pair[t], rtol=0, atol=0)
        expected = expected + w * single.loss
    torch.testing.assert_close(combined.loss, torch.as_tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_rewards_are_beta_times_logratio_and_detached():
    chosen = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    f64 = dict(dtype=torch.float64)
    logps = PreferenceLogps(chosen, torch.tensor([-2.0, -4.0], **f64), torch.tensor([-2.5, -1.5], **f64),
                            torch.tensor([-2.0, -3.0], **f64), torch.tensor([3, 4]), torch.tensor([2, 5]))
    out = preference_loss(logps, beta=0.5)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-0.25, 0.25], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([0.0, -0.5], dtype=torch.float64))
    assert not out.chosen_rewards.requires_grad and out.loss.requires_grad


def test_reference_free_ignores_the_reference():
    g = torch.Generator().manual_seed(3)
    logps = random_logps(g, 4)
    zeroed = PreferenceLogps(logps.chosen, logps.rejected, torch.zeros(4, dtype=torch.float64),
                             torch.zeros(4, dtype=torch.float64), logps.chosen_tokens, logps.rejected_tokens)
    for t in LOSS_TYPES:
        ls = default_smoothing([t])
        a = preference_loss(logps, loss_types=[t], label_smoothing=ls, reference_free=True)
        b = preference_loss(zeroed, loss_types=[t], label_smoothing=ls)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
        torch.testing.assert_close(a.chosen_rewards, b.chosen_rewards, rtol=0, atol=0)


def test_sft_is_per_token_nll_of_the_chosen_completions():
    logps = logps_of([-6.0, -2.0], [-1.0, -1.0], chosen_tokens=[3, 1], rejected_tokens=[9, 9])
    out = preference_loss(logps, loss_types=["sft"])
    torch.testing.assert_close(out.per_pair["sft"], torch.full((2,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "args, match",
    [
        ((["sigmoid", "dpo"], None, 0.0, 0.1), r"unknown loss type 'dpo'.*sigmoid, hinge, ipo"),
        (([], None, 0.0, 0.1), "at least one loss type"),
        ((["sigmoid", "sft"], [1.0], 0.0, 0.1), "1 loss weights for 2 loss types"),
        ((["sigmoid"], [1.0, 2.0], 0.0, 0.1), "2 loss weights for 1 loss types"),
        ((["exo_pair"], None, 0.0, 0.1), "exo_pair loss needs label_smoothing > 0"),
        ((["exo_pair"], None, 1.0, 0.1), r"exo_pair loss needs label_smoothing in \(0, 1\)"),
        ((["robust"], None, 0.5, 0.1), r"robust loss needs label_smoothing in \[0, 0.5\)"),
        ((["robust"], None, -0.1, 0.1), r"robust loss needs label_smoothing in \[0, 0.5\)"),
        ((["sigmoid"], None, 0.0, 0.0), "beta must be > 0"),
        ((["sigmoid"], None, 0.0, -1.0), "beta must be > 0"),
        ((["sigmoid"], None, 0.0, float("nan")), "beta must be > 0"),
    ],
)
def test_validate_loss_config_errors(args, match):
    with pytest.raises(ValueError, match=match):
        validate_loss_config(*args)
    # preference_loss refuses the same configurations
    types, weights, ls, beta = args
    with pytest.raises(ValueError, match=match):
        preference_loss(logps_of([-1.0], [-2.0]), loss_types=types, loss_weights=weights, label_smoothing=ls, beta=beta)


@pytest.mark.parametrize(
    "args",
    [
        (list(LOSS_TYPES), [1.0] * len(LOSS_TYPES), 0.2, 0.1),
        (["robust"], None, 0.0, 0.5),
        (["exo_pair"], None, 1e-3, 0.1),
        (["aot", "sigmoid"], [0.5, 2.0], 0.7, 3.0),  # TRL only bounds label_smoothing for robust / exo_pair
        ("sigmoid", None, 0.0, 0.1),  # a bare string is one loss type
    ],
)
def test_validate_loss_config_accepts_valid(args):
    validate_loss_config(*args)


@settings(max_examples=30, deadline=None)
@given(types=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3))
def test_validate_rejects_any_unknown_name(types):
    assume(any(t not in LOSS_TYPES for t in types))
    with pytest.raises(ValueError, match="unknown loss type"):
        validate_loss_config(types, None, 0.1, 0.1)


# ---------------------------------------------------------------------------------------------
# Equality with TRL 1.15's DPOTrainer._compute_loss
# ---------------------------------------------------------------------------------------------


def random_logps(g: torch.Generator, batch: int) -> PreferenceLogps:
    """Random per-pair values with the spread real batches have (log-ratios of either sign)."""
    nc = torch.randint(1, 40, (batch,), generator=g)
    nr = torch.randint(1, 40, (batch,), generator=g)
    chosen = -torch.rand(batch, generator=g, dtype=torch.float64) * 3 * nc
    rejected = -torch.rand(batch, generator=g, dtype=torch.float64) * 3 * nr
    ref_chosen = chosen + torch.randn(batch, generator=g, dtype=torch.float64) * 8
    ref_rejected = rejected + torch.randn(batch, generator=g, dtype=torch.float64) * 8
    return PreferenceLogps(chosen, rejected, ref_chosen, ref_rejected, nc, nr)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):  # one process: gathering is the identity
        return t

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


def trl_batch(g: torch.Generator, batch: int, dtype: torch.dtype, *, empty_completion: bool):
    """A TRL-shaped batch: rows [chosen..., rejected...], prompt then completion then right padding.

    Returns (inputs, a leaf [2B, T-1], the per-token log-probs made from it, our PreferenceLogps).
    The per-token log-probs are the leaf times the completion mask: zero off the completion, with no
    gradient there, as TRL's fused LM head returns them (it masks with the labels).
    """
    rows = 2 * batch
    prompt = torch.randint(1, 5, (rows,), generator=g)
    completion = torch.randint(1, 9, (rows,), generator=g)
    if empty_completion and batch > 1:
        completion[1] = 0  # an empty chosen completion: token counts clamp to 1
        completion[batch + 1] = 0  # and an empty rejected one
    width = int((prompt + completion).max()) + 2
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for i in range(rows):
        p, c = int(prompt[i]), int(completion[i])
        input_ids[i, : p + c] = torch.randint(3, 100, (p + c,), generator=g)
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    shifted = completion_mask[:, 1:].to(dtype)
    leaf = (-torch.rand(rows, width - 1, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_(True)
    per_token = leaf * shifted
    ref = (per_token.detach().sum(1) + torch.randn(rows, generator=g, dtype=torch.float64).to(dtype) * 6)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:batch],
        "ref_rejected_logps": ref[batch:],
    }
    seq = per_token.sum(dim=1)  # our sequence log-probs: the masked sum (mask already applied)
    tokens = completion_mask.sum(dim=1)
    ours = PreferenceLogps(seq[:batch], seq[batch:], ref[:batch], ref[batch:], tokens[:batch], tokens[batch:])
    return inputs, leaf, per_token, ours


def run_trl(inputs, per_token, *, loss_types, loss_weights, beta, label_smoothing, discopop_tau):
    """Call the real DPOTrainer._compute_loss on a stub trainer; return (loss, logged metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    def model(**kwargs):
        assert kwargs["fused_lm_head"] is True
        zeros = torch.zeros_like(per_token.detach())
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(zeros, dtype=torch.bool))

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        args=SimpleNamespace(discopop_tau=discopop_tau),
        beta=beta,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types),
        label_smoothing=label_smoothing,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics


def compare_with_trl(seed, batch, dtype, *, loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0,
                     discopop_tau=0.05, empty_completion=False, reference_free=False):
    """Absolute differences between TRL and us (loss, gradient, each logged metric), and TRL's magnitudes."""
    g = torch.Generator().manual_seed(seed)
    inputs, leaf, per_token, ours_logps = trl_batch(g, batch, dtype, empty_completion=empty_completion)
    if reference_free:  # TRL has no such flag: its reference-free equivalent is reference log-probs of 0
        ours_ref = (ours_logps.ref_chosen, ours_logps.ref_rejected)
        inputs["ref_chosen_logps"] = torch.zeros_like(ours_ref[0])
        inputs["ref_rejected_logps"] = torch.zeros_like(ours_ref[1])
    trl_loss, m = run_trl(inputs, per_token, loss_types=loss_types, loss_weights=loss_weights, beta=beta,
                          label_smoothing=label_smoothing, discopop_tau=discopop_tau)
    (trl_grad,) = torch.autograd.grad(trl_loss, leaf, retain_graph=True)

    out = preference_loss(ours_logps, beta=beta, loss_types=loss_types, loss_weights=loss_weights,
                          label_smoothing=label_smoothing, discopop_tau=discopop_tau, reference_free=reference_free)
    (our_grad,) = torch.autograd.grad(out.loss, leaf)
    cr, rr = out.chosen_rewards, out.rejected_rewards
    ours = {
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/margins": (cr - rr).mean().item(),
        "rewards/accuracies": (cr > rr).float().mean().item(),
        "logps/chosen": ours_logps.chosen.mean().item(),
        "logps/rejected": ours_logps.rejected.mean().item(),
    }
    assert out.loss.dtype == trl_loss.dtype == dtype
    assert math.isfinite(trl_loss.item())
    diffs = {"loss": abs(out.loss.item() - trl_loss.item()), "grad": (our_grad - trl_grad).abs().max().item()}
    diffs.update({k: abs(v - m[k]) for k, v in ours.items()})
    scales = {"loss": abs(trl_loss.item()), "grad": trl_grad.abs().max().item()}
    scales.update({k: abs(m[k]) for k in ours})
    return diffs, scales


MAX_DIFF: dict[str, float] = defaultdict(float)  # case -> max abs difference seen (printed at the end)


def check(case: str, result, tol: float = TOL) -> float:
    """Assert |ours - TRL| <= tol * max(1, |TRL|) for every quantity; return the largest absolute difference.

    Absolute for values up to 1; relative above, because a float32 loss of ~10 has an ulp near 1e-6.
    """
    diffs, scales = result
    worst = max(diffs.values())
    MAX_DIFF[case] = max(MAX_DIFF[case], worst)
    bad = {k: d for k, d in diffs.items() if not d <= tol * max(1.0, scales[k])}
    assert not bad, f"{case}: differs from TRL by {bad} (TRL magnitudes {scales})"
    return worst


def _cases():
    for t in LOSS_TYPES:
        if t in SMOOTHED_LOSS_TYPES:
            for ls in ([0.0, 0.2, 0.45] if t != "exo_pair" else [1e-3, 0.2, 0.45]):
                yield t, ls
        else:
            yield t, 0.0
    yield "sigmoid", 0.3  # TRL's sigmoid ignores label_smoothing; so must we


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss_type, label_smoothing", list(_cases()))
def test_each_loss_type_equals_trl(loss_type, label_smoothing, dtype, record_property):
    worst = 0.0
    for seed in range(6):
        beta = (0.1, 0.5, 1.0, 0.05, 2.0, 0.1)[seed]
        tau = 0.05 if seed % 2 == 0 else 0.5
        result = compare_with_trl(seed, batch=1 + seed, dtype=dtype, loss_types=[loss_type], beta=beta,
                                  label_smoothing=label_smoothing, discopop_tau=tau, empty_completion=seed == 5,
                                  reference_free=seed == 4)
        worst = max(worst, check(f"{loss_type} ls={label_smoothing} {dtype}", result))
    record_property("max_abs_diff", worst)
    print(f"{loss_type:>12} ls={label_smoothing:<5} {str(dtype):>13}: max |ours - TRL| = {worst:.3e}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "loss_types, loss_weights, label_smoothing",
    [
        (["sigmoid", "sft"], [1.0, 0.25], 0.0),  # RPO-style
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0),  # MPO-style
        (list(LOSS_TYPES), [0.5 + 0.1 * i for i in range(len(LOSS_TYPES))], 0.1),
        (["apo_zero", "hinge"], None, 0.0),
    ],
)
def test_weighted_combination_equals_trl(loss_types, loss_weights, label_smoothing, dtype, record_property):
    worst = 0.0
    for seed in range(4):
        result = compare_with_trl(100 + seed, batch=2 + seed, dtype=dtype, loss_types=loss_types,
                                  loss_weights=loss_weights, beta=0.1 * (seed + 1), label_smoothing=label_smoothing)
        worst = max(worst, check(f"{'+'.join(loss_types)} {dtype}", result))
    record_property("max_abs_diff", worst)
    print(f"{'+'.join(loss_types)} {dtype}: max |ours - TRL| = {worst:.3e}")


# A wrong formula must be caught: each mutant below is a plausible slip, and the same comparison must see it.
_discopop = losses.discopop_loss
MUTANTS = {
    "sigmoid": lambda c, r, *, beta: -torch.nn.functional.logsigmoid(beta * (c - r)) * 0.9
    - torch.nn.functional.logsigmoid(-beta * (c - r)) * 0.1,  # cDPO smoothing that TRL's sigmoid does not do
    "hinge": lambda c, r, *, beta: torch.relu(0.5 - beta * (c - r)),
    "ipo": lambda c, r, nc, nr, *, beta: (c - r - 1 / (2 * beta)) ** 2,  # no length normalisation
    "sft": lambda logps, tokens: (-logps / tokens.clamp(min=1)),  # per-row mean instead of batch mean
    "aot_unpaired": lambda c, r, *, beta, label_smoothing: losses.sigmoid_loss(c, r, beta=beta),  # no sorting
    "discopop": lambda c, r, *, beta, discopop_tau: _discopop(c, r, beta=beta, discopop_tau=1.0),
}
MUTANT_FUNCS = {"sigmoid": "sigmoid_loss", "hinge": "hinge_loss", "ipo": "ipo_loss", "sft": "sft_loss",
                "aot_unpaired": "aot_unpaired_loss", "discopop": "discopop_loss"}


@pytest.mark.parametrize("loss_type", sorted(MUTANTS))
def test_comparison_catches_a_wrong_formula(loss_type, monkeypatch):
    monkeypatch.setattr(losses, MUTANT_FUNCS[loss_type], MUTANTS[loss_type])
    worst = max(
        compare_with_trl(seed, batch=4, dtype=torch.float64, loss_types=[loss_type], beta=1.0)[0]["loss"]
        for seed in range(3)
    )
    assert worst > 1e-3, f"a wrong {loss_type} formula went unnoticed (diff {worst})"


def test_zzz_print_max_differences():
    """Summary of every TRL comparison in this run (pytest -s shows it)."""
    if not MAX_DIFF:
        pytest.skip("no TRL comparison ran in this session")
    for case, d in sorted(MAX_DIFF.items()):
        print(f"{case:<60} {d:.3e}")
