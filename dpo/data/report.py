"""The data report: what loading and tokenizing did to a dataset (read, kept, dropped and why,
token-length summaries, truncation), printed before training and by `python -m dpo.data`; and the
per-row records `python -m dpo.data --out` writes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dpo.data.prompts import ASSISTANT_MARKER, HUMAN_MARKER
from dpo.data.sources import PreferenceRow, is_conversational



@dataclass
class RowResult:
    """One row after tokenization: its pair (prompt already cut to max_prompt_length) and fate."""

    row: PreferenceRow
    pair: Any  # its dpo.data.pairs.TokenizedPair
    dropped: str | None = None  # one of dpo.data.pairs' drop reasons, or None when kept
    prompt_tokens_cut: int = 0  # tokens max_prompt_length removed from the prompt's start
    boundary_merge: int = 0  # prompt tokens that merged into the completion (TRL warns about these)


@dataclass
class DataReport:
    """What loading and tokenizing did to a dataset; `format()` is the text printed before training."""

    rows_read: int
    kept: int
    dropped: dict[str, int]  # reason -> count
    identical_pairs: int  # pairs whose completions tokenize the same (dropped unless kept on request)
    max_length: int | None
    max_prompt_length: int | None
    # Token-length summaries of the kept pairs (prompt after max_prompt_length, before max_length):
    prompt_tokens: dict[str, float]
    chosen_tokens: dict[str, float]
    rejected_tokens: dict[str, float]
    sequence_tokens: dict[str, float]  # prompt + the longer completion
    truncated_at_max_length: int  # kept pairs whose chosen or rejected sequence the collator cuts
    chosen_truncated: int
    rejected_truncated: int
    prompts_cut: int  # prompts shortened by max_prompt_length
    prompt_tokens_removed: int
    boundary_merges: int  # rows where prompt tokens merged into the completion at tokenization
    empty_completions: int  # rows with a blank chosen or rejected text (kept: the completion is EOS alone)
    extra_turn_completions: int  # text completions holding another "\n\nHuman:"/"\n\nAssistant:" turn
    data_format: str = ""  # e.g. "text, implicit prompt"
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """The report as readable lines (printed before training and by python -m dpo.data)."""
        lines = [f"data: {self.source}" + (f" ({self.data_format})" if self.data_format else ""),
                 f"rows read: {self.rows_read}",
                 f"kept: {self.kept}",
                 f"dropped: {sum(self.dropped.values())}"]
        lines += [f"  {reason}: {count}" for reason, count in self.dropped.items()]
        lines.append(f"identical pairs (chosen == rejected): {self.identical_pairs}")
        if self.max_length is None:
            lines.append("max_length: none (no truncation)")
        else:
            lines.append(f"max_length {self.max_length}: {self.truncated_at_max_length} kept pairs cut by the "
                         f"collator (chosen {self.chosen_truncated}, rejected {self.rejected_truncated})")
        if self.max_prompt_length is None:
            lines.append("max_prompt_length: none")
        else:
            lines.append(f"max_prompt_length {self.max_prompt_length}: {self.prompts_cut} prompts cut, "
                         f"{self.prompt_tokens_removed} tokens removed from their start")
        lines.append(f"tokens (kept pairs) {'min':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>9}")
        for name, stats in (("prompt", self.prompt_tokens), ("chosen", self.chosen_tokens),
                            ("rejected", self.rejected_tokens), ("sequence", self.sequence_tokens)):
            if stats:
                cells = " ".join(f"{stats[k]:>7}" for k in ("min", "p50", "p90", "p99", "max"))
                lines.append(f"  {name:<17} {cells} {stats['mean']:>9.1f}")
        if self.boundary_merges:
            lines.append(f"prompt/completion boundary merges: {self.boundary_merges} rows (their last prompt "
                         "tokens merged into the completion; the completion starts where the tokens diverge)")
        if self.empty_completions:
            lines.append(f"rows with an empty chosen or rejected reply (kept; that completion is EOS alone): "
                         f"{self.empty_completions}")
        if self.extra_turn_completions:
            lines.append(f"completions holding another dialogue turn: {self.extra_turn_completions}")
        return "\n".join(lines)


def build_report(results: list[RowResult], max_length: int | None, max_prompt_length: int | None,
                 fmt: str = "") -> DataReport:
    kept = [r for r in results if r.dropped is None]
    dropped: dict[str, int] = {}
    for r in results:
        if r.dropped is not None:
            dropped[r.dropped] = dropped.get(r.dropped, 0) + 1
    p = [r.pair for r in kept]
    chosen_seq = [len(x.prompt_ids) + len(x.chosen_ids) for x in p]
    rejected_seq = [len(x.prompt_ids) + len(x.rejected_ids) for x in p]
    over = (lambda n: max_length is not None and n > max_length)
    return DataReport(
        rows_read=len(results),
        kept=len(kept),
        dropped=dict(sorted(dropped.items())),
        identical_pairs=sum(r.pair.chosen_ids == r.pair.rejected_ids for r in results),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompt_tokens=summarize([len(x.prompt_ids) for x in p]),
        chosen_tokens=summarize([len(x.chosen_ids) for x in p]),
        rejected_tokens=summarize([len(x.rejected_ids) for x in p]),
        sequence_tokens=summarize([max(a, b) for a, b in zip(chosen_seq, rejected_seq)]),
        truncated_at_max_length=sum(over(a) or over(b) for a, b in zip(chosen_seq, rejected_seq)),
        chosen_truncated=sum(map(over, chosen_seq)),
        rejected_truncated=sum(map(over, rejected_seq)),
        prompts_cut=sum(r.prompt_tokens_cut > 0 for r in results),
        prompt_tokens_removed=sum(r.prompt_tokens_cut for r in results),
        boundary_merges=sum(r.boundary_merge > 0 for r in results),
        empty_completions=sum(_has_blank_completion(r.row) for r in results),
        extra_turn_completions=sum(_has_extra_turn(r.row) for r in results),
        data_format=fmt,
        source=_sources(r.row for r in results),
    )


def summarize(values: list[int]) -> dict[str, float]:
    """min, nearest-rank p50/p90/p99, max and mean; {} for no values."""
    if not values:
        return {}
    s = sorted(values)

    def rank(q: float) -> int:
        return s[max(0, math.ceil(q / 100 * len(s)) - 1)]

    return {"min": s[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1],
            "mean": round(sum(s) / len(s), 2)}


def _has_blank_completion(row: PreferenceRow) -> bool:
    return not is_conversational(row) and not (row.chosen.strip() and row.rejected.strip())


def _has_extra_turn(row: PreferenceRow) -> bool:
    return not is_conversational(row) and any(
        m in text for text in (row.chosen, row.rejected) for m in (HUMAN_MARKER, ASSISTANT_MARKER))


def _sources(rows) -> str:
    names = list(dict.fromkeys(r.source for r in rows if r.source))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "(rows given in code)"


def processed_record(result: RowResult) -> dict:
    """One --out line: the texts as split, token counts, and why it was dropped (null when kept)."""
    row, pair = result.row, result.pair
    return {
        "row_id": row.row_id,
        "where": row.where,
        "prompt": row.prompt,
        "chosen": row.chosen,
        "rejected": row.rejected,
        "prompt_tokens": len(pair.prompt_ids),
        "chosen_tokens": len(pair.chosen_ids),
        "rejected_tokens": len(pair.rejected_ids),
        "prompt_tokens_cut": result.prompt_tokens_cut,
        "dropped_reason": result.dropped,
    }


# --- the objectives beyond DPO (python -m dpo.data --loss-type simpo|cpo|orpo|kto) -----------------


PROMPT_FILLS = "prompt_fills_max_length"  # the drop reason of a row whose prompt leaves no completion token


@dataclass
class ObjectiveReport:
    """What an objective's own tokenization does to a dataset (the one training uses: dpo.build).

    Every objective drops the rows whose prompt fills max_length (no completion token would be left), as
    DPO does. simpo/cpo/orpo (TRL's CPO/ORPO trainers): a sequence over max_length loses completion tokens
    only (`completions_cut` counts chosen and rejected sides). kto (TRL's KTOTrainer): pairs are split into
    a desirable and an undesirable row each; the collator cuts longer prompt+completion rows at max_length
    (`completions_cut`)."""

    objective: str
    source: str
    rows_read: int  # records in the data (pairs, or KTO's unpaired rows)
    items: int  # pairs (simpo/cpo/orpo) or rows after unpairing (kto), before any drop
    kept: int
    dropped: dict[str, int]
    max_length: int | None
    completions_cut: dict[str, int]  # side -> count
    desirable: int | None = None  # kto: kept rows of each label
    undesirable: int | None = None
    tokens: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # before any cut

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        kto = self.desirable is not None  # unpaired rows, each labelled
        unit = "rows" if kto else "pairs"
        lines = [f"data: {self.source} (for --loss-type {self.objective})", f"rows read: {self.rows_read}"]
        if kto and self.items != self.rows_read:
            lines.append(f"unpaired rows (each pair: a desirable and an undesirable row): {self.items}")
        lines += [f"kept: {self.kept} {unit}", f"dropped: {sum(self.dropped.values())}"]
        lines += [f"  {reason}: {count}" for reason, count in self.dropped.items()]
        if kto:
            lines.append(f"desirable (label true): {self.desirable}, undesirable (label false): {self.undesirable}")
        cuts = ", ".join(f"{side} {n}" for side, n in self.completions_cut.items())
        if self.max_length is None:
            lines.append("max_length: none (no truncation)")
        else:
            lines.append(f"max_length {self.max_length}: completions cut ({cuts})")
        lines.append(f"tokens (kept {unit}, uncut) {'min':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>9}")
        for name, stats in self.tokens.items():
            if stats:
                cells = " ".join(f"{stats[k]:>7}" for k in ("min", "p50", "p90", "p99", "max"))
                lines.append(f"  {name:<17} {cells} {stats['mean']:>9.1f}")
        return "\n".join(lines)


def sided_report(objective: str, pairs: list, kept: list, max_length: int | None, source: str) -> ObjectiveReport:
    """The report of SimPO/CPO/ORPO pairs (dpo.data.objective_rows.SidedPair), `pairs` all of them and `kept` those
    left after dropping the ones whose prompt fills max_length, both uncut: what a cut at max_length does
    to the kept ones (TRL's CPO/ORPO tokenization cuts the completion only)."""
    over = (lambda p, a: max_length is not None and len(p) + len(a) > max_length)
    dropped = len(pairs) - len(kept)
    return ObjectiveReport(
        objective=objective, source=source, rows_read=len(pairs), items=len(pairs), kept=len(kept),
        dropped={PROMPT_FILLS: dropped} if dropped else {}, max_length=max_length,
        completions_cut={"chosen": sum(over(x.chosen_prompt_ids, x.chosen_ids) for x in kept),
                         "rejected": sum(over(x.rejected_prompt_ids, x.rejected_ids) for x in kept)},
        tokens={"prompt": summarize([len(x.chosen_prompt_ids) for x in kept]),
                "chosen": summarize([len(x.chosen_ids) for x in kept]),
                "rejected": summarize([len(x.rejected_ids) for x in kept]),
                "sequence": summarize([max(len(x.chosen_prompt_ids) + len(x.chosen_ids),
                                           len(x.rejected_prompt_ids) + len(x.rejected_ids)) for x in kept])})


def kto_report(rows_read: int, tokenized: list, kept: list, max_length: int | None, source: str) -> ObjectiveReport:
    """The report of KTO rows (dpo.data.objective_rows.TokenizedRow): `tokenized` after unpairing, `kept` those
    whose prompt is shorter than max_length (TRL drops the others)."""
    over = (lambda r: max_length is not None and len(r.prompt_ids) + len(r.completion_ids) > max_length)
    dropped = len(tokenized) - len(kept)
    return ObjectiveReport(
        objective="kto", source=source, rows_read=rows_read, items=len(tokenized), kept=len(kept),
        dropped={PROMPT_FILLS: dropped} if dropped else {}, max_length=max_length,
        completions_cut={label: sum(over(r) for r in kept if r.label == want)
                         for label, want in (("desirable", True), ("undesirable", False))},
        desirable=sum(r.label for r in kept), undesirable=sum(not r.label for r in kept),
        tokens={"prompt": summarize([len(r.prompt_ids) for r in kept]),
                "completion": summarize([len(r.completion_ids) for r in kept]),
                "sequence": summarize([len(r.prompt_ids) + len(r.completion_ids) for r in kept])})
