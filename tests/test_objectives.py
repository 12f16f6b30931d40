"""Properties of the objectives beyond DPO (dpo/losses.py, dpo/logps.py, dpo/data/objective_rows.py),
their settings, metric names and data shaping. Their equality with TRL's trainers: test_objectives_trl.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo.data.sources import DataError, PreferenceRow
from dpo.losses import PreferenceLogps, preference_loss, sigmoid_loss
from dpo.losses import (
    UnpairedLogps, chosen_nll, cpo_loss, kto_kl_estimate, kto_loss, log1mexp, orpo_log_odds, orpo_loss, simpo_loss)
from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for
from dpo.data.objective_rows import kl_completions, split_sided, unpair_rows, unpaired_row
from dpo.logps import (
    ld_logps_from_token_logps, ld_masks, mean_logps, wpo_sequence_weights, wpo_token_terms_from_logits, wpo_weights_from_hidden)

finite = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False)
mean_lp = st.floats(-20.0, -1e-3, allow_nan=False)  # a mean token log-prob: negative
betas = st.floats(0.01, 5.0, allow_nan=False)
eps = st.floats(0.0, 0.49, allow_nan=False)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# --- losses ------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(c=finite, r=finite, beta=betas)
def test_simpo_without_margin_is_dpo_with_a_uniform_reference(c, r, beta):
    assert simpo_loss(t(c), t(r), beta=beta, gamma=0.0).item() == pytest.approx(
        sigmoid_loss(t(c), t(r), beta=beta).item(), rel=1e-12, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(r=finite, beta=betas, gamma=st.floats(-3, 3))
def test_simpo_is_ln2_when_the_margin_equals_gamma_over_beta(r, beta, gamma):
    assert simpo_loss(t(r + gamma / beta), t(r), beta=beta, gamma=gamma).item() == pytest.approx(math.log(2), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(a=finite, b=finite, r=finite, beta=betas, gamma=st.floats(-3, 3))
def test_simpo_and_cpo_decrease_as_chosen_rises(a, b, r, beta, gamma):
    # Without label smoothing only: with it, the loss has its minimum at a finite margin (cDPO).
    lo, hi, e = *sorted((a, b)), 0.0
    assert simpo_loss(t(hi), t(r), beta=beta, gamma=gamma, label_smoothing=e) <= simpo_loss(
        t(lo), t(r), beta=beta, gamma=gamma, label_smoothing=e) + 1e-12
    assert cpo_loss(t(hi), t(r), beta=beta, label_smoothing=e) <= cpo_loss(t(lo), t(r), beta=beta, label_smoothing=e) + 1e-12


@settings(max_examples=50, deadline=None)
@given(c=finite, r=finite, beta=betas, e=eps)
def test_cpo_smoothing_mixes_the_two_label_directions(c, r, beta, e):
    mixed = cpo_loss(t(c), t(r), beta=beta, label_smoothing=e).item()
    expect = (1 - e) * cpo_loss(t(c), t(r), beta=beta).item() + e * cpo_loss(t(r), t(c), beta=beta).item()
    assert mixed == pytest.approx(expect, rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(x=st.floats(-30.0, -1e-6, allow_nan=False))
def test_log1mexp_is_log_of_one_minus_exp(x):
    assert log1mexp(t(x)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(c=mean_lp, r=mean_lp)
def test_orpo_log_odds_is_the_log_ratio_of_odds(c, r):
    def log_odds(lp):
        return lp - math.log(-math.expm1(lp))
    got = orpo_log_odds(t(c).float(), t(r).float()).item()
    assert got == pytest.approx(log_odds(c) - log_odds(r), rel=1e-4, abs=1e-4)
    assert orpo_log_odds(t(c), t(r)).item() == pytest.approx(-orpo_log_odds(t(r), t(c)).item(), abs=1e-5)


@settings(max_examples=50, deadline=None)
@given(a=mean_lp, b=mean_lp, r=mean_lp, beta=betas)
def test_orpo_term_decreases_as_chosen_rises_and_is_beta_ln2_at_a_tie(a, b, r, beta):
    lo, hi = sorted((a, b))
    assert orpo_loss(t(hi), t(r), beta=beta) <= orpo_loss(t(lo), t(r), beta=beta) + 1e-6
    assert orpo_loss(t(r), t(r), beta=beta).item() == pytest.approx(beta * math.log(2), rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(rho=finite, kl=st.floats(0, 20), beta=betas, wd=st.floats(0.1, 3), wu=st.floats(0.1, 3))
def test_kto_rows_are_mirror_images_and_bounded_by_their_weights(rho, kl, beta, wd, wu):
    good = kto_loss(t(rho), torch.tensor([True]), t(kl), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    bad = kto_loss(t(2 * kl - rho), torch.tensor([False]), t(kl), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert good.item() / wd == pytest.approx(bad.item() / wu, rel=1e-9, abs=1e-12)
    assert 0 <= good.item() <= wd and 0 <= bad.item() <= wu


@settings(max_examples=50, deadline=None)
@given(a=finite, b=finite, kl=st.floats(0, 20), beta=betas)
def test_kto_desirable_loss_falls_and_undesirable_loss_rises_with_the_log_ratio(a, b, kl, beta):
    lo, hi = sorted((a, b))
    for label, sign in ((True, 1), (False, -1)):
        mask = torch.tensor([label])
        l_lo, l_hi = (kto_loss(t(x), mask, t(kl), beta=beta).item() for x in (lo, hi))
        assert sign * (l_hi - l_lo) <= 1e-12


@settings(max_examples=50, deadline=None)
@given(xs=st.lists(finite, min_size=1, max_size=8), ys=st.lists(finite, min_size=1, max_size=8))
def test_kto_kl_estimate_is_the_clamped_mean_and_carries_no_gradient(xs, ys):
    n = min(len(xs), len(ys))
    kl_logps = t(*xs[:n]).requires_grad_()
    got = kto_kl_estimate(kl_logps, t(*ys[:n]))
    assert not got.requires_grad
    assert got.item() == pytest.approx(max(0.0, sum(a - b for a, b in zip(xs[:n], ys[:n])) / n), abs=1e-9)


def test_chosen_nll_is_the_token_mean_negative_log_likelihood():
    assert chosen_nll(t(-6.0, -2.0), t(3.0, 1.0)).item() == pytest.approx(2.0)


@settings(max_examples=30, deadline=None)
@given(c=st.lists(finite, min_size=2, max_size=6), k=st.floats(0.01, 10))
def test_wpo_weights_scale_the_loss_and_ones_change_nothing(c, k):
    n = len(c)
    logps = PreferenceLogps(t(*c), t(*c[::-1]), torch.zeros(n, dtype=torch.float64),
                            torch.zeros(n, dtype=torch.float64), torch.ones(n), torch.ones(n))
    plain = preference_loss(logps).loss
    assert preference_loss(logps, pair_weights=torch.ones(n, dtype=torch.float64)).loss.item() == plain.item()
    scaled = preference_loss(logps, pair_weights=torch.full((n,), k, dtype=torch.float64)).loss
    assert scaled.item() == pytest.approx(k * plain.item(), rel=1e-12)


# --- per-sequence quantities -------------------------------------------------------------------


def _random_completion_mask(draw_lengths, prompt=2, width=12):
    rows = []
    for n in draw_lengths:
        rows.append([0] * prompt + [1] * n + [0] * (width - prompt - n))
    return torch.tensor(rows)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 10), min_size=2, max_size=8).filter(lambda x: len(x) % 2 == 0),
       alpha=st.floats(0, 1))
def test_ld_masks_split_each_completion_at_the_shorter_length(lengths, alpha):
    cm = _random_completion_mask(lengths)
    shared, tail = ld_masks(cm)
    assert torch.equal(shared + tail, cm)  # a partition of the completion tokens
    b = len(lengths) // 2
    shorter = [min(lengths[i], lengths[i + b]) for i in range(b)] * 2
    assert shared.sum(1).tolist() == shorter
    token = torch.randn(cm.shape[0], cm.shape[1] - 1, dtype=torch.float64)
    plain = (token * cm[:, 1:]).sum(1)
    assert torch.allclose(ld_logps_from_token_logps(token, cm, 1.0), plain)
    assert torch.allclose(ld_logps_from_token_logps(token, cm, 0.0), (token * shared[:, 1:]).sum(1))


def test_mean_logps_divides_by_the_token_count_and_counts_an_empty_completion_as_one():
    assert mean_logps(t(-6.0, -3.0), t(3.0, 0.0)).tolist() == [-2.0, -3.0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(0, 6), min_size=2, max_size=4))
def test_wpo_weights_lean_path_equals_the_logits_path(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(5, 11, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 5, generator=g, dtype=torch.float64))
    cm = _random_completion_mask(lengths, width=9)
    hidden = torch.randn(cm.shape[0], cm.shape[1], 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, cm.shape, generator=g)
    logits = head(hidden)
    full = wpo_sequence_weights(*wpo_token_terms_from_logits(logits, ids), cm)
    lean = wpo_weights_from_hidden(hidden, head, ids, cm, chunk_size=3)
    assert torch.allclose(full.double(), lean.double(), rtol=1e-5)
    assert (full[torch.tensor(lengths) == 0] == 1).all()  # no tokens: weight exp(0)


# --- settings and metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(loss_type=("simpo", "sigmoid")), "stands alone"),
    (dict(loss_type="orpo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="cpo", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="kto", kto_undesirable_weight=-1.0), "kto_undesirable_weight"),
    (dict(loss_type="sigmoid", cpo_alpha=0.5), "cpo_alpha"),
    (dict(loss_type="cpo", cpo_alpha=-0.1), "cpo_alpha"),
    (dict(loss_type="simpo", simpo_gamma=float("nan")), "simpo_gamma"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_type="kto", use_weighting=True), "DPO options"),
    (dict(loss_type="orpo", loss_weights=(1.0,)), "loss weights"),
    (dict(loss_type="simpo", reference_free=True), "reference_free"),
    (dict(loss_type="kto", beta=0.0), "beta"),
])
def test_bad_objective_settings_are_refused_in_one_line(kwargs, words):
    with pytest.raises(ValueError) as e:
        LossSettings(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("loss_type, objective, reference, unpaired, normalised, nll", [
    (("sigmoid", "ipo"), "dpo", True, False, False, 0.0),
    ("simpo", "simpo", False, False, True, 0.0),
    ("cpo", "cpo", False, False, False, 1.0),
    ("orpo", "orpo", False, False, True, 1.0),
    ("kto", "kto", True, True, False, 0.0),
])
def test_settings_properties(loss_type, objective, reference, unpaired, normalised, nll):
    s = LossSettings(loss_type=loss_type)
    assert (s.objective, s.needs_reference, s.unpaired, s.length_normalised, s.nll_weight) == (
        objective, reference, unpaired, normalised, nll)
    assert s.nll_includes_prompt == (objective == "orpo")
    assert objective_for(s).metric_names[0] == "loss"
    assert LossSettings(loss_type="simpo", cpo_alpha=0.3).nll_weight == 0.3
    assert not LossSettings(reference_free=True).needs_reference


def test_from_config_reads_the_new_fields_when_present():
    class Cfg:
        beta, loss_type, loss_weights, label_smoothing, reference_free = 0.2, ["kto"], None, 0.0, False
        kto_desirable_weight = 1.5
    s = LossSettings.from_config(Cfg())
    assert s.objective == "kto" and s.kto_desirable_weight == 1.5 and s.kto_undesirable_weight == 1.0


def test_metric_names_are_trls_per_objective():
    assert objective_for(LossSettings(loss_type="orpo")).metric_names[-3:] == ("nll_loss", "log_odds_ratio", "log_odds_chosen")
    assert "kl" in objective_for(LossSettings(loss_type="kto")).metric_names
    assert "rewards/accuracies" not in objective_for(LossSettings(loss_type="kto")).metric_names  # TRL's KTO does not log it


def test_reference_free_objectives_need_their_nll_and_report_it():
    logps = PreferenceLogps(t(-1.0, -2.0), t(-2.0, -1.5), t(0, 0), t(0, 0), t(3, 4), t(2, 2))
    with pytest.raises(ValueError, match="NLL"):
        objective_for(LossSettings(loss_type="cpo")).output(logps)
    cpo = objective_for(LossSettings(loss_type="cpo", cpo_alpha=0.5))
    out = cpo.output(logps, nll=torch.tensor(2.0, dtype=torch.float64))
    assert out.loss.item() == pytest.approx(cpo_loss(logps.chosen, logps.rejected, beta=0.1).mean().item() + 1.0)
    row = cpo.batch_row(out, logps)
    assert row["nll_loss"] == 2.0 and set(row) == set(objective_for(LossSettings(loss_type="cpo")).metric_names)


def test_kto_row_leaves_out_a_side_the_batch_lacks():
    s = LossSettings(loss_type="kto")
    kto = objective_for(s)
    only_good = UnpairedLogps(t(-3.0, -4.0), t(-3.5, -4.0), torch.tensor([True, True]), torch.tensor(0.1))
    row = kto.batch_row(kto.output(only_good), only_good)
    assert "rewards/chosen" in row and "rewards/rejected" not in row and "rewards/margins" not in row
    both = UnpairedLogps(t(-3.0, -4.0), t(-3.5, -4.0), torch.tensor([True, False]), torch.tensor(0.1))
    row = kto.batch_row(kto.output(both), both)
    assert row["rewards/margins"] == pytest.approx(0.1 * 0.5 - 0.0)


# --- data shaping ------------------------------------------------------------------------------


def test_unpairing_puts_every_chosen_then_every_rejected_per_block():
    pairs = [PreferenceRow(f"p{i}", f"c{i}", f"r{i}", i) for i in range(5)]
    rows = unpair_rows(pairs, block=3)
    assert [(r.completion, r.label) for r in rows] == [
        ("c0", True), ("c1", True), ("c2", True), ("r0", False), ("r1", False), ("r2", False),
        ("c3", True), ("c4", True), ("r3", False), ("r4", False)]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 20), batch=st.integers(2, 6))
def test_kl_completions_rotate_inside_each_batch(n, batch):
    comps = [[i] for i in range(n)]
    kl = kl_completions(comps, batch)
    for start in range(0, n, batch):
        block, got = comps[start:start + batch], kl[start:start + batch]
        assert sorted(got) == sorted(block)  # the same completions, re-paired within the batch
        if len(block) > 1:
            assert all(g != b for g, b in zip(got, block))  # no row keeps its own completion


@pytest.mark.parametrize("value, words", [
    ({"prompt": "a", "completion": "b"}, "no 'label' column"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "label must be true or false"),
    ({"prompt": "a", "completion": "b", "label": 1}, "label must be true or false"),
    (["a", "b"], "expected an object"),
])
def test_bad_kto_rows_are_named_in_one_line(value, words):
    with pytest.raises(DataError) as e:
        unpaired_row(value, 3, "data.jsonl line 4")
    assert str(e.value).startswith("data.jsonl line 4: ") and words in str(e.value)


def test_unpaired_row_reads_a_good_row():
    row = unpaired_row({"prompt": "a", "completion": "b", "label": False}, 3, "f line 4")
    assert (row.prompt, row.completion, row.label, row.row_id) == ("a", "b", False, 3)


def test_cpo_tokenization_adds_bos_and_eos_and_cuts_only_the_completion():
    pair = split_sided([5, 6], [5, 6, 7, 8], [5, 6, 9], bos_token_id=1, eos_token_id=2, max_length=6)
    assert (pair.chosen_prompt_ids, pair.chosen_ids) == ([1, 5, 6], [7, 8, 2])
    assert (pair.rejected_prompt_ids, pair.rejected_ids) == ([1, 5, 6], [9, 2])
    cut = split_sided([5, 6], [5, 6, 7, 8], [5, 6, 9], bos_token_id=1, eos_token_id=2, max_length=4)
    assert (cut.chosen_prompt_ids, cut.chosen_ids) == ([1, 5, 6], [7])
    merged = split_sided([5, 6], [5, 66, 7], [5, 6, 9, 2], bos_token_id=None, eos_token_id=2, max_length=10)
    assert (merged.chosen_prompt_ids, merged.chosen_ids) == ([5], [66, 7, 2])  # the last prompt token merged
    assert (merged.rejected_prompt_ids, merged.rejected_ids) == ([5, 6], [9, 2])  # EOS already there
    with pytest.raises(DataError, match="beyond their last token"):
        split_sided([5, 6, 7, 8], [5, 60, 70, 8, 9], [5, 6, 7, 8, 9], bos_token_id=None, eos_token_id=2, max_length=10)


def test_kto_kl_estimate_averages_over_ranks_before_the_clamp():
    # Two ranks with means +3 and -1: TRL's estimate is max(0, (3 - 1) / 2) = 1, not (3 + 0) / 2.
    other_rank_mean = torch.tensor(-1.0, dtype=torch.float64)
    got = kto_kl_estimate(t(3.0), t(0.0), average_over_ranks=lambda m: (m + other_rank_mean) / 2)
    assert got.item() == 1.0
