"""llama.cpp's own converters, `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py`, run as subprocesses.

They come from the source distribution of the pinned `llama-cpp-python` (the `gguf` extra), so the
converter, the quantizer and the runtime that verifies the file are one llama.cpp version. `scripts/setup.sh`
(dev or gguf) fetches that archive with pip and unpacks the two scripts, their `conversion/` package and
their `gguf-py` into the environment (`<venv>/share/dpo-llamacpp/<version>/`, about 2 MB); export needs no
network. Each converter runs with `sys.executable` and its own gguf-py first on PYTHONPATH (the `gguf`
package installed beside dpo may be another version).

    python -m dpo.export.llamacpp_convert unpack llama_cpp_python-0.3.36.tar.gz     # what setup.sh runs
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # as pinned by the `gguf` extra in pyproject.toml
SETUP_HINT = "bash scripts/setup.sh gguf (or dev)"
ENV_OVERRIDE = "DPO_LLAMACPP_CONVERTER"  # a folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/
# What export needs of the archive's vendor/llama.cpp folder (scripts, the model classes, the matching gguf-py).
MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what the converters write themselves


class ConverterError(Exception):
    """The converter is missing or refused the model; printed as one line."""


def default_dir() -> Path:
    return Path(sys.prefix) / "share" / "dpo-llamacpp" / LLAMA_CPP_PYTHON_VERSION


def converter_dir() -> Path:
    """The unpacked llama.cpp converter tree, or one line naming the set-up command that makes it."""
    folder = Path(os.environ.get(ENV_OVERRIDE) or default_dir())
    if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py" / "gguf").is_dir():
        raise ConverterError(
            f"llama.cpp's GGUF converter is not installed (looked in {folder}): run {SETUP_HINT}, which unpacks "
            f"it from the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} source archive"
        )
    return folder


def supported_architectures() -> frozenset[str]:
    """The Hugging Face architectures (config.json "architectures") the converter has a text-model class for,
    read from its table (conversion/__init__.py's TEXT_MODEL_MAP) without importing it (that loads torch)."""
    import ast

    tree = ast.parse((converter_dir() / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return frozenset()


def refused_architecture(architecture: str | None) -> str | None:
    """One line when the converter has no class for `architecture`, else None (None: unknown, let it decide)."""
    known = supported_architectures()
    if architecture is None or not known or architecture in known:
        return None
    return (f"llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}) does not support the "
            f"architecture {architecture}: export --format merged instead")


def unpack(archive: Path, dest: Path | None = None) -> Path:
    """Extract MEMBERS of the sdist's vendor/llama.cpp into `dest` (default_dir()); returns `dest`."""
    dest = Path(dest or default_dir())
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(archive) as tar:
        chosen = [m for m in tar.getmembers()
                  if m.isfile() and m.name.startswith(prefix) and m.name[len(prefix):].startswith(MEMBERS)]
        if not any(m.name.endswith("/convert_hf_to_gguf.py") for m in chosen):
            raise ConverterError(f"{archive} holds no {prefix}convert_hf_to_gguf.py")
        for m in chosen:
            m.name = m.name[len(prefix):]
            tar.extract(m, tmp, filter="data")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _run(script: str, args: list[str], what: str) -> None:
    tree = converter_dir()
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the scripts put their own gguf-py first unless this is set
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py"), str(tree)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")  # every input is a local folder
    proc = subprocess.run([sys.executable, str(tree / script), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ConverterError(refusal(proc.stderr + proc.stdout, what))


def refusal(log: str, what: str) -> str:
    """One line from a failed converter's log: the unsupported architecture, else its last error."""
    m = re.search(r"Model (\S+) is not supported", log) or re.search(r"Architecture '([^']+)' not supported", log)
    if m:
        return (f"llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}) does not support the "
                f"architecture {m.group(1)}: export --format merged instead")
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("ERROR")] or lines or ["no output"]
    return f"llama.cpp's converter failed on {what}: {errors[-1]}"


def convert_model(model_dir: Path, out: Path, outtype: str) -> None:
    """A Hugging Face model folder -> one GGUF file of `outtype` (OUTTYPES), by convert_hf_to_gguf.py."""
    _run("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", outtype], str(model_dir))


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> None:
    """A PEFT LoRA adapter folder (and its base model's folder, for the config) -> a GGUF LoRA file."""
    _run("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out),
                                     "--outtype", outtype], str(adapter_dir))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "unpack":
        print("usage: python -m dpo.export.llamacpp_convert unpack ARCHIVE.tar.gz", file=sys.stderr)
        return 2
    try:
        print(f"llama.cpp converter unpacked into {unpack(Path(argv[1]))}")
    except (ConverterError, OSError, tarfile.TarError) as e:
        print(f"dpo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
