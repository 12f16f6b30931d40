"""The config declares its own policy: every field says whether a resume may change it, and every list of
field names is derived from that metadata (resume-locked keys, planned fields, the card's settings,
evaluate's one-objective flags, config.json's keys)."""

from __future__ import annotations

import dataclasses

import pytest

from dpo import config
from dpo.build import PLANNED_FIELDS
from dpo.config import RESUME_POLICIES, TrainConfig, field_names
from dpo.evaluate import ONLY_FOR
from dpo.run.card import _SETTINGS as CARD_SETTINGS
from dpo.run.folder import RESUME_LOCKED_KEYS


def test_every_field_declares_a_resume_policy():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("resume") in RESUME_POLICIES, f.name


def test_a_field_without_a_resume_policy_cannot_be_declared():
    with pytest.raises(TypeError, match="resume"):
        config._opt(1, "a new flag")
    with pytest.raises(ValueError, match="resume policy"):
        config._opt(1, "a new flag", resume="sometimes")


def test_the_lists_of_field_names_come_from_the_fields():
    assert RESUME_LOCKED_KEYS == field_names(resume="locked")
    assert set(RESUME_LOCKED_KEYS) >= {"model", "dataset", "loss_type", "beta", "learning_rate", "seed"}
    assert not set(RESUME_LOCKED_KEYS) & {"device", "dtype", "backend", "output_dir", "prefix_sharing", "packing",
                                          "max_steps"}  # a run may be extended
    assert PLANNED_FIELDS == field_names(planned=True) and "prefix_sharing" in PLANNED_FIELDS
    assert dict(CARD_SETTINGS)["beta"] == "beta" and [k for k, _ in CARD_SETTINGS] == [
        f.name for f in dataclasses.fields(TrainConfig) if f.metadata["card"]]
    assert ONLY_FOR == {"simpo_gamma": "simpo", "kto_desirable_weight": "kto", "kto_undesirable_weight": "kto",
                        "discopop_tau": "discopop"}
    run_keys = set(TrainConfig(dataset="d.jsonl").run_dict())
    assert run_keys == {f.name for f in dataclasses.fields(TrainConfig)} - set(field_names(start=True))
    assert set(field_names(start=True)) == {"resume", "resume_from", "overwrite", "plan"}


def test_the_memory_budget_is_parsed_once_into_a_typed_value():
    assert TrainConfig(memory_budget="6.5").budget == config.MemoryBudget("gib", 6.5)
    assert not TrainConfig(memory_budget="none").budget.plans and TrainConfig().budget.kind == "auto"
    with pytest.raises(ValueError, match="a number of GiB > 0"):
        config.MemoryBudget.parse("-1")


def test_the_loss_settings_are_built_once_for_the_values_the_fields_hold():
    cfg = TrainConfig(dataset="d.jsonl", beta=0.2)
    assert cfg.loss_settings() is cfg.loss_settings()
    cfg.beta = 0.3
    assert cfg.loss_settings().beta == 0.3
