"""The structure holds: the import layers (import-linter contracts in pyproject.toml), no import of a dpo
module inside a function but where a heavy optional dependency needs it, and modules and functions
short enough to read."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dpo"
MAX_MODULE_LINES = 550
MAX_FUNCTION_LINES = 70
# Function-level imports of dpo modules allowed: each needs a heavy optional dependency first.
LAZY_ALLOWED = {("dpo/models.py", "dpo.unsloth_varlen")}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_imports_point_down_the_layers():
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_dpo_modules_are_imported_at_the_top():
    lazy = set()
    for path in _modules():
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                lazy |= {(str(path.relative_to(ROOT)), n) for n in names if n == "dpo" or n.startswith("dpo.")}
    assert lazy <= LAZY_ALLOWED, sorted(lazy - LAZY_ALLOWED)


def test_modules_and_functions_are_short_enough_to_read():
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append((name, text.count("\n")))
        for fn in (n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append((name, fn.name, fn.end_lineno - fn.lineno + 1))
    assert not long_modules and not long_functions, (long_modules, long_functions)
