"""Glue: make glibc give freed tensor memory back to the operating system (CPU runs).

Why: glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB),
so after the first step every activation tensor below that size comes from the heap, and freed heap
memory stays in the process. A training step allocates and frees gigabytes of such tensors in an order
that fragments the heap: on the default run the resident size grew to twice the live tensors
(4.0 GB peak for 1.0 GB of model and torch). A fixed threshold stops the raising: tensors above it are
mmapped and unmapped when freed, so the resident size follows what is alive. Numbers are unchanged
(only where the bytes live changes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers (glibc malloc.h)
# 1 MiB: small allocations (Python objects, small tensors) stay on the heap. Measured on the default run
# (quiet 2-core machine, 8 steps): glibc's own starting 128 KiB gave a 1.46 GB peak in 148 s (every
# activation mmapped afresh: page faults), 1 MiB 1.60 GB in 129 s, 8 MiB 2.49 GB in 94 s, unset 2.53 GB
# in 89 s.
MMAP_THRESHOLD_BYTES = 1024 * 1024


def _glibc():
    """The C library when it is glibc (Linux), else None (macOS, musl: their allocators differ)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold_bytes`, so that freed tensors above it leave the process.

    True when set; False where the C library is not glibc (nothing to do there)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
