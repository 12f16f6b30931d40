"""dpo.eval.evaluation, dpo.eval.generation and the `python -m dpo.evaluate` CLI on a tiny random Llama: metrics equal a
direct computation (each a mean over pairs), generation report, CLI errors."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from dpo import evaluate, models
from dpo.eval import evaluation
from dpo.eval import generation
from dpo.data import tasks
from dpo.data.sources import PreferenceRow
from dpo.data.pairs import tokenize_row
from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for

from .conftest import build_tiny_llama

ROWS = [
    ("The sky is", " blue today.", " green, obviously."),
    ("Q: What is 2+2?\nA:", " 4", " 5, I think"),
    ("Say hello politely.", " Hello, it is nice to meet you!", " what"),
    ("Finish: once upon a", " time", " banana"),
    ("Name a prime number greater than 10.", " 13", " 12 is prime."),
    ("Translate 'chat' from French:", " cat", " chat"),
    ("Write a haiku about rain.", "\nSoft rain on the roof\nwhispers", "\nRain."),
]
BETA = 0.1
LOSS = LossSettings(beta=BETA)


@pytest.fixture
def pairs(tokenizer):
    return [tokenize_row(tokenizer, PreferenceRow(p, c, r, i)) for i, (p, c, r) in enumerate(ROWS)]


def lora_model(tokenizer, perturb: bool):
    model = models.add_lora(build_tiny_llama(len(tokenizer)), models.LoraSettings(r=4, alpha=8))
    if perturb:
        g = torch.Generator().manual_seed(1)
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def direct_logp(model, prompt_ids, completion_ids) -> float:
    """log pi(completion | prompt) summed, from a plain full-logits forward of one sequence."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    per_token = logps.gather(-1, targets[:, None]).squeeze(-1)
    return float(per_token[len(prompt_ids) - 1 :].sum())


def direct_metrics(model, pairs):
    """Every eval metric from a direct computation: each the mean over all pairs (as TRL's eval set mean)."""
    rows = []
    for p in pairs:
        pc, pr = direct_logp(model, p.prompt_ids, p.chosen_ids), direct_logp(model, p.prompt_ids, p.rejected_ids)
        with model.disable_adapter():
            rc, rr = direct_logp(model, p.prompt_ids, p.chosen_ids), direct_logp(model, p.prompt_ids, p.rejected_ids)
        rows.append((pc, pr, rc, rr, len(p.chosen_ids), len(p.rejected_ids)))
    n = len(rows)
    out = {
        "eval_loss": sum(math.log1p(math.exp(-BETA * ((pc - rc) - (pr - rr)))) for pc, pr, rc, rr, *_ in rows) / n,
        "eval_rewards/chosen": sum(BETA * (pc - rc) for pc, pr, rc, rr, *_ in rows) / n,
        "eval_rewards/rejected": sum(BETA * (pr - rr) for pc, pr, rc, rr, *_ in rows) / n,
        "eval_rewards/accuracies": sum(float(pc - rc > pr - rr) for pc, pr, rc, rr, *_ in rows) / n,
        "eval_rewards/margins": sum(BETA * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr, *_ in rows) / n,
        "eval_logps/chosen": sum(r[0] for r in rows) / n,
        "eval_logps/rejected": sum(r[1] for r in rows) / n,
        "eval_ref_logps/chosen": sum(r[2] for r in rows) / n,
        "eval_ref_logps/rejected": sum(r[3] for r in rows) / n,
    }
    out["eval_length_normalised_accuracy"] = sum(pc / nc > pr / nr for pc, pr, _, _, nc, nr in rows) / len(rows)
    out["eval_ref_length_normalised_accuracy"] = sum(rc / nc > rr / nr for _, _, rc, rr, nc, nr in rows) / len(rows)
    return out


@pytest.mark.parametrize("logprobs", ["chunked", "full"])
def test_metrics_equal_a_direct_computation(tokenizer, pairs, logprobs):
    model = lora_model(tokenizer, perturb=True)
    got = evaluation.evaluate_items(model, tokenizer, pairs, loss=LOSS, batch_size=3, logprobs=logprobs)
    # 7 pairs in batches of 3, 3, 1: a mean of batch means would weigh the last pair 3 times (issue 17, item 6)
    want = direct_metrics(model, pairs)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert got["eval_num_pairs"] == len(pairs)
    assert set(evaluation.METRIC_NAMES) <= set(got)


