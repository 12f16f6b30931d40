"""Progress bars for long phases (reading and tokenizing data, evaluation, generation, reference
precompute): one rule for all of them.

A bar appears only once a phase has run DELAY_S seconds, so quick work (and the test suite) stays
quiet; only the first process of a torchrun launch (RANK 0) draws one; TQDM_DISABLE=1 turns them off.
Bars go to stderr and are removed when the phase ends.
"""

from __future__ import annotations

import os

DELAY_S = 3.0  # seconds a phase runs before its bar appears


def _quiet() -> bool:
    return bool(os.environ.get("TQDM_DISABLE")) or os.environ.get("RANK", "0") != "0"


def bar(total: int, desc: str, unit: str = "batch"):
    """A bar for `total` units of work: a context manager; call `.update(n)` as work is done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True,
                disable=_quiet())


def iterate(iterable, *, desc: str, unit: str = "it", total: int | None = None):
    """`iterable` with a bar; drawn only on a terminal, so logs, pipes and captured output stay clean."""
    from tqdm.auto import tqdm

    disable = True if _quiet() else None  # None: tqdm's "off unless a terminal"
    return tqdm(iterable, desc=desc, unit=unit, total=total, delay=DELAY_S, leave=False, disable=disable)
