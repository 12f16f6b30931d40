"""Our loop against TRL 1.15's DPOTrainer on the same model, data and LoRA weights (CPU, float32).

TRL's log-prob kernel is Triton-only; `tests/trl_cpu_kernel.py` substitutes a pure-torch function
with the same contract (the GPU suite shows it equals the Triton kernel).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dpo import models
from dpo.run.checkpoint import latest_checkpoint
from dpo.config import TrainConfig
from dpo.data.sources import PreferenceRow
from dpo.data.pairs import collate, tokenize_row
from dpo.build import seed_everything
from dpo.train import RunHooks, run
from dpo.trainer import Trainer

from .conftest import build_tiny_llama, write_jsonl
from .trl_cpu_kernel import use_cpu_kernel

ROWS = [
    {"prompt": "The sky is", "chosen": " blue today.", "rejected": " green, obviously."},
    {"prompt": "Q: What is 2+2?\nA:", "chosen": " 4", "rejected": " 5, I think"},
    {"prompt": "Write a haiku about rain.", "chosen": "\nSoft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth",
     "rejected": "\nRain."},
    {"prompt": "Translate 'chat' from French:", "chosen": " cat", "rejected": " chat"},
    {"prompt": "Name a prime number greater than 10.", "chosen": " 13", "rejected": " 12 is prime."},
    {"prompt": "Say hello politely.", "chosen": " Hello, it is nice to meet you!", "rejected": " what"},
    {"prompt": "Finish: once upon a", "chosen": " time", "rejected": " banana"},
    {"prompt": "A long question " + "that goes on " * 12 + "and ends?", "chosen": " Yes." * 20,
     "rejected": " No." * 20},  # cut by max_length in the collator
]
MAX_LENGTH = 64
LORA = models.LoraSettings(r=4, alpha=8, dropout=0.0)


def perturb_lora(model, seed: int) -> None:
    """The same LoRA weights in both models (A and B), with B non-zero so that the policy differs
    from the reference from the first step."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(n for n, _ in model.named_parameters() if "lora_" in n)
    assert names, "no LoRA parameters found"
    params = dict(model.named_parameters())
    for name in names:
        params[name].data.copy_(torch.randn(params[name].shape, generator=g) * 0.2)


def trl_trainer(tokenizer, tmp_path, **overrides):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = dict(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=MAX_LENGTH,
                per_device_train_batch_size=4, beta=0.1, logging_steps=1, save_strategy="no",
                train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0)
    args.update(overrides)
    seed_everything(0)
    model = build_tiny_llama(len(tokenizer))
    peft_config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                             target_modules=list(LORA.targets), task_type="CAUSAL_LM")
    return DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=Dataset.from_list(ROWS),
                      processing_class=tokenizer, peft_config=peft_config)


def our_model(tokenizer, gradient_checkpointing=True):
    seed_everything(0)
    model = models.add_lora(build_tiny_llama(len(tokenizer)), LORA)
    models.disable_dropout(model)
    if gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    return model


def our_pairs(tokenizer):
    return [tokenize_row(tokenizer, PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i)) for i, r in enumerate(ROWS)]


