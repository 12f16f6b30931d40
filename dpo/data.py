"""Preference data: files in, checked rows, token ids out, batches of [chosen rows; rejected rows].

One pair's way: a file row -> PreferenceRow(prompt, chosen, rejected) -> TokenizedPair(prompt_ids,
chosen_ids, rejected_ids) -> Batch(input_ids[2B,T], attention_mask[2B,T], completion_mask[2B,T]).

Loading (`load_rows`) reads .jsonl, .jsonl.gz, .json, .parquet, .csv files, a folder of them, or a hub
dataset, and accepts three row formats:
- explicit prompt: prompt, chosen and rejected strings;
- implicit prompt (Anthropic HH-RLHF): only chosen and rejected, each a whole dialogue; the prompt is
  what they share up to and including the last "\\n\\nAssistant:" they share (see
  `extract_implicit_prompt`, and `trl_extract_prompt` for TRL's own rule);
- conversational: the same fields as lists of {"role", "content"} messages (explicit or implicit).
Other columns are ignored (`tools` and `chat_template_kwargs`, which TRL renders, are refused).
Anything else stops the load with one `DataError` naming the file, the row (line for JSON Lines) and
the problem; nothing is silently skipped at this stage. An empty prompt is an error; an empty chosen
or rejected reply is not (real data has them, e.g. UltraFeedback; the completion is then the EOS
token alone, as in TRL) and the report counts them.

Tokenization follows TRL 1.15's DPOTrainer exactly, so that our numbers can be checked against it:
- plain-text rows get the EOS token appended to chosen and rejected (unless already there);
  conversations get none (the chat template ends each turn itself);
- prompt and prompt+completion are tokenized separately (special tokens as the tokenizer adds them;
  conversations through the chat template, the prompt with add_generation_prompt=True), and the
  completion starts where the two token lists stop agreeing (tokens may merge across the
  prompt/completion boundary, so "after the prompt tokens" is not always right);
- with `max_length`, a pair whose prompt alone fills `max_length` is dropped (no completion token
  would survive truncation); completions are cut later, in the collator (keep_start).

Where we differ from TRL on purpose (`prepare_pairs` counts each in its DataReport):
- pairs whose completions are token-for-token identical are dropped ("identical_pair"): their loss
  is a constant with zero gradient and would only dilute the batch mean;
- pairs left with no prompt token or an empty completion are dropped: the loss code assumes the
  first completion token follows a prompt token and is scored;
- `max_prompt_length` (ours, not TRL's) keeps the END of a long prompt (a leading BOS is kept);
- the default implicit-prompt rule cuts at the last shared "\\n\\nAssistant:"; TRL cuts at the
  first differing character, which moves shared opening words of the two replies into the prompt
  (about a fifth of HH pairs). `DataSpec(implicit_prompt="trl")` follows TRL's rule instead;
- mixed formats in one dataset are an error (TRL looks at the first row only).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are made, so `python -m dpo.data` rejects bad data fast
    import torch


@dataclass(frozen=True)
class PreferenceRow:
    prompt: Any  # str, or a list of {"role", "content"} messages
    chosen: Any
    rejected: Any
    row_id: int = 0  # position in the loaded data (for error messages and NaN reports)
    # Where the row came from, for messages: a file or hub name, and "line 12" / "row 3".
    source: str = field(default="", compare=False)
    location: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return f"{self.source} {self.location}".strip() or f"row id {self.row_id}"


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row_id: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [2B, T] long: B chosen rows, then B rejected rows
    attention_mask: torch.Tensor  # [2B, T] long
    completion_mask: torch.Tensor  # [2B, T] long: 1 on completion tokens
    row_ids: list[int] = field(default_factory=list)  # [B]
    host_input_ids: torch.Tensor | None = None  # input_ids in CPU memory (kept by .to): for host-side lookups

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "Batch":
        host = self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.row_ids,
            host,
        )


def common_prefix_length(a, b) -> int:
    """How many leading items (token ids, characters, messages) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def is_conversational(row: PreferenceRow) -> bool:
    return isinstance(row.prompt, list)


