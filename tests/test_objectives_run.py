"""Each objective beyond DPO through the one loop (`dpo.train.run`, as `python -m dpo.train` runs it) against
its TRL 1.15 trainer: 5 optimizer steps with gradient accumulation 2, in-order data, the same non-zero
starting LoRA weights, AdamW and schedule; every metric TRL logs that we log, relative 1e-4 (as the DPO
trajectory test in tests/test_trl_equivalence.py). CPU, float32, tiny random Llama, SmolLM2 tokenizer.
"""

from __future__ import annotations

import json

import pytest
from torch.utils.data import Sampler

from dpo.config import ConfigError, TrainConfig
from dpo.data.pairs import TokenizedPair
from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for
from dpo.trainer import epoch_order

from .conftest import write_jsonl
from .conftest import build_tiny_llama
from .test_objectives_trl import _common_args, _peft_config
from .test_trl_equivalence import ROWS, perturb_lora, run_ours, trl_trainer
from .trl_cpu_kernel import use_cpu_kernel

STEPS = dict(gradient_accumulation_steps=2, max_steps=5, learning_rate=5e-3, lr_scheduler_type="linear",
             warmup_steps=1, max_grad_norm=1.0, weight_decay=0.0)
OURS = dict(grad_accum=2, max_steps=5, learning_rate=5e-3, lr_scheduler="linear", warmup_steps=1, max_grad_norm=1.0)

# name: (TRL trainer kind, TRL config, our TrainConfig settings)
CASES = {
    "simpo": ("cpo", dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0),
              dict(loss_type=["simpo"], simpo_gamma=0.7, beta=2.0)),
    "cpo-simpo": ("cpo", dict(loss_type="simpo", cpo_alpha=0.3, simpo_gamma=0.5, beta=2.0, label_smoothing=0.1),
                  dict(loss_type=["simpo"], cpo_alpha=0.3, simpo_gamma=0.5, beta=2.0, label_smoothing=0.1)),
    "cpo": ("cpo", dict(loss_type="sigmoid", cpo_alpha=1.0, beta=0.1), dict(loss_type=["cpo"], beta=0.1)),
    "orpo": ("orpo", dict(beta=0.2), dict(loss_type=["orpo"], beta=0.2)),
    # 3 rows a micro-batch: some micro-batches mix desirable and undesirable rows (rewards/margins), some
    # steps hold a side in only one of their micro-batches (each metric averages where it was logged)
    "kto": ("kto", dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.7, per_device_train_batch_size=3),
            dict(loss_type=["kto"], beta=0.5, kto_desirable_weight=1.3, kto_undesirable_weight=0.7,
                 per_device_batch_size=3)),
    "ld_alpha": ("dpo", dict(ld_alpha=0.3), dict(ld_alpha=0.3)),
    "use_weighting": ("dpo", dict(use_weighting=True), dict(use_weighting=True)),
}


def _trl_objective_trainer(kind, tokenizer, tmp_path, args):
    """TRL's CPOTrainer, ORPOTrainer or KTOTrainer on ROWS with these arguments, sequential sampling."""
    import torch
    from datasets import Dataset

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    elif kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    else:
        from trl import KTOConfig as Config, KTOTrainer as Trainer
    torch.manual_seed(0)
    config = Config(**{**_common_args(tmp_path), "train_sampling_strategy": "sequential", **args})
    return Trainer(model=build_tiny_llama(len(tokenizer)), args=config, train_dataset=Dataset.from_list(ROWS),
                   processing_class=tokenizer, peft_config=_peft_config())


