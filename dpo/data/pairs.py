"""Preference rows to token ids and batches: tokenization as TRL 1.15 does it, the keep/drop decision
for each pair, and collation into [chosen rows; rejected rows].

One pair's way: a file row -> PreferenceRow(prompt, chosen, rejected) (dpo.data.sources) -> TokenizedPair(
prompt_ids, chosen_ids, rejected_ids) -> Batch(input_ids[2B,T], attention_mask[2B,T], completion_mask[2B,T]).

Tokenization follows TRL 1.15's DPOTrainer exactly, so that our numbers can be checked against it:
- plain-text rows get the EOS token appended to chosen and rejected (unless already there);
  conversations get none (the chat template ends each turn itself);
- prompt and prompt+completion are tokenized separately (special tokens as the tokenizer adds them;
  conversations through the chat template, the prompt with add_generation_prompt=True), and the
  completion starts where the two token lists stop agreeing (tokens may merge across the
  prompt/completion boundary, so "after the prompt tokens" is not always right);
- with `max_length`, a pair whose prompt alone fills `max_length` is dropped (no completion token
  would survive truncation); completions are cut later, in the collator (keep_start).

Where we differ from TRL on purpose (`prepare_pairs` counts each in its DataReport, dpo.data.report):
- pairs whose completions are token-for-token identical are dropped ("identical_pair"): their loss
  is a constant with zero gradient and would only dilute the batch mean;
- pairs left with no prompt token or an empty completion are dropped: the loss code assumes the
  first completion token follows a prompt token and is scored;
- `max_prompt_length` (ours, not TRL's) keeps the END of a long prompt (a leading BOS is kept);
- implicit prompts are cut at the last shared "\\n\\nAssistant:" by default (dpo.data.prompts).

The other data modules: dpo.data.sources (readers, row checks, `looks_local`, DataSpec, `load_rows`),
dpo.data.prompts (implicit prompts), dpo.data.report (the data report), dpo.data.cli (`python -m dpo.data`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dpo import smollm2
from dpo.config import DEFAULT_MAX_LENGTH
from dpo.progress import iterate as progress
from dpo.data.prompts import common_prefix_length
from dpo.data.report import PROMPT_FILLS, DataReport, RowResult, build_report
from dpo.data.sources import DataError, PreferenceRow, is_conversational

if TYPE_CHECKING:  # torch is imported where tensors are made, so `python -m dpo.data` rejects bad data fast
    import torch


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row_id: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [2B, T] long: B chosen rows, then B rejected rows
    attention_mask: torch.Tensor  # [2B, T] long
    completion_mask: torch.Tensor  # [2B, T] long: 1 on completion tokens
    row_ids: list[int] = field(default_factory=list)  # [B]
    host_input_ids: torch.Tensor | None = None  # input_ids in CPU memory (kept by .to): for host-side lookups

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "Batch":
        host = self.input_ids if self.input_ids.device.type == "cpu" else self.host_input_ids
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.row_ids,
            host,
        )


# --- tokenization ------------------------------------------------------------------------------


def _ids(tokenizer, text_or_messages, **chat_kwargs) -> list[int]:
    if isinstance(text_or_messages, list):
        out = tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True, **chat_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=text_or_messages)["input_ids"])


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _tokenize_whole(tokenizer, row: PreferenceRow) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt alone, prompt+chosen and prompt+rejected, as TRL 1.15 makes them."""
    if is_conversational(row):
        return (
            _ids(tokenizer, row.prompt, add_generation_prompt=True),
            _ids(tokenizer, row.prompt + row.chosen),
            _ids(tokenizer, row.prompt + row.rejected),
        )
    eos = tokenizer.eos_token
    return (
        _ids(tokenizer, row.prompt),
        _ids(tokenizer, row.prompt + _with_eos(row.chosen, eos)),
        _ids(tokenizer, row.prompt + _with_eos(row.rejected, eos)),
    )


def _split(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int], row_id: int) -> TokenizedPair:
    # The completion starts where prompt and prompt+completion stop agreeing (TRL's rule).
    n = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return TokenizedPair(prompt_ids[:n], chosen_full[n:], rejected_full[n:], row_id)


def tokenize_row(tokenizer, row: PreferenceRow) -> TokenizedPair:
    """Token ids of one pair, split into prompt and completions exactly as TRL 1.15 splits them."""
    return _split(*_tokenize_whole(tokenizer, row), row.row_id)


def prompt_fits(pair: TokenizedPair, max_length: int | None) -> bool:
    """False where the prompt alone fills max_length (TRL drops such pairs under keep_start)."""
    return max_length is None or len(pair.prompt_ids) < max_length


