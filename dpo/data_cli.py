"""`python -m dpo.data`: check a preference dataset before training on it.

Validates every row, tokenizes as training will (same max length default as training), prints the
data report and, with --out, writes each processed row with its token counts and why it was dropped.
"""

from __future__ import annotations

import os
import sys

from dpo import data
from dpo.cli import Parser, one_line, optional
from dpo.files import write_jsonl_atomic
from dpo.prompts import IMPLICIT_PROMPT_RULES
from dpo.report import build_report, processed_record
from dpo.smollm2 import DEFAULT_MODEL
from dpo.sources import DataError, DataSpec, load_rows

PROG = "python -m dpo.data"


def build_parser() -> Parser:
    p = Parser(prog=PROG,
               description="Check a preference dataset: validate, tokenize as training will, and print a report.")
    p.add_argument("--dataset", required=True, help="a .jsonl/.jsonl.gz/.json/.parquet/.csv file, a folder of "
                                                    "them, or a hub dataset name")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"whose tokenizer to use: a local model folder, or {DEFAULT_MODEL} (the embedded default)")
    p.add_argument("--max-length", type=optional(int), default=data.DEFAULT_MAX_LENGTH,
                   help="as training and TRL: drop pairs whose prompt fills it; the collator cuts longer "
                        "sequences; 'none' for no limit")
    p.add_argument("--max-prompt-length", type=optional(int), default=None,
                   help="ours: keep only the last N prompt tokens (a leading BOS stays)")
    p.add_argument("--out", default=None, help="write processed rows as JSONL (written atomically)")
    p.add_argument("--dataset-split", default="train", help="split of a hub dataset")
    p.add_argument("--dataset-config", default=None, help="configuration name of a hub dataset")
    p.add_argument("--prompt-column", default="prompt",
                   help="column holding the prompt (rows without a 'prompt' column have an implicit one)")
    p.add_argument("--chosen-column", default="chosen", help="column holding the preferred reply")
    p.add_argument("--rejected-column", default="rejected", help="column holding the other reply")
    p.add_argument("--implicit-prompt", default="last_assistant", choices=IMPLICIT_PROMPT_RULES,
                   help="rows without a prompt: cut at the last shared '\\n\\nAssistant:', or as TRL "
                        "(at the first differing character)")
    p.add_argument("--keep-identical", action="store_true",
                   help="keep pairs whose completions are identical (TRL keeps them; we drop them by default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        data.check_lengths(args.max_length, args.max_prompt_length)
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise DataError(f"{args.out}: the folder to write --out into does not exist")
        rows = load_rows(DataSpec.from_config(args))  # before the tokenizer: bad data fails in a second
        tokenizer = data.load_tokenizer(args.model)  # looked up on the module, so tests can substitute it
        results = data.process_rows(tokenizer, rows, args.max_length, args.max_prompt_length,
                                    drop_identical=not args.keep_identical)
        report = build_report(results, args.max_length, args.max_prompt_length, rows.format)
        data.require_kept(results, report)
        if args.out:
            write_jsonl_atomic(args.out, (processed_record(r) for r in results))
    except DataError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(report.format())
    if args.out:
        print(f"wrote {len(results)} rows ({report.kept} kept) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
