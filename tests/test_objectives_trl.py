"""The objectives beyond DPO (SimPO, CPO, ORPO, KTO, LD-DPO, WPO) against TRL 1.15's own trainers:
one batch on a tiny random Llama with the SmolLM2 tokenizer, CPU, float32; same LoRA weights on both
sides. TRL's trainer computes its loss, metrics and LoRA gradients; ours come from the pure functions
in dpo/losses.py, dpo/logps.py and dpo/data/objective_rows.py on the batch we shape ourselves
(and that batch must equal TRL's, token for token).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo import models
from dpo.data.sources import PreferenceRow
from dpo.data.pairs import collate
from dpo.logps import sequence_logps_from_hidden, sequence_logps_from_logits
from dpo.losses import PreferenceLogps
from dpo.losses import UnpairedLogps, chosen_nll, kto_kl_estimate
from dpo.loss_settings import LossSettings
from dpo.objectives import objective_for
from dpo.data.objective_rows import (
    collate_sided, collate_unpaired, kl_completions, kto_keeps, tokenize_sided, tokenize_unpaired, unpair_rows)
from dpo.logps import (
    completion_token_counts, ld_logps, ld_masks, mean_logps, nll_mask, wpo_pair_weights, wpo_sequence_weights, wpo_token_terms_from_logits, wpo_weights_from_hidden)

from .conftest import build_tiny_llama
from .test_trl_equivalence import LORA, MAX_LENGTH, ROWS, max_diff, our_model, our_pairs, perturb_lora, trl_trainer
from .trl_cpu_kernel import use_cpu_kernel

B = 4
TOL = 1e-5  # loss, metrics and gradients, absolute (as the DPO test); log-prob sums get 1e-6 of their size more


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=list(LORA.targets),
                      task_type="CAUSAL_LM")


def _common_args(tmp_path):
    return dict(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=MAX_LENGTH,
                per_device_train_batch_size=B, logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0)


class Forward:
    """Our policy forward on one batch: summed log-probs under any mask, by the full or chunked path."""

    def __init__(self, model, batch, path: str, no_grad: bool = False):
        self.model, self.batch, self.path = model, batch, path
        with torch.set_grad_enabled(not no_grad):
            if path == "full":
                self.logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    use_cache=False).logits
            else:
                lm = model.get_base_model()
                self.hidden = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False).last_hidden_state
                self.lm_head = lm.lm_head

    def sums(self, mask, rows=slice(None)):
        ids = self.batch.input_ids[rows]
        if self.path == "full":
            return sequence_logps_from_logits(self.logits[rows], ids, mask[rows])
        return sequence_logps_from_hidden(self.hidden[rows], self.lm_head, ids, mask[rows], chunk_size=7)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _trl_batch(trainer, rows: list[int]):
    """TRL's loss of the given training rows, backpropagated, from the shared non-zero LoRA start:
    (collated inputs, loss, LoRA gradients)."""
    perturb_lora(trainer.model, seed=1)
    trainer.model.train()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return inputs, loss, _grads(trainer.model)


def chunked_grad_tol(path: str, vocab: int, trl_grads: dict) -> float:
    """What the chunked path may add to the gradients' difference: it sums the vocabulary's V terms of each
    position in another order than TRL's full logits, and float32 rounding of such a sum grows as sqrt(V) u
    (u = 2^-24) of its size; twice that, of the largest gradient (measured: 0.3 of it, on an AMD EPYC; the
    full path stays within TOL)."""
    if path != "chunked":
        return 0.0
    return 2 * math.sqrt(vocab) * 2.0**-24 * max(g.abs().max().item() for g in trl_grads.values())


def _check(diffs, record_property, label, scale=0.0, beta=0.0, grad_tol=0.0):
    """Each difference within TOL; log-probs 1e-6 of their size more, rewards (beta x a difference of two
    log-probs) 2 beta of that, gradients `grad_tol` more (chunked_grad_tol)."""
    record_property("max_abs_diff", json.dumps(diffs))
    print(f"\n[{label}] max abs differences vs TRL: {diffs}")
    for name, d in diffs.items():
        tol = TOL
        if name.startswith("logps"):
            tol += 1e-6 * scale
        elif name.startswith("rewards/") and name != "rewards/accuracies":
            tol += 2 * beta * 1e-6 * scale
        elif name == "grad":
            tol += grad_tol
        assert d <= tol, f"{label} {name}: max abs diff {d:.3e} > {tol:.3e}"


def _backward_and_compare(out, logps, settings, model, trl_loss, theirs: dict, trl_grads: dict):
    """Backpropagate our loss `out` of `logps`: (our metrics row, max abs difference from TRL's loss, each
    metric and the LoRA gradients, our gradients)."""
    out.loss.backward()
    ours = objective_for(settings).batch_row(out, logps)
    diffs = {"loss": max_diff(out.loss.detach(), trl_loss.detach())}
    diffs.update(_compare_metrics(ours, theirs, objective_for(settings).metric_names[1:]))
    our_grads = _grads(model)
    diffs["grad"] = max(max_diff(our_grads[n], trl_grads[n]) for n in trl_grads)
    return ours, diffs, our_grads


def _compare_metrics(ours: dict, theirs: dict, names) -> dict:
    out = {}
    for name in names:
        assert name in theirs, f"TRL logged no {name}"
        assert name in ours, f"we computed no {name}"
        out[name] = abs(ours[name] - theirs[name])
    return out


# --- SimPO, CPO, ORPO --------------------------------------------------------------------------


def _cpo_like_trainer(kind, tokenizer, tmp_path, **cfg):
    from datasets import Dataset

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    torch.manual_seed(0)
    return Trainer(model=build_tiny_llama(len(tokenizer)), args=Config(**_common_args(tmp_path), **cfg),
                   train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer, peft_config=_peft_config())


CPO_CASES = {
    "simpo": (dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0),
              dict(loss_type="simpo", simpo_gamma=0.7, beta=2.0)),
    "cpo-simpo": (dict(loss_type="simpo", cpo_alpha=0.3, simpo_gamma=0.5, beta=2.0, label_smoothing=0.1),
                  dict(loss_type="simpo", cpo_alpha=0.3, simpo_gamma=0.5, beta=2.0, label_smoothing=0.1)),
    "cpo": (dict(loss_type="sigmoid", cpo_alpha=1.0, beta=0.1), dict(loss_type="cpo", beta=0.1)),
    "orpo": (dict(beta=0.2), dict(loss_type="orpo", beta=0.2)),
}


def _our_reference_free_loss(model, batch, settings, path):
    fwd = Forward(model, batch, path)
    cm = batch.completion_mask
    sums, counts = fwd.sums(cm), completion_token_counts(cm)
    pol = mean_logps(sums, counts) if settings.length_normalised else sums
    nll = None
    if settings.nll_weight > 0:
        mask = nll_mask(batch.attention_mask, cm, include_prompt=settings.nll_includes_prompt)
        nll = chosen_nll(fwd.sums(mask, slice(0, B)), completion_token_counts(mask[:B]))
    zeros = torch.zeros_like(pol[:B])
    logps = PreferenceLogps(pol[:B], pol[B:], zeros, zeros, counts[:B], counts[B:])
    return objective_for(settings).output(logps, nll=nll), logps, sums


@pytest.mark.parametrize("path", ["full", "chunked"])
@pytest.mark.parametrize("case", list(CPO_CASES))
def test_reference_free_objective_equals_trl(case, path, tokenizer, tmp_path, record_property):
    trl_cfg, ours_cfg = CPO_CASES[case]
    kind = "orpo" if case == "orpo" else "cpo"
    trainer = _cpo_like_trainer(kind, tokenizer, tmp_path, **trl_cfg)
    inputs, trl_loss, trl_grads = _trl_batch(trainer, list(range(B)))
    theirs = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    concat = trainer.concatenated_inputs(inputs, padding_value=tokenizer.pad_token_id)

    settings = LossSettings(**ours_cfg)
    pairs = [tokenize_sided(tokenizer, PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i), MAX_LENGTH)
             for i, r in enumerate(ROWS[:B])]
    batch = collate_sided(pairs, tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids, concat["concatenated_input_ids"])
    assert torch.equal(batch.attention_mask, concat["concatenated_attention_mask"])
    assert torch.equal(batch.completion_mask.bool(), concat["concatenated_labels"] != -100)

    model = our_model(tokenizer)
    perturb_lora(model, seed=1)
    model.train()
    out, logps, _ = _our_reference_free_loss(model, batch, settings, path)
    ours, diffs, our_grads = _backward_and_compare(out, logps, settings, model, trl_loss, theirs, trl_grads)
    assert set(our_grads) == set(trl_grads)
    assert abs(ours["rewards/margins"]) > 1e-3 and max(g.abs().max() for g in our_grads.values()) > 1e-4
    _check(diffs, record_property, f"{case}/{path}", scale=max(abs(ours["logps/chosen"]), abs(ours["logps/rejected"])),
           beta=settings.beta, grad_tol=chunked_grad_tol(path, len(tokenizer), trl_grads))


# --- KTO ---------------------------------------------------------------------------------------


def _kto_trainer(tokenizer, tmp_path, **cfg):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    args = KTOConfig(**_common_args(tmp_path), train_sampling_strategy="sequential", **cfg)
    return KTOTrainer(model=build_tiny_llama(len(tokenizer)), args=args, train_dataset=Dataset.from_list(ROWS),
                      processing_class=tokenizer, peft_config=_peft_config())


def _our_kto_rows(tokenizer):
    pairs = [PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(ROWS)]
    rows = [t for t in (tokenize_unpaired(tokenizer, u) for u in unpair_rows(pairs)) if kto_keeps(t, MAX_LENGTH)]
    return rows, kl_completions([r.completion_ids for r in rows], B)


@pytest.mark.parametrize("path", ["full", "chunked"])
def test_kto_equals_trl(path, tokenizer, tmp_path, record_property):
    weights = dict(desirable_weight=1.3, undesirable_weight=0.7)
    with use_cpu_kernel():
        trainer = _kto_trainer(tokenizer, tmp_path, beta=0.5, **weights)
        data = trainer.train_dataset
        pick = [6, 7, 8, 9]  # two desirable rows, two undesirable, from two KL rotation blocks
        inputs, trl_loss, trl_grads = _trl_batch(trainer, pick)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    rows, kl_ids = _our_kto_rows(tokenizer)
    assert [r.prompt_ids for r in rows] == data["prompt_ids"]
    assert [r.completion_ids for r in rows] == data["completion_ids"]
    assert kl_ids == data["KL_completion_ids"] and [r.label for r in rows] == data["label"]
    ub = collate_unpaired([rows[i] for i in pick], tokenizer.pad_token_id, MAX_LENGTH, [kl_ids[i] for i in pick])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(ub.batch, key), inputs[key]), key
        assert torch.equal(getattr(ub.kl_batch, key), inputs[f"KL_{key}"]), key

    model = our_model(tokenizer)
    perturb_lora(model, seed=1)
    model.train()
    logps = Forward(model, ub.batch, path).sums(ub.batch.completion_mask)
    kl_logps = Forward(model, ub.kl_batch, path, no_grad=True).sums(ub.kl_batch.completion_mask)
    with torch.no_grad(), models.reference_mode(model):
        ref = Forward(model, ub.batch, path).sums(ub.batch.completion_mask)
        ref_kl = Forward(model, ub.kl_batch, path).sums(ub.kl_batch.completion_mask)
    settings = LossSettings(loss_type="kto", beta=0.5, kto_desirable_weight=1.3, kto_undesirable_weight=0.7)
    unpaired = UnpairedLogps(logps, ref, ub.desirable, kto_kl_estimate(kl_logps, ref_kl))
    out = objective_for(settings).output(unpaired)
    ours, diffs, _ = _backward_and_compare(out, unpaired, settings, model, trl_loss, theirs, trl_grads)
    assert ours["kl"] > 1e-3, "the KL estimate must be non-zero for the check to mean something"
    assert abs(ours["rewards/margins"]) > 1e-3
    _check(diffs, record_property, f"kto/{path}", scale=max(abs(ours["logps/chosen"]), abs(ours["logps/rejected"])),
           beta=settings.beta, grad_tol=chunked_grad_tol(path, len(tokenizer), trl_grads))


# --- LD-DPO and WPO (DPOTrainer options) --------------------------------------------------------


@pytest.mark.parametrize("path", ["full", "chunked"])
@pytest.mark.parametrize("option", ["ld_alpha", "use_weighting"])
def test_dpo_option_equals_trl(option, path, tokenizer, tmp_path, record_property):
    trl_opt = {"ld_alpha": dict(ld_alpha=0.3), "use_weighting": dict(use_weighting=True)}[option]
    with use_cpu_kernel():
        trainer = trl_trainer(tokenizer, tmp_path, **trl_opt)
        inputs, trl_loss, trl_grads = _trl_batch(trainer, list(range(B)))
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    batch = collate(our_pairs(tokenizer)[:B], tokenizer.pad_token_id, MAX_LENGTH)
    model = our_model(tokenizer)
    perturb_lora(model, seed=1)
    model.train()
    settings = LossSettings(beta=0.1, **trl_opt)
    cm = batch.completion_mask
    fwd = Forward(model, batch, path)
    with torch.no_grad(), models.reference_mode(model):
        ref_fwd = Forward(model, batch, path)
    pair_weights = None
    if option == "ld_alpha":
        shared, tail = ld_masks(cm)
        pol = ld_logps(fwd.sums(shared), fwd.sums(tail), settings.ld_alpha)
        ref = ld_logps(ref_fwd.sums(shared), ref_fwd.sums(tail), settings.ld_alpha)
    else:
        pol, ref = fwd.sums(cm), ref_fwd.sums(cm)
        if path == "full":
            weights = wpo_sequence_weights(*wpo_token_terms_from_logits(fwd.logits, batch.input_ids), cm)
        else:
            weights = wpo_weights_from_hidden(fwd.hidden, fwd.lm_head, batch.input_ids, cm, chunk_size=7)
        pair_weights = wpo_pair_weights(weights)
        assert (pair_weights - 1).abs().max() > 1e-3  # weights far from 1, or the check proves nothing
    counts = completion_token_counts(cm)
    logps = PreferenceLogps(pol[:B], pol[B:], ref[:B], ref[B:], counts[:B], counts[B:])
    out = objective_for(settings).output(logps, pair_weights=pair_weights)
    ours, diffs, _ = _backward_and_compare(out, logps, settings, model, trl_loss, theirs, trl_grads)
    assert abs(ours["rewards/margins"]) > 1e-3
    if option == "use_weighting":  # the weights make loss and gradients small: compare relative to their size
        grad_scale = max(g.abs().max().item() for g in trl_grads.values())
        print(f"WPO pair weights {pair_weights.tolist()}, loss {trl_loss.item():.3e}, largest grad {grad_scale:.3e}")
        diffs["loss_rel"] = diffs.pop("loss") / abs(trl_loss.item())
        diffs["grad_rel"] = diffs.pop("grad") / grad_scale
    _check(diffs, record_property, f"{option}/{path}", scale=max(abs(ours["logps/chosen"]), abs(ours["logps/rejected"])),
           beta=settings.beta, grad_tol=chunked_grad_tol(path, len(tokenizer), trl_grads))
