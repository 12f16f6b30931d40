"""Data shaping the objectives beyond DPO need, as TRL 1.15's trainers for them do it, in pure functions.

KTO (trl.KTOTrainer) reads unpaired rows (prompt, completion, label); a paired file is unpaired the
way TRL's `unpair_preference_dataset` does it (per block of 1000 pairs: every chosen, then every
rejected); its KL estimate reads mismatched (prompt, completion) rows made by rotating completions
by one inside each block of batch-size rows in file order, once, at preparation (TRL's
KL_completion_ids column): each row keeps its partner however the rows are then ordered.

CPO and ORPO (trl.experimental.cpo / .orpo) tokenize pairs their own way, unlike DPOTrainer:
prompt and prompt+completion without special tokens, the completion starting at the prompt's length
(one token earlier where the last prompt token merged), a BOS token id put in front where missing
and an EOS token id appended where missing; a sequence too long loses completion tokens only. Each
side keeps its own prompt ids (they may differ by the merged token). A pair whose prompt fills
max_length is dropped (sided_keeps), as DPO and KTO drop theirs: TRL 1.15 keeps it, with an empty
completion whose mean log-prob is 0/0 (a deliberate difference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo.data.pairs import Batch, _ids, _with_eos, pad_rows
from dpo.data.sources import DataError, DataSpec, PreferenceRow, load_rows, read_records
from dpo.data.prompts import common_prefix_length

UNPAIR_BLOCK = 1000  # `datasets.Dataset.map(batched=True)`'s default batch size, which TRL's unpairing uses


# --- KTO ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnpairedRow:
    prompt: Any  # str, or a list of {"role", "content"} messages
    completion: Any
    label: bool  # True: desirable
    row_id: int = 0
    where: str = field(default="", compare=False)  # "file line 3", for messages


@dataclass(frozen=True)
class TokenizedRow:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    row_id: int = 0
    kl_completion_ids: list[int] | None = None  # the completion of this row's mismatched KL row (kl_completions)


def unpair_rows(rows: list[PreferenceRow], block: int = UNPAIR_BLOCK) -> list[UnpairedRow]:
    """Pairs -> desirable and undesirable rows, in TRL's order: per block, all chosen then all rejected."""
    out: list[UnpairedRow] = []
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        for label, side in ((True, "chosen"), (False, "rejected")):
            out += [UnpairedRow(r.prompt, getattr(r, side), label, r.row_id, r.where) for r in chunk]
    return out


