"""From rows to kept pairs: tokenization properties (Hypothesis), drops and their reasons,
`max_prompt_length`, the report, and `--out` files (complete, atomic, loadable again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo.data import pairs as data
from dpo.data.cli import main as data_main
from dpo.data.sources import DataSpec, load_rows
from dpo.files import write_jsonl_atomic
from dpo.data.sources import DataError, PreferenceRow

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizers():
    """SmolLM2's tokenizer as shipped (adds no BOS to plain text) and a copy that adds BOS."""
    from transformers import AutoTokenizer

    from dpo import smollm2

    try:
        path = smollm2.plain_copy(with_model=False)
    except smollm2.MissingDefaultModel as e:
        pytest.skip(str(e))
    plain = AutoTokenizer.from_pretrained(path)
    with_bos = AutoTokenizer.from_pretrained(path, add_bos_token=True)
    assert plain("hi")["input_ids"][0] != plain.bos_token_id
    assert with_bos("hi")["input_ids"][0] == with_bos.bos_token_id
    return {"plain": plain, "bos": with_bos}


# Random unicode (no surrogates), minus the tokenizer's special-token strings.
text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
               max_size=40).filter(lambda s: not any(t in s for t in SPECIAL))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(prompt=text, chosen=text, rejected=text, chosen_has_eos=st.booleans(), which=st.sampled_from(["plain", "bos"]),
       max_length=st.one_of(st.none(), st.integers(1, 60)))
def test_tokenization_keeps_every_token_once(tokenizers, prompt, chosen, rejected, chosen_has_eos, which, max_length):
    tok = tokenizers[which]
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if chosen_has_eos:  # already ends with EOS: no second one is added
        chosen += tok.eos_token
    pair = data.tokenize_row(tok, PreferenceRow(prompt, chosen, rejected))
    chosen_text = chosen if chosen_has_eos else chosen + tok.eos_token
    for completion, completion_text in ((pair.chosen_ids, chosen_text), (pair.rejected_ids, rejected + tok.eos_token)):
        full = pair.prompt_ids + completion
        # Nothing lost or duplicated: the pair is the whole text tokenized once.
        # (Ids, not decoded text: this vocabulary lacks a few byte tokens, so some characters, e.g.
        # U+40000, come back as <|endoftext|> whichever way they are split.)
        assert full == tok(text=prompt + completion_text)["input_ids"]
        assert full.count(eos) == 1 and completion[-1] == eos
        assert full.count(bos) == (1 if which == "bos" else 0)
        if which == "bos":
            assert pair.prompt_ids[0] == bos  # BOS belongs to the prompt, never to a completion
    # The collator's masks cover exactly the completion (keep_start truncation at max_length).
    batch = data.collate([pair], tok.pad_token_id, max_length)
    for row, completion in ((0, pair.chosen_ids), (1, pair.rejected_ids)):
        n_prompt, n = len(pair.prompt_ids), len(pair.prompt_ids) + len(completion)
        kept = n if max_length is None else min(n, max_length)
        mask = batch.completion_mask[row].tolist()
        assert mask[:kept] == ([0] * n_prompt + [1] * len(completion))[:kept]
        assert sum(mask) == max(0, kept - n_prompt) and not any(mask[kept:])
        assert batch.attention_mask[row].tolist()[:kept] == [1] * kept and sum(batch.attention_mask[row]) == kept
        assert batch.input_ids[row].tolist()[:kept] == (pair.prompt_ids + completion)[:kept]


