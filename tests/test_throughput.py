"""What a run costs in its own metrics (dpo.throughput): tokens and pairs per second, padding share, MFU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpo import throughput as T
from dpo.config import TrainConfig
from dpo.data.pairs import TokenizedPair, collate
from dpo.objectives import Scorer
from dpo.train import run

from .conftest import build_tiny_llama, write_jsonl

lengths_st = st.lists(st.integers(1, 300), min_size=1, max_size=12)


def test_padding_share_is_exact_on_a_known_batch():
    # rows: prompt 3 + chosen 2 = 5, 3 + 4 = 7 (chosen); 3 + 1 = 4, 3 + 6 = 9 (rejected): [4, 9] padded
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10], 0), TokenizedPair([5, 6, 7], [8, 9, 10, 11], [1, 2, 3, 4, 5, 6], 1)]
    batch = collate(pairs, pad_token_id=0)
    padded, packed, shared = T.StepTokens(), T.StepTokens(), T.StepTokens()
    for counted, layout in ((padded, {}), (packed, {"packing": True}), (shared, {"sharing": True})):
        scorer = Scorer(torch.device("cpu"), **layout)
        counted.add(*scorer.token_counts(batch))
    assert (padded.real, padded.computed, sorted(padded.lengths)) == (25, 36, [4, 5, 7, 9])
    assert T.padding_share(padded.real, padded.computed) == 11 / 36
    assert (packed.real, packed.computed) == (25, 25) and T.padding_share(packed.real, packed.computed) == 0.0
    # shared rows [prompt | chosen | rejected]: 3 + 2 + 1 = 6 and 3 + 4 + 6 = 13 real, 2 x 13 computed
    assert (shared.real, shared.computed, shared.lengths) == (19, 26, [6, 13])
    assert T.padding_share(shared.real, shared.computed) == 7 / 26


@given(st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=20), min_size=1, max_size=8))
def test_padding_share_counts_every_masked_position(rows):
    width = max(len(r) for r in rows)
    mask = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    counted = T.StepTokens()
    counted.add(mask.sum(dim=1).tolist(), mask.numel())
    share = T.padding_share(counted.real, counted.computed)
    assert 0.0 <= share <= 1.0
    assert share * mask.numel() == pytest.approx(int((mask == 0).sum()))


def test_padding_share_refuses_impossible_counts():
    with pytest.raises(ValueError, match="real <= computed"):
        T.padding_share(5, 4)


def test_step_flops_on_a_tiny_config_counted_by_hand():
    shape = T.FlopShape(layers=2, matmul_params=10, adapter_params=2, trainable=2, attention_width=3)
    # T = 5 tokens; attention per layer 2*3*(2*3 + 3*4) = 108, two layers: A = 216
    assert T.attention_flops([2, 3], width=3, layers=2) == 216
    forward = 2 * 12 * 5 + 216  # 336
    backward = 2 * 12 * 5 + 2 * 2 * 5 + 2 * 216  # 572
    reference = 2 * 10 * 5 + 216  # 316
    assert T.step_flops(shape, [2, 3], reference_forward=False) == forward + backward == 908
    assert T.step_flops(shape, [2, 3], reference_forward=True) == 908 + reference == 1224


@given(lengths_st, lengths_st, st.booleans())
def test_step_flops_add_up_over_sequences_and_a_live_reference_adds_one_forward(a, b, reference):
    shape = T.FlopShape(layers=3, matmul_params=1000, adapter_params=40, trainable=40, attention_width=16)
    both = T.step_flops(shape, a + b, reference)
    assert both == pytest.approx(T.step_flops(shape, a, reference) + T.step_flops(shape, b, reference), rel=1e-12)
    extra = T.step_flops(shape, a, True) - T.step_flops(shape, a, False)
    assert extra == pytest.approx(2 * 1000 * sum(a) + T.attention_flops(a, 16, 3), rel=1e-12)


def test_flop_shape_from_config_matches_a_flop_counter_on_the_tiny_llama():
    """The matmul parameters read from the config are what one forward multiplies: torch's FlopCounterMode on
    the tiny Llama with eager attention (counted as the full square, 4 x width x n^2 per layer, not the causal
    half) and rotary's one matmul (the inverse frequencies times the positions: 2 x head_dim / 2 x n)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_tiny_llama(vocab_size=64, attn_implementation="eager").eval()
    shape = T.FlopShape.from_config(model.config, adapter_params=0, trainable=0)
    assert shape.matmul_params == 2 * (16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 32) + 64 * 16
    n = 11
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.arange(n)[None])
    full_square, rotary = shape.layers * 4 * shape.attention_width * n * n, 2 * (8 // 2) * n
    assert counter.get_total_flops() == 2 * shape.matmul_params * n + full_square + rotary


def test_peaks_by_card_name():
    assert T.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert T.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert T.peak_flops("NVIDIA H200") == 989e12
    assert T.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert T.peak_flops("NVIDIA L40S") == 362e12
    assert T.peak_flops("NVIDIA L4") == 121e12
    assert T.peak_flops("Some Future GPU") is None


def test_mfu_on_cuda_is_flops_over_time_and_peak_and_omitted_for_an_unknown_card(monkeypatch, capsys):
    model = build_tiny_llama(vocab_size=64)
    counted = T.StepTokens()
    counted.add([3, 2], 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cost = T.StepCost(model, torch.device("cuda"))
    fields = cost.fields(counted, step_tokens=5, pairs=1, seconds=0.5, reference_forward=True)
    assert fields["mfu"] == T.step_flops(cost.shape, [3, 2], True) / (0.5 * 989e12)
    assert fields["tokens_per_second"] == 10 and fields["pairs_per_second"] == 2 and fields["padding_share"] == 3 / 8
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    unknown = T.StepCost(model, torch.device("cuda"))
    assert "mfu" not in unknown.fields(counted, 5, 1, 0.5, True)
    assert capsys.readouterr().out.count("no dense bf16 peak known for 'Some Future GPU'") == 1
    assert "mfu" not in T.StepCost(model, torch.device("cpu")).fields(counted, 5, 1, 0.5, True)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_every_training_row_says_what_the_step_cost(tiny_llama_dir, tmp_path, layout):
    rows = [{"prompt": "Q " * (i % 5 + 1) + "?", "chosen": " yes" * (i % 3 + 1), "rejected": " no" * (i % 4 + 1)}
            for i in range(8)]
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                      output_dir=str(tmp_path / "run"), max_steps=2, per_device_batch_size=2, grad_accum=2,
                      lora_r=4, max_length=32, device="cpu", dtype="float32", packing=layout == "packed",
                      prefix_sharing="on" if layout == "shared" else "off")
    history = run(cfg)["history"]
    previous = 0
    for row in history:
        step_tokens, previous = row["num_tokens"] - previous, row["num_tokens"]
        assert row["tokens_per_second"] / row["pairs_per_second"] == pytest.approx(step_tokens / 4)
        assert row["tokens_per_second"] > 0 and "mfu" not in row
        assert (row["padding_share"] == 0) if layout == "packed" else (0 < row["padding_share"] < 1)
        assert (row["tokens_computed"] < step_tokens) if layout == "shared" else (row["tokens_computed"] >= step_tokens)
