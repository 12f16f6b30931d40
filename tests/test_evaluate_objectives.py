"""`python -m dpo.evaluate --loss-type simpo|cpo|orpo|kto` against training's own held-out evaluation: a short
run (`dpo.train.run`, as `python -m dpo.train --eval-dataset`) writes its end-of-run eval row and its adapter;
the CLI (its main, in-process) on that adapter and the same file gives every eval_ number of that row. The
training eval is proven equal to TRL's `.evaluate()` (tests/test_objective_eval.py), so the CLI is too.
The eval set does not divide into training's eval batches (tasks.DEFAULT_EVAL["batch_size"]), so the
last, smaller batch (its own NLL token mean, KTO's own KL estimate) is compared too.
"""

from __future__ import annotations

import json

import pytest

from dpo import evaluate, models
from dpo.data import tasks
from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for

from .conftest import write_jsonl
from .test_trl_equivalence import MAX_LENGTH, ROWS, run_ours

EVAL_BATCH = tasks.DEFAULT_EVAL["batch_size"]  # what training's held-out evaluation batches by
# 20 pairs (KTO: 40 rows) and 21 unpaired rows: neither divides into batches of 16
EVAL_PAIRS = ROWS + [{"prompt": f"Count to {n}:", "chosen": " " + ", ".join(str(i) for i in range(1, n + 1)),
                      "rejected": f" {n}, {n - 1}, nine"} for n in range(2, 14)]
EVAL_UNPAIRED = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                 for r in EVAL_PAIRS[:11] for side in ("chosen", "rejected")][:21]

# name: (our TrainConfig loss settings, the same as evaluate's flags, the eval file's rows)
CASES = {
    "simpo": (dict(loss_type=["simpo"], beta=2.0, simpo_gamma=0.7, cpo_alpha=0.3),
              ["--loss-type", "simpo", "--beta", "2.0", "--simpo-gamma", "0.7", "--cpo-alpha", "0.3"], EVAL_PAIRS),
    "cpo": (dict(loss_type=["cpo"], beta=0.3), ["--loss-type", "cpo", "--beta", "0.3"], EVAL_PAIRS),
    "orpo": (dict(loss_type=["orpo"], beta=0.2), ["--loss-type", "orpo", "--beta", "0.2"], EVAL_PAIRS),
    "kto-paired": (dict(loss_type=["kto"], beta=0.5, kto_desirable_weight=1.3, kto_undesirable_weight=0.7),
                   ["--loss-type", "kto", "--beta", "0.5", "--kto-desirable-weight", "1.3",
                    "--kto-undesirable-weight", "0.7"], EVAL_PAIRS),
    "kto-unpaired": (dict(loss_type=["kto"], beta=0.5), ["--loss-type", "kto", "--beta", "0.5"], EVAL_UNPAIRED),
}


def _training_eval(tiny_llama_dir, tmp_path, settings: dict, eval_file) -> dict:
    """The end-of-run eval row of a 2-step run from non-zero LoRA weights (its adapter: tmp_path/ours/adapter)."""
    run_ours(tiny_llama_dir, tmp_path, lora_seed=1, per_device_batch_size=4, max_steps=2, learning_rate=5e-3,
             eval_dataset=str(eval_file), eval_steps=0, **settings)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    return evals[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_cli_equals_trainings_held_out_eval(case, tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                                     record_property):
    settings, flags, eval_rows = CASES[case]
    loss = LossSettings(**{k: tuple(v) if k == "loss_type" else v for k, v in settings.items()})
    rows_scored = 2 * len(eval_rows) if loss.unpaired and "chosen" in eval_rows[0] else len(eval_rows)
    assert rows_scored % EVAL_BATCH != 0  # a last, smaller batch
    eval_file = write_jsonl(tmp_path / "held_out.jsonl", eval_rows)
    trained = _training_eval(tiny_llama_dir, tmp_path, settings, eval_file)
    if not loss.needs_reference:  # SimPO, CPO, ORPO: the CLI never runs a reference
        monkeypatch.setattr(models, "as_reference", lambda *a, **k: pytest.fail("a reference was computed"))
    out_json = tmp_path / "cli.json"
    code = evaluate.main(["--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "ours" / "adapter"),
                          "--dataset", str(eval_file), "--max-length", str(MAX_LENGTH), "--batch-size",
                          str(EVAL_BATCH), "--device", "cpu", "--output", str(out_json), *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    ours = json.loads(out_json.read_text())["metrics"]
    names = {f"eval_{k}" for k in objective_for(loss).metric_names}
    assert names <= set(trained) and set(ours) == set(trained) - {"step"}
    diffs = {k: abs(ours[k] - trained[k]) / max(1.0, abs(trained[k])) for k in sorted(ours) if k != "eval_seconds"}
    record_property("max_diff", json.dumps(diffs))
    print(f"\n[{case}] evaluate CLI vs training's eval row (abs, relative above 1): {max(diffs.values()):.2e}")
    for k, d in diffs.items():
        assert d <= 1e-5, f"{case} {k}: cli {ours[k]} vs training {trained[k]}"
    assert f"under {loss.loss_type[0]} (beta {loss.beta}" in out


@pytest.mark.parametrize("flags, message", [
    (["--loss-type", "orpo", "--simpo-gamma", "1"], "--simpo-gamma: applies to --loss-type simpo only"),
    (["--loss-type", "simpo", "--kto-desirable-weight", "2"], "--kto-desirable-weight: applies to --loss-type kto"),
    (["--loss-type", "kto", "--batch-size", "1"], "--batch-size: kto needs >= 2 rows"),
    (["--loss-type", "orpo", "--ld-alpha", "0.5"], "--ld-alpha: ld_alpha and use_weighting are DPO options"),
    (["--loss-type", "cpo", "--use-weighting"], "ld_alpha and use_weighting are DPO options"),
    (["--loss-type", "kto", "--reference-free"], "reference_free applies to DPO loss types only"),
    (["--loss-type", "orpo", "--cpo-alpha", "1"], "cpo_alpha weighs the NLL term of cpo and simpo only"),
    (["--loss-type", "sigmoid", "kto"], "the kto objective stands alone"),
    (["--loss-type", "simpo", "--beta", "0"], "--beta: must be > 0"),
    (["--loss-type", "ipo", "--discopop-tau", "0.1"], "--discopop-tau: applies to --loss-type discopop only"),
])
def test_bad_objective_settings_are_one_line_exit_2(flags, message, capsys, tiny_llama_dir):
    """Refused before the model loads: one line naming the flag, exit 2."""
    code = evaluate.main(["--model", str(tiny_llama_dir), "--dataset", "builtin:sentiment", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpo.evaluate: error:")
