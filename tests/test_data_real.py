"""dpo.data on the real preference files against TRL 1.15's own dataset processing.

TRL's processing is `DPOTrainer._prepare_dataset` called as a plain function on a stub `self` (it only
reads `self._tokenizer`), so no model or trainer is built. Each test states where we differ from TRL
on purpose and checks that every differing row differs for exactly that reason:
- identical pairs: TRL keeps them, we drop them ("identical_pair");
- HH implicit prompts, default rule: we cut at the last shared "\\n\\nAssistant:", TRL at the first
  differing character (less a trailing space), so where both replies open with the same words TRL's
  prompt holds those words and ours does not. The token sequences are the same; only the boundary moves.
With `implicit_prompt="trl"` we follow TRL's rule, and then every non-identical row must match exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import types

import pytest

from dpo.data import pairs as data
from dpo.data.cli import main as data_main
from dpo.data.sources import DataSpec, load_rows

from .conftest import HH_HARMLESS, HH_HELPFUL, ULTRAFEEDBACK, require_file

MAX_LENGTHS = (256, 1024)
# The two-length parity runs on fixed subsets (every 6th HH row, every 8th UltraFeedback row, plus the
# rows SOURCES.md singles out) to keep the suite fast; the report tests below read every row.
HH_ODD_ROWS = (168, 354, 567, 743, 960, 1011, 1166, 1307, 1450)  # dialogues differ before the last turn
HH_IDENTICAL_ROWS = (721, 2168)


def hh_subset(n_rows: int) -> list[int]:
    return sorted(set(range(0, n_rows, 6)) | set(HH_ODD_ROWS) | set(HH_IDENTICAL_ROWS))


def uf_subset(raw: list[dict]) -> list[int]:
    """Every 8th row, every long prompt (so both max lengths drop some), identical and empty replies."""
    return [i for i, r in enumerate(raw)
            if i % 8 == 0 or len(r["prompt"]) > 3000 or r["chosen"] == r["rejected"]
            or not (r["chosen"] and r["rejected"])]


def read_raw(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def trl_prepare(tokenizer, records: list[dict], max_length: int | None, tmp_dir) -> dict[int, dict]:
    """TRL 1.15's processed rows (prompt_ids, chosen_ids, rejected_ids, texts), keyed by input row index."""
    import datasets
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    datasets.disable_progress_bars()
    args = DPOConfig(max_length=max_length, output_dir=str(tmp_dir), report_to=[], bf16=False, use_cpu=True,
                     dataset_num_proc=None)
    stub = types.SimpleNamespace(_tokenizer=tokenizer)
    ds = datasets.Dataset.from_list([{**r, "row_index": i} for i, r in enumerate(records)])
    out = DPOTrainer._prepare_dataset(stub, ds, tokenizer, args, "train")
    return {r["row_index"]: r for r in out}


class Cache:
    """Processing results shared by the tests of this module (each pass over HH costs seconds)."""

    def __init__(self, tokenizer, tmp_dir):
        self.tok, self.tmp, self.store = tokenizer, tmp_dir, {}

    def get(self, key, make):
        if key not in self.store:
            self.store[key] = make()
        return self.store[key]

    def raw(self, path) -> list[dict]:
        return self.get(("raw", str(path)), lambda: read_raw(require_file(path)))

    def trl(self, path, max_length, subset: list[int] | None = None) -> dict[int, dict]:
        """TRL's processed rows keyed by row index in the file (only rows of `subset` are processed)."""
        def make():
            raw = self.raw(path)
            index = subset if subset is not None else range(len(raw))
            out = trl_prepare(self.tok, [raw[i] for i in index], max_length, self.tmp)
            return {index[k]: v for k, v in out.items()}

        return self.get(("trl", str(path), max_length, tuple(subset or ())), make)

    def ours(self, path, max_length, subset: list[int] | None = None, rule="last_assistant") -> dict:
        """Our RowResults keyed by row index in the file (row ids count from 0 over the whole file)."""
        def make():
            rows = load_rows(DataSpec(str(path), implicit_prompt=rule))
            picked = [rows[i] for i in subset] if subset is not None else rows
            return {r.row.row_id: r for r in data.process_rows(self.tok, picked, max_length)}

        return self.get(("ours", str(path), max_length, tuple(subset or ()), rule), make)


@pytest.fixture(scope="module")
def cache(tok, tmp_path_factory):
    return Cache(tok, tmp_path_factory.mktemp("trl"))


