"""Loading preference data: every file format, folders, hub names, column mapping, implicit prompts,
and one clear error (file, row or line, problem; exit code 2, no traceback) for each kind of bad input.

Nothing here needs a tokenizer except the few CLI runs that get past loading.
"""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpo.data import pairs as data
from dpo.data.cli import main as data_main
from dpo.data.prompts import extract_implicit_conversation, extract_implicit_prompt, trl_extract_prompt
from dpo.data.sources import Rows, load_rows
from dpo.data.sources import DataError, DataSpec, PreferenceRow

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Say, \"hi\"", "chosen": " hi,\nthere", "rejected": " no"},  # comma, quote, newline for CSV
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
]


def expected_rows(records=ROWS) -> list[PreferenceRow]:
    return [PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i) for i, r in enumerate(records)]


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_csv(path: Path, records) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def load(path, **kw) -> Rows:
    return load_rows(DataSpec(str(path), **kw))


def load_error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load(path, **kw)
    return str(e.value)


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json-data", "json-lines", "parquet", "csv"])
def test_every_file_format_gives_the_same_rows(tmp_path, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif kind == "jsonl.gz":
        path = write_jsonl(tmp_path / "d.jsonl.gz", ROWS, opener=gzip.open)
    elif kind == "json":
        (path := tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    elif kind == "json-data":
        (path := tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    elif kind == "json-lines":  # JSON Lines under a .json name, as HF datasets also accepts
        path = write_jsonl(tmp_path / "d.json", ROWS)
    elif kind == "parquet":
        path = write_parquet(tmp_path / "d.parquet", ROWS)
    else:
        path = write_csv(tmp_path / "d.csv", ROWS)
    rows = load(path)
    assert rows == expected_rows()
    assert rows.format == "text, explicit prompt"
    assert all(r.source == str(path) for r in rows)


def test_locations_name_lines_for_line_formats_and_rows_otherwise(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")  # blank lines skipped
    assert [r.location for r in load(path)] == ["line 2", "line 4"]
    csv_rows = load(write_csv(tmp_path / "d.csv", ROWS))
    assert [r.location for r in csv_rows] == ["line 2", "line 3", "line 5"]  # row 2 spans two lines
    assert [r.location for r in load(write_parquet(tmp_path / "d.parquet", ROWS))] == ["row 1", "row 2", "row 3"]


def test_folder_of_files_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:2])
    write_csv(tmp_path / "a.csv", ROWS[:1])
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "c.parquet", ROWS[2:])
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("not json")
    rows = load(tmp_path)
    assert rows == expected_rows()
    assert [Path(r.source).name for r in rows] == ["a.csv", "b.jsonl", "c.parquet"]
    assert [r.row_id for r in rows] == [0, 1, 2]


def test_folder_mixing_formats_across_files_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "b.jsonl", [{"chosen": DIALOGUE + " a", "rejected": DIALOGUE + " b"}])
    msg = load_error(tmp_path)
    assert "b.jsonl line 1: mixed formats" in msg and "a.jsonl line 1 is text, explicit prompt" in msg


def test_column_mapping(tmp_path):
    records = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "score": 1} for r in ROWS]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    rows = load(path, prompt_column="question", chosen_column="good", rejected_column="bad")
    assert rows == expected_rows()


