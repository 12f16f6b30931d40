"""dpo.data.objective_rows on real HH-RLHF rows against TRL 1.15's own processing for KTO, CPO and ORPO,
at two max lengths. TRL's code runs as plain functions on a stub `self` (no model, no trainer)."""

from __future__ import annotations

import types

import pytest

from dpo.data import pairs as data
from dpo.data.sources import DataSpec, load_rows
from dpo.data.objective_rows import (kl_completions, kto_keeps, sided_keeps, tokenize_sided, tokenize_unpaired,
                                     unpair_rows)

from .conftest import HH_HELPFUL, require_file

MAX_LENGTHS = (128, 1024)
EVERY = 12  # every 12th row of the file keeps the suite fast (about 190 pairs)


@pytest.fixture(scope="module")
def hh_rows():
    rows = load_rows(DataSpec(path=str(require_file(HH_HELPFUL)), implicit_prompt="trl"))
    return [r for i, r in enumerate(rows) if i % EVERY == 0]


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_kto_rows_equal_trl_prepare_dataset(tok, hh_rows, max_length):
    from datasets import Dataset
    from trl import KTOTrainer

    stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, per_device_train_batch_size=4)
    raw = Dataset.from_list([{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in hh_rows])
    theirs = KTOTrainer._prepare_dataset(stub, raw, tok, args, "train")

    rows = [t for t in (tokenize_unpaired(tok, u) for u in unpair_rows(hh_rows)) if kto_keeps(t, max_length)]
    assert len(rows) == len(theirs)
    if max_length == 128:
        assert len(rows) < 2 * len(hh_rows), "no prompt filled max_length: the drop rule went untested"
    assert [r.prompt_ids for r in rows] == theirs["prompt_ids"]
    assert [r.completion_ids for r in rows] == theirs["completion_ids"]
    assert [r.label for r in rows] == theirs["label"]
    assert kl_completions([r.completion_ids for r in rows], 4) == theirs["KL_completion_ids"]


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_cpo_orpo_tokenization_equals_trl_tokenize_row(tok, hh_rows, max_length):
    from accelerate import PartialState
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    PartialState()  # TRL's warning about an emptied completion logs through accelerate, which needs its state
    cut = emptied = 0
    for trainer_cls in (CPOTrainer, ORPOTrainer):
        stub = types.SimpleNamespace(processing_class=tok, max_length=max_length, is_encoder_decoder=False)
        stub.build_tokenized_answer = types.MethodType(trainer_cls.build_tokenized_answer, stub)
        for row in hh_rows:
            theirs = trainer_cls.tokenize_row(stub, {"prompt": row.prompt, "chosen": row.chosen,
                                                     "rejected": row.rejected})
            ours = tokenize_sided(tok, row, max_length)
            for side in ("chosen", "rejected"):
                prompt, answer = getattr(ours, f"{side}_prompt_ids"), getattr(ours, f"{side}_ids")
                assert prompt + answer == theirs[f"{side}_input_ids"], (row.where, side)
                assert [-100] * len(prompt) + answer == theirs[f"{side}_labels"], (row.where, side)
                cut += len(prompt) + len(answer) == max_length
            # TRL keeps a pair its cut leaves with no completion token (the loss's mean is then 0/0); we drop
            # exactly those pairs, on purpose, as DPO and KTO drop theirs
            empty = any(all(t == -100 for t in theirs[f"{side}_labels"]) for side in ("chosen", "rejected"))
            assert sided_keeps(tokenize_sided(tok, row, None), max_length) is not empty, row.where
            emptied += empty
    if max_length == 128:
        assert cut > 0, "no row reached max_length: the truncation rule went untested"
        assert emptied > 0, "no prompt filled max_length: the drop rule went untested"


def test_conversational_pairs_render_as_trl_apply_chat_template(tok):
    from trl.data_utils import maybe_apply_chat_template

    from dpo.data.sources import PreferenceRow
    from dpo.data.objective_rows import render_chat_pair

    user = [{"role": "user", "content": "Name a colour."}]
    prefilled = user + [{"role": "assistant", "content": "Sure:"}]
    cases = [
        (user, [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "A car."}]),
        (prefilled, [{"role": "assistant", "content": " red"}], [{"role": "assistant", "content": " no"}]),
    ]
    for prompt, chosen, rejected in cases:
        theirs = maybe_apply_chat_template({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tok)
        ours = render_chat_pair(tok, PreferenceRow(prompt, chosen, rejected))
        assert (ours.prompt, ours.chosen, ours.rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
        assert ours.chosen  # a non-trivial reply survived the split