def ids(x) -> tuple:
    if isinstance(x, data.TokenizedPair):
        return (x.prompt_ids, x.chosen_ids, x.rejected_ids)
    return (list(x["prompt_ids"]), list(x["chosen_ids"]), list(x["rejected_ids"]))


def identical_rows(raw: list[dict]) -> set[int]:
    return {i for i, r in enumerate(raw) if r["chosen"] == r["rejected"]}


def check_exact_parity(results: dict, trl: dict[int, dict], raw: list[dict], max_length: int) -> None:
    """Every row kept by us is kept by TRL with the same ids; every other difference is an identical pair."""
    identical = identical_rows(raw)
    for i, r in results.items():
        if i in identical:  # ours on purpose: TRL keeps identical pairs (zero-gradient, constant loss)
            assert r.dropped == data.IDENTICAL_PAIR
            if i in trl:
                assert ids(r.pair) == ids(trl[i])
            else:
                assert len(r.pair.prompt_ids) >= max_length
        elif i in trl:
            assert r.dropped is None, (i, r.dropped)
            assert ids(r.pair) == ids(trl[i]), i
        else:  # TRL dropped it: the prompt fills max_length
            assert r.dropped == data.PROMPT_FILLS_MAX_LENGTH, (i, r.dropped)
            assert len(r.pair.prompt_ids) >= max_length


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_ultrafeedback_matches_trl(cache, max_length):
    raw = cache.raw(ULTRAFEEDBACK)
    subset = uf_subset(raw)
    trl = cache.trl(ULTRAFEEDBACK, max_length, subset)
    results = cache.ours(ULTRAFEEDBACK, max_length, subset)
    assert set(results) == set(subset)
    check_exact_parity(results, trl, raw, max_length)
    assert sum(r.dropped == data.IDENTICAL_PAIR for r in results.values()) == 4
    assert sum(r.dropped == data.PROMPT_FILLS_MAX_LENGTH for r in results.values()) > 0  # the filter is exercised


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_hh_with_trl_prompt_rule_matches_trl_exactly(cache, max_length):
    raw = cache.raw(HH_HELPFUL)
    subset = hh_subset(len(raw))
    results = cache.ours(HH_HELPFUL, max_length, subset, rule="trl")
    check_exact_parity(results, cache.trl(HH_HELPFUL, max_length, subset), raw, max_length)
    assert any(r.pair.prompt_ids and not r.row.prompt.endswith("Assistant:") for r in results.values())


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_hh_default_prompt_rule_differs_from_trl_only_by_shared_opening_words(cache, max_length):
    from trl.data_utils import extract_prompt

    raw = cache.raw(HH_HELPFUL)
    subset = hh_subset(len(raw))
    trl = cache.trl(HH_HELPFUL, max_length, subset)
    results = cache.ours(HH_HELPFUL, max_length, subset)
    identical = identical_rows(raw)
    moved = 0
    for i, r in results.items():
        ours = r.row
        theirs = extract_prompt(raw[i])
        assert ours.prompt.endswith("\n\nAssistant:")
        if i in identical:
            assert r.dropped == data.IDENTICAL_PAIR
            continue
        if theirs["prompt"] == ours.prompt:  # same split: same ids, same fate
            if i in trl:
                assert r.dropped is None and ids(r.pair) == ids(trl[i]), i
            else:
                assert r.dropped == data.PROMPT_FILLS_MAX_LENGTH, i
            continue
        # On purpose: TRL's prompt also holds the replies' shared opening words.
        moved += 1
        head = theirs["prompt"][len(ours.prompt):]
        assert theirs["prompt"].startswith(ours.prompt) and head.strip(), i
        assert ours.chosen == head + theirs["chosen"] and ours.rejected == head + theirs["rejected"], i
        if i in trl:  # the same token sequences; our completion starts no later than TRL's
            t_prompt, t_chosen, t_rejected = ids(trl[i])
            assert r.pair.prompt_ids + r.pair.chosen_ids == t_prompt + t_chosen, i
            assert r.pair.prompt_ids + r.pair.rejected_ids == t_prompt + t_rejected, i
            assert len(r.pair.prompt_ids) <= len(t_prompt)
            assert r.dropped is None
        else:  # TRL's longer prompt fills max_length; ours may still fit
            assert r.dropped in (None, data.PROMPT_FILLS_MAX_LENGTH)
            assert (r.dropped is None) == (len(r.pair.prompt_ids) < max_length)
    assert moved > 50  # about a fifth of HH pairs open both replies with the same words


