"""The first step's check (dpo.first_step): an untrained policy's loss is the loss type's value at zero
log-ratios, and a run whose step 1 is not stops with one line (exit 3)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo import first_step, models, train
from dpo.first_step import expected_first_loss, first_step_problem, relative_tolerance, zero_margin_loss
from dpo.loss_settings import LossSettings
from dpo.losses import LOSS_TYPES, PreferenceLogps, preference_loss
from dpo.trainer import Trainer

from .conftest import build_tiny_llama, write_jsonl

KNOWN = [t for t in LOSS_TYPES if t != "sft"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KNOWN), st.floats(0.01, 2.0), st.floats(0.001, 0.49), st.integers(1, 6), st.integers(0, 2**16))
def test_each_tabulated_value_is_what_the_loss_gives_when_policy_equals_reference(loss_type, beta, eps, b, seed):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = -torch.rand(b, generator=g) * 50, -torch.rand(b, generator=g) * 50
    tokens = torch.randint(1, 40, (b,), generator=g)
    logps = PreferenceLogps(chosen, rejected, chosen.clone(), rejected.clone(), tokens, tokens.flip(0))
    smoothing = eps if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    out = preference_loss(logps, beta=beta, loss_types=loss_type, label_smoothing=smoothing)
    assert float(out.loss) == pytest.approx(zero_margin_loss(loss_type, beta, smoothing), rel=1e-5)


def test_expected_first_loss_where_it_is_known_and_why_not_elsewhere():
    assert expected_first_loss(LossSettings()) == (math.log(2), "ln 2")
    mix, _ = expected_first_loss(LossSettings(beta=0.5, loss_type=("sigmoid", "ipo"), loss_weights=(1.0, 0.5)))
    assert mix == pytest.approx(math.log(2) + 0.5 * 1 / (4 * 0.25))
    assert expected_first_loss(LossSettings(loss_type=("kto",), kto_desirable_weight=1.5,
                                            kto_undesirable_weight=1.5))[0] == 0.75
    for settings_, why in [(LossSettings(loss_type=("sigmoid", "sft")), "sft"),
                           (LossSettings(reference_free=True), "no reference"),
                           (LossSettings(loss_type=("simpo",)), "no reference"),
                           (LossSettings(use_weighting=True), "WPO"),
                           (LossSettings(loss_type=("kto",), kto_desirable_weight=2.0), "unequal")]:
        value, reason = expected_first_loss(settings_)
        assert value is None and why in reason
    assert expected_first_loss(LossSettings(), dropout_off=False)[0] is None


def test_the_tolerance_follows_the_dtype_and_the_message_is_one_line():
    assert relative_tolerance(torch.float32) == 1e-3
    assert relative_tolerance(torch.bfloat16) == 0.0625
    assert first_step_problem(0.6935, math.log(2), "ln 2", 1e-3) is None
    line = first_step_problem(4.158, math.log(2), "ln 2", 1e-3)
    assert line.startswith("step 1 loss 4.158 != ln 2 = 0.6931 for an untrained policy") and "\n" not in line
    assert first_step_problem(float("nan"), math.log(2), "ln 2", 1e-3) is not None


def test_policy_is_reference_for_a_fresh_lora_and_a_starting_adapter_not_after_weights_change(tmp_path):
    lora = models.LoraSettings(r=4, targets=("q_proj", "v_proj"))
    fresh = models.add_lora(build_tiny_llama(64), lora)
    assert first_step.policy_is_reference(fresh)
    with torch.no_grad():
        next(p for n, p in fresh.named_parameters() if "lora_B" in n).add_(0.1)
    assert not first_step.policy_is_reference(fresh)
    fresh.save_pretrained(tmp_path / "adapter")
    started = models.load_starting_adapter(build_tiny_llama(64), str(tmp_path / "adapter"))
    assert first_step.policy_is_reference(started)
    assert not first_step.policy_is_reference(build_tiny_llama(64))


ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
         "rejected": f" Perhaps {3 * i + 1}."} for i in range(8)]


def flags(model_dir, data, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--per-device-batch-size", "2", "--grad-accum", "2", "--learning-rate", "5e-3", "--lora-r", "4",
            "--max-length", "64", "--device", "cpu", "--dtype", "float32", *map(str, extra)]


@pytest.mark.parametrize("extra", [[], ["--precompute-ref"]], ids=["live", "precomputed"])
def test_a_run_passes_the_check_and_stops_at_step_1_on_a_wrong_reference(tiny_llama_dir, tmp_path, extra,
                                                                         monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert train.main(flags(tiny_llama_dir, data, tmp_path / "right", *extra)) == 0
    right = Trainer.reference_scores

    def wrong(self, batch):  # a reference that is not the policy: 10 nats more on each chosen row
        ref = right(self, batch)
        return dataclasses.replace(ref, logps=torch.cat([ref.logps[: len(ref)] + 10.0, ref.logps[len(ref):]]))

    monkeypatch.setattr(Trainer, "reference_scores", wrong)
    capsys.readouterr()
    assert train.main(flags(tiny_llama_dir, data, tmp_path / "wrong", *extra)) == 3
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpo:")]
    assert len(said) == 1 and said[0].startswith("dpo: error: step 1 loss ")
    assert "!= ln 2 = 0.6931 for an untrained policy" in said[0]


def test_a_run_from_a_starting_adapter_passes_the_check(tiny_llama_dir, tmp_path):
    """--adapter: the trained adapter is both the policy's start and the reference, so step 1 is ln 2 again."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert train.main(flags(tiny_llama_dir, data, tmp_path / "first")) == 0
    assert train.main(flags(tiny_llama_dir, data, tmp_path / "second", "--adapter",
                            tmp_path / "first" / "adapter")) == 0
