"""Implicit prompts: rows that hold only chosen and rejected, each a whole dialogue (Anthropic HH-RLHF).

The prompt is what the two dialogues share, cut by one of two rules (IMPLICIT_PROMPT_RULES):
- "last_assistant" (ours, the default): up to and including the last "\\n\\nAssistant:" they share
  (`extract_implicit_prompt`; for message lists, `extract_implicit_conversation`);
- "trl": TRL 1.15's `extract_prompt`, quirks included (`trl_extract_prompt`), which cuts at the first
  differing character and so moves shared opening words of the two replies into the prompt (about a
  fifth of HH pairs).

Chat templates are not applied here: a conversation stays a list of messages until tokenization
(dpo.data), where the tokenizer's own template renders it, as TRL does.
"""

from __future__ import annotations

import os

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
IMPLICIT_PROMPT_RULES = ("last_assistant", "trl")


def common_prefix_length(a, b) -> int:
    """How many leading items (token ids, characters, messages) two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_implicit(chosen, rejected, rule: str):
    """(prompt, chosen completion, rejected completion) of a row without a prompt, by `rule`
    (one of IMPLICIT_PROMPT_RULES); ValueError when the two share no usable prompt."""
    if rule == "trl":
        return trl_extract_prompt(chosen, rejected)
    if isinstance(chosen, list):
        return extract_implicit_conversation(chosen, rejected)
    return extract_implicit_prompt(chosen, rejected)


def extract_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-style rows: the prompt is their shared text up to and including the last shared "\\n\\nAssistant:".

    Everything after that marker is completion, so both replies are scored in full, shared opening
    words included (TRL moves those into the prompt; see `trl_extract_prompt`). Where the two
    dialogues differ before their own last "\\n\\nAssistant:" (one reply holds extra turns; 9 rows of
    the helpful-base test split), the prompt still ends at the last marker they share and the extra
    turns stay in that completion, as in TRL: the pair still ranks two continuations of one context.
    """
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(ASSISTANT_MARKER)
    if end < 0:
        raise ValueError(f"chosen and rejected share no {ASSISTANT_MARKER!r} turn, so the prompt cannot be "
                         "inferred; give a prompt column")
    cut = end + len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def extract_implicit_conversation(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Message lists: the prompt is the shared messages up to the last shared point where both go on
    with an assistant message (so each completion starts with the assistant's reply)."""
    shared = common_prefix_length(chosen, rejected)
    for k in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant":
            return chosen[:k], chosen[k:], rejected[k:]
    raise ValueError("chosen and rejected share no messages before an assistant reply, so the prompt cannot be "
                     "inferred; give a prompt column")


def trl_extract_prompt(chosen, rejected):
    """TRL 1.15's `extract_prompt`, quirks included (strings or message lists).

    The prompt is the longest common prefix, less one trailing space. Quirks copied on purpose for
    parity: where one side is a prefix of the other (or they are equal) the loop runs out and TRL's
    loop variable leaves the last shared item out of the prompt; a difference at position 0 looks at
    position -1.
    """
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if chosen[i - 1] == " " else i
            break
    if idx < 0:
        raise ValueError("chosen and rejected share no leading text, so the prompt cannot be inferred")
    return chosen[:idx], chosen[idx:], rejected[idx:]

