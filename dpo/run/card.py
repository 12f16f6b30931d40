"""The model card (README.md) written beside an exported adapter, merged model or GGUF file.

What a user of the exported model needs, read from the run folder: the base model, the data, the
objective and its settings, the steps and optimizer, the held-out numbers before and after training
(eval.json) or the last logged step (metrics.jsonl), how to load the export, and the commands that made it.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from dpo.cli import python_command
from dpo.config import TrainConfig
from dpo.files import write_text_atomic
from dpo.smollm2 import DEFAULT_MODEL

# The embedded default is a GGUF copy of this hub model: a card names what loads anywhere.
DEFAULT_MODEL_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_SETTINGS = tuple((f.name, f.metadata["card"]) for f in fields(TrainConfig) if f.metadata.get("card"))


def base_model_name(model: str) -> str:
    """The name a card gives the base: the hub name for the embedded default, else as configured."""
    return DEFAULT_MODEL_HUB_NAME if model == DEFAULT_MODEL else model


def read_run(run_dir: Path) -> dict:
    """config.json, the last metrics.jsonl row with a training loss, and eval.json (each {} when absent)."""
    run_dir = Path(run_dir)

    def load(name):
        try:
            return json.loads((run_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    last = {}
    try:
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if "loss" in row:
                last = row
    except (OSError, ValueError):
        pass
    return {"config": load("config.json"), "last_step": last, "eval": load("eval.json")}


def model_card(run_dir: Path, kind: str, how_to_load: str, commands: list[str]) -> str:
    """The card's Markdown: kind is "adapter", "merged" or "gguf"."""
    run = read_run(run_dir)
    cfg = run["config"]
    base = base_model_name(str(cfg.get("model", "unknown")))
    front = ["---", f"base_model: {base}", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
             "tags:", "- dpo", "- preference-optimization", f"- {kind}", "---", ""]
    lines = front + [f"# {Path(run_dir).resolve().name} ({kind})", "",
                     f"Direct Preference Optimization (DPO) of [{base}](https://huggingface.co/{base}) "
                     "with a LoRA adapter, trained with this repository's `python -m dpo.train`.", ""]
    lines += _data_section(cfg) + _settings_section(cfg, run["last_step"]) + _results_section(run)
    lines += ["## How to load", "", "```python", how_to_load.strip(), "```", ""]
    lines += ["## How it was made", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def _data_section(cfg: dict) -> list[str]:
    data = cfg.get("dataset") or "the built-in preference task (dpo/data/tasks.py)"
    lines = ["## Data", "", f"- training pairs: `{data}`"]
    if cfg.get("dataset_split") and cfg.get("dataset"):
        lines.append(f"- split: `{cfg['dataset_split']}`")
    if cfg.get("eval_dataset"):
        lines.append(f"- held-out pairs: `{cfg['eval_dataset']}`")
    return lines + [""]


def _settings_section(cfg: dict, last: dict) -> list[str]:
    lines = ["## Objective and training", "", "| setting | value |", "| --- | --- |"]
    for key, label in _SETTINGS:
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            value = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"| {label} | {value} |")
    if last:
        lines.append(f"| optimizer steps | {last.get('step', '?')} |")
    lines.append("")
    if last:
        shown = {k: v for k, v in last.items() if k != "step" and isinstance(v, (int, float))}
        lines += [f"Last training step ({last.get('step', '?')}): "
                  + ", ".join(f"{k} {_num(v)}" for k, v in shown.items()), ""]
    return lines


def _results_section(run: dict) -> list[str]:
    ev = run["eval"]
    before, after = ev.get("before") or {}, ev.get("after") or {}
    if not before and not after:
        return ["## Held-out results", "", "Not evaluated (train with `--eval-dataset` for before/after numbers).", ""]
    n = ev.get("num_pairs")
    lines = ["## Held-out results", "", f"{n} held-out pairs" + (f" ({ev['task']})" if ev.get("task") else "") + ":", "",
             "| metric | before | after |", "| --- | ---: | ---: |"]
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, (int, float)) or isinstance(b, (int, float)):
            lines.append(f"| {key} | {_num(a)} | {_num(b)} |")
    return lines + [""]


def _num(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_model_card(folder: Path, run_dir: Path, kind: str, how_to_load: str, commands: list[str]) -> Path:
    """README.md in `folder` (written atomically); returns its path."""
    path = Path(folder) / "README.md"
    write_text_atomic(path, model_card(run_dir, kind, how_to_load, commands))
    return path


def adapter_loading(base: str, folder) -> str:
    """Python that loads an adapter folder onto its base model."""
    return (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})")


def merged_loading(folder) -> str:
    """Python that loads a merged model folder."""
    return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})")


def write_run_card(run_dir) -> Path:
    """The card of a finished run's own adapter (RUN/adapter/README.md), for training to call at its end,
    after eval.json is written (it replaces the blank template PEFT's save_pretrained leaves there)."""
    run_dir = Path(run_dir)
    base = base_model_name(str(read_run(run_dir)["config"].get("model", "unknown")))
    command = python_command("dpo.train", ["--config", str(run_dir / "config.json")])
    return write_model_card(run_dir / "adapter", run_dir, "adapter", adapter_loading(base, run_dir / "adapter"), [command])