def test_hh_rows_whose_dialogues_differ_before_their_last_assistant_turn(cache):
    """SOURCES.md: 9 rows where the text before each side's last "\\n\\nAssistant:" differs.

    Decision: the prompt ends at the last marker both share; the extra turns stay in the completion
    (one reply holds two assistant turns, or a made-up human turn). TRL does the same (its prompt ends
    at the first difference); the pair still ranks two continuations of one context, so it is kept.
    """
    from trl.data_utils import extract_prompt

    raw = cache.raw(HH_HELPFUL)
    marker = "\n\nAssistant:"
    odd = [i for i, r in enumerate(raw)
           if r["chosen"][: r["chosen"].rfind(marker)] != r["rejected"][: r["rejected"].rfind(marker)]]
    assert tuple(odd) == HH_ODD_ROWS
    results = cache.ours(HH_HELPFUL, 1024, hh_subset(len(raw)))
    for i in odd:
        row = results[i].row
        assert results[i].dropped is None
        assert marker in row.chosen + row.rejected or "\n\nHuman:" in row.chosen + row.rejected
        theirs = extract_prompt(raw[i])
        assert theirs["prompt"].startswith(row.prompt)  # TRL's prompt: ours, or ours + shared opening words
        assert len(theirs["prompt"]) - len(row.prompt) < 20


def test_collate_matches_trl_collator(cache, tok):
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    results = cache.ours(HH_HELPFUL, 256, hh_subset(len(cache.raw(HH_HELPFUL))))
    pairs = [r.pair for r in results.values() if r.dropped is None][:12]
    ours = data.collate(pairs, tok.pad_token_id, max_length=256)
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=256)(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(ours, key), theirs[key]), key


# --- conversational rows through the real chat template ------------------------------------------


def hh_to_messages(dialogue: str) -> list[dict]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    messages = []
    for part in dialogue.split("\n\nHuman:")[1:]:
        turns = part.split("\n\nAssistant:")
        messages.append({"role": "user", "content": turns[0].strip()})
        messages += [{"role": "assistant", "content": t.strip()} for t in turns[1:]]
    return messages


def conversational_records() -> tuple[list[dict], list[dict]]:
    uf = read_raw(require_file(ULTRAFEEDBACK))[:40]
    explicit = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in uf]
    hh = read_raw(require_file(HH_HELPFUL))
    implicit = [{"chosen": hh_to_messages(r["chosen"]), "rejected": hh_to_messages(r["rejected"])}
                for r in hh[:40] + [hh[1166], hh[743]]]  # two rows with extra assistant turns
    return explicit, implicit


@pytest.mark.parametrize("kind", ["explicit", "implicit"])
def test_conversational_rows_match_trl(tok, tmp_path, kind):
    explicit, implicit = conversational_records()
    records = explicit if kind == "explicit" else implicit
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = load_rows(DataSpec(str(path)))
    assert rows.format == f"conversation, {kind} prompt" + (" (last_assistant)" if kind == "implicit" else "")
    pairs, report = data.prepare_pairs(tok, rows, 1024)
    trl = trl_prepare(tok, records, 1024, tmp_path)
    kept = {p.row_id: p for p in pairs}
    assert set(kept) == set(trl)
    im_end, im_start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    for i, pair in kept.items():
        assert ids(pair) == ids(trl[i])
        # The template closes each turn with <|im_end|>\n; no extra EOS is appended.
        for completion, messages in ((pair.chosen_ids, rows[i].chosen), (pair.rejected_ids, rows[i].rejected)):
            assert completion[-2:] == [im_end, tok.convert_tokens_to_ids("Ċ")]
            assert completion.count(im_end) == len(messages)
        assert pair.prompt_ids[-4:] == tok("<|im_start|>assistant\n")["input_ids"]
        assert pair.prompt_ids.count(im_start) == len(rows[i].prompt) + 2  # system + prompt turns + header


# --- python -m dpo.data on each real file: the printed report, counts checked independently -------


