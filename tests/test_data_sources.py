"""Where data comes from: the one local-path rule, the one DataSpec builder, the data CLI's defaults
(the same as training's), and the progress bar long data work shows."""

from __future__ import annotations

import argparse
import io
import json
import time

import pytest

from dpo import cli, progress
from dpo.data import pairs as data
from dpo.data.sources import looks_local
from dpo.data import cli as data_cli
from dpo.data import sources
from dpo.data.sources import DataError, DataSpec, looks_local


@pytest.mark.parametrize("path", ["./x", "../x", "/abs/x", "~/x", "x.jsonl", "X.JSONL.GZ", "dir/x.parquet",
                                  "a/b/c"])
def test_paths_that_look_local_even_when_missing(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of these names exists here
    assert looks_local(path)


@pytest.mark.parametrize("name", ["org/name", "name", "HuggingFaceH4/ultrafeedback_binarized", "Anthropic/hh-rlhf"])
def test_hub_names_are_not_local(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local(name)


def test_an_existing_file_or_folder_is_local_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs").write_text("")  # no suffix, no leading ./: a hub name if it did not exist
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert looks_local("prefs") and looks_local("org/name")
    assert not looks_local("other")


def test_one_rule_everywhere_in_the_data_modules():
    assert looks_local is sources.looks_local


def test_a_missing_deep_path_is_reported_missing_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path went to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^runs/data/prefs: no such file or folder$"):
        sources.load_rows(DataSpec("runs/data/prefs"))


# --- DataSpec.from_config ----------------------------------------------------------------------


def train_config(**kw):
    from dpo.config import TrainConfig

    return TrainConfig(**kw)


def test_data_spec_from_a_train_config_carries_every_data_field():
    cfg = train_config(dataset="org/prefs", dataset_split="test", dataset_config="small", prompt_column="q",
                       chosen_column="good", rejected_column="bad", implicit_prompt="trl")
    assert DataSpec.from_config(cfg) == DataSpec("org/prefs", split="test", config="small", prompt_column="q",
                                                 chosen_column="good", rejected_column="bad", implicit_prompt="trl")


def test_data_spec_for_another_path_keeps_columns_but_not_the_split_of_dataset():
    cfg = train_config(dataset="org/prefs", dataset_split="test", dataset_config="small", chosen_column="good",
                       implicit_prompt="trl", eval_dataset="held_out.jsonl")
    spec = DataSpec.from_config(cfg, path=cfg.eval_dataset)
    assert spec == DataSpec("held_out.jsonl", chosen_column="good", implicit_prompt="trl")


def test_data_spec_from_a_namespace_with_some_fields_takes_defaults_for_the_rest():
    assert DataSpec.from_config(argparse.Namespace(dataset="d.jsonl", chosen_column="a")) == \
        DataSpec("d.jsonl", chosen_column="a")


def test_data_spec_without_a_dataset_is_one_clear_error():
    with pytest.raises(DataError, match=r"^no dataset given \(--dataset\)$"):
        DataSpec.from_config(argparse.Namespace(dataset=None))


def test_data_spec_from_config_loads_the_rows_the_flags_name(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "2+2=", "good": "4", "bad": "5"}) + "\n")
    cfg = train_config(dataset=str(path), prompt_column="q", chosen_column="good", rejected_column="bad")
    rows = sources.load_rows(DataSpec.from_config(cfg))
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [("2+2=", "4", "5")]


# --- the data CLI's defaults are training's ------------------------------------------------------


def test_data_cli_max_length_default_is_trainings():
    from dpo.config import TrainConfig

    args = data_cli.build_parser().parse_args(["--dataset", "d.jsonl"])
    assert args.max_length == data.DEFAULT_MAX_LENGTH == TrainConfig().max_length == 1024
    assert data_cli.build_parser().parse_args(["--dataset", "d.jsonl", "--max-length", "none"]).max_length is None


def test_optional_converter():
    parse = cli.optional(int)
    assert parse("none") is None and parse("NULL") is None and parse("12") == 12
    with pytest.raises(ValueError):
        parse("ten")
    p = cli.Parser(prog="p")
    p.add_argument("--n", type=cli.optional(int), default=3)
    assert p.parse_args([]).n == 3 and p.parse_args(["--n", "None"]).n is None


def test_optional_converter_error_names_the_type(capsys):
    p = cli.Parser(prog="p")
    p.add_argument("--n", type=cli.optional(int))
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "ten"])
    assert e.value.code == 2 and capsys.readouterr().err == "p: error: argument --n: invalid int value: 'ten' (see --help)\n"


# --- progress on long work -----------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal_and_for_quick_work(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    off_terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", off_terminal)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    assert list(progress.iterate(range(3), desc="tokenizing")) == [0, 1, 2]
    assert off_terminal.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(progress, "DELAY_S", 60.0)
    assert list(progress.iterate(range(3), desc="tokenizing")) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_progress_shows_a_bar_on_a_terminal_once_work_is_slow(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(progress, "DELAY_S", 0.05)

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    assert list(progress.iterate(slow(), desc="tokenizing", unit="pair", total=3)) == [0, 1, 2]
    assert "tokenizing" in terminal.getvalue() and "pair" in terminal.getvalue()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert list(progress.iterate(slow(), desc="tokenizing", total=3)) == [0, 1, 2] and quiet.getvalue() == ""
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("RANK", "1")  # a second torchrun process: the first one draws the bar
    assert list(progress.iterate(slow(), desc="tokenizing", total=3)) == [0, 1, 2] and quiet.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    assert list(progress.iterate(slow(), desc="tokenizing", total=3)) == [0, 1, 2] and "tokenizing" in quiet.getvalue()


def test_tokenizing_rows_goes_through_the_progress_bar(monkeypatch, tmp_path):
    seen = []

    def spy(iterable, **kw):
        seen.append(kw["desc"])
        return iterable

    monkeypatch.setattr(data, "progress", spy)
    monkeypatch.setattr(sources, "progress", spy)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    rows = sources.load_rows(DataSpec(str(path)))

    class Tok:
        eos_token, bos_token_id = "</s>", None

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    data.process_rows(Tok(), rows, None)
    assert seen == ["reading d.jsonl", "checking rows", "tokenizing"]
