"""Packed micro-batches equal padded ones: log-probs and LoRA gradients, on a tiny random Llama (CPU)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dpo import models, packing
from dpo.data.pairs import TokenizedPair, collate
from tests.conftest import build_tiny_llama

VOCAB = 40


@functools.lru_cache(maxsize=None)
def lora_llama(attn_implementation: str):
    """A tiny Llama with random (non-zero) LoRA A and B on every projection, float32."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(VOCAB, seed=3, attn_implementation=attn_implementation)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


@st.composite
def micro_batches(draw):
    pairs_n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(draw(st.integers(0, 7))),  # an empty prompt: a sequence may start scored
                           ids(draw(st.integers(1, 7))), ids(draw(st.integers(1, 7))), i)
             for i in range(pairs_n)]
    max_length = draw(st.one_of(st.none(), st.integers(2, 12)))  # truncation cuts some completions short
    return pairs, max_length


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def logps_and_grads(model, compute, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logps = compute()
    (logps * weights).sum().backward()
    return logps.detach(), lora_grads(model)


@settings(max_examples=40, deadline=None)
@given(micro_batches(), st.sampled_from(["sdpa", "eager"]), st.sampled_from(["full", "chunked"]),
       st.integers(1, 5))
# float32 noise of either layout is 7e-5 of the largest gradient here (against the same model in float64)
@example(([TokenizedPair([], [26], [38, 12, 31, 34, 14], 0),
           TokenizedPair([11, 20, 37, 34, 9], [25, 39, 33, 4, 27], [24, 7, 17, 37, 15, 30], 1)], None),
         "eager", "full", 1)
def test_packed_equals_padded_values_and_lora_gradients(case, implementation, mode, chunk):
    pairs, max_length = case
    model = lora_llama(implementation)
    batch = collate(pairs, pad_token_id=0, max_length=max_length)
    packed = packing.pack_batch(batch)
    weights = torch.linspace(-1.0, 1.5, 2 * len(pairs))  # a different weight per sequence: grads differ by row
    padded_logps, padded_grads = logps_and_grads(model, lambda: models.completion_logps(model, batch, mode, chunk),
                                                 weights)
    packed_logps, packed_grads = logps_and_grads(
        model, lambda: packing.packed_completion_logps(model, packed, mode, chunk), weights)
    torch.testing.assert_close(packed_logps, padded_logps, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys()
    # float32 rounding of sums in another layout, measured against the largest LoRA gradient (q/k
    # gradients are exactly 0 in theory where every query sees one key, and rounding noise in practice);
    # each layout alone is up to 7e-5 of it from a float64 run (the @example), a layout bug is of order 1
    scale = max(g.abs().max().item() for g in padded_grads.values())
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-4 * scale + 1e-12, msg=name)


def test_pack_layout():
    pairs = [TokenizedPair([1, 5], [7, 8, 2], [9, 2], row_id=10), TokenizedPair([1], [4, 2], [6, 6, 6, 2], row_id=11)]
    packed = packing.pack_batch(collate(pairs, pad_token_id=0))
    assert packed.input_ids.tolist() == [[1, 5, 7, 8, 2, 1, 4, 2, 1, 5, 9, 2, 1, 6, 6, 6, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert packed.completion_mask.tolist() == [[0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1]]
    assert packed.cu_seqlens.tolist() == [0, 5, 8, 12, 17] and packed.cu_seqlens.dtype == torch.int32
    assert packed.seq_index.tolist() == [0] * 5 + [1] * 3 + [2] * 4 + [3] * 5
    assert (packed.max_seqlen, packed.num_pairs, packed.num_tokens, packed.row_ids) == (5, 2, 17, [10, 11])
    # the last token of a sequence never scores the first token of the next one
    assert packing.scored_positions(packed).tolist() == [
        False, True, True, True, False, True, True, False, False, True, True, False, True, True, True, True]
    assert packing.token_counts(collate(pairs, pad_token_id=0)) == (20, 17)


def test_a_sequence_that_starts_with_a_completion_is_not_scored_from_the_one_before():
    packed = packing.pack_pairs([TokenizedPair([], [7, 8], [9, 2], row_id=0)])
    assert packed.completion_mask.tolist() == [[1, 1, 1, 1]]
    assert packing.scored_positions(packed).tolist() == [True, False, True]


def test_pack_pairs_truncates_as_collate():
    pairs = [TokenizedPair([1, 2, 3], [4, 5, 6, 7], [8, 9], row_id=0)]
    packed = packing.pack_pairs(pairs, max_length=5)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 8, 9]]
    assert packed.cu_seqlens.tolist() == [0, 5, 10]


def test_pack_refuses_left_padding():
    batch = collate([TokenizedPair([1], [2, 3], [4], 0)], pad_token_id=0)
    batch.attention_mask = batch.attention_mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        packing.pack_batch(batch)


def test_sequences_do_not_see_each_other():
    """Changing the first sequence leaves the others' log-probs as they were (attention stays inside)."""
    model = build_tiny_llama(VOCAB, seed=1, attn_implementation="sdpa")
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10, 11], 0)]
    other = [TokenizedPair([5, 6, 7], [12, 13], [10, 11], 0)]
    with torch.no_grad():
        a = packing.packed_completion_logps(model, packing.pack_pairs(pairs), "full")
        b = packing.packed_completion_logps(model, packing.pack_pairs(other), "full")
    assert a[0] != b[0]
    assert a[1] == b[1]