# --- tokenization ------------------------------------------------------------------------------


def _ids(tokenizer, text_or_messages, **chat_kwargs) -> list[int]:
    if isinstance(text_or_messages, list):
        out = tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True, **chat_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=text_or_messages)["input_ids"])


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _tokenize_whole(tokenizer, row: PreferenceRow) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt alone, prompt+chosen and prompt+rejected, as TRL 1.15 makes them."""
    if is_conversational(row):
        return (
            _ids(tokenizer, row.prompt, add_generation_prompt=True),
            _ids(tokenizer, row.prompt + row.chosen),
            _ids(tokenizer, row.prompt + row.rejected),
        )
    eos = tokenizer.eos_token
    return (
        _ids(tokenizer, row.prompt),
        _ids(tokenizer, row.prompt + _with_eos(row.chosen, eos)),
        _ids(tokenizer, row.prompt + _with_eos(row.rejected, eos)),
    )


def _split(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int], row_id: int) -> TokenizedPair:
    # The completion starts where prompt and prompt+completion stop agreeing (TRL's rule).
    n = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return TokenizedPair(prompt_ids[:n], chosen_full[n:], rejected_full[n:], row_id)


def tokenize_row(tokenizer, row: PreferenceRow) -> TokenizedPair:
    """Token ids of one pair, split into prompt and completions exactly as TRL 1.15 splits them."""
    return _split(*_tokenize_whole(tokenizer, row), row.row_id)


def prompt_fits(pair: TokenizedPair, max_length: int | None) -> bool:
    """False where the prompt alone fills max_length (TRL drops such pairs under keep_start)."""
    return max_length is None or len(pair.prompt_ids) < max_length


def cut_prompt(pair: TokenizedPair, max_prompt_length: int | None, bos_token_id: int | None = None) -> TokenizedPair:
    """Keep the END of a prompt longer than max_prompt_length (our option; TRL 1.15 has none).

    The end is kept because it is what the completion answers (the last user turn and, for chat
    templates, the assistant header). A leading BOS token is kept too: models are trained to see it
    first, and dropping it changes every later hidden state.
    """
    ids = pair.prompt_ids
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return pair
    head = ids[:1] if (bos_token_id is not None and ids[0] == bos_token_id and max_prompt_length > 1) else []
    tail = ids[len(ids) - (max_prompt_length - len(head)) :]
    return dataclasses.replace(pair, prompt_ids=head + tail)


def collate(pairs: list[TokenizedPair], pad_token_id: int, max_length: int | None = None) -> Batch:
    """[chosen rows; rejected rows], each prompt+completion cut to max_length (keep_start), right-padded."""
    import torch

    rows, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            completion = getattr(p, side)
            ids = (p.prompt_ids + completion)[:max_length]
            mask = ([0] * len(p.prompt_ids) + [1] * len(completion))[:max_length]
            rows.append(ids)
            masks.append(mask)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return Batch(input_ids, attention_mask, completion_mask, [p.row_id for p in pairs])


# --- where the data comes from -----------------------------------------------------------------

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")
IMPLICIT_PROMPT_RULES = ("last_assistant", "trl")


@dataclass
class DataSpec:
    """What to load; filled from the command line flags."""

    path: str  # local file (.jsonl, .jsonl.gz, .json, .parquet, .csv), a folder of them, or a hub name
    split: str = "train"  # --dataset-split (hub only)
    config: str | None = None  # --dataset-config (hub only)
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    # How to find the prompt of rows without one: "last_assistant" (ours, the default) or "trl".
    implicit_prompt: str = "last_assistant"


class DataError(ValueError):
    """Bad input data: the message names the file, the row (line for JSON Lines) and the problem."""


Record = tuple[str, str, Any]  # (source: file or hub name, location: "line 3" / "row 3", the raw row)


class Rows(list):
    """The loaded rows (a plain list of PreferenceRow) plus a description of their format."""

    format: str = ""


def looks_local(path: str) -> bool:
    """A path rather than a hub name like "org/name": it exists, starts like a path, or has a data suffix."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.lower().endswith(SUFFIXES)


