"""Progress bars for long phases (evaluation, generation): shown only once a phase has run for
`DELAY_S` seconds, so quick work (and the test suite) stays quiet; off with TQDM_DISABLE=1."""

from __future__ import annotations

import os

# Seconds a phase runs before its bar appears.
DELAY_S = 3.0


def bar(total: int, desc: str, unit: str = "batch"):
    """A tqdm bar on stderr for `total` units of work; use as a context manager and call `.update(n)`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True,
                disable=bool(os.environ.get("TQDM_DISABLE")))
