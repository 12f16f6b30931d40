"""Prefix-shared micro-batches equal padded ones: log-probs and LoRA gradients on a tiny random Llama (CPU,
float32), the layout, the attention rule, and the tokens saved."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo import models, sharing
from dpo.data.pairs import TokenizedPair, collate
from tests.test_packing import VOCAB, logps_and_grads, lora_llama


@st.composite
def micro_batches(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(draw(st.integers(1, 8))), ids(draw(st.integers(1, 7))), ids(draw(st.integers(1, 7))), i)
             for i in range(draw(st.integers(1, 4)))]
    max_length = draw(st.one_of(st.none(), st.integers(2, 12)))  # truncation cuts some completions short
    return pairs, max_length


@settings(max_examples=40, deadline=None)
@given(micro_batches(), st.sampled_from(["sdpa", "eager"]), st.sampled_from(["full", "chunked"]), st.integers(1, 5),
       st.booleans())
def test_shared_equals_padded_values_and_lora_gradients(case, implementation, mode, chunk, one_row):
    """Both shared forms, a row per pair and every pair in one row (the form the flex route runs), under the
    dense mask that is their reference."""
    pairs, max_length = case
    model = lora_llama(implementation)
    batch = collate(pairs, pad_token_id=0, max_length=max_length)
    weights = torch.linspace(-1.0, 1.5, 2 * len(pairs))  # a different weight per side: gradients differ by side
    padded, padded_grads = logps_and_grads(model, lambda: models.completion_logps(model, batch, mode, chunk), weights)
    shared_batch = sharing.share_batch(batch, one_row=one_row)
    shared, shared_grads = logps_and_grads(
        model, lambda: sharing.shared_completion_logps(model, shared_batch, mode, chunk), weights)
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max().item() for g in padded_grads.values())
    for name, grad in padded_grads.items():  # float32 sums in another layout, against the largest gradient
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5 * scale + 1e-12, msg=name)


def test_shared_layout_positions_and_scored_tokens():
    pairs = [TokenizedPair([1, 5], [7, 8, 2], [9, 2], row_id=10), TokenizedPair([1], [4, 2], [6, 6, 6, 2], row_id=11)]
    shared = sharing.share_batch(collate(pairs, pad_token_id=0))
    assert shared.input_ids.tolist() == [[1, 5, 7, 8, 2, 9, 2], [1, 4, 2, 6, 6, 6, 2]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 3, 4]]
    assert shared.part.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, 2]]
    # the last prompt position scores the first token of both sides (flat positions: row x 7 + column)
    assert shared.predictor.tolist() == [1, 2, 3, 1, 5, 7, 8, 7, 10, 11, 12]
    assert shared.target.tolist() == [7, 8, 2, 9, 2, 4, 2, 6, 6, 6, 2]
    assert shared.sequence.tolist() == [0, 0, 0, 2, 2, 1, 1, 3, 3, 3, 3]
    assert (shared.num_pairs, shared.num_tokens, shared.row_ids) == (2, 14, [10, 11])
    assert sharing.segment_lengths(collate(pairs, pad_token_id=0)) == [7, 7]  # 14 tokens where unshared rows hold 17
    # a shorter pair is padded; its pads sit at position 0 (no position past the sides') and score nothing
    short = sharing.share_batch(collate(pairs + [TokenizedPair([3], [4], [5], row_id=12)], pad_token_id=0))
    assert short.part[2].tolist() == [0, 1, 2, -1, -1, -1, -1] and short.position_ids[2].tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert short.pair[2].tolist() == [2, 2, 2, -1, -1, -1, -1] and short.segments == [(2, 3, 2), (1, 2, 4), (1, 1, 1)]
    # one row: the pairs one after another, positions restarting at each prompt, predictors offset by it
    row = sharing.share_batch(collate(pairs, pad_token_id=0), one_row=True)
    assert row.input_ids.tolist() == [[1, 5, 7, 8, 2, 9, 2, 1, 4, 2, 6, 6, 6, 2]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3, 4]]
    assert row.pair.tolist() == [[0] * 7 + [1] * 7]
    assert row.predictor.tolist() == shared.predictor.tolist()  # 7 + column: the same flat positions here
    assert (row.target.tolist(), row.sequence.tolist()) == (shared.target.tolist(), shared.sequence.tolist())


def test_each_side_sees_the_prompt_and_itself_never_the_other_side():
    shared = sharing.share_batch(collate([TokenizedPair([1, 5], [7, 8], [9], 0), TokenizedPair([1], [2], [3], 1)],
                                         pad_token_id=0))
    allowed = sharing.attention_allowed(shared).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0],  # prompt
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],  # chosen
                          [1, 1, 1, 1, 0],
                          [1, 1, 0, 0, 1]]  # rejected: the prompt and itself
    assert allowed[1][3:] == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]  # a pad query sees itself only
    row = sharing.share_batch(collate([TokenizedPair([1, 5], [7, 8], [9], 0), TokenizedPair([1], [2], [3], 1)],
                                      pad_token_id=0), one_row=True)
    allowed = sharing.attention_allowed(row).int()[0]
    assert allowed[:5, :5].tolist() == [r[:5] for r in sharing.attention_allowed(shared).int()[0].tolist()]
    assert allowed[5:].tolist() == [[0, 0, 0, 0, 0, 1, 0, 0],  # the second pair: never the first pair's keys
                                    [0, 0, 0, 0, 0, 1, 1, 0],
                                    [0, 0, 0, 0, 0, 1, 0, 1]]


def test_changing_the_chosen_side_leaves_the_rejected_log_probs_alone():
    model = lora_llama("sdpa")
    one = sharing.share_batch(collate([TokenizedPair([3, 4, 5], [6, 7, 8], [9, 10], 0)], pad_token_id=0))
    two = sharing.share_batch(collate([TokenizedPair([3, 4, 5], [11, 12, 13, 14], [9, 10], 0)], pad_token_id=0))
    with torch.no_grad():
        a, b = (sharing.shared_completion_logps(model, s, "full") for s in (one, two))
    assert a[1].item() == pytest.approx(b[1].item(), abs=1e-6) and abs(a[0].item() - b[0].item()) > 1e-3


def test_a_pair_without_prompt_tokens_cannot_share():
    with pytest.raises(ValueError, match="no prompt token"):
        sharing.share_batch(collate([TokenizedPair([], [7, 8], [9], 0)], pad_token_id=0))


def test_a_model_that_honours_the_layout_passes_the_self_check():
    batch = collate([TokenizedPair([3, 4, 5], [6, 7], [9, 10, 11], 0), TokenizedPair([5], [6], [7], 1)], pad_token_id=0)
    agrees, diff = sharing.sharing_agrees(lora_llama("sdpa"), batch)
    assert agrees and diff < 1e-5


def test_a_prefix_shared_run_follows_the_padded_runs_trajectory_and_computes_fewer_tokens(tiny_llama_dir, tmp_path):
    """--prefix-sharing through dpo.train.run: 3 steps of grad accumulation 2 (reference precomputed in the
    same layout) equal the padded run's rows (float32, CPU), each prompt computed once."""
    from dpo.config import TrainConfig
    from dpo.train import run

    from .conftest import write_jsonl

    rows = [{"prompt": "Q " * (i % 5 + 3) + "?", "chosen": " yes" * (i % 3 + 1), "rejected": " no" * (i % 4 + 1)}
            for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def trajectory(name, **kw):
        cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / name), max_steps=3,
                          per_device_batch_size=2, grad_accum=2, learning_rate=5e-3, lora_r=4, max_length=32,
                          device="cpu", dtype="float32", shuffle=False, precompute_ref=True, **kw)
        return run(cfg)["history"]

    padded, shared = trajectory("padded", prefix_sharing="off"), trajectory("shared", prefix_sharing="on")
    real = [r["num_tokens"] - p for r, p in zip(padded, [0] + [r["num_tokens"] for r in padded])]  # num_tokens: a total
    for a, b, n in zip(padded, shared, real, strict=True):
        for k in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
        assert b["num_tokens"] == a["num_tokens"] and b["tokens_computed"] < n < a["tokens_computed"]
    assert padded[0]["loss"] != padded[-1]["loss"]


