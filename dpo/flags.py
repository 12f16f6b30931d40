"""The command line and config files into the one TrainConfig: a flag for each field (its help, type and
choices from the field), `--config FILE` (YAML or JSON, each value converted to the field's type or refused
in one line), flags winning, then the config's own validation (dpo/config.py)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

from dpo.cli import Parser, optional
from dpo.config import FLOAT16_NAMES, FLOAT16_REFUSAL, ConfigError, TrainConfig, _flag


def _show(value) -> str:
    """A default as a user would type it: lists space-separated."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _scalar_type(tp):
    """The element type behind Optional[...] / list[...]: str, int, float or bool."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is list:
        return args[0]
    if args:
        return _scalar_type(args[0])
    return tp


def _dtype_name(text: str) -> str:
    if text.lower() in FLOAT16_NAMES:
        raise argparse.ArgumentTypeError(FLOAT16_REFUSAL)
    return text


class _HelpFormat(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog as written (argparse would break flags at their hyphens)."""


def build_parser(prog: str = "python -m dpo.train", cls=TrainConfig, epilog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, name="dpo", description="Train a LoRA adapter with Direct Preference Optimization.",
                    epilog=epilog and textwrap.fill(epilog, 100, break_on_hyphens=False), formatter_class=_HelpFormat)
    parser.add_argument("--config", help="YAML or JSON file of options; flags given here win", default=None)
    add_field_arguments(parser, cls=cls)
    return parser


def add_field_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None, cls=TrainConfig) -> None:
    """A flag for each field of `cls` (those in `names`, default all) with its help and type; a flag not
    given leaves no attribute (SUPPRESS), so the caller knows what was typed. `python -m dpo.evaluate`
    takes the loss settings' flags from here, as training does."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        tp = hints[f.name]
        kind = _scalar_type(tp)
        help_text = f.metadata["help"]
        flags = (_flag(f.name), *f.metadata.get("aliases", ()))
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text + f" (default: {_show(f.default)})")
            continue
        nullable = type(None) in get_args(tp)
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text + f" (default: {_show(f.default)})")
        kw["type"] = optional(kind) if nullable and get_origin(tp) is not list else kind
        if get_origin(tp) is list or list in (get_origin(a) for a in get_args(tp)):
            kw["nargs"] = "+"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.name == "dtype":
            kw["type"] = _dtype_name
        parser.add_argument(*flags, **kw)


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ConfigError(f"--config: cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_from_args(argv: list[str] | None = None, cls=TrainConfig, base: dict | None = None,
                     epilog: str | None = None):
    """Flags (and --config FILE) -> a validated config. Raises ConfigError on bad values. `epilog` ends --help.

    Precedence: dataclass defaults < `base` (e.g. the default run's settings) < config file < flags."""
    args = vars(build_parser(cls=cls, epilog=epilog).parse_args(argv))
    file_path = args.pop("config", None)
    values = dict(base or {})
    values.update(read_config_file(file_path) if file_path else {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config: unknown option(s) {', '.join(unknown)} in {file_path}")
    hints = get_type_hints(cls)
    values = {k: coerce(k, v, hints[k], file_path) for k, v in values.items()}
    values.update(args)  # flags win (argparse has converted them)
    try:
        config = cls(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    config.validate()
    return config


# --- config-file values to the field's type ----------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(key: str, value: Any, tp, source: str | None = None) -> Any:
    """A config-file value as the field's type where that is unambiguous: "5e-6" (PyYAML reads 5e-6 as a
    string) -> 5e-06, "0.1" -> 0.1, "no" -> False, "ipo" for a list field -> ["ipo"]. Otherwise a
    ConfigError naming the key, the value and the type wanted."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if type(None) in get_args(tp) and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if get_origin(tp) is list or any(get_origin(a) is list for a in args):
        (item,) = get_args(tp if get_origin(tp) is list else next(a for a in args if get_origin(a) is list))
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_scalar(key, v, item, source) for v in items]
    return _scalar(key, value, args[0] if args else tp, source)


def _scalar(key: str, value: Any, kind, source: str | None) -> Any:
    converted = _convert(value, kind)
    if converted is _REFUSED:
        where = f" in {source}" if source else ""
        wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, kind.__name__)
        raise ConfigError(f"--config: {key}: {value!r} is not {wanted}{where}")
    return converted


_REFUSED = object()


def _convert(value: Any, kind) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        return True if text in _TRUE else False if text in _FALSE else _REFUSED
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):
        return _REFUSED  # True is not a number, a list is not a scalar
    if kind is str:
        return str(value) if isinstance(value, (str, int, float)) else _REFUSED
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _REFUSED
    if kind is float:
        return number
    if kind is int:
        return int(number) if number.is_integer() else _REFUSED
    return value