class OurOrder(Sampler):
    """Our shuffled order (dpo.trainer.epoch_order), a new permutation each pass: TRL reads the rows as we do."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        order = epoch_order(self.num_rows, self.epoch, self.seed, shuffle=True)
        self.epoch += 1
        return iter(order)


def _trl_log_history(kind, trl_cfg, tokenizer, tmp_path, lora_seed, order_seed: int | None = None):
    """TRL's logged rows (5 steps unless trl_cfg says); order_seed: its rows read in our shuffled order, else
    in file order."""
    args = {"per_device_train_batch_size": 2, **STEPS, **trl_cfg}
    with use_cpu_kernel():
        if kind == "dpo":
            trainer = trl_trainer(tokenizer, tmp_path, **args)
        else:
            trainer = _trl_objective_trainer(kind, tokenizer, tmp_path, args)
        perturb_lora(trainer.model, seed=lora_seed)
        if order_seed is not None:
            sampler = OurOrder(len(trainer.train_dataset), order_seed)
            trainer._get_train_sampler = lambda *a, **k: sampler
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    assert len(rows) == args["max_steps"]
    return rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if abs(b) > 1e-6 else abs(a - b)


@pytest.mark.parametrize("case", list(CASES))
def test_objective_trajectory_equals_trl(case, tokenizer, tiny_llama_dir, tmp_path, record_property):
    kind, trl_cfg, ours_cfg = CASES[case]
    trl_rows = _trl_log_history(kind, trl_cfg, tokenizer, tmp_path, lora_seed=2)
    history = run_ours(tiny_llama_dir, tmp_path, lora_seed=2, **{"per_device_batch_size": 2, **OURS, **ours_cfg})
    _assert_same_trajectory(case, history, trl_rows, ours_cfg, record_property)


def test_shuffled_kto_equals_trl_reading_the_same_order(tokenizer, tiny_llama_dir, tmp_path, record_property):
    """KTO with shuffled data (the default): each row keeps the KL partner fixed in file order at preparation
    (TRL's KL_completion_ids column), so our run equals KTOTrainer reading its rows in our order. 16 rows in
    micro-batches of 3, 2 per step: steps 1-3 are the first epoch, step 4 starts a differently shuffled
    second one. (4 steps: a 5th, at a gradient norm of 8.6, drifts to 2.2e-4 relative in float32.)"""
    kind, trl_cfg, ours_cfg = CASES["kto"]
    assert epoch_order(16, 0, 42, shuffle=True) != list(range(16))
    trl_rows = _trl_log_history(kind, {**trl_cfg, "max_steps": 4}, tokenizer, tmp_path, lora_seed=2, order_seed=42)
    history = run_ours(tiny_llama_dir, tmp_path, lora_seed=2, shuffle=True, seed=42,
                       **{**OURS, **ours_cfg, "max_steps": 4})
    _assert_same_trajectory("kto-shuffled", history, trl_rows, ours_cfg, record_property)


def _assert_same_trajectory(case, history, trl_rows, ours_cfg, record_property):
    """Every metric TRL logs that we log, at each step, within relative 1e-4."""
    assert len(history) == len(trl_rows)
    names = objective_for(LossSettings.from_config(TrainConfig(**ours_cfg))).metric_names
    worst: dict[str, float] = {}
    for step, (ours, theirs) in enumerate(zip(history, trl_rows), start=1):
        for k in (*names, "grad_norm", "learning_rate"):
            assert (k in ours) == (k in theirs), f"step {step}: {k} logged by {'us' if k in ours else 'TRL'} only"
            if k in theirs:
                worst[k] = max(worst.get(k, 0.0), _rel(ours[k], theirs[k]))
    record_property("max_rel_diff", json.dumps(worst))
    print(f"\n[{case}] max relative differences over {len(history)} steps vs TRL log_history: {worst}")
    assert history[0]["loss"] != history[-1]["loss"], "the run must move"
    if case.startswith("kto"):
        assert any("rewards/margins" in r for r in history), "no micro-batch mixed the two labels"
    assert abs(history[-1]["logps/chosen"] - history[0]["logps/chosen"]) > 1e-3
    for k, d in worst.items():
        assert d <= 1e-4, f"{case} {k}: max relative diff {d:.3e} > 1e-4"


def _cfg(tmp_path, **kw):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    return TrainConfig(dataset=str(data), output_dir=str(tmp_path / "o"), **kw)


@pytest.mark.parametrize("settings, flag", [
    (dict(loss_type=["kto"], shuffle=False, per_device_batch_size=1), "--per-device-batch-size"),
    (dict(loss_type=["simpo"], precompute_ref=True), "--precompute-ref"),
    (dict(loss_type=["kto"], shuffle=False, precompute_ref=True), "--precompute-ref"),
    (dict(loss_type=["simpo", "sigmoid"]), "--loss-type"),
    (dict(loss_type=["orpo"], cpo_alpha=0.5), "--cpo-alpha"),
    (dict(ld_alpha=1.5), "--ld-alpha"),
    (dict(loss_type=["kto"], shuffle=False, kto_desirable_weight=0.0), "--kto-desirable-weight"),
])
def test_objective_settings_refused_in_one_line(settings, flag, tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, **settings).validate()
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


def test_objective_flags_parse():
    from dpo.flags import config_from_args

    cfg = config_from_args(["--dataset", "builtin:sentiment", "--loss-type", "simpo", "--simpo-gamma", "0.3",
                            "--cpo-alpha", "0.2"])
    assert cfg.loss_settings().objective == "simpo" and cfg.loss_settings().nll_weight == 0.2
    cfg = config_from_args(["--dataset", "builtin:sentiment", "--ld-alpha", "0.5", "--use-weighting"])
    assert cfg.loss_settings().ld_alpha == 0.5 and cfg.loss_settings().use_weighting


def test_kto_reads_unpaired_rows(tokenizer, tiny_llama_dir, tmp_path):
    """A file of (prompt, completion, label) rows trains KTO; a bad label is refused naming the row."""
    from dpo.build import load_training_pairs, read_rows
    from dpo.data.sources import DataError

    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in ROWS for side in ("chosen", "rejected")]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = TrainConfig(dataset=str(path), loss_type=["kto"], shuffle=False, max_length=64)
    items, report = load_training_pairs(cfg, tokenizer, read_rows(cfg))
    assert [r.label for r in items] == [r["label"] for r in rows][: len(items)]
    assert "kto" in report.format()
    write_jsonl(path, rows[:3] + [{"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError, match=r"kto.jsonl line 4: label must be true or false"):
        read_rows(cfg)
    write_jsonl(path, [{"prompt": "p", "completion": "c"}] + rows)
    with pytest.raises(DataError, match=r"kto.jsonl line 1: no 'label' column"):
        read_rows(cfg)


@pytest.mark.parametrize("extra", [
    ["--loss-type", "orpo"],
    ["--loss-type", "kto", "--no-shuffle"],
    ["--ld-alpha", "0.5", "--precompute-ref"],
    ["--use-weighting"],
], ids=["orpo", "kto", "ld_alpha-precompute", "use_weighting"])
def test_objective_resume_after_a_crash_equals_the_uninterrupted_run(tiny_llama_dir, tmp_path, monkeypatch,
                                                                     single_thread, extra):
    """A crash before step 5 of 6, then --resume: the same metrics and adapter, bit for bit (test_resume's
    check, for each kind of batch the objectives add)."""
    from dpo import train

    from .test_resume import ROWS as RESUME_ROWS, assert_same_run, flags, straight_and_crashed_runs

    data = write_jsonl(tmp_path / "pairs.jsonl", RESUME_ROWS)
    straight, out = straight_and_crashed_runs(tiny_llama_dir, data, tmp_path, monkeypatch, *extra)
    assert train.main(flags(tiny_llama_dir, data, out, *extra, "--resume")) == 0
    assert_same_run(straight, out)


def test_ld_alpha_precomputed_reference_equals_the_reference_each_step(tiny_llama_dir, tmp_path):
    """--precompute-ref caches LD-DPO's weighted reference sums: the same trajectory as computing them each step."""
    settings = dict(lora_seed=2, per_device_batch_size=2, grad_accum=2, max_steps=3, learning_rate=5e-3, ld_alpha=0.3)
    (tmp_path / "each").mkdir()
    (tmp_path / "cached").mkdir()
    each = run_ours(tiny_llama_dir, tmp_path / "each", **settings)
    cached = run_ours(tiny_llama_dir, tmp_path / "cached", precompute_ref=True, precompute_ref_batch_size=5, **settings)
    for a, b in zip(each, cached):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert abs(each[-1]["rewards/margins"]) > 1e-3


def test_kto_with_default_flags_trains_and_logs_its_kl(tiny_llama_dir, tmp_path, capsys):
    """`--loss-type kto` and no other objective flag (shuffled data, 8 rows a micro-batch) trains."""
    from dpo import train

    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "run"
    rc = train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(out),
                     "--loss-type", "kto", "--max-steps", "2", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("kl" in r for r in rows)


def test_kto_on_several_ranks_is_refused_in_one_line(tmp_path, monkeypatch, no_model_load):
    from dpo.train import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^--loss-type kto: runs on one process"):
        run(_cfg(tmp_path, loss_type=["kto"], shuffle=False))


def test_a_builtin_task_run_evaluates_under_every_objective(tokenizer):
    """A built-in task evaluates on its held-out split by itself: DPO (with LD-DPO or WPO), SimPO, CPO, ORPO
    (on pairs tokenized as they train) and KTO (on the pairs split into rows)."""
    from dpo.eval.evaluation import Evaluation
    from dpo.data.objective_rows import SidedPair, TokenizedRow

    for other in (dict(), dict(ld_alpha=0.5), dict(use_weighting=True), dict(loss_type=["simpo"]),
                  dict(loss_type=["cpo"]), dict(loss_type=["orpo"]), dict(loss_type=["kto"], shuffle=False)):
        evaluation = Evaluation.for_run(TrainConfig(dataset="builtin:sentiment", **other), tokenizer)
        kind = {"orpo": SidedPair, "simpo": SidedPair, "cpo": SidedPair, "kto": TokenizedRow}
        assert isinstance(evaluation.pairs[0], kind.get(other.get("loss_type", [""])[0], TokenizedPair))


def test_every_objective_accepts_an_eval_dataset(tmp_path):
    for settings in (dict(loss_type=["simpo"]), dict(loss_type=["cpo"]), dict(loss_type=["orpo"]),
                     dict(loss_type=["kto"], shuffle=False)):
        _cfg(tmp_path, eval_dataset="builtin:sentiment:eval", **settings).validate()


@pytest.mark.parametrize("option", [dict(ld_alpha=0.3), dict(use_weighting=True)], ids=["ld_alpha", "use_weighting"])
def test_ld_and_wpo_held_out_metrics_equal_trl_evaluate(option, tokenizer, tmp_path, record_property):
    """Held-out evaluation with LD-DPO or WPO: every eval_ metric TRL's DPOTrainer.evaluate() logs, on all
    8 pairs in one batch, same LoRA weights (reference: the adapter off)."""
    from datasets import Dataset

    from dpo.eval.evaluation import Evaluation

    from .test_trl_equivalence import MAX_LENGTH, max_diff, our_model, our_pairs

    with use_cpu_kernel():
        trainer = trl_trainer(tokenizer, tmp_path, per_device_eval_batch_size=len(ROWS), **option)
        perturb_lora(trainer.model, seed=1)
        theirs = trainer.evaluate(Dataset.from_list(ROWS))
    model = our_model(tokenizer, gradient_checkpointing=False)
    perturb_lora(model, seed=1)
    evaluation = Evaluation("rows", tokenizer, our_pairs(tokenizer), loss=LossSettings(beta=0.1, **option),
                            max_length=MAX_LENGTH, batch_size=len(ROWS))
    evaluation.before(model)
    ours = evaluation.metrics(model)
    names = [f"eval_{k}" for k in objective_for(LossSettings(**option)).metric_names]
    # WPO's weights make the loss tiny: the loss relative to its size; the rest absolute, relative above 1
    diffs = {k: max_diff(ours[k], theirs[k]) / (abs(theirs[k]) if k == "eval_loss" else max(abs(theirs[k]), 1.0))
             for k in names}
    record_property("max_diff", json.dumps(diffs))
    print(f"\n[{option}] eval differences vs TRL evaluate() (abs, relative above 1): {diffs}")
    assert abs(ours["eval_rewards/margins"]) > 1e-3
    for k, d in diffs.items():
        assert d <= 1e-5, f"{k}: {d:.3e}"