@SETTINGS
@given(prompt=text, chosen=text, rejected=text, which=st.sampled_from(["plain", "bos"]), limit=st.integers(1, 12))
def test_max_prompt_length_keeps_the_end_and_the_bos(tokenizers, prompt, chosen, rejected, which, limit):
    tok = tokenizers[which]
    full = data.tokenize_row(tok, PreferenceRow(prompt, chosen, rejected))
    [result] = data.process_rows(tok, [PreferenceRow(prompt, chosen, rejected)], None, limit, drop_identical=False)
    cut = result.pair.prompt_ids
    assert (result.pair.chosen_ids, result.pair.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    if len(full.prompt_ids) <= limit:
        assert cut == full.prompt_ids and result.prompt_tokens_cut == 0
        return
    assert len(cut) == limit and result.prompt_tokens_cut == len(full.prompt_ids) - limit
    if which == "bos" and limit > 1:
        assert cut[0] == tok.bos_token_id and cut[1:] == full.prompt_ids[len(full.prompt_ids) - limit + 1:]
    else:
        assert cut == full.prompt_ids[-limit:]


@SETTINGS
@given(user=text, chosen=text, rejected=text)
def test_conversations_get_no_extra_eos(tokenizers, user, chosen, rejected):
    tok = tokenizers["plain"]
    row = PreferenceRow([{"role": "user", "content": user}], [{"role": "assistant", "content": chosen}],
                        [{"role": "assistant", "content": rejected}])
    pair = data.tokenize_row(tok, row)
    for completion, reply in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
        assert completion.count(tok.eos_token_id) == 1  # the template's <|im_end|>, nothing appended
        whole = tok.apply_chat_template(row.prompt + [{"role": "assistant", "content": reply}], tokenize=True,
                                        return_dict=True)["input_ids"]
        assert pair.prompt_ids + completion == list(whole)  # the completion is exactly the rendered reply turn


# --- drops and the report -------------------------------------------------------------------------


def rows_of(*triples) -> list[PreferenceRow]:
    return [PreferenceRow(p, c, r, i, "mem.jsonl", f"line {i + 1}") for i, (p, c, r) in enumerate(triples)]


def test_drop_reasons_and_report(tokenizers):
    tok = tokenizers["plain"]
    long_prompt = "word " * 40
    rows = rows_of(("Question:", " yes", " no"),  # kept
                   ("Question:", " same", " same"),  # identical pair
                   (long_prompt, " yes", " no"),  # prompt fills max_length
                   ("Hel", "lo", "lo there"),  # "Hel" merges into "Hello": no prompt token is left
                   ("Q:", "", "   "))  # empty replies are kept: their completion is EOS alone
    pairs, report = data.prepare_pairs(tok, rows, max_length=16)
    assert [p.row_id for p in pairs] == [0, 4]
    assert report.rows_read == 5 and report.kept == 2
    assert report.dropped == {"identical_pair": 1, "no_prompt_tokens": 1, "prompt_fills_max_length": 1}
    assert report.identical_pairs == 1 and report.empty_completions == 1 and report.boundary_merges >= 1
    assert pairs[1].chosen_ids == [tok.eos_token_id]
    text = report.format()
    assert "rows read: 5\nkept: 2\ndropped: 3\n  identical_pair: 1\n  no_prompt_tokens: 1\n" in text
    assert "identical pairs (chosen == rejected): 1" in text
    json.dumps(report.to_dict())
    # TRL keeps identical pairs; so do we on request.
    kept, report = data.prepare_pairs(tok, rows, max_length=16, drop_identical=False)
    assert [p.row_id for p in kept] == [0, 1, 4] and report.identical_pairs == 1


def test_truncation_counts(tokenizers):
    tok = tokenizers["plain"]
    rows = rows_of(("Question:", " a b c d e f g h i j k l", " no"), ("Question:", " yes", " no"))
    _, report = data.prepare_pairs(tok, rows, max_length=8)
    assert (report.truncated_at_max_length, report.chosen_truncated, report.rejected_truncated) == (1, 1, 0)
    _, report = data.prepare_pairs(tok, rows, max_length=None, max_prompt_length=1)
    assert report.prompts_cut == 2 and report.prompt_tokens_removed == 2 * (len(tok("Question:")["input_ids"]) - 1)
    assert "max_prompt_length 1: 2 prompts cut" in report.format()


class ChatOnlyUserTokenizer:
    """A fake chat tokenizer whose template renders no assistant text: completions come out empty."""

    eos_token, eos_token_id, bos_token_id = "</s>", 0, None

    def apply_chat_template(self, messages, tokenize=True, return_dict=True, add_generation_prompt=False):
        return {"input_ids": [ord(c) for m in messages if m["role"] == "user" for c in m["content"]]}


def test_empty_completion_is_dropped():
    rows = [PreferenceRow([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                          [{"role": "assistant", "content": "b"}], 0, "mem.jsonl", "line 1"),
            PreferenceRow([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                          [{"role": "user", "content": "?"}], 1, "mem.jsonl", "line 2")]
    results = data.process_rows(ChatOnlyUserTokenizer(), rows, None)
    assert [r.dropped for r in results] == [data.IDENTICAL_PAIR, data.EMPTY_COMPLETION]


def test_every_row_dropped_is_an_error(tokenizers):
    rows = rows_of(("Q:", " same", " same"), ("Q:", " also", " also"))
    with pytest.raises(DataError) as e:
        data.prepare_pairs(tokenizers["plain"], rows, max_length=None)
    assert str(e.value) == ("mem.jsonl: all 2 rows were dropped (identical_pair: 2; max_length=None); "
                            "nothing is left to train on")


# --- --out files ------------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
           {"prompt": "Say it twice:", "chosen": " it it", "rejected": " it it"},
           {"prompt": "A long question " * 8, "chosen": " Yes.", "rejected": " No."}]


def test_cli_out_file(tmp_path, capsys, tokenizers, monkeypatch):
    monkeypatch.setattr(data, "load_tokenizer", lambda model: tokenizers["plain"])
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    assert data_main(["--dataset", str(src), "--max-length", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept: 1\ndropped: 2\n  identical_pair: 1\n  prompt_fills_max_length: 1\n" in printed
    assert printed.endswith(f"wrote 3 rows (1 kept) to {out}\n")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["dropped_reason"] for x in lines] == [None, "identical_pair", "prompt_fills_max_length"]
    assert [x["where"] for x in lines] == [f"{src} line {n}" for n in (1, 2, 3)]
    pair = data.tokenize_row(tokenizers["plain"], PreferenceRow(**RECORDS[0]))
    assert lines[0] == {"row_id": 0, "where": f"{src} line 1", **RECORDS[0], "prompt_tokens": len(pair.prompt_ids),
                        "chosen_tokens": len(pair.chosen_ids), "rejected_tokens": len(pair.rejected_ids),
                        "prompt_tokens_cut": 0, "dropped_reason": None}
    # The written rows load again and give the same pairs.
    again = load_rows(DataSpec(str(out)))
    assert [data.tokenize_row(tokenizers["plain"], r) for r in again][0] == pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_cli_writes_nothing_when_every_row_is_dropped(tmp_path, capsys, tokenizers, monkeypatch):
    monkeypatch.setattr(data, "load_tokenizer", lambda model: tokenizers["plain"])
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS[1:2])
    out = tmp_path / "out.jsonl"
    out.write_text("previous contents\n")
    assert data_main(["--dataset", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"dpo.data: error: {src}: all 1 rows were dropped (identical_pair: 1; max_length=1024); "
                   "nothing is left to train on\n")
    assert out.read_text() == "previous contents\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_write_is_atomic_when_writing_fails(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def records():
        yield {"a": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(str(out), records())
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_cli_hub_dataset_flags(capsys, tokenizers, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                           for r in RECORDS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "load_tokenizer", lambda model: tokenizers["plain"])
    argv = ["--dataset", "org/prefs", "--dataset-split", "test", "--dataset-config", "small", "--prompt-column", "q",
            "--chosen-column", "good", "--rejected-column", "bad", "--keep-identical"]
    assert data_main(argv) == 0
    assert calls == [("org/prefs", "small", "test")]
    out = capsys.readouterr().out
    assert out.startswith("data: org/prefs (hub, split 'test', config 'small') (text, explicit prompt)\nrows read: 3\n"
                          "kept: 3\ndropped: 0\nidentical pairs (chosen == rejected): 1\n")