def unpaired_row(value: Any, row_id: int, where: str) -> UnpairedRow:
    """One checked KTO row from a record {"prompt", "completion", "label": true/false}; DataError otherwise."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object with prompt, completion and label, got {type(value).__name__}")
    for column in ("prompt", "completion", "label"):
        if column not in value:
            raise DataError(f"{where}: no {column!r} column; columns here: {', '.join(map(str, value)) or '(none)'}")
    label = value["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: label must be true or false, got {label!r}")
    return UnpairedRow(value["prompt"], value["completion"], label, row_id, where)


def read_spec_rows(spec: DataSpec, unpaired: bool = False):
    """The rows of a file, folder or hub dataset: preference pairs; with `unpaired` (KTO) a file of
    (prompt, completion, label) rows is read as UnpairedRows, each label checked (DataError naming
    file, row and problem)."""
    if unpaired:
        records = read_records(spec)
        if records and isinstance(records[0][2], dict) and {"completion", "label"} & set(records[0][2]):
            return [unpaired_row(value, i, f"{source} {location}")
                    for i, (source, location, value) in enumerate(records)]
    return load_rows(spec)


def tokenize_unpaired(tokenizer, row: UnpairedRow) -> TokenizedRow:
    """Prompt and completion ids as KTOTrainer makes them: EOS text appended to a text completion where
    missing, and the completion starting where prompt and prompt+completion stop agreeing."""
    if isinstance(row.prompt, list):
        prompt_ids = _ids(tokenizer, row.prompt, add_generation_prompt=True)
        full = _ids(tokenizer, row.prompt + row.completion)
    else:
        prompt_ids = _ids(tokenizer, row.prompt)
        full = _ids(tokenizer, row.prompt + _with_eos(row.completion, tokenizer.eos_token))
    n = common_prefix_length(prompt_ids, full)
    return TokenizedRow(prompt_ids[:n], full[n:], row.label, row.row_id)


def kto_keeps(row: TokenizedRow, max_length: int | None) -> bool:
    """False where the prompt alone fills max_length (TRL drops such rows)."""
    return max_length is None or len(row.prompt_ids) < max_length


def kl_completions(completions: list[list[int]], batch_size: int) -> list[list[int]]:
    """Mismatched completions for KTO's KL term: rotate by one inside each block of batch_size rows,
    (y_1, ..., y_n) -> (y_n, y_1, ..., y_{n-1}), so row i is paired with the completion of row i-1."""
    out: list[list[int]] = []
    for start in range(0, len(completions), batch_size):
        block = completions[start:start + batch_size]
        out += [block[-1]] + block[:-1]
    return out


@dataclass
class UnpairedBatch:
    batch: Batch  # the N rows: input_ids, attention_mask, completion_mask [N, T]
    desirable: torch.Tensor  # [N] bool
    kl_batch: Batch | None  # the N mismatched rows (prompt_i + kl_completion_i), or None

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.batch.attention_mask

    @property
    def row_ids(self) -> list[int]:
        return self.batch.row_ids


def _cut(prompt: list[int], completion: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    return (prompt + completion)[:max_length], ([0] * len(prompt) + [1] * len(completion))[:max_length]


def collate_unpaired(
    rows: list[TokenizedRow], pad_token_id: int, max_length: int | None = None,
    kl_completion_ids: list[list[int]] | None = None,
) -> UnpairedBatch:
    """KTO's collator: each prompt+completion cut to max_length (keep_start), right-padded; the KL rows
    (prompt_i + kl_completion_ids[i]) likewise, as their own batch."""
    cut = [_cut(r.prompt_ids, r.completion_ids, max_length) for r in rows]
    row_ids = [r.row_id for r in rows]
    batch = pad_rows([c[0] for c in cut], [c[1] for c in cut], pad_token_id, row_ids)
    kl_batch = None
    if kl_completion_ids is not None:
        kl_cut = [_cut(r.prompt_ids, y, max_length) for r, y in zip(rows, kl_completion_ids, strict=True)]
        kl_batch = pad_rows([c[0] for c in kl_cut], [c[1] for c in kl_cut], pad_token_id, row_ids)
    return UnpairedBatch(batch, torch.tensor([r.label for r in rows], dtype=torch.bool), kl_batch)


# --- CPO and ORPO --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidedPair:
    """A pair whose chosen and rejected rows each have their own prompt ids (CPO/ORPO tokenization)."""

    chosen_prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_prompt_ids: list[int]
    rejected_ids: list[int]
    row_id: int = 0


def _answer_start(prompt_ids: list[int], full_ids: list[int]) -> int:
    # TRL's build_tokenized_answer: one token earlier where the last prompt token merged into the answer.
    n = len(prompt_ids)
    return n - 1 if prompt_ids != full_ids[:n] else n


def split_sided(
    prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int], *,
    bos_token_id: int | None, eos_token_id: int, max_length: int | None, row_id: int = 0, where: str = "",
) -> SidedPair:
    """CPO/ORPO's tokenize_row on token ids (all made with add_special_tokens=False); None: no cut."""
    sides = []
    for full in (chosen_full, rejected_full):
        start = _answer_start(prompt_ids, full)
        sides.append((full[:start], full[start:]))
    (cp, ca), (rp, ra) = sides
    if sum(a != b for a, b in zip(cp, rp)) > 1 or abs(len(cp) - len(rp)) > 1:
        raise DataError(f"{where}: the chosen and rejected prompts tokenize differently beyond their last token")
    out = []
    for prompt, answer in ((cp, ca), (rp, ra)):
        if bos_token_id is not None and (not prompt or prompt[0] != bos_token_id):
            prompt = [bos_token_id] + prompt
        if not answer or answer[-1] != eos_token_id:
            answer = answer + [eos_token_id]
        out += [prompt, answer]
    return cut_sided(SidedPair(*out, row_id=row_id), max_length)