def cut_prompt(pair: TokenizedPair, max_prompt_length: int | None, bos_token_id: int | None = None) -> TokenizedPair:
    """Keep the END of a prompt longer than max_prompt_length (our option; TRL 1.15 has none).

    The end is kept because it is what the completion answers (the last user turn and, for chat
    templates, the assistant header). A leading BOS token is kept too: models are trained to see it
    first, and dropping it changes every later hidden state.
    """
    ids = pair.prompt_ids
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return pair
    head = ids[:1] if (bos_token_id is not None and ids[0] == bos_token_id and max_prompt_length > 1) else []
    tail = ids[len(ids) - (max_prompt_length - len(head)) :]
    return dataclasses.replace(pair, prompt_ids=head + tail)


def collate(pairs: list[TokenizedPair], pad_token_id: int, max_length: int | None = None) -> Batch:
    """[chosen rows; rejected rows], each prompt+completion cut to max_length (keep_start), right-padded."""
    rows, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            completion = getattr(p, side)
            ids = (p.prompt_ids + completion)[:max_length]
            mask = ([0] * len(p.prompt_ids) + [1] * len(completion))[:max_length]
            rows.append(ids)
            masks.append(mask)
    return pad_rows(rows, masks, pad_token_id, [p.row_id for p in pairs])


def pad_rows(sequences: list[list[int]], masks: list[list[int]], pad_token_id: int, row_ids: list[int]) -> Batch:
    """Token rows and their completion masks, right-padded into one Batch [R, T] (T = the longest row)."""
    import torch

    width = max(len(r) for r in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return Batch(input_ids, attention_mask, completion_mask, row_ids)


# --- from rows to kept pairs ----------------------------------------------------------------

IDENTICAL_PAIR = "identical_pair"  # chosen and rejected completions tokenize the same
NO_PROMPT_TOKENS = "no_prompt_tokens"  # the whole prompt merged into the completion at tokenization
EMPTY_COMPLETION = "empty_completion"  # chosen or rejected has no token after the prompt
PROMPT_FILLS_MAX_LENGTH = PROMPT_FILLS  # no completion token would survive max_length


def process_rows(tokenizer, rows: list[PreferenceRow], max_length: int | None,
                 max_prompt_length: int | None = None, *, drop_identical: bool = True) -> list[RowResult]:
    """Tokenize every row as training will and decide, for each, whether it is kept."""
    check_lengths(max_length, max_prompt_length)
    results = []
    for row in progress(rows, desc="tokenizing", unit="pair"):
        whole = _tokenize_whole(tokenizer, row)
        pair = _split(*whole, row.row_id)
        cut = cut_prompt(pair, max_prompt_length, tokenizer.bos_token_id)
        results.append(RowResult(
            row, cut, _drop_reason(cut, max_length, drop_identical),
            prompt_tokens_cut=len(pair.prompt_ids) - len(cut.prompt_ids),
            boundary_merge=len(whole[0]) - len(pair.prompt_ids),
        ))
    return results


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")


def _drop_reason(pair: TokenizedPair, max_length: int | None, drop_identical: bool) -> str | None:
    if drop_identical and pair.chosen_ids == pair.rejected_ids:
        return IDENTICAL_PAIR
    if not pair.prompt_ids:
        return NO_PROMPT_TOKENS
    if not pair.chosen_ids or not pair.rejected_ids:
        return EMPTY_COMPLETION
    if not prompt_fits(pair, max_length):
        return PROMPT_FILLS_MAX_LENGTH
    return None


def prepare_pairs(tokenizer, rows: list[PreferenceRow], max_length: int | None,
                  max_prompt_length: int | None = None, *, drop_identical: bool = True,
                  ) -> tuple[list[TokenizedPair], "DataReport"]:
    """The pairs training will see, and a report of what was read, kept and dropped (and why).

    Raises DataError when no row is left.
    """
    results = process_rows(tokenizer, rows, max_length, max_prompt_length, drop_identical=drop_identical)
    report = build_report(results, max_length, max_prompt_length, getattr(rows, "format", ""))
    require_kept(results, report)
    return [r.pair for r in results if r.dropped is None], report


def require_kept(results: list[RowResult], report: "DataReport") -> None:
    if not results:
        raise DataError("the dataset is empty (no rows)")
    if report.kept == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped.items())
        raise DataError(f"{report.source}: all {report.rows_read} rows were dropped ({reasons}; "
                        f"max_length={report.max_length}); nothing is left to train on")


def load_tokenizer(model: str):
    """The tokenizer of a local model folder; smollm2-135m-instruct means the embedded default model."""
    try:
        path = str(smollm2.plain_copy(with_model=False)) if model == smollm2.DEFAULT_MODEL else model
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing folder, no tokenizer files, default model not installed
        raise DataError(f"{model}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