def test_policy_equal_to_reference_gives_trivial_implicit_metrics(tokenizer, pairs):
    model = lora_model(tokenizer, perturb=False)  # fresh LoRA: B = 0, so policy == reference exactly
    got = evaluation.evaluate_items(model, tokenizer, pairs, loss=LOSS, batch_size=4)
    assert got["eval_rewards/accuracies"] == 0.0
    assert got["eval_rewards/margins"] == 0.0
    assert got["eval_rewards/chosen"] == 0.0 == got["eval_rewards/rejected"]
    assert got["eval_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert got["eval_length_normalised_accuracy"] == got["eval_ref_length_normalised_accuracy"]
    # and the same numbers come from the reference's log-probs alone (no policy pass)
    ref = evaluation.score_items(model, tokenizer, pairs, objective=objective_for(LOSS), batch_size=4, reference=True)
    again = objective_for(LOSS).eval_row(ref, ref, batch_size=4)
    for key in evaluation.METRIC_NAMES + ("eval_length_normalised_accuracy",):
        assert again[key] == pytest.approx(got[key], abs=1e-6), key


def test_cached_reference_and_separate_ref_model(tokenizer, pairs):
    model = lora_model(tokenizer, perturb=True)
    plain = evaluation.evaluate_items(model, tokenizer, pairs, loss=LOSS, batch_size=2)
    ref = evaluation.score_items(model, tokenizer, pairs, objective=objective_for(LOSS), batch_size=5, reference=True)
    cached = evaluation.evaluate_items(model, tokenizer, pairs, loss=LOSS, batch_size=2, ref_scores=ref)
    # a full model as the policy, the base (same init) as an explicit reference model
    merged = lora_model(tokenizer, perturb=True).merge_and_unload()
    base = build_tiny_llama(len(tokenizer))
    explicit = evaluation.evaluate_items(merged, tokenizer, pairs, loss=LOSS, batch_size=2, ref_model=base)
    for key in evaluation.METRIC_NAMES:
        assert cached[key] == pytest.approx(plain[key], abs=1e-5), key
        assert explicit[key] == pytest.approx(plain[key], abs=1e-4), key
    with pytest.raises(ValueError, match="items"):
        evaluation.evaluate_items(model, tokenizer, pairs[:3], loss=LOSS, batch_size=2, ref_scores=ref)


def test_training_mode_is_restored(tokenizer, pairs):
    model = lora_model(tokenizer, perturb=True)
    model.train()
    evaluation.evaluate_items(model, tokenizer, pairs[:2], loss=LOSS, batch_size=2)
    assert model.training
    assert any(p.requires_grad for p in model.parameters())


def test_batched_greedy_generation_equals_one_at_a_time(tokenizer):
    model = lora_model(tokenizer, perturb=True)
    prompts = [generation.prompt_ids(tokenizer, r["prompt"]) for r in tasks.builtin_task().eval_rows(4)]
    prompts.append(prompts[0][-7:])  # a much shorter prompt: left padding in the batch
    batched = generation.greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=5)
    alone = [generation.greedy_generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    hf = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False)
    assert hf[0, len(prompts[1]):].tolist() == alone[1]


def test_generation_report_shape(tokenizer):
    task = tasks.builtin_task()
    prompts = [r["prompt"] for r in task.eval_rows(3)]
    model = lora_model(tokenizer, perturb=True)
    rep = generation.generation_report(model, tokenizer, task, prompts, max_new_tokens=5)
    for key in ("policy_completions", "policy_rewards", "reference_completions", "reference_rewards", "prompts"):
        assert len(rep[key]) == 3, key
    assert rep["prompts"][0] == prompts[0][0]["content"]
    assert rep["policy_reward_mean"] == pytest.approx(sum(rep["policy_rewards"]) / 3)
    assert rep["policy_rewards"] == [task.reward(p, c) for p, c in zip(prompts, rep["policy_completions"])]
    kl = rep["kl"]
    assert kl["kl_tokens"] > 0 and kl["kl_per_token"] > 0 and "definition" in kl
    assert 0 <= rep["policy_beats_reference"] <= 1
    json.dumps(rep)  # serialisable
    assert "prompt:" in generation.format_samples(rep, 2)
    no_ref = generation.generation_report(model, tokenizer, task, prompts[:2], max_new_tokens=3, ref=False)
    assert "reference_completions" not in no_ref and "kl" not in no_ref


