"""`python -m dpo.data`: check a preference dataset before training on it.

Validates every row, tokenizes as training will (same max length default as training), prints the
data report and, with --out, writes each processed row with its token counts and why it was dropped.
--loss-type simpo|cpo|orpo|kto: tokenizes as that objective trains (dpo.build: TRL's CPO/ORPO
tokenization, or KTO's unpaired rows, a paired file split into desirable and undesirable rows) and
reports what it keeps, drops and cuts (dpo.data.report.ObjectiveReport).
"""

from __future__ import annotations

import sys

from dpo.data import objective_rows as od
from dpo.data import pairs as data
from dpo.cli import Parser, one_line, optional
from dpo.files import output_problem, write_jsonl_atomic
from dpo.loss_settings import LossSettings
from dpo.losses import LOSS_TYPES, OBJECTIVES
from dpo.data.prompts import IMPLICIT_PROMPT_RULES
from dpo.data.report import PROMPT_FILLS, build_report, kto_report, processed_record, sided_report
from dpo.smollm2 import DEFAULT_MODEL
from dpo.data.sources import DataError, DataSpec, load_rows

PROG = "python -m dpo.data"
NAME = "dpo.data"  # what its error lines start with (python -m dpo.train's: "dpo")


def build_parser() -> Parser:
    p = Parser(prog=PROG, name=NAME,
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
    p.add_argument("--loss-type", default="sigmoid", choices=LOSS_TYPES + OBJECTIVES, metavar="LOSS_TYPE",
                   help="tokenize as this objective trains: a DPO loss type (all tokenize alike), or "
                        f"{', '.join(OBJECTIVES)} (kto also reads unpaired prompt/completion/label rows)")
    return p


def objective_records(args, tokenizer, rows):
    """(ObjectiveReport, --out records) of the rows under --loss-type simpo/cpo/orpo/kto, tokenized as
    training tokenizes them (dpo.objectives: each objective's prepare), each record with its token counts
    before any cut."""
    if not rows:
        raise DataError(f"{args.dataset}: the dataset is empty (no rows)")
    if not LossSettings(loss_type=(args.loss_type,)).unpaired:
        pairs = [od.tokenize_sided(tokenizer, r, None) for r in rows]  # uncut: the report counts cuts
        kept = [p for p in pairs if od.sided_keeps(p, args.max_length)]
        report = sided_report(args.loss_type, pairs, kept, args.max_length, args.dataset)
        if not kept:
            raise DataError(f"{args.dataset}: all {len(pairs)} pairs were dropped (every prompt fills max_length "
                            f"{args.max_length}); nothing is left to train on")
        records = [{"row_id": r.row_id, "where": r.where, "chosen_prompt_tokens": len(x.chosen_prompt_ids),
                    "chosen_tokens": len(x.chosen_ids), "rejected_prompt_tokens": len(x.rejected_prompt_ids),
                    "rejected_tokens": len(x.rejected_ids),
                    "dropped_reason": None if od.sided_keeps(x, args.max_length) else PROMPT_FILLS}
                   for r, x in zip(rows, pairs)]
        return report, records
    unpaired = rows if isinstance(rows[0], od.UnpairedRow) else od.unpair_rows(list(rows))
    tokenized = [od.tokenize_unpaired(tokenizer, r) for r in unpaired]
    kept = [t for t in tokenized if od.kto_keeps(t, args.max_length)]
    report = kto_report(len(rows), tokenized, kept, args.max_length, args.dataset)
    if not kept:
        raise DataError(f"{args.dataset}: all {len(tokenized)} rows were dropped (every prompt fills max_length "
                        f"{args.max_length}); nothing is left to train on")
    records = [{"row_id": u.row_id, "where": u.where, "label": u.label, "prompt_tokens": len(t.prompt_ids),
                "completion_tokens": len(t.completion_ids),
                "dropped_reason": None if od.kto_keeps(t, args.max_length) else "prompt_fills_max_length"}
               for u, t in zip(unpaired, tokenized)]
    return report, records


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    objective = args.loss_type if args.loss_type in OBJECTIVES else None
    if objective and (args.max_prompt_length is not None or args.keep_identical):
        flag = "--max-prompt-length" if args.max_prompt_length is not None else "--keep-identical"
        parser.error(f"{flag}: applies to DPO pairs only; --loss-type {objective} tokenizes as its TRL trainer does")
    try:
        data.check_lengths(args.max_length, args.max_prompt_length)
        if args.out and (problem := output_problem(args.out)) is not None:
            raise DataError(f"--out: {problem}")
        if objective:
            rows = od.read_spec_rows(  # KTO: unpaired rows, each label checked (file and row named)
                DataSpec.from_config(args), unpaired=LossSettings(loss_type=(objective,)).unpaired)
        else:
            rows = load_rows(DataSpec.from_config(args))  # before the tokenizer: bad data fails in a second
        tokenizer = data.load_tokenizer(args.model)  # looked up on the module, so tests can substitute it
        if objective:
            report, records = objective_records(args, tokenizer, rows)
        else:
            results = data.process_rows(tokenizer, rows, args.max_length, args.max_prompt_length,
                                        drop_identical=not args.keep_identical)
            report = build_report(results, args.max_length, args.max_prompt_length, rows.format)
            data.require_kept(results, report)
            records = [processed_record(r) for r in results]
        if args.out:
            write_jsonl_atomic(args.out, records)
    except DataError as e:
        print(f"{NAME}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(report.format())
    if args.out:
        print(f"wrote {len(records)} rows ({report.kept} kept) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