def cut_sided(pair: SidedPair, max_length: int | None) -> SidedPair:
    """Each side's completion cut so that prompt + completion fits max_length (prompts are never cut)."""
    if max_length is None:
        return pair
    fit = (lambda prompt, answer: answer[: max(0, max_length - len(prompt))])
    return dataclasses.replace(pair, chosen_ids=fit(pair.chosen_prompt_ids, pair.chosen_ids),
                               rejected_ids=fit(pair.rejected_prompt_ids, pair.rejected_ids))


def sided_keeps(pair: SidedPair, max_length: int | None) -> bool:
    """False where either side's prompt alone fills max_length, leaving that completion no token: such a pair
    is dropped, as DPO and KTO drop theirs (a mean over zero completion tokens is not a number)."""
    return max_length is None or max(len(pair.chosen_prompt_ids), len(pair.rejected_prompt_ids)) < max_length


def _common_text_prefix(a: str, b: str) -> str:
    return a[: common_prefix_length(a, b)]


def render_chat_pair(tokenizer, row: PreferenceRow) -> PreferenceRow:
    """A conversational pair as text, the way TRL's maybe_apply_chat_template renders it for CPO/ORPO:
    the prompt with the generation prompt (or continuing a final assistant message), cut to what it
    shares with each rendered prompt+reply; each reply is the rest of its rendered prompt+reply."""
    if not isinstance(row.prompt, list):
        return row
    last = row.prompt[-1].get("role")
    if last not in ("user", "tool", "assistant"):
        raise DataError(f"{row.where}: the prompt's last message has role {last!r}; expected user, tool or assistant")
    prompt = tokenizer.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=last != "assistant",
                                           continue_final_message=last == "assistant")
    chosen = tokenizer.apply_chat_template(row.prompt + row.chosen, tokenize=False)
    rejected = tokenizer.apply_chat_template(row.prompt + row.rejected, tokenize=False)
    prompt = _common_text_prefix(_common_text_prefix(prompt, chosen), rejected)
    return dataclasses.replace(row, prompt=prompt, chosen=chosen[len(prompt):], rejected=rejected[len(prompt):])


def tokenize_sided(tokenizer, row: PreferenceRow, max_length: int | None) -> SidedPair:
    """One pair tokenized as TRL 1.15's CPOTrainer and ORPOTrainer do (a conversational pair is rendered
    to text with the chat template first, as there)."""
    row = render_chat_pair(tokenizer, row)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return split_sided(
        ids(row.prompt), ids(row.prompt + row.chosen), ids(row.prompt + row.rejected),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, max_length=max_length,
        row_id=row.row_id, where=row.where,
    )


def collate_sided(pairs: list[SidedPair], pad_token_id: int) -> Batch:
    """[chosen rows; rejected rows], right-padded to one width, as TRL's DPODataCollatorWithPadding
    followed by CPO/ORPO's concatenated_inputs (labels != -100 exactly where completion_mask is 1)."""
    seqs, masks = [], []
    for prompt_key, answer_key in (("chosen_prompt_ids", "chosen_ids"), ("rejected_prompt_ids", "rejected_ids")):
        for p in pairs:
            prompt, answer = getattr(p, prompt_key), getattr(p, answer_key)
            seqs.append(prompt + answer)
            masks.append([0] * len(prompt) + [1] * len(answer))
    return pad_rows(seqs, masks, pad_token_id, [p.row_id for p in pairs])
