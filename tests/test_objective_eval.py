"""Held-out evaluation under SimPO, CPO and ORPO against TRL 1.15's CPOTrainer/ORPOTrainer `.evaluate()`:
same tiny Llama, same LoRA weights, all 8 pairs of ROWS in batches of 4 (TRL averages its per-batch
metrics over batches; with equal batches that is our mean over pairs; the NLL is a token mean per batch
in both)."""

from __future__ import annotations

import json

import pytest
import torch

from dpo.config import TrainConfig
from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for
from dpo.data.objective_rows import tokenize_sided
from dpo.data.sources import PreferenceRow
from dpo.losses import PreferenceLogps
from dpo.objectives.sided import SidedScores

from .test_objectives_run import CASES, _rel, _trl_objective_trainer
from .test_trl_equivalence import MAX_LENGTH, ROWS, our_model, perturb_lora
from .trl_cpu_kernel import use_cpu_kernel

SIDED = [c for c in CASES if CASES[c][0] in ("cpo", "orpo")]
EVAL_BATCH = 4


def _sided_pairs(tokenizer):
    return [tokenize_sided(tokenizer, PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i), MAX_LENGTH)
            for i, r in enumerate(ROWS)]


@pytest.mark.parametrize("case", SIDED)
def test_sided_held_out_metrics_equal_trl_evaluate(case, tokenizer, tmp_path, record_property):
    from dpo.eval.evaluation import Evaluation

    kind, trl_cfg, ours_cfg = CASES[case]
    with use_cpu_kernel():
        trainer = _trl_objective_trainer(kind, tokenizer, tmp_path,
                                         {**trl_cfg, "per_device_eval_batch_size": EVAL_BATCH})
        perturb_lora(trainer.model, seed=1)
        theirs = trainer.evaluate(trainer.train_dataset)  # ROWS, tokenized by TRL when it was built
    model = our_model(tokenizer, gradient_checkpointing=False)
    perturb_lora(model, seed=1)
    loss = LossSettings.from_config(TrainConfig(**ours_cfg))
    evaluation = Evaluation("rows", tokenizer, _sided_pairs(tokenizer), loss=loss, max_length=MAX_LENGTH,
                            batch_size=EVAL_BATCH)
    before = evaluation.before(model)
    ours = evaluation.metrics(model)
    names = [f"eval_{k}" for k in objective_for(loss).metric_names]
    timing = ("runtime", "per_second", "_time")
    trl_names = {k for k in theirs if k.startswith("eval_") and "logits" not in k and not any(t in k for t in timing)}
    assert set(names) == trl_names
    diffs = {k: _rel(ours[k], theirs[k]) for k in names}
    record_property("max_rel_diff", json.dumps(diffs))
    print(f"\n[{case}] eval relative differences vs TRL evaluate(): {diffs}")
    assert ours["eval_num_pairs"] == len(ROWS)
    assert abs(ours["eval_rewards/margins"] - before["eval_rewards/margins"]) > 1e-3  # before: adapter off
    for k, d in diffs.items():
        assert d <= 1e-4, f"{case} {k}: relative diff {d:.3e} > 1e-4"


def _batch(seed: int, n: int) -> SidedScores:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 9, (2, n), generator=g).float()
    sums = -torch.rand(2, n, generator=g) * tokens * 3
    return SidedScores(sums[0], sums[1], tokens[0], tokens[1], sums[0] * 1.5, tokens[0] + 2)


@pytest.mark.parametrize("objective", ["simpo", "cpo", "orpo"])
def test_sided_eval_loss_is_the_batch_size_weighted_mean_of_batch_losses(objective):
    """HF Trainer's eval_loss weighs each batch's loss by its size: uneven batches (5 and 2 pairs) too;
    the per-pair metrics are means over pairs, the NLL each batch's token mean weighted by its pairs."""
    loss = LossSettings(loss_type=(objective,), beta=0.5, cpo_alpha=0.4 if objective == "simpo" else None)
    batches = [_batch(1, 5), _batch(2, 2)]
    row = objective_for(loss).eval_row(batches)
    losses, nlls = [], []
    for b in batches:  # each batch as training scores a micro-batch
        c, r = (b.chosen / b.chosen_tokens, b.rejected / b.rejected_tokens) if objective != "cpo" \
            else (b.chosen, b.rejected)
        nll = -b.nll_logps.sum() / b.nll_tokens.sum()
        zeros = torch.zeros_like(c)
        out = objective_for(loss).output(PreferenceLogps(c, r, zeros, zeros, b.chosen_tokens, b.rejected_tokens), nll=nll)
        losses.append(len(b) * float(out.loss))
        nlls.append(len(b) * float(nll))
    assert row["eval_loss"] == pytest.approx(sum(losses) / 7, rel=1e-6)
    assert row["eval_nll_loss"] == pytest.approx(sum(nlls) / 7, rel=1e-6)
    chosen = torch.cat([b.chosen for b in batches])
    want = chosen / torch.cat([b.chosen_tokens for b in batches]) if objective != "cpo" else chosen
    assert row["eval_logps/chosen"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert row["eval_num_pairs"] == 7


def test_an_orpo_run_logs_held_out_rows_with_trls_names(tiny_llama_dir, tmp_path):
    """`python -m dpo.train --loss-type orpo --eval-dataset ...`: the start (step 0), every --eval-steps and
    the end get eval rows with ORPO's names; eval.json and the printed report hold them."""
    from .conftest import write_jsonl
    from .test_trl_equivalence import run_ours

    data = write_jsonl(tmp_path / "eval.jsonl", ROWS[:5])
    run_ours(tiny_llama_dir, tmp_path, loss_type=["orpo"], beta=0.2, per_device_batch_size=2, max_steps=3,
             learning_rate=5e-3, eval_dataset=str(data), eval_steps=2)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    names = {f"eval_{k}" for k in objective_for(LossSettings(loss_type=("orpo",), beta=0.2)).metric_names}
    for r in evals:
        assert names <= set(r) and r["eval_num_pairs"] == 5
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]
    saved = json.loads((tmp_path / "ours" / "eval.json").read_text())
    assert saved["before"]["eval_log_odds_chosen"] == evals[0]["eval_log_odds_chosen"]
    assert saved["data"]["objective"] == "orpo" and saved["data"]["kept"] == 5


