"""Giving freed heap pages back between in-process peers: glibc's malloc_trim.

Many peers in one process each keep a few small long-lived tensors (adapter, gradients, AdamW moments,
received updates), and each allocates them between the large, short-lived activation buffers of its own
training and evaluation passes. When those buffers are freed, glibc keeps their pages: the small tensors
pin the heap, so resident memory grows by megabytes per peer while the live data is a fraction of a MB.
`malloc_trim(0)` hands every whole free page back to the kernel (glibc >= 2.8 also releases pages in the
middle of the heap, not only at its top). benchmarks/memory.py measures the effect and its cost.

Lowering M_MMAP_THRESHOLD instead (activations in mmap'd chunks, returned on free) was measured about 40%
slower per training step: every step then pays page faults for its activations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


@functools.cache
def _libc_trim() -> Callable[[int], int] | None:
    # Looked up once per process; None where the C library is not glibc (macOS, musl): nothing to trim.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def trim_heap() -> bool:
    """Return free heap pages to the kernel; False where this C library cannot."""
    trim = _libc_trim()
    if trim is None:
        return False
    trim(0)
    return True


async def run_trimmed(work: Callable[[], T]) -> T:
    """loop.PeerHooks.compute for many peers in one process: the work, then the pages it freed go back."""
    try:
        return work()
    finally:
        trim_heap()
