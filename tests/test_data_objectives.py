"""`python -m dpo.data --loss-type simpo|cpo|orpo|kto`: the report counts what that objective's own
tokenization (the one training uses, dpo.build.load_training_pairs) keeps, drops and cuts."""

from __future__ import annotations

import json

import pytest

from dpo.data import pairs as data
from dpo.data.cli import main as data_main
from dpo.build import load_training_pairs
from dpo.config import TrainConfig
from dpo.data.objective_rows import tokenize_sided
from dpo.data.sources import PreferenceRow

from .conftest import write_jsonl

RECORDS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green, obviously, and more words."},
           {"prompt": "Say it twice:", "chosen": " it it", "rejected": " it it"},
           {"prompt": "A long question " * 8, "chosen": " Yes.", "rejected": " No."}]
MAX_LENGTH = 12


@pytest.fixture
def cli(monkeypatch, tokenizer, capsys):
    monkeypatch.setattr(data, "load_tokenizer", lambda model: tokenizer)

    def run(*args):
        code = data_main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.mark.parametrize("objective", ["simpo", "cpo", "orpo"])
def test_sided_report_drops_pairs_whose_prompt_fills_max_length_and_counts_cuts(objective, cli, tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    code, printed, _ = cli("--dataset", src, "--loss-type", objective, "--max-length", MAX_LENGTH, "--out", out)
    assert code == 0
    cut = [tokenize_sided(tokenizer, PreferenceRow(**r, row_id=i), MAX_LENGTH) for i, r in enumerate(RECORDS)]
    full = [tokenize_sided(tokenizer, PreferenceRow(**r), None) for r in RECORDS]
    emptied = [not a.chosen_ids or not a.rejected_ids for a in cut]
    assert emptied == [False, False, True]  # the long prompt fills max_length: no completion token is left
    chosen_cut = sum(len(a.chosen_ids) < len(b.chosen_ids) for a, b, e in zip(cut, full, emptied) if not e)
    rejected_cut = sum(len(a.rejected_ids) < len(b.rejected_ids) for a, b, e in zip(cut, full, emptied) if not e)
    assert rejected_cut >= 1
    assert (f"data: {src} (for --loss-type {objective})\nrows read: 3\nkept: 2 pairs\ndropped: 1\n"
            "  prompt_fills_max_length: 1\n") in printed
    assert f"max_length {MAX_LENGTH}: completions cut (chosen {chosen_cut}, rejected {rejected_cut})\n" in printed
    kept, _ = load_training_pairs(TrainConfig(dataset=str(src), loss_type=[objective], max_length=MAX_LENGTH),
                                  tokenizer)
    assert kept == cut[:2]  # what training keeps, cut as TRL cuts
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["rejected_tokens"] for x in lines] == [len(b.rejected_ids) for b in full]
    assert [x["dropped_reason"] for x in lines] == [None, None, "prompt_fills_max_length"]


def test_kto_report_counts_unpaired_rows_and_drops(cli, tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    code, printed, _ = cli("--dataset", src, "--loss-type", "kto", "--max-length", MAX_LENGTH)
    assert code == 0
    kept, _ = load_training_pairs(TrainConfig(dataset=str(src), loss_type=["kto"], shuffle=False,
                                              max_length=MAX_LENGTH), tokenizer)
    assert len(kept) == 4  # the long prompt's two rows are dropped, as training (and TRL) drop them
    assert ("rows read: 3\nunpaired rows (each pair: a desirable and an undesirable row): 6\nkept: 4 rows\n"
            "dropped: 2\n  prompt_fills_max_length: 2\ndesirable (label true): 2, undesirable (label false): 2\n"
            ) in printed


def test_kto_report_reads_unpaired_rows(cli, tmp_path):
    rows = [{"prompt": "Hi", "completion": " hello", "label": True},
            {"prompt": "Hi", "completion": " go away", "label": False},
            {"prompt": "Why?", "completion": " because", "label": True}]
    out = tmp_path / "out.jsonl"
    code, printed, _ = cli("--dataset", write_jsonl(tmp_path / "rows.jsonl", rows), "--loss-type", "kto",
                           "--out", out)
    assert code == 0 and "rows read: 3\nkept: 3 rows\n" in printed
    assert "desirable (label true): 2, undesirable (label false): 1" in printed
    assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == [True, False, True]


@pytest.mark.parametrize("bad, problem", [({"prompt": "x", "completion": "y", "label": "yes"}, "label must be true"),
                                          ({"prompt": "x", "completion": "y"}, "no 'label' column")])
def test_bad_kto_label_is_one_line_naming_file_and_row(bad, problem, cli, tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b", "label": True}, bad])
    code, printed, err = cli("--dataset", src, "--loss-type", "kto")
    assert code == 2 and printed == ""
    assert err.startswith(f"dpo.data: error: {src} line 2: ") and problem in err and err.count("\n") == 1


def test_dpo_only_flags_are_refused_with_an_objective(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    with pytest.raises(SystemExit) as e:
        cli("--dataset", src, "--loss-type", "orpo", "--max-prompt-length", "4")
    assert e.value.code == 2