def run_ours(model_dir, tmp_path, lora_seed: int | None = None, **settings) -> list[dict]:
    """Our run through the entry point `python -m dpo.train` calls, on ROWS as a file; `lora_seed`: the
    LoRA weights perturb_lora gives TRL's model too."""
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = TrainConfig(model=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "ours"), device="cpu",
                      dtype="float32", max_length=MAX_LENGTH, lora_r=LORA.r, lora_alpha=LORA.alpha,
                      lora_dropout=LORA.dropout, lora_targets=list(LORA.targets), **{"shuffle": False, **settings})
    hooks = RunHooks(model_built=None if lora_seed is None else lambda model: perturb_lora(model, lora_seed))
    return run(cfg, hooks=hooks)["history"]


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("logprobs", ["chunked", "full"])
def test_one_batch_equals_trl_compute_loss(tokenizer, tmp_path, logprobs, record_property):
    with use_cpu_kernel():
        trainer = trl_trainer(tokenizer, tmp_path)
        perturb_lora(trainer.model, seed=1)
        trl_model = trainer.model
        trl_model.train()
        examples = [trainer.train_dataset[i] for i in range(4)]
        inputs = trainer.data_collator(examples)
        trl_loss = trainer.compute_loss(trl_model, inputs)
        trl_loss.backward()
        trl_grads = {n: p.grad.clone() for n, p in trl_model.named_parameters() if p.requires_grad}
        # TRL's four log-prob vectors, from its own fused forward and reference pass.
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        with torch.no_grad():
            out = trl_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                            fused_lm_head=True, use_cache=False)
            trl_policy = out.log_probs.sum(1)
            trl_ref_c, trl_ref_r = trainer.compute_ref_log_probs(trl_model, inputs)

    model = our_model(tokenizer)
    perturb_lora(model, seed=1)
    pairs = our_pairs(tokenizer)[:4]
    batch = collate(pairs, tokenizer.pad_token_id, MAX_LENGTH)
    # Same token ids, masks and layout as TRL's collator.
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(batch, key), inputs[key]), key
    cfg = TrainConfig(dataset="x", max_length=MAX_LENGTH, per_device_batch_size=4, logprobs=logprobs, beta=0.1)
    ours = Trainer(model, tokenizer, cfg, pairs)
    model.train()
    out, logps, _ = ours.micro_batch(pairs)
    out.loss.backward()
    our_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    diffs = {
        "loss": max_diff(out.loss.detach(), trl_loss.detach()),
        "policy_chosen_logps": max_diff(logps.chosen.detach(), trl_policy[:4]),
        "policy_rejected_logps": max_diff(logps.rejected.detach(), trl_policy[4:]),
        "ref_chosen_logps": max_diff(logps.ref_chosen, trl_ref_c),
        "ref_rejected_logps": max_diff(logps.ref_rejected, trl_ref_r),
        "chosen_rewards": max_diff(out.chosen_rewards, 0.1 * (trl_policy[:4] - trl_ref_c)),
        "rejected_rewards": max_diff(out.rejected_rewards, 0.1 * (trl_policy[4:] - trl_ref_r)),
    }
    assert set(our_grads) == set(trl_grads)
    diffs["grad"] = max(max_diff(our_grads[n], trl_grads[n]) for n in trl_grads)
    record_property("max_abs_diff", json.dumps(diffs))
    print(f"\n[{logprobs}] max abs differences vs TRL: {diffs}")
    # The rewards must be non-trivial for the comparison to mean something.
    assert out.chosen_rewards.abs().max() > 1e-3
    assert all(torch.isfinite(g).all() for g in our_grads.values())
    # Loss, rewards and gradients: 1e-5 absolute. Summed log-probs are float32 sums of hundreds of
    # token log-probs of magnitude ~10 each (|logp| here is ~10^2-10^3), so one float32 ulp of the sum is
    # already ~3e-5: for them the bound is 1e-5 plus 1e-6 of the value (8 ulps of float32).
    scale = max(logps.chosen.abs().max().item(), logps.rejected.abs().max().item())
    print(f"largest |logp| {scale:.1f}")
    for name, d in diffs.items():
        tol = 1e-5 + (1e-6 * scale if "logps" in name else 0.0)
        assert d <= tol, f"{name}: max abs diff {d:.3e} > {tol:.3e}"