def test_host_embedding_path_equals_device_path():
    model = build_tiny_llama(VOCAB, seed=2, attn_implementation="sdpa")
    packed = packing.pack_pairs([TokenizedPair([1, 4], [5, 6, 2], [7, 2], 0), TokenizedPair([3], [9, 2], [8, 8, 2], 1)])
    with torch.no_grad():
        plain = packing.packed_completion_logps(model, packed, "chunked", 2)
        model.set_input_embeddings(models.HostEmbedding(model.get_input_embeddings().weight))
        host = packing.packed_completion_logps(model, packed, "chunked", 2)
    torch.testing.assert_close(host, plain, rtol=0, atol=0)


@pytest.mark.parametrize("device, flash, flex, route", [
    ("cuda", True, True, "flash_varlen"),
    ("cuda", False, True, "sdpa"),  # FlexAttention only when asked for (it did not compile on the H200)
    ("cuda", False, False, "sdpa"),
    ("cpu", True, True, "sdpa"),
])
def test_attention_route_follows_what_is_installed(device, flash, flex, route):
    chosen = packing.choose_attention(device, has_flash_attn=flash, has_flex=flex)
    assert chosen.name == route and chosen.reason
    assert chosen.attn_implementation in packing.PACKING_IMPLEMENTATIONS


def test_asked_for_route_is_refused_with_one_line_when_missing():
    with pytest.raises(ValueError, match="flash-attn"):
        packing.choose_attention("cuda", has_flash_attn=False, has_flex=True, requested="flash_varlen")
    with pytest.raises(ValueError, match="unknown attention route"):
        packing.choose_attention("cpu", requested="magic")
    assert packing.choose_attention("cpu", requested="eager").attn_implementation == "eager"


def test_flash_gets_varlen_offsets_and_others_only_positions():
    packed = packing.pack_pairs([TokenizedPair([1], [2, 3], [4], 0)])
    flash = packing.forward_inputs(packed, "flash_attention_2")
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 5] and flash["max_length_k"] == 3
    assert flash["attention_mask"] is None
    assert set(packing.forward_inputs(packed, "sdpa")) == {"position_ids", "attention_mask", "use_cache"}


def test_model_without_a_known_attention_is_refused():
    model = build_tiny_llama(VOCAB)
    model.config._attn_implementation = "some_custom_kernel"
    with pytest.raises(ValueError, match="without --packing"):
        packing.check_model_can_pack(model)