def test_generation_report_of_an_untrained_adapter_matches_the_reference(tokenizer):
    task = tasks.builtin_task()
    model = lora_model(tokenizer, perturb=False)
    rep = generation.generation_report(model, tokenizer, task, [r["prompt"] for r in task.eval_rows(2)], 4)
    assert rep["policy_completions"] == rep["reference_completions"]
    assert rep["kl"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert rep["kl"]["logratio_per_sequence"] == pytest.approx(0.0, abs=1e-5)


def test_before_after_table():
    before = {"eval_length_normalised_accuracy": 0.5, "eval_rewards/accuracies": 0.0, "eval_loss": 0.6931}
    after = {"eval_length_normalised_accuracy": 0.8, "eval_rewards/accuracies": 1.0, "eval_loss": 0.3}
    text = evaluation.format_before_after(before, after)
    assert "+30.0pt" in text and "before" in text


# --- the command line ----------------------------------------------------------------------------


def cli(capsys, *argv):
    code = evaluate.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["--model", "./no/such/model", "--dataset", "builtin:sentiment"], "--model: no such model folder"),
    (["--model", "MODEL", "--adapter", "/no/such/adapter", "--dataset", "builtin:sentiment"], "--adapter: no such"),
    (["--model", "MODEL", "--adapter", "MODEL", "--dataset", "builtin:sentiment"], "adapter_config.json"),
    (["--model", "MODEL", "--dataset", "/no/such/prefs.jsonl"], "no such file"),
    (["--model", "MODEL", "--dataset", "builtin:nope"], "no such built-in task"),
    (["--model", "MODEL", "--dataset", "builtin:sentiment", "--output", "/no/such/dir/x.json"], "--output"),
    (["--model", "MODEL", "--dataset", "builtin:sentiment", "--batch-size", "0"], "--batch-size"),
])
def test_cli_errors_are_one_line_exit_2(capsys, tiny_llama_dir, argv, message):
    argv = [str(tiny_llama_dir) if a == "MODEL" else a for a in argv]
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpo.evaluate: error:")


def test_an_unwritable_output_is_one_line_before_the_model_loads(capsys, tiny_llama_dir, unwritable_dir, no_model_load):
    code, out, err = cli(capsys, "--model", str(tiny_llama_dir), "--dataset", "builtin:sentiment", "--output",
                         str(unwritable_dir / "e.json"))
    assert code == 2 and out == ""
    assert err.startswith("dpo.evaluate: error: --output: ") and str(unwritable_dir) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_hub_model_with_the_hub_unreachable_is_one_line_at_once(capsys, monkeypatch, no_model_load):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    code, out, err = cli(capsys, "--model", "nosuch-org/Model-Instrukt", "--dataset", "builtin:sentiment")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("dpo.evaluate: error: --model: nosuch-org/Model-Instrukt is neither a local folder nor in "
                          "the hub cache, and the hub (http://127.0.0.1:9) cannot be reached"), err