def read_records(spec: DataSpec) -> list[Record]:
    """Every raw row of a file, a folder's files (in name order) or a hub dataset, unchecked."""
    path = os.path.expanduser(spec.path)
    if os.path.isdir(path):
        files = _data_files(path)
        if not files:
            raise DataError(f"{spec.path}: folder holds no data files (looked for {', '.join(SUFFIXES)})")
        return [rec for f in files for rec in _read_file(f)]
    if os.path.isfile(path):
        return _read_file(path)
    if looks_local(spec.path):
        raise DataError(f"{spec.path}: no such file or folder")
    return _read_hub(spec)


def _data_files(folder: str) -> list[str]:
    """Data files under a folder, in name order (so row ids are stable), hidden files skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in names if n.lower().endswith(SUFFIXES) and not n.startswith(".")]
    return sorted(found)


def _read_file(path: str) -> list[Record]:
    name = path.lower()
    if name.endswith(".parquet"):
        return _read_parquet(path)
    stem = name[:-3] if name.endswith(".gz") else name
    raw = _read_bytes(path)
    if stem.endswith(".jsonl"):
        return _read_jsonl(path, raw)
    if stem.endswith(".json"):
        return _read_json(path, raw)
    if stem.endswith(".csv"):
        return _read_csv(path, raw)
    raise DataError(f"{path}: unsupported file type (use one of {', '.join(SUFFIXES)})")


def _read_bytes(path: str) -> bytes:
    try:
        if path.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read the file ({e})") from None


def _decode_line(path: str, line_no: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        where = f"{path} line {line_no}"
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None


def _read_jsonl(path: str, raw: bytes) -> list[Record]:
    records = []
    # Decoding line by line keeps line numbers exact in every message (blank lines are skipped).
    for n, raw_line in enumerate(raw.split(b"\n"), 1):
        line = _decode_line(path, n, raw_line)
        if not line.strip():
            continue
        try:
            records.append((path, f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
    return records


def _read_json(path: str, raw: bytes) -> list[Record]:
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return _read_jsonl(path, raw)  # which names the first line that is not UTF-8
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON Lines under a .json name (HF datasets reads these too)
            return _read_jsonl(path, raw)
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}}), got a {_type_name(data)}")
    return [(path, f"row {i}", value) for i, value in enumerate(data, 1)]


def _read_csv(path: str, raw: bytes) -> list[Record]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        consumed = reader.line_num
        for fields in reader:
            start, consumed = consumed + 1, reader.line_num  # a quoted field may span lines
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path} line {start}: {len(fields)} fields, but the header has {len(header)}")
            records.append((path, f"line {start}", dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: bad CSV ({e})") from None
    return records


def _read_parquet(path: str) -> list[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(path, f"row {i}", value) for i, value in enumerate(rows, 1)]


def _read_hub(spec: DataSpec) -> list[Record]:
    import datasets

    name = f"{spec.path} (hub, split {spec.split!r}" + (f", config {spec.config!r})" if spec.config else ")")
    try:
        ds = datasets.load_dataset(spec.path, name=spec.config, split=spec.split)
    except Exception as e:  # network, missing dataset, bad split: one line, not a traceback
        raise DataError(f"{name}: cannot load ({type(e).__name__}: {e})") from None
    return [(name, f"row {i}", value) for i, value in enumerate(ds, 1)]


# --- from raw rows to PreferenceRow ------------------------------------------------------------


def load_rows(spec: DataSpec) -> Rows:
    """Read, validate and normalise every row; raises DataError at the first bad one."""
    if spec.implicit_prompt not in IMPLICIT_PROMPT_RULES:
        raise DataError(f"implicit prompt rule must be one of {', '.join(IMPLICIT_PROMPT_RULES)}, "
                        f"got {spec.implicit_prompt!r}")
    records = read_records(spec)
    if not records:
        raise DataError(f"{spec.path}: the dataset is empty (no rows)")
    rows, first = Rows(), None
    for i, (source, location, value) in enumerate(records):
        fmt, row = _row_from_record(spec, value, i, source, location)
        if first is None:
            first = (fmt, row.where)
        elif fmt != first[0]:
            raise DataError(f"{row.where}: mixed formats: this row is {fmt}, but {first[1]} is {first[0]}")
        rows.append(row)
    rows.format = first[0]
    return rows


def _row_from_record(spec: DataSpec, value: Any, row_id: int, source: str, location: str):
    """One checked PreferenceRow and its format (e.g. "text, explicit prompt")."""
    where = f"{source} {location}"
    explicit = _check_columns(spec, value, where)
    names = ([spec.prompt_column] if explicit else []) + [spec.chosen_column, spec.rejected_column]
    kinds = {name: _check_field(value[name], name, where, is_prompt=explicit and name == spec.prompt_column)
             for name in names}
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{name} is {kind}" for name, kind in kinds.items())
        raise DataError(f"{where}: mixes text and conversation fields ({detail})")
    kind = kinds[spec.chosen_column]
    chosen, rejected = value[spec.chosen_column], value[spec.rejected_column]
    if explicit:
        return f"{kind}, explicit prompt", PreferenceRow(value[spec.prompt_column], chosen, rejected, row_id,
                                                         source, location)
    try:
        prompt, chosen, rejected = _extract(chosen, rejected, spec.implicit_prompt)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not prompt:
        raise DataError(f"{where}: the implicit prompt is empty ({_EMPTY_PROMPT_WHY})")
    fmt = f"{kind}, implicit prompt ({spec.implicit_prompt})"
    return fmt, PreferenceRow(prompt, chosen, rejected, row_id, source, location)


def _check_columns(spec: DataSpec, value: Any, where: str) -> bool:
    """Whether the row has an explicit prompt column; DataError (listing the columns) when one is missing."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object with columns, got a {_type_name(value)}")
    columns = f"columns here: {', '.join(map(str, value)) or '(none)'}"
    for column, flag in ((spec.chosen_column, "--chosen-column"), (spec.rejected_column, "--rejected-column")):
        if column not in value:
            raise DataError(f"{where}: no {column!r} column (set {flag}); {columns}")
    # TRL renders these into the chat template; we do not, so a row using them would tokenize differently.
    for column in ("tools", "chat_template_kwargs"):
        if value.get(column):
            raise DataError(f"{where}: the {column!r} column is not supported (TRL would render it into the "
                            "chat template)")
    if spec.prompt_column in value:
        return True
    if spec.prompt_column != DataSpec.prompt_column:  # asked for by name, so its absence is an error
        raise DataError(f"{where}: no {spec.prompt_column!r} column (--prompt-column); {columns}")
    return False