def test_conversational_rows_load_from_jsonl_and_parquet(tmp_path):
    records = [{"prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}]
    for path in (write_jsonl(tmp_path / "c.jsonl", records), write_parquet(tmp_path / "c.parquet", records)):
        rows = load(path)
        assert rows.format == "conversation, explicit prompt"
        assert rows[0] == PreferenceRow(records[0]["prompt"], records[0]["chosen"], records[0]["rejected"], 0)


def test_hub_names_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"q": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                           for r in ROWS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load("someorg/prefs", split="test", config="small", prompt_column="q")
    assert calls == [("someorg/prefs", "small", "test")]
    assert rows == expected_rows()
    assert rows[1].where == "someorg/prefs (hub, split 'test', config 'small') row 2"


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("offline: no network here\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = load_error("someorg/prefs")
    assert msg.startswith("someorg/prefs (hub, split 'train'): cannot load (ConnectionError: offline")


def test_local_looking_missing_path_is_not_sent_to_the_hub(tmp_path):
    assert load_error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file or folder"
    assert load_error("./missing/folder") == "./missing/folder: no such file or folder"


# --- implicit prompts -------------------------------------------------------------------------

DIALOGUE = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:"


def test_implicit_prompt_ends_at_the_last_shared_assistant_marker():
    prompt, chosen, rejected = extract_implicit_prompt(DIALOGUE + " It is 6.", DIALOGUE + " It is 7.")
    assert (prompt, chosen, rejected) == (DIALOGUE, " It is 6.", " It is 7.")
    # TRL's rule puts the shared opening words in the prompt, less the trailing space.
    assert trl_extract_prompt(DIALOGUE + " It is 6.", DIALOGUE + " It is 7.") == (
        DIALOGUE + " It is", " 6.", " 7.")


def test_implicit_prompt_when_dialogues_differ_before_the_last_turn():
    """One reply holds an extra turn: the prompt is what both share, the extra turn stays in the completion."""
    chosen = DIALOGUE + " Six.\n\nAssistant: Anything else?"
    rejected = DIALOGUE + " No idea."
    assert extract_implicit_prompt(chosen, rejected) == (
        DIALOGUE, " Six.\n\nAssistant: Anything else?", " No idea.")


def test_trl_rule_copies_trls_quirks():
    from trl.data_utils import extract_prompt

    cases = [(DIALOGUE + " Same.", DIALOGUE + " Same."),  # identical: TRL leaves the last char out
             (DIALOGUE + " A", DIALOGUE + " A longer reply"),  # one is a prefix of the other
             (DIALOGUE + " Yes", DIALOGUE + " No")]
    for chosen, rejected in cases:
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert trl_extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_implicit_conversations():
    user = {"role": "user", "content": "Hi"}
    a1, a2 = {"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": "Bye"}
    follow = {"role": "user", "content": "More?"}
    assert extract_implicit_conversation([user, a1], [user, a2]) == ([user], [a1], [a2])
    # They share an assistant turn and differ later: the prompt ends before a turn both answer.
    assert extract_implicit_conversation([user, a1, follow, a1], [user, a1, follow, a2]) == (
        [user, a1, follow], [a1], [a2])
    # Identical conversations split before the last assistant turn (then dropped as identical pairs).
    assert extract_implicit_conversation([user, a1], [user, a1]) == ([user], [a1], [a1])


def test_hh_style_rows_load_with_an_implicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": DIALOGUE + " Six.", "rejected": DIALOGUE + " Seven."}])
    rows = load(path)
    assert rows.format == "text, implicit prompt (last_assistant)"
    assert rows[0] == PreferenceRow(DIALOGUE, " Six.", " Seven.", 0)
    assert load(path, implicit_prompt="trl")[0].prompt == DIALOGUE + " S"  # "Six"/"Seven" share "S"


# --- bad input: one clear error each ------------------------------------------------------------

GOOD = json.dumps(ROWS[0])


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, '{"prompt": "a", "chosen": "b",'], "line 2: invalid JSON (Expecting property name enclosed in double "
                                                "quotes at column 31)"),
    ([GOOD, "[1, 2]"], "line 2: expected an object with columns, got a list"),
    ([GOOD, json.dumps({"prompt": "a", "good": "b", "rejected": "c"})],
     "line 2: no 'chosen' column (set --chosen-column); columns here: prompt, good, rejected"),
    ([json.dumps({"prompt": "a", "chosen": "b"})],
     "line 1: no 'rejected' column (set --rejected-column); columns here: prompt, chosen"),
    ([GOOD, json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"})],
     "line 2: 'chosen' is a number; expected a string or a list of messages"),
    ([GOOD, json.dumps({"prompt": "a", "chosen": "b", "rejected": None})], "line 2: 'rejected' is null"),
    ([json.dumps({"prompt": "", "chosen": "b", "rejected": "c"})],
     "line 1: 'prompt' is empty (every completion token must follow a prompt token to be scored)"),
    ([json.dumps({"prompt": " \n", "chosen": "b", "rejected": "c"})], "line 1: 'prompt' is blank (only whitespace)"),
    ([GOOD, json.dumps({"chosen": DIALOGUE + " a", "rejected": DIALOGUE + " b"})],
     "line 2: mixed formats: this row is text, implicit prompt (last_assistant), but"),
    ([json.dumps({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"})],
     "line 1: mixes text and conversation fields (prompt is text, chosen is conversation, rejected is text)"),
    ([json.dumps({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant"}],
                  "rejected": [{"role": "assistant", "content": "c"}]})],
     "line 1: 'chosen' message 1 is not a {\"role\": str, \"content\": str} object (got {'role': 'assistant'})"),
    ([json.dumps({"prompt": [], "chosen": [], "rejected": []})], "line 1: 'prompt' is an empty list of messages"),
    ([json.dumps({**ROWS[0], "tools": [{"name": "f"}]})], "line 1: the 'tools' column is not supported"),
    ([json.dumps({"chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"})],
     "line 1: chosen and rejected share no '\\n\\nAssistant:' turn, so the prompt cannot be inferred"),
])
def test_bad_jsonl_rows(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    msg = load_error(path)
    assert msg.startswith(f"{path} "), msg
    assert expected in msg, msg


def test_mixed_text_and_conversation_rows(tmp_path):
    conv = {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
            "rejected": [{"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, json.dumps(conv)])
    assert load_error(path) == (f"{path} line 2: mixed formats: this row is conversation, explicit prompt, "
                                f"but {path} line 1 is text, explicit prompt")


def test_misnamed_prompt_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_error(path, prompt_column="question") == (
        f"{path} line 1: no 'question' column (--prompt-column); columns here: prompt, chosen, rejected")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, content):
    (path := tmp_path / "empty.jsonl").write_text(content)
    assert load_error(path) == f"{path}: the dataset is empty (no rows)"


def test_other_unreadable_inputs(tmp_path):
    (gz := tmp_path / "d.jsonl.gz").write_bytes(b"not gzip at all")
    assert load_error(gz).startswith(f"{gz}: cannot read the file (Not a gzipped file")
    (latin := tmp_path / "d.jsonl").write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9"}\n')
    assert load_error(latin) == f"{latin} line 2: not UTF-8 text (invalid continuation byte at byte 16 of the line)"
    (bad_json := tmp_path / "d.json").write_text('[{"prompt": "a",\n  "chosen": }]')
    assert load_error(bad_json) == f"{bad_json} line 2: invalid JSON (Expecting value at column 13)"
    (scalar := tmp_path / "s.json").write_text('"just a string"')
    assert load_error(scalar) == f"{scalar}: expected a JSON list of rows (or {{\"data\": [...]}}), got a string"
    (parquet := tmp_path / "d.parquet").write_bytes(b"PAR1 nope")
    assert load_error(parquet).startswith(f"{parquet}: not a readable Parquet file")
    (txt := tmp_path / "d.txt").write_text(GOOD)
    assert load_error(txt).startswith(f"{txt}: unsupported file type")
    (folder := tmp_path / "nothing").mkdir()
    assert load_error(folder).startswith(f"{folder}: folder holds no data files")


def test_bad_csv_rows(tmp_path):
    (short := tmp_path / "short.csv").write_text("prompt,chosen,rejected\na,b,c\nd,e\n")
    assert load_error(short) == f"{short} line 3: 2 fields, but the header has 3"
    (blank := tmp_path / "blank.csv").write_text("prompt,chosen,rejected\na,b,c\n,e,f\n")
    assert load_error(blank).startswith(f"{blank} line 3: 'prompt' is empty")
    (header_only := tmp_path / "h.csv").write_text("prompt,chosen,rejected\n")
    assert load_error(header_only) == f"{header_only}: the dataset is empty (no rows)"


def test_parquet_null_field_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ROWS[:2] + [{"prompt": "a", "chosen": None, "rejected": "c"}])
    assert load_error(path) == f"{path} row 3: 'chosen' is null"


# --- the command line, in-process and as `python -m dpo.data` ------------------------------------


def run_main(capsys, *argv):
    rc = data_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_bad_data_exits_2_with_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{oops"])
    rc, out, err = run_main(capsys, "--dataset", path)
    assert rc == 2 and out == ""
    assert err == f"dpo.data: error: {path} line 2: invalid JSON (Expecting property name enclosed in " \
                  f"double quotes at column 2)\n"


def test_cli_argument_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    rc, _, err = run_main(capsys, "--dataset", path, "--max-length", "0")
    assert rc == 2 and err == "dpo.data: error: max_length must be at least 1, got 0\n"
    rc, _, err = run_main(capsys, "--dataset", path, "--out", tmp_path / "no" / "such" / "out.jsonl")
    assert rc == 2 and err == f"dpo.data: error: --out: the folder {tmp_path / 'no' / 'such'} does not exist\n"
    rc, _, err = run_main(capsys, "--dataset", path, "--model", tmp_path / "no-model")
    assert rc == 2 and err.startswith(f"dpo.data: error: {tmp_path / 'no-model'}: cannot load its tokenizer")
    assert err.count("\n") == 1


def test_an_unwritable_out_is_one_line_before_the_tokenizer_loads(tmp_path, capsys, unwritable_dir, monkeypatch):
    monkeypatch.setattr(data, "load_tokenizer", lambda model: pytest.fail("the tokenizer loaded before the refusal"))
    rc, out, err = run_main(capsys, "--dataset", write_jsonl(tmp_path / "d.jsonl", ROWS), "--out",
                            unwritable_dir / "x.jsonl")
    assert rc == 2 and out == ""
    assert err.startswith("dpo.data: error: --out: ") and str(unwritable_dir) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_an_atomic_write_that_cannot_clean_up_raises_the_writes_own_error(tmp_path, monkeypatch):
    """A read-only file system refuses the write and then the clean-up too: the write's error is the one raised,
    not a second one chained to it."""
    import errno

    from dpo import files

    def read_only(what):
        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system", what)
        return refuse
    for write in (lambda p: files.write_text_atomic(p, "x"), lambda p: files.write_jsonl_atomic(p, [{}])):
        with monkeypatch.context() as m, pytest.raises(OSError) as raised:
            m.setattr(files, "open", read_only("the write"), raising=False)
            m.setattr(Path, "unlink", read_only("the clean-up"))
            write(tmp_path / "x.json")
        assert raised.value.filename == "the write"


def run_module(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo.data", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_python_m_dpo_data_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer_a": "b", "answer_b": "c"}])
    proc = run_module("--dataset", path, "--chosen-column", "answer_a")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"dpo.data: error: {path} line 1: no 'rejected' column (set --rejected-column); "
                           "columns here: prompt, answer_a, answer_b\n")


def test_python_m_dpo_data_mixed_formats(tmp_path):
    implicit = {"chosen": DIALOGUE + " a", "rejected": DIALOGUE + " b"}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, json.dumps(implicit)])
    proc = run_module("--dataset", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"dpo.data: error: {path} line 2: mixed formats: this row is text, implicit "
                           f"prompt (last_assistant), but {path} line 1 is text, explicit prompt\n")
