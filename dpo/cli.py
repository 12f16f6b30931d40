"""What every `python -m dpo.*` command line shares: one parser base and one-line error text.

- Parser: argparse with one-line errors (exit 2, no usage dump), defaults shown in --help, and
  negative numbers accepted as values (`--learning-rate -1e-5` is a value, not an unknown flag).
- one_line(e): an exception (or text) as a single line, for messages that must never be a traceback.
- optional(kind): an argparse `type` that also takes "none" (a flag whose default can be switched off).
- progress(iterable): a tqdm bar for long work that stays silent when the work is quick.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

# argparse takes "-1e-5" for an option: its own rule knows only "-1" and "-1.5".
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Parser(argparse.ArgumentParser):
    """argparse for our commands: `prog: error: ... (see --help)` on one line, exit 2."""

    def __init__(self, *args, name: str | None = None, **kwargs):
        self.name = name  # what an error line starts with (default: prog)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.name or self.prog}: error: {message} (see --help)\n")


def optional(kind):
    """An argparse `type` for a value that may be absent: "none" or "null" (any case) is None, anything
    else goes through `kind` (argparse's error names `kind`, e.g. "invalid int value")."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def one_line(error: BaseException | str) -> str:
    """The text of an error as one line: its non-empty lines joined with ' | ', colours stripped.

    An exception with no text gives its type's name, so the line is never empty."""
    text = _ANSI.sub("", str(error))
    parts = [part.strip() for part in text.splitlines() if part.strip()]
    if parts:
        return " | ".join(parts)
    return type(error).__name__ if isinstance(error, BaseException) else ""


def first_line(error: BaseException | str) -> str:
    """Only the first non-empty line of an error (for libraries whose later lines are noise)."""
    return one_line(error).split(" | ", 1)[0]


def python_command(module: str, args: list[str], from_anywhere: bool = False) -> str:
    """The command line that runs `python -m module args` again, with the interpreter that runs now
    (a `.venv/bin/python` stays that, so the printed command works when copied as is; from_anywhere:
    its absolute path, for a command that must work from any folder)."""
    exe = (sys.executable or "python") if from_anywhere else _interpreter()
    return shlex.join([exe, "-m", module, *args])


def _interpreter() -> str:
    exe = sys.executable or "python"
    try:
        rel = os.path.relpath(exe)
    except ValueError:  # another drive (Windows)
        return exe
    # A relative path inside the current folder (.venv/bin/python) reads better than an absolute one.
    return rel if not rel.startswith("..") and os.path.sep in rel else exe