def test_prefix_sharing_on_for_an_objective_that_cannot_share_says_so(tiny_llama_dir, tmp_path, capsys):
    from dpo.config import TrainConfig
    from dpo.train import run

    from .conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q Q?", "chosen": " a", "rejected": " b"}] * 4)
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                      per_device_batch_size=2, lora_r=4, device="cpu", loss_type=["simpo"], prefix_sharing="on")
    history = run(cfg)["history"]
    assert "prefix sharing is off: it serves plain DPO loss types only" in capsys.readouterr().out
    assert history[0]["tokens_computed"] >= history[0]["num_tokens"]


def test_the_unsloth_backend_shares_through_its_kernel_where_its_forward_has_one(tok, capsys, monkeypatch):
    """On Unsloth the shared rows go through its shared-prefix kernel as one row (the "flex" route), after
    the same first-micro-batch self-check; a model whose Unsloth forward has no such kernel (here, attention
    logit softcapping) is not asked to share: auto says why, on is refused in one line."""
    from dpo.config import TrainConfig
    from dpo.trainer import Trainer

    asked_routes = []

    def agrees(*a, route, **k):
        asked_routes.append(route)
        return True, 0.0
    monkeypatch.setattr(sharing, "sharing_agrees", agrees)
    pairs = [TokenizedPair([3, 4, 5], [6, 7], [8], i) for i in range(4)]

    def trainer(asked, **config):
        model = lora_llama("sdpa")
        for k, v in config.items():
            setattr(models._causal_lm(model).config, k, v)
        t = Trainer(model, tok, TrainConfig(dataset="x", per_device_batch_size=2, prefix_sharing=asked), pairs)
        t.backend = "unsloth"  # the model stands in for Unsloth's: only the choice of layout is under test
        return t

    shared = trainer("auto")
    shared.choose_layout()
    assert asked_routes == ["flex"] and shared.scorer.sharing == "flex" and shared.scorer.layout == "shared"
    capped = trainer("auto", attn_logit_softcapping=50.0)
    capped.choose_layout()
    assert "prefix sharing is off: the shared-prefix kernel does not apply attention logit softcapping" in \
        capsys.readouterr().out
    assert capped.scorer.layout == "padded" and asked_routes == ["flex"]
    with pytest.raises(ValueError, match="--prefix-sharing on: the shared-prefix kernel does not apply"):
        trainer("on", attn_logit_softcapping=50.0).choose_layout()


