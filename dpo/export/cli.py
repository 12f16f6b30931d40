"""`python -m dpo.export`: export a training run: its LoRA adapter, a merged Hugging Face model, or GGUF files for llama.cpp and Ollama.

    python -m dpo.export --run-dir RUN --format adapter   --output OUT_DIR
    python -m dpo.export --run-dir RUN --format merged    --output OUT_DIR [--dtype bfloat16|float16|float32]
    python -m dpo.export --run-dir RUN --format gguf      --output OUT.gguf [--quantization f16|f32|q8_0|q4_0|q4_k_m|...]
    python -m dpo.export --run-dir RUN --format gguf-lora --output OUT.gguf

A run directory holds `config.json` (its "model" names the base: a local path, a hub name or
`smollm2-135m-instruct`) and `adapter/` (a PEFT LoRA adapter with the tokenizer beside it).

- adapter: the adapter folder (and the tokenizer) copied to OUT_DIR.
- merged: the base model in float32, the adapter applied and merged (`merge_and_unload`), saved as
  a plain HF folder in `--dtype` (bfloat16 by default) with the tokenizer. Verified by reloading it
  and comparing logits with the in-memory float32 merged model.
- gguf: the float32 merged folder converted by llama.cpp's own `convert_hf_to_gguf.py` (dpo.export.llamacpp_convert:
  every architecture it knows) to f32/f16, or to f32 and then quantized by llama.cpp's quantizer
  (dpo.export.llamacpp). Verified in llama.cpp: logits, top-1 and a greedy generation against the float32 merge,
  its tokenizer against ours, and whether the adapter is in the file (dpo.export.gguf_weights: the file's
  dequantised weights against the merged and the base weights).
- gguf-lora: the adapter alone as a GGUF LoRA (f32, by `convert_lora_to_gguf.py`), and the base model as GGUF
  `--quantization` beside it (OUT-base-f16.gguf), which llama.cpp and Ollama apply it to; verified in llama.cpp
  (the LoRA over the base file) against the float32 merge.
Each GGUF gets an Ollama Modelfile beside it (dpo.export.modelfile).

Everything is written to `OUT.tmp` first and renamed into place. Errors print one line and exit 2;
a failed verification exits 1 (the file stays, for inspection).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpo.cli import Parser, first_line, python_command
from dpo.export.common import (
    ExportError, FORMATS, MERGED_DTYPES, QUANTIZATIONS, Run, Verification, describe_path, base_model, merged_model,
    open_run)
from dpo.export.gguf import export_gguf, export_gguf_lora, verify_gguf
from dpo.export.merged import export_adapter, export_merged, verify_merged


# ---------------------------------------------------------------------------------------- CLI


NAME = "dpo.export"  # what its error lines start with (python -m dpo.train's: "dpo")


def build_parser() -> Parser:
    p = Parser(
        prog="python -m dpo.export", name=NAME,
        description="Export a training run as its LoRA adapter, a merged HF model, or a GGUF file.",
    )
    p.add_argument("--run-dir", required=True, default=argparse.SUPPRESS, help="the training run directory (config.json, adapter/)")
    p.add_argument("--format", required=True, choices=FORMATS, default=argparse.SUPPRESS, help=" | ".join(FORMATS))
    p.add_argument("--output", required=True, default=argparse.SUPPRESS,
                   help="folder (adapter, merged) or .gguf file (gguf, gguf-lora; a folder works too)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=argparse.SUPPRESS,
                   help="gguf (for gguf-lora: the base model's file); f16 when not given")
    p.add_argument("--dtype", choices=MERGED_DTYPES, default=argparse.SUPPRESS,
                   help="merged only; bfloat16 when not given")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of unexpected errors")
    return p


def _say(text: str) -> None:
    """A progress line: the phases of an export take seconds to minutes."""
    print(f"export: {text}", flush=True)


def _commands(run: Run, argv: list[str]) -> list[str]:
    return [python_command("dpo.train", ["--config", str(run.dir / "config.json")]) + "   # the training run",
            python_command("dpo.export", argv)]


def run_export(args, argv: list[str] | None = None) -> int:
    quantization, dtype = getattr(args, "quantization", None), getattr(args, "dtype", None)
    if quantization is not None and not args.format.startswith("gguf"):
        raise ExportError("--quantization applies to --format gguf and gguf-lora only")
    if dtype is not None and args.format != "merged":
        raise ExportError("--dtype applies to --format merged only")
    run = open_run(args.run_dir)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    commands = _commands(run, argv if argv is not None else sys.argv[1:])
    if args.format == "adapter":
        out = export_adapter(run, args.output, overwrite=args.overwrite, commands=commands)
        print(f"wrote adapter: {describe_path(out)}")
        print(f"base model for this adapter: {run.config['model']}")
        return 0
    if args.format == "merged":
        return _run_merged(run, args, dtype or "bfloat16", commands)
    if args.format == "gguf-lora":
        return _run_gguf_lora(run, args, quantization or "f16")
    return _run_gguf(run, args, quantization or "f16")


def _run_merged(run: Run, args, dtype: str, commands: list[str]) -> int:
    _say(f"loading {run.base} and merging the adapter (float32)")
    out, model, tokenizer = export_merged(run, args.output, dtype, overwrite=args.overwrite, commands=commands)
    print(f"wrote merged {dtype} model: {describe_path(out)}")
    if args.no_verify:
        return 0
    _say("verifying: reloading the folder and comparing logits")
    return _report([verify_merged(out, model, tokenizer, dtype)])


def _print_summary(what: str, out: Path, summary: dict) -> None:
    types = ", ".join(f"{v} {k}" for k, v in summary["tensor_types"].items())
    print(f"wrote {what}: {describe_path(out)}; architecture {summary['architecture']}; tensors: {types}; "
          f"tokenizer.ggml.model={summary['tokenizer']}, pre={summary['pre']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote Ollama Modelfile: {summary['modelfile']} (ollama create NAME -f {summary['modelfile']})")


def _run_gguf(run: Run, args, quantization: str) -> int:
    _say(f"loading {run.base}, merging the adapter (float32) and converting it with llama.cpp's converter "
         f"to GGUF {quantization}")
    out, summary, model, tokenizer = export_gguf(run, args.output, quantization, overwrite=args.overwrite)
    _print_summary(f"GGUF {quantization}", out, summary)
    if args.no_verify:
        return 0
    _say("verifying in llama.cpp (the base model is loaded too, to check that the adapter is in the file)")
    return _report([verify_gguf(out, model, tokenizer, quantization, base=base_model(run))])


def _run_gguf_lora(run: Run, args, quantization: str) -> int:
    _say(f"converting the adapter and the base model {run.base} (GGUF {quantization}) with llama.cpp's converters")
    out, base_out, summary, tokenizer = export_gguf_lora(run, args.output, quantization, overwrite=args.overwrite)
    print(f"wrote GGUF LoRA: {describe_path(out)}")
    _print_summary(f"its base model as GGUF {quantization}", base_out, summary)
    if args.no_verify:
        return 0
    _say("verifying in llama.cpp: the LoRA over the base file against the merged model")
    model, base = merged_model(run), base_model(run)
    return _report([verify_gguf(base_out, model, tokenizer, quantization, base=base, lora=out)])


def _report(checks: list[Verification]) -> int:
    for v in checks:
        print(v.line())
        for note in v.notes:
            print(f"  {note}")
    return 0 if all(v.ok for v in checks) else 1


def main(argv: list[str] | None = None) -> int:
    # Keep the output to what was written and how it verified: the libraries' plain tqdm bars are switched
    # off only by the environment, read when tqdm is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        return run_export(args, argv)
    except ExportError as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full place: name the path and the cause, as training does
        where = e.filename or args.output
        print(f"{NAME}: error: could not write the export to {where}: {e.strerror or first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{NAME}: error: interrupted", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user; --traceback for a bug report
        if args.traceback:
            raise
        print(f"{NAME}: error: unexpected {type(e).__name__}: {first_line(e)} (rerun with --traceback for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