def test_packing_self_check_agrees_on_a_model_that_keeps_sequences_apart_and_not_otherwise(monkeypatch):
    model = build_tiny_llama(VOCAB, seed=4, attn_implementation="sdpa")
    batch = collate([TokenizedPair([5, 6, 7], [8, 9, 10], [11, 12], 0), TokenizedPair([3, 4], [9, 9], [8], 1)], 0)
    agrees, diff = packing.packing_agrees(model, batch, rtol=1e-5)
    assert agrees and diff < 1e-5
    # a forward that ignores the restarts: every sequence sees the ones before it
    monkeypatch.setattr(packing, "forward_inputs", lambda packed, impl: {
        "position_ids": torch.arange(packed.num_tokens)[None], "attention_mask": None, "use_cache": False})
    agrees, diff = packing.packing_agrees(model, batch, rtol=1e-5)
    assert not agrees and diff > 1e-3


def test_use_attention_switches_a_loaded_peft_model():
    model = lora_llama.__wrapped__("eager")  # a fresh one: the cached models stay as they are
    assert packing.use_attention(model, packing.choose_attention("cpu")) == "sdpa"
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_packing_benchmark_harness_runs_on_cpu(tmp_path):
    """benchmarks.packing on the tiny shape (CPU): padded and packed rows, packing agrees, fewer tokens packed."""
    import json

    from benchmarks import packing as bench
    from benchmarks.workload import SHAPES, make_model

    make_model(SHAPES["tiny"], str(tmp_path / "tiny"), device="cpu")
    out = tmp_path / "packing.json"
    bench.main(["--shape", "tiny", "--model-dir", str(tmp_path / "tiny"), "--backend", "hf", "--device", "cpu",
                "--micro-batches", "2", "--pairs", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["packing"] for r in rows] == [False, True]
    assert all(r["agrees"] and r["predicted_peak_gib"] > 0 for r in rows)
    assert rows[1]["tokens_forward"] < rows[0]["tokens_forward"] and rows[1]["route"] == "sdpa"


# --- through the entry point python -m dpo.train calls ---------------------------------------------


def test_a_packed_run_follows_the_padded_runs_trajectory(tiny_llama_dir, tmp_path):
    """--packing through dpo.train.run: 3 steps of grad accumulation 2 equal the padded run's rows
    (float32, CPU), and the self-check left packing on."""
    from dpo.config import TrainConfig
    from dpo.train import run

    from .conftest import write_jsonl

    rows = [{"prompt": "Q " * (i % 5 + 1) + "?", "chosen": " yes" * (i % 3 + 1), "rejected": " no" * (i % 4 + 1)}
            for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)

    def trajectory(name, **kw):
        cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / name), max_steps=3,
                          per_device_batch_size=2, grad_accum=2, learning_rate=5e-3, lora_r=4, max_length=32,
                          device="cpu", dtype="float32", shuffle=False, **kw)
        return run(cfg)["history"]

    padded, packed = trajectory("padded", prefix_sharing="off"), trajectory("packed", packing=True, prefix_sharing="off")
    for a, b in zip(padded, packed, strict=True):
        for k in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
        assert b["num_tokens"] == a["num_tokens"]
    assert padded[0]["loss"] != padded[-1]["loss"]
    totals = [0] + [r["num_tokens"] for r in packed]  # num_tokens: a running total
    assert [r["tokens_computed"] for r in packed] == [b - a for a, b in zip(totals, totals[1:])]  # no pad tokens


def test_plan_on_the_cpu_prints_the_cpu_plan_and_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    from dpo import train

    from .conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": " a", "rejected": " b"}])
    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(out),
                       "--device", "cpu", "--plan"]) == 0
    assert "dpo: CPU plan: gradient checkpointing off (it fits" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_a_memory_budget_that_is_not_a_positive_number_is_refused_in_one_line(value, capsys, no_model_load):
    from dpo import train

    assert train.main(["--dataset", "x.jsonl", "--memory-budget", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dpo: error: --memory-budget: must be a number of GiB > 0, auto or none, got {value!r}"


def test_flags_set_away_from_their_default_fix_the_plans_choices():
    from dpo.build import user_fixed_choices
    from dpo.config import TrainConfig

    assert user_fixed_choices(TrainConfig()) == {}
    assert user_fixed_choices(TrainConfig(gradient_checkpointing=False, packing=True, logprob_chunk=128)) == {
        "checkpointing": "off", "packing": True, "logprob_chunk": 128}