def test_auto_runs_padded_when_the_model_cannot_switch_to_the_shared_route(tok, capsys, monkeypatch):
    """A model whose attention cannot become sdpa: auto says so and runs as before (the attention it was
    loaded with), never a refusal of a run with default flags."""
    from dpo import packing
    from dpo.config import TrainConfig
    from dpo.trainer import Trainer

    def refuse(model, route):
        raise ValueError("attention route sdpa: this model has no sdpa attention")
    monkeypatch.setattr(packing, "use_attention", refuse)
    model = lora_llama("eager")
    trainer = Trainer(model, tok, TrainConfig(dataset="x", per_device_batch_size=2),
                      [TokenizedPair([3, 4, 5], [6, 7], [8], i) for i in range(4)])
    trainer.backend = "hf"
    trainer.choose_layout()
    out = capsys.readouterr().out
    assert "prefix sharing is off: a forward of the prefix-shared layout failed: attention route sdpa" in out
    assert trainer.scorer.layout == "padded" and model.config._attn_implementation == "eager"


def test_the_plan_offers_shared_rows_on_unsloth_only_where_its_kernel_applies(tiny_llama_dir, tmp_path, monkeypatch):
    """A plan that counted shared rows for a model whose run then falls back to padded rows would have
    planned for far fewer tokens than run: on Unsloth the planner offers sharing only where the shared-prefix
    kernel applies (here a Llama, then the same model with attention logit softcapping)."""
    import json
    import shutil

    from dpo import build
    from dpo.config import TrainConfig

    monkeypatch.setattr(models, "pick_backend", lambda requested: "unsloth")
    items = [TokenizedPair(list(range(3, 300)), [5] * 40, [6] * 30, i) for i in range(16)]

    def planned(model_dir):
        cfg = TrainConfig(model=str(model_dir), dataset="x", memory_budget="40", per_device_batch_size=2,
                          grad_accum=4, max_length=1024)
        return build.plan_run(cfg, items, torch.device("cuda"), reference_free=False)[1]

    assert planned(tiny_llama_dir).choice.sharing == "flex"
    capped = tmp_path / "capped"
    shutil.copytree(tiny_llama_dir, capped)
    config = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    assert not any(k.choice.sharing for k in planned(capped).considered)


def test_unsloths_kernel_is_offered_only_to_forwards_it_computes_exactly():
    """The shared-prefix kernel applies the plain causal rule within each group and nothing else: a model
    outside the architectures whose Unsloth forward passes the table on, or with softcapping, attention
    dropout or a sliding window in use, runs unshared (each says why)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    from dpo import unsloth_prefix

    assert unsloth_prefix.unsupported(LlamaConfig()) is None
    assert unsloth_prefix.unsupported(Qwen3Config(sliding_window=4096, use_sliding_window=False)) is None
    assert unsloth_prefix.unsupported(MistralConfig(sliding_window=None)) is None  # Mistral v0.2 and later
    assert "no sliding window (this model attends 4096 tokens back)" in unsloth_prefix.unsupported(
        MistralConfig(sliding_window=4096))  # Mistral v0.1
    assert "covers llama" in unsloth_prefix.unsupported(Qwen2Config())
    assert "no attention dropout" in unsloth_prefix.unsupported(LlamaConfig(attention_dropout=0.1))
