"""Where things are: the one rule for a local path (not a hub name), and what a local model folder holds."""

from __future__ import annotations

import os

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")
OR_NAME = "or_name"  # a path setting that names a local file or folder, or else a hub or builtin: name
MODEL_FOLDER_NEEDS = "config.json, the weights as *.safetensors and the tokenizer (tokenizer.json or tokenizer_config.json)"


def looks_local(path: str) -> bool:
    """The one rule for "a local path, not a hub name" (datasets and models alike).

    A hub name is "name" or "org/name". Anything that exists here, starts like a path ("/", ".",
    "~"), has a data file suffix, or holds more than one "/" is local; so a missing local file is
    reported as missing instead of being looked up on the hub.
    """
    return (os.path.exists(os.path.expanduser(path)) or path.startswith((".", "/", "~"))
            or path.lower().endswith(SUFFIXES) or path.count("/") > 1)


def local_path(value: str | None, rule: bool | str = True) -> str | None:
    """The absolute path (~ expanded) a path setting names; None for no value, and under OR_NAME for a hub
    or builtin: name (one that does not look local)."""
    if value is None or (rule == OR_NAME and not looks_local(value)):
        return None
    return os.path.abspath(os.path.expanduser(value))


def model_folder_problem(path: str) -> str | None:
    """Why the local folder `path` cannot be loaded as a model, as one line; None when it looks like one."""
    folder = os.path.expanduser(path)
    if not os.path.exists(folder):
        return f"no such model folder: {path}"
    if not os.path.isdir(folder):
        return f"{path} is a file, not a model folder (a model folder holds {MODEL_FOLDER_NEEDS})"
    names = set(os.listdir(folder))
    if "adapter_config.json" in names and "config.json" not in names:
        return (f"{path} holds a LoRA adapter, not a model: pass it as --adapter, with its base model as --model")
    missing = [what for what, present in (
        ("config.json", "config.json" in names),
        ("weights (*.safetensors)", any(n.endswith(".safetensors") for n in names)),
        ("a tokenizer (tokenizer.json or tokenizer_config.json)", bool(names & {"tokenizer.json", "tokenizer_config.json"})),
    ) if not present]
    if len(missing) == 3:
        return f"{path} holds no model: a model folder needs {MODEL_FOLDER_NEEDS}"
    if missing:
        return f"{path} is not a complete model folder: it lacks {' and '.join(missing)}"
    return None