def test_cli_on_a_tiny_model_with_an_adapter(capsys, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = models.add_lora(base, models.LoraSettings(r=4, alpha=8))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    out_json = tmp_path / "eval.json"
    code, out, err = cli(capsys, "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"),
                         "--dataset", "builtin:sentiment", "--eval-size", "4", "--batch-size", "2",
                         "--generations", "2", "--max-new-tokens", "3", "--output", str(out_json))
    assert code == 0, err
    assert "eval_rewards/accuracies" in out and "generations:" in out
    result = json.loads(out_json.read_text())
    assert result["metrics"]["eval_num_pairs"] == 4
    assert result["metrics"]["eval_rewards/margins"] != 0.0  # the adapter moved the policy
    assert len(result["generations"]["policy_completions"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval.json")]  # no temp file left


def test_cli_on_a_preference_file(capsys, tiny_llama_dir, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in ROWS) + "\n")
    code, out, err = cli(capsys, "--model", str(tiny_llama_dir), "--dataset", str(data), "--batch-size", "4")
    assert code == 0, err
    assert "evaluated 7 pairs" in out and "policy = reference" in out


def test_held_out_eval_before_and_after(tokenizer):
    no_eval = types.SimpleNamespace(eval_dataset=None, dataset="prefs.jsonl")
    assert evaluation.Evaluation.for_run(no_eval, tokenizer) is None  # a file to train on, nothing held out
    model = lora_model(tokenizer, perturb=False)
    held_out = evaluation.Evaluation.of_dataset("builtin:sentiment", tokenizer, loss=LOSS, max_length=128,
                                                eval_size=5, batch_size=2,
                                                generation_settings=evaluation.GenerationSettings(2, 3))
    before = held_out.before(model)
    direct = evaluation.evaluate_items(model, tokenizer, held_out.pairs, loss=LOSS, batch_size=2, max_length=128)
    for key in evaluation.METRIC_NAMES + ("eval_length_normalised_accuracy",):
        assert before[key] == pytest.approx(direct[key], abs=1e-6), key
    with torch.no_grad():  # "training": move the adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
    after = held_out.after(model)
    assert after["eval_rewards/margins"] != 0.0
    assert after["eval_ref_length_normalised_accuracy"] == before["eval_length_normalised_accuracy"]
    text = held_out.report()
    assert "before" in text and "generation reward" in text and "prompt:" in text
    json.dumps(held_out.to_dict())


def test_cli_missing_arguments_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--dataset", "builtin:sentiment"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--model" in err and len(err.strip().splitlines()) == 1


# --- issue 17: what a user of `python -m dpo.evaluate` sees ---------------------------------------


def test_cli_scores_the_mean_over_pairs_and_prints_the_rows_dropped(capsys, tiny_llama_dir, tmp_path):
    """7 pairs in batches of 3 (3, 3, 1) with no adapter: the policy is the reference, so its mean
    log-probs equal the reference's (a mean of batch means did not); a row whose prompt fills
    --max-length is dropped, and the count is printed, not only written to the JSON."""
    long_prompt = "Tell me everything about " + " and ".join(f"topic number {i}" for i in range(60))
    data = tmp_path / "prefs.jsonl"
    rows = ROWS + [(long_prompt, " Sure.", " No.")]
    data.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in rows) + "\n")
    out_json = tmp_path / "eval.json"
    code, out, err = cli(capsys, "--model", str(tiny_llama_dir), "--dataset", str(data), "--batch-size", "3",
                         "--max-length", "64", "--output", str(out_json))
    assert code == 0, err
    assert "evaluated 7 pairs" in out and "1 of 8 rows dropped" in out
    metrics = json.loads(out_json.read_text())["metrics"]
    assert metrics["eval_num_pairs"] == 7
    assert metrics["eval_logps/chosen"] == pytest.approx(metrics["eval_ref_logps/chosen"], abs=1e-5)
    assert metrics["eval_logps/rejected"] == pytest.approx(metrics["eval_ref_logps/rejected"], abs=1e-5)


def test_cli_help_shows_trainings_defaults_and_device_auto_runs(capsys, tiny_llama_dir, tmp_path):
    from dpo.config import TrainConfig

    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    train = TrainConfig(dataset="prefs.jsonl")
    assert train.device == "auto"
    for flag, default in (("--device", train.device), ("--max-length", train.max_length),
                          ("--logprobs", train.logprobs), ("--beta", train.beta),
                          ("--batch-size", tasks.DEFAULT_EVAL["batch_size"]),
                          ("--generations", tasks.DEFAULT_EVAL["generations"])):
        assert f"(default: {default})" in help_text, flag
    # --adapter, --eval-size, --output, and training's --loss-weights, --cpo-alpha, --ld-alpha; not the required ones
    assert help_text.count("(default: None)") == 6
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in ROWS) + "\n")
    out_json = tmp_path / "eval.json"
    code, out, err = cli(capsys, "--model", str(tiny_llama_dir), "--dataset", str(data), "--device", "auto",
                         "--output", str(out_json))
    assert code == 0, err
    assert json.loads(out_json.read_text())["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    code, _, err = cli(capsys, "--model", str(tiny_llama_dir), "--dataset", str(data), "--device", "tpu9")
    assert code == 2 and "--device" in err and len(err.strip().splitlines()) == 1


def test_cli_at_a_folder_that_holds_no_model_says_so_in_one_line(capsys, tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli(capsys, "--model", str(empty), "--dataset", "builtin:sentiment")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert f"--model: {empty} holds no model: a model folder needs config.json" in err
    assert "safetensors" in err and "tokenizer" in err


def test_long_evaluation_shows_progress_bars_and_a_quick_one_stays_quiet(capsys, tiny_llama_dir, monkeypatch):
    from dpo import progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    argv = ("--model", str(tiny_llama_dir), "--dataset", "builtin:sentiment", "--eval-size", "4",
            "--generations", "2", "--max-new-tokens", "2", "--batch-size", "2")
    code, out, err = cli(capsys, *argv)  # well under progress.DELAY_S
    assert code == 0
    assert "eval (" not in err and "generate (" not in err and "KL to reference" not in err
    monkeypatch.setattr(progress, "DELAY_S", 0.0)  # as if every phase ran longer than the delay
    code, out, err = cli(capsys, *argv)
    assert code == 0
    for phase in ("eval (reference)", "eval (policy)", "generate (policy)", "generate (reference)",
                  "KL to reference"):
        assert phase in err, phase
    assert "eval (" not in out  # bars go to stderr, the results to stdout