def parse_report(text: str) -> dict:
    out = {"dropped_by": {}}
    for line in text.splitlines():
        if line.startswith("rows read: "):
            out["rows_read"] = int(line.split(": ")[1])
        elif line.startswith("kept: "):
            out["kept"] = int(line.split(": ")[1])
        elif line.startswith("dropped: "):
            out["dropped"] = int(line.split(": ")[1])
        elif line.startswith("  ") and ": " in line and line.strip().split(":")[0].isidentifier():
            reason, count = line.strip().split(": ")
            out["dropped_by"][reason] = int(count)
        elif line.startswith("identical pairs"):
            out["identical"] = int(line.rsplit(": ", 1)[1])
        elif line.startswith("  prompt ") or line.startswith("  sequence "):
            cells = line.split()
            out[cells[0] + "_max"] = int(cells[5])
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = data_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_report_ultrafeedback(tok, cache, capsys):
    raw = cache.raw(ULTRAFEEDBACK)
    rc, out, err = run_cli(capsys, "--dataset", str(ULTRAFEEDBACK), "--max-length", "1024")
    assert rc == 0, err
    got = parse_report(out)
    # Independent count of prompts that fill 1024 tokens: tokenize each prompt alone. A merge at the
    # prompt/completion boundary shortens a prompt by a token or two, so no prompt may sit just above
    # the limit for this count to be exact.
    lengths = [len(x) for x in tok([r["prompt"] for r in raw])["input_ids"]]
    assert not any(1024 <= n < 1028 for n in lengths)
    identical = identical_rows(raw)
    too_long = sum(n >= 1024 for i, n in enumerate(lengths) if i not in identical)
    assert too_long == 23
    assert got["rows_read"] == len(raw) == 1000
    assert got["identical"] == len(identical) == 4  # SOURCES.md: 4 rows have chosen == rejected
    assert got["dropped_by"] == {"identical_pair": 4, "prompt_fills_max_length": too_long}
    assert got["kept"] == len(raw) - 4 - too_long and got["dropped"] == 4 + too_long
    assert got["prompt_max"] <= max(n for n in lengths if n < 1024)
    assert "(text, explicit prompt)" in out
    # Line 479 has an empty rejected reply, line 834 an empty chosen one: kept, completion = EOS.
    assert "rows with an empty chosen or rejected reply (kept; that completion is EOS alone): 2" in out


HH_FACTS = {  # from SOURCES.md: rows, identical pairs, rows whose dialogues differ before the last turn
    "helpful": (HH_HELPFUL, 2354, 2, 9),
    "harmless": (HH_HARMLESS, 2312, 0, 5),
}


@pytest.mark.parametrize("name", HH_FACTS)
def test_cli_report_hh(tok, cache, capsys, name):
    path, n_rows, n_identical, n_odd = HH_FACTS[name]
    raw = cache.raw(path)
    rc, out, err = run_cli(capsys, "--dataset", str(path), "--max-length", "1024")
    assert rc == 0, err
    got = parse_report(out)
    # Independent count: prompt = shared text up to its last "\n\nAssistant:", tokenized directly
    # (a merge at the boundary can only shorten a prompt, so none of these can fill 1024 tokens).
    prompts = []
    for r in raw:
        shared = os.path.commonprefix([r["chosen"], r["rejected"]])
        prompts.append(shared[: shared.rfind("\n\nAssistant:") + len("\n\nAssistant:")])
    lengths = [len(x) for x in tok(prompts)["input_ids"]]
    empty_replies = sum(not p_c[len(p):].strip() or not p_r[len(p):].strip()
                        for p, p_c, p_r in ((p, r["chosen"], r["rejected"]) for p, r in zip(prompts, raw)))
    assert max(lengths) < 1024
    assert got["rows_read"] == len(raw) == n_rows
    assert got["identical"] == len(identical_rows(raw)) == n_identical
    assert got["dropped_by"] == ({"identical_pair": n_identical} if n_identical else {})
    assert got["dropped"] == n_identical and got["kept"] == n_rows - n_identical
    assert got["prompt_max"] == max(n for n, r in zip(lengths, raw) if r["chosen"] != r["rejected"])
    assert "(text, implicit prompt (last_assistant))" in out
    assert f"completions holding another dialogue turn: {n_odd}" in out
    empty_line = "rows with an empty chosen or rejected reply (kept; that completion is EOS alone)"
    assert (f"{empty_line}: {empty_replies}" in out) if empty_replies else (empty_line not in out)
    if name == "helpful":
        assert empty_replies == 4  # rows 120, 740, 1214 and 2063 end on an empty assistant turn
