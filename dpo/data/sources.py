"""Where preference data comes from: files and hub datasets in, checked PreferenceRow out.

`load_rows(spec)` reads .jsonl, .jsonl.gz, .json, .parquet, .csv files, a folder of them, or a hub
dataset (which of the two: `looks_local`, the one rule for every path the project is given), and
accepts three row formats:
- explicit prompt: prompt, chosen and rejected strings;
- implicit prompt (Anthropic HH-RLHF): only chosen and rejected, each a whole dialogue; the prompt is
  cut from what they share (dpo.data.prompts);
- conversational: the same fields as lists of {"role", "content"} messages (explicit or implicit).
Other columns are ignored (`tools` and `chat_template_kwargs`, which TRL renders, are refused).
Anything else stops the load with one `DataError` naming the file, the row (line for JSON Lines) and
the problem; nothing is silently skipped at this stage. An empty prompt is an error; an empty chosen
or rejected reply is not (real data has them, e.g. UltraFeedback; the completion is then the EOS
token alone, as in TRL). Mixed formats in one dataset are an error (TRL looks at the first row only).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from dpo.paths import SUFFIXES, looks_local
from dpo.progress import iterate as progress
from dpo.data.prompts import IMPLICIT_PROMPT_RULES, split_implicit



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


def is_conversational(row: PreferenceRow) -> bool:
    return isinstance(row.prompt, list)


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

    @classmethod
    def from_config(cls, cfg, path: str | None = None) -> "DataSpec":
        """The spec of a run's data: `cfg` is a TrainConfig, or any object with its data fields
        (dataset, dataset_split, dataset_config, prompt_column, chosen_column, rejected_column,
        implicit_prompt; an argparse namespace of the same flags); fields it lacks keep their defaults.

        `path` names another dataset read with the same columns and implicit-prompt rule (e.g. the
        --eval-dataset); --dataset-split and --dataset-config belong to --dataset, so they apply only
        when `path` is None.
        """
        values = {f.name: getattr(cfg, name) for f, name in zip(dataclasses.fields(cls), _CONFIG_NAMES)
                  if hasattr(cfg, name)}
        if path is not None:
            values = {k: v for k, v in values.items() if k not in ("path", "split", "config")}
            values["path"] = path
        if values.get("path") is None:
            raise DataError("no dataset given (--dataset)")
        return cls(**values)


# The config field behind each DataSpec field, in DataSpec's order.
_CONFIG_NAMES = ("dataset", "dataset_split", "dataset_config", "prompt_column", "chosen_column", "rejected_column",
                 "implicit_prompt")


class DataError(ValueError):
    """Bad input data: the message names the file, the row (line for JSON Lines) and the problem."""


Record = tuple[str, str, Any]  # (source: file or hub name, location: "line 3" / "row 3", the raw row)


class Rows(list):
    """The loaded rows (a plain list of PreferenceRow) plus a description of their format."""

    format: str = ""


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
    lines = raw.split(b"\n")
    for n, raw_line in enumerate(progress(lines, desc=f"reading {os.path.basename(path)}", unit="line"), 1):
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
    rows = progress(ds, desc=f"reading {spec.path}", unit="row")
    return [(name, f"row {i}", value) for i, value in enumerate(rows, 1)]


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
    for i, (source, location, value) in enumerate(progress(records, desc="checking rows", unit="row")):
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
        prompt, chosen, rejected = split_implicit(chosen, rejected, spec.implicit_prompt)
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