def test_trajectory_equals_trl_log_history(tokenizer, tiny_llama_dir, tmp_path, record_property):
    """5 optimizer steps, grad accumulation 2, in-order data, same LoRA init, AdamW and schedule."""
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5, learning_rate=5e-3,
                    lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0, weight_decay=0.0)
    with use_cpu_kernel():
        trainer = trl_trainer(tokenizer, tmp_path, **settings)
        perturb_lora(trainer.model, seed=2)
        trainer.train()
    trl_rows = [r for r in trainer.state.log_history if "rewards/chosen" in r]
    assert len(trl_rows) == 5

    history = run_ours(tiny_llama_dir, tmp_path, lora_seed=2, per_device_batch_size=2, grad_accum=2, max_steps=5,
                       learning_rate=5e-3, lr_scheduler="linear", warmup_steps=1, max_grad_norm=1.0)

    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "grad_norm", "learning_rate")
    worst = {}
    for ours, theirs in zip(history, trl_rows):
        for k in keys:
            rel = abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-8)
            worst[k] = max(worst.get(k, 0.0), rel if abs(theirs[k]) > 1e-6 else abs(ours[k] - theirs[k]))
    record_property("max_rel_diff", json.dumps(worst))
    print(f"\nmax relative differences over 5 steps vs TRL log_history: {worst}")
    # The run must move: rewards leave zero and the loss changes.
    assert abs(history[-1]["rewards/margins"]) > 1e-3
    assert history[0]["loss"] != history[-1]["loss"]
    for k, d in worst.items():
        assert d <= 1e-4, f"{k}: max relative diff {d:.3e} > 1e-4"


def test_starting_adapter_is_the_reference_as_in_trl(tokenizer, tiny_llama_dir, tmp_path):
    """From a saved adapter, the reference is that adapter frozen (TRL: a PeftModel with ref_model=None)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    start = our_model(tokenizer, gradient_checkpointing=False)
    perturb_lora(start, seed=3)
    start.save_pretrained(tmp_path / "start")

    def trainable_copy():
        return PeftModel.from_pretrained(build_tiny_llama(len(tokenizer)), tmp_path / "start", is_trainable=True)

    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=MAX_LENGTH,
                     per_device_train_batch_size=4, max_steps=2, learning_rate=5e-3, logging_steps=1,
                     save_strategy="no", train_sampling_strategy="sequential", seed=0)
    with use_cpu_kernel():
        trainer = DPOTrainer(model=trainable_copy(), args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tokenizer)
        trainer.train()
    trl_rows = [r for r in trainer.state.log_history if "rewards/chosen" in r]

    built = []
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "ours"), device="cpu",
                      dtype="float32", max_length=MAX_LENGTH, per_device_batch_size=4, max_steps=2,
                      learning_rate=5e-3, shuffle=False, adapter=str(tmp_path / "start"))
    history = run(cfg, hooks=RunHooks(model_built=built.append))["history"]
    (model,) = built
    # Step 1: policy == reference, so every reward is exactly 0 (the adapter-off base would not give 0).
    assert history[0]["rewards/chosen"] == 0.0 and history[0]["rewards/rejected"] == 0.0
    assert abs(history[1]["rewards/margins"]) > 1e-4  # and then it moves
    # Only the "default" adapter trains; the reference copy stays as loaded.
    ref_after = {n: p for n, p in model.named_parameters() if ".ref." in n}
    saved = PeftModel.from_pretrained(build_tiny_llama(len(tokenizer)), tmp_path / "start")
    for n, p in saved.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(ref_after[n.replace(".default.", ".ref.")], p, rtol=0, atol=0)
    for ours, theirs in zip(history, trl_rows):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
            assert ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-6), k


def test_precomputed_reference_equals_trl_precompute(tokenizer, tiny_llama_dir, tmp_path):
    """--precompute-ref gives the same trajectory as TRL's precompute_ref_log_probs=True."""
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-3,
                    precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    with use_cpu_kernel():
        trainer = trl_trainer(tokenizer, tmp_path, **settings)
        perturb_lora(trainer.model, seed=4)
        trainer.train()
    trl_rows = [r for r in trainer.state.log_history if "rewards/chosen" in r]

    history = run_ours(tiny_llama_dir, tmp_path, lora_seed=4, per_device_batch_size=2, grad_accum=2, max_steps=3,
                       learning_rate=5e-3, precompute_ref=True, precompute_ref_batch_size=5)
    ref_cache = load_file(str(latest_checkpoint(tmp_path / "ours") / "ref_logps.safetensors"))["ref_logps"]
    assert ref_cache.shape == (len(ROWS), 2)
    for a, b in zip(history, trl_rows):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