@pytest.mark.parametrize("eval_batch", [3, 4])
def test_kto_held_out_metrics_equal_trl_evaluate(eval_batch, tokenizer, tmp_path, record_property):
    """KTO: the 16 unpaired rows of ROWS in batches of 3 (the last holds 1 row, some no desirable row) or 4,
    each batch's KL from its own mismatched rows; every eval_ metric KTOTrainer.evaluate() logs."""
    from dpo.eval.evaluation import Evaluation
    from dpo.data.objective_rows import kto_keeps, tokenize_unpaired, unpair_rows

    _, trl_cfg, ours_cfg = CASES["kto"]
    with use_cpu_kernel():
        trainer = _trl_objective_trainer("kto", tokenizer, tmp_path, {
            **trl_cfg, "per_device_train_batch_size": eval_batch, "per_device_eval_batch_size": eval_batch})
        perturb_lora(trainer.model, seed=1)
        theirs = trainer.evaluate(trainer.train_dataset)  # its KL completions rotate within eval_batch rows
    model = our_model(tokenizer, gradient_checkpointing=False)
    perturb_lora(model, seed=1)
    loss = LossSettings.from_config(TrainConfig(**ours_cfg))
    pairs = [PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(ROWS)]
    rows = [t for t in (tokenize_unpaired(tokenizer, u) for u in unpair_rows(pairs)) if kto_keeps(t, MAX_LENGTH)]
    evaluation = Evaluation("rows", tokenizer, rows, loss=loss, max_length=MAX_LENGTH, batch_size=eval_batch)
    before = evaluation.before(model)
    ours = evaluation.metrics(model)
    names = [f"eval_{k}" for k in objective_for(loss).metric_names]
    timing = ("runtime", "per_second", "_time")
    trl_names = {k for k in theirs if k.startswith("eval_") and not any(t in k for t in timing)
                 and not any(t in k for t in ("logits", "entropy", "num_tokens"))}
    names = [k for k in names if k in ours]  # rewards/margins: only where some batch mixes both labels
    assert set(names) == trl_names and ("eval_rewards/margins" in names) == (eval_batch == 3)
    diffs = {k: _rel(ours[k], theirs[k]) for k in names}
    record_property("max_rel_diff", json.dumps(diffs))
    print(f"\n[kto, batches of {eval_batch}] eval relative differences vs TRL evaluate(): {diffs}")
    assert ours["eval_num_rows"] == len(rows) and ours["eval_kl"] > 0 and before["eval_kl"] == 0
    for k, d in diffs.items():
        assert d <= 1e-4, f"kto {k}: relative diff {d:.3e} > 1e-4"


def test_a_kto_run_evaluates_an_unpaired_file(tiny_llama_dir, tmp_path):
    """--loss-type kto --eval-dataset FILE of (prompt, completion, label) rows: step 0 and the end get KTO's
    eval rows; a bad label in the eval file is one line naming file, row and problem."""
    from dpo.data.sources import DataError

    from .conftest import write_jsonl
    from .test_trl_equivalence import run_ours

    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in ROWS[:3] for side in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    run_ours(tiny_llama_dir, tmp_path, loss_type=["kto"], per_device_batch_size=2, max_steps=2,
             learning_rate=5e-3, eval_dataset=str(data), eval_steps=0)
    lines = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval_num_rows"] == 6 and evals[0]["eval_num_desirable"] == 3 and evals[0]["eval_kl"] == 0
    assert {"eval_kl", "eval_rewards/margins", "eval_logps/rejected"} <= set(evals[-1])
    saved = json.loads((tmp_path / "ours" / "eval.json").read_text())
    assert saved["data"]["desirable"] == 3 and saved["data"]["undesirable"] == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"prompt": "x", "completion": "y", "label": "yes"}])
    (tmp_path / "again").mkdir()
    with pytest.raises(DataError) as e:
        run_ours(tiny_llama_dir, tmp_path / "again", loss_type=["kto"], per_device_batch_size=2, max_steps=1,
                 eval_dataset=str(bad))
    assert "bad.jsonl" in str(e.value) and "label" in str(e.value) and "\n" not in str(e.value)