_EMPTY_PROMPT_WHY = "every completion token must follow a prompt token to be scored"


def _check_field(value: Any, name: str, where: str, is_prompt: bool) -> str:
    """"text" or "conversation" for a usable field; DataError for a null, wrongly typed or empty one
    (for text, only a blank prompt counts as empty)."""
    if isinstance(value, str):
        # An empty reply is a real answer (UltraFeedback rates some), and its completion is still the
        # EOS token, which is scored; so only an empty prompt is an error. The report counts them.
        if is_prompt and not value.strip():
            raise DataError(f"{where}: {name!r} is {'empty' if not value else 'blank (only whitespace)'} "
                            f"({_EMPTY_PROMPT_WHY})")
        return "text"
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}: {name!r} is an empty list of messages")
        for j, message in enumerate(value, 1):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: {name!r} message {j} is not a {{\"role\": str, \"content\": str}} "
                                f"object (got {_short(message)})")
        return "conversation"
    if value is None:
        raise DataError(f"{where}: {name!r} is null")
    raise DataError(f"{where}: {name!r} is a {_type_name(value)}; expected a string or a list of messages")


def _type_name(value: Any) -> str:
    names = {dict: "JSON object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- implicit prompts --------------------------------------------------------------------------


def _extract(chosen, rejected, rule: str):
    if rule == "trl":
        return trl_extract_prompt(chosen, rejected)
    if isinstance(chosen, list):
        return extract_implicit_conversation(chosen, rejected)
    return extract_implicit_prompt(chosen, rejected)


def extract_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-style rows: the prompt is their shared text up to and including the last shared "\\n\\nAssistant:".

    Everything after that marker is completion, so both replies are scored in full, shared opening
    words included (TRL moves those into the prompt; see `trl_extract_prompt`). Where the two
    dialogues differ before their own last "\\n\\nAssistant:" (one reply holds extra turns; 9 rows of
    the helpful-base test split), the prompt still ends at the last marker they share and the extra
    turns stay in that completion, as in TRL: the pair still ranks two continuations of one context.
    """
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(ASSISTANT_MARKER)
    if end < 0:
        raise ValueError(f"chosen and rejected share no {ASSISTANT_MARKER!r} turn, so the prompt cannot be "
                         "inferred; give a prompt column")
    cut = end + len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def extract_implicit_conversation(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Message lists: the prompt is the shared messages up to the last shared point where both go on
    with an assistant message (so each completion starts with the assistant's reply)."""
    shared = common_prefix_length(chosen, rejected)
    for k in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant":
            return chosen[:k], chosen[k:], rejected[k:]
    raise ValueError("chosen and rejected share no messages before an assistant reply, so the prompt cannot be "
                     "inferred; give a prompt column")


def trl_extract_prompt(chosen, rejected):
    """TRL 1.15's `extract_prompt`, quirks included (strings or message lists).

    The prompt is the longest common prefix, less one trailing space. Quirks copied on purpose for
    parity: where one side is a prefix of the other (or they are equal) the loop runs out and TRL's
    loop variable leaves the last shared item out of the prompt; a difference at position 0 looks at
    position -1.
    """
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if chosen[i - 1] == " " else i
            break
    if idx < 0:
        raise ValueError("chosen and rejected share no leading text, so the prompt cannot be inferred")
    return chosen[:idx], chosen[idx:], rejected[idx:]


# --- from rows to kept pairs, with a report ----------------------------------------------------

IDENTICAL_PAIR = "identical_pair"  # chosen and rejected completions tokenize the same
NO_PROMPT_TOKENS = "no_prompt_tokens"  # the whole prompt merged into the completion at tokenization
EMPTY_COMPLETION = "empty_completion"  # chosen or rejected has no token after the prompt
PROMPT_FILLS_MAX_LENGTH = "prompt_fills_max_length"  # no completion token would survive max_length


@dataclass
class RowResult:
    """One row after tokenization: its pair (prompt already cut to max_prompt_length) and fate."""

    row: PreferenceRow
    pair: TokenizedPair
    dropped: str | None = None  # one of the reasons above, or None when kept
    prompt_tokens_cut: int = 0  # tokens max_prompt_length removed from the prompt's start
    boundary_merge: int = 0  # prompt tokens that merged into the completion (TRL warns about these)


def process_rows(tokenizer, rows: list[PreferenceRow], max_length: int | None,
                 max_prompt_length: int | None = None, *, drop_identical: bool = True) -> list[RowResult]:
    """Tokenize every row as training will and decide, for each, whether it is kept."""
    _check_lengths(max_length, max_prompt_length)
    results = []
    for row in rows:
        whole = _tokenize_whole(tokenizer, row)
        pair = _split(*whole, row.row_id)
        cut = cut_prompt(pair, max_prompt_length, tokenizer.bos_token_id)
        results.append(RowResult(
            row, cut, _drop_reason(cut, max_length, drop_identical),
            prompt_tokens_cut=len(pair.prompt_ids) - len(cut.prompt_ids),
            boundary_merge=len(whole[0]) - len(pair.prompt_ids),
        ))
    return results


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")


def _drop_reason(pair: TokenizedPair, max_length: int | None, drop_identical: bool) -> str | None:
    if drop_identical and pair.chosen_ids == pair.rejected_ids:
        return IDENTICAL_PAIR
    if not pair.prompt_ids:
        return NO_PROMPT_TOKENS
    if not pair.chosen_ids or not pair.rejected_ids:
        return EMPTY_COMPLETION
    if not prompt_fits(pair, max_length):
        return PROMPT_FILLS_MAX_LENGTH
    return None


def prepare_pairs(tokenizer, rows: list[PreferenceRow], max_length: int | None,
                  max_prompt_length: int | None = None, *, drop_identical: bool = True,
                  ) -> tuple[list[TokenizedPair], "DataReport"]:
    """The pairs training will see, and a report of what was read, kept and dropped (and why).

    Raises DataError when no row is left.
    """
    results = process_rows(tokenizer, rows, max_length, max_prompt_length, drop_identical=drop_identical)
    report = build_report(results, max_length, max_prompt_length, getattr(rows, "format", ""))
    require_kept(results, report)
    return [r.pair for r in results if r.dropped is None], report


def require_kept(results: list[RowResult], report: "DataReport") -> None:
    if not results:
        raise DataError("the dataset is empty (no rows)")
    if report.kept == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped.items())
        raise DataError(f"{report.source}: all {report.rows_read} rows were dropped ({reasons}; "
                        f"max_length={report.max_length}); nothing is left to train on")


# --- the report --------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What loading and tokenizing did to a dataset; `format()` is the text printed before training."""

    rows_read: int
    kept: int
    dropped: dict[str, int]  # reason -> count
    identical_pairs: int  # pairs whose completions tokenize the same (dropped unless kept on request)
    max_length: int | None
    max_prompt_length: int | None
    # Token-length summaries of the kept pairs (prompt after max_prompt_length, before max_length):
    prompt_tokens: dict[str, float]
    chosen_tokens: dict[str, float]
    rejected_tokens: dict[str, float]
    sequence_tokens: dict[str, float]  # prompt + the longer completion
    truncated_at_max_length: int  # kept pairs whose chosen or rejected sequence the collator cuts
    chosen_truncated: int
    rejected_truncated: int
    prompts_cut: int  # prompts shortened by max_prompt_length
    prompt_tokens_removed: int
    boundary_merges: int  # rows where prompt tokens merged into the completion at tokenization
    empty_completions: int  # rows with a blank chosen or rejected text (kept: the completion is EOS alone)
    extra_turn_completions: int  # text completions holding another "\n\nHuman:"/"\n\nAssistant:" turn
    data_format: str = ""  # e.g. "text, implicit prompt"
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """The report as readable lines (printed before training and by python -m dpo.data)."""
        lines = [f"data: {self.source}" + (f" ({self.data_format})" if self.data_format else ""),
                 f"rows read: {self.rows_read}",
                 f"kept: {self.kept}",
                 f"dropped: {sum(self.dropped.values())}"]
        lines += [f"  {reason}: {count}" for reason, count in self.dropped.items()]
        lines.append(f"identical pairs (chosen == rejected): {self.identical_pairs}")
        if self.max_length is None:
            lines.append("max_length: none (no truncation)")
        else:
            lines.append(f"max_length {self.max_length}: {self.truncated_at_max_length} kept pairs cut by the "
                         f"collator (chosen {self.chosen_truncated}, rejected {self.rejected_truncated})")
        if self.max_prompt_length is None:
            lines.append("max_prompt_length: none")
        else:
            lines.append(f"max_prompt_length {self.max_prompt_length}: {self.prompts_cut} prompts cut, "
                         f"{self.prompt_tokens_removed} tokens removed from their start")
        lines.append(f"tokens (kept pairs) {'min':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>9}")
        for name, stats in (("prompt", self.prompt_tokens), ("chosen", self.chosen_tokens),
                            ("rejected", self.rejected_tokens), ("sequence", self.sequence_tokens)):
            if stats:
                cells = " ".join(f"{stats[k]:>7}" for k in ("min", "p50", "p90", "p99", "max"))
                lines.append(f"  {name:<17} {cells} {stats['mean']:>9.1f}")
        if self.boundary_merges:
            lines.append(f"prompt/completion boundary merges: {self.boundary_merges} rows (their last prompt "
                         "tokens merged into the completion; the completion starts where the tokens diverge)")
        if self.empty_completions:
            lines.append(f"rows with an empty chosen or rejected reply (kept; that completion is EOS alone): "
                         f"{self.empty_completions}")
        if self.extra_turn_completions:
            lines.append(f"completions holding another dialogue turn: {self.extra_turn_completions}")
        return "\n".join(lines)


def build_report(results: list[RowResult], max_length: int | None, max_prompt_length: int | None,
                 fmt: str = "") -> DataReport:
    kept = [r for r in results if r.dropped is None]
    dropped: dict[str, int] = {}
    for r in results:
        if r.dropped is not None:
            dropped[r.dropped] = dropped.get(r.dropped, 0) + 1
    p = [r.pair for r in kept]
    chosen_seq = [len(x.prompt_ids) + len(x.chosen_ids) for x in p]
    rejected_seq = [len(x.prompt_ids) + len(x.rejected_ids) for x in p]
    over = (lambda n: max_length is not None and n > max_length)
    return DataReport(
        rows_read=len(results),
        kept=len(kept),
        dropped=dict(sorted(dropped.items())),
        identical_pairs=sum(r.pair.chosen_ids == r.pair.rejected_ids for r in results),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompt_tokens=summarize([len(x.prompt_ids) for x in p]),
        chosen_tokens=summarize([len(x.chosen_ids) for x in p]),
        rejected_tokens=summarize([len(x.rejected_ids) for x in p]),
        sequence_tokens=summarize([max(a, b) for a, b in zip(chosen_seq, rejected_seq)]),
        truncated_at_max_length=sum(over(a) or over(b) for a, b in zip(chosen_seq, rejected_seq)),
        chosen_truncated=sum(map(over, chosen_seq)),
        rejected_truncated=sum(map(over, rejected_seq)),
        prompts_cut=sum(r.prompt_tokens_cut > 0 for r in results),
        prompt_tokens_removed=sum(r.prompt_tokens_cut for r in results),
        boundary_merges=sum(r.boundary_merge > 0 for r in results),
        empty_completions=sum(_has_blank_completion(r.row) for r in results),
        extra_turn_completions=sum(_has_extra_turn(r.row) for r in results),
        data_format=fmt,
        source=_sources(r.row for r in results),
    )


def summarize(values: list[int]) -> dict[str, float]:
    """min, nearest-rank p50/p90/p99, max and mean; {} for no values."""
    if not values:
        return {}
    s = sorted(values)

    def rank(q: float) -> int:
        return s[max(0, math.ceil(q / 100 * len(s)) - 1)]

    return {"min": s[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1],
            "mean": round(sum(s) / len(s), 2)}


def _has_blank_completion(row: PreferenceRow) -> bool:
    return not is_conversational(row) and not (row.chosen.strip() and row.rejected.strip())


def _has_extra_turn(row: PreferenceRow) -> bool:
    return not is_conversational(row) and any(
        m in text for text in (row.chosen, row.rejected) for m in (HUMAN_MARKER, ASSISTANT_MARKER))


def _sources(rows) -> str:
    names = list(dict.fromkeys(r.source for r in rows if r.source))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "(rows given in code)"


# --- writing processed rows --------------------------------------------------------------------


def processed_record(result: RowResult) -> dict:
    """One --out line: the texts as split, token counts, and why it was dropped (null when kept)."""
    row, pair = result.row, result.pair
    return {
        "row_id": row.row_id,
        "where": row.where,
        "prompt": row.prompt,
        "chosen": row.chosen,
        "rejected": row.rejected,
        "prompt_tokens": len(pair.prompt_ids),
        "chosen_tokens": len(pair.chosen_ids),
        "rejected_tokens": len(pair.rejected_ids),
        "prompt_tokens_cut": result.prompt_tokens_cut,
        "dropped_reason": result.dropped,
    }


def write_jsonl_atomic(path: str, records) -> None:
    """Write every record, then rename into place: a crash or error never leaves half a file at `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --- the command line: python -m dpo.data --------------------------------------------------------


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m dpo.data",
        description="Check a preference dataset: validate, tokenize as training will, and print a report.")
    p.add_argument("--dataset", required=True, help="a .jsonl/.jsonl.gz/.json/.parquet/.csv file, a folder of "
                                                    "them, or a hub dataset name")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="whose tokenizer to use: a local model folder, or smollm2-135m-instruct (the default)")
    p.add_argument("--max-length", type=int, default=None,
                   help="as TRL: drop pairs whose prompt fills it; the collator cuts longer sequences")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="ours: keep only the last N prompt tokens (a leading BOS stays)")
    p.add_argument("--out", default=None, help="write processed rows as JSONL (written atomically)")
    p.add_argument("--dataset-split", default="train", help="split of a hub dataset")
    p.add_argument("--dataset-config", default=None, help="configuration name of a hub dataset")
    p.add_argument("--prompt-column", default="prompt",
                   help="column holding the prompt (rows without a 'prompt' column have an implicit one)")
    p.add_argument("--chosen-column", default="chosen", help="column holding the preferred reply")
    p.add_argument("--rejected-column", default="rejected", help="column holding the other reply")
    p.add_argument("--implicit-prompt", default="last_assistant", choices=IMPLICIT_PROMPT_RULES,
                   help="rows without a prompt: cut at the last shared '\\n\\nAssistant:' (default), or as TRL "
                        "(at the first differing character)")
    p.add_argument("--keep-identical", action="store_true",
                   help="keep pairs whose completions are identical (TRL keeps them; we drop them by default)")
    return p


def load_tokenizer(model: str):
    """The tokenizer of a local model folder; smollm2-135m-instruct means the embedded default model."""
    from dpo import smollm2

    try:
        path = str(smollm2.plain_copy(with_model=False)) if model == smollm2.DEFAULT_MODEL else model
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing folder, no tokenizer files, default model not installed
        raise DataError(f"{model}: cannot load its tokenizer ({type(e).__name__}: {e})") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_lengths(args.max_length, args.max_prompt_length)
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise DataError(f"{args.out}: the folder to write --out into does not exist")
        spec = DataSpec(args.dataset, args.dataset_split, args.dataset_config, args.prompt_column,
                        args.chosen_column, args.rejected_column, args.implicit_prompt)
        rows = load_rows(spec)  # before the tokenizer: bad data fails in a second
        tokenizer = load_tokenizer(args.model)
        results = process_rows(tokenizer, rows, args.max_length, args.max_prompt_length,
                               drop_identical=not args.keep_identical)
        report = build_report(results, args.max_length, args.max_prompt_length, rows.format)
        require_kept(results, report)
        if args.out:
            write_jsonl_atomic(args.out, (processed_record(r) for r in results))
    except DataError as e:
        print(f"python -m dpo.data: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    print(report.format())
    if args.out:
        print(f"wrote {len(results)} rows ({report.kept} kept) to {args.out}")
    return 0


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
