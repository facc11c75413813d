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
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc; about 10 microseconds); None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class HeapTrimmer:
    """loop.PeerHooks.compute for many peers in one process: the work, then a trim when resident memory has
    grown by `growth` bytes since the last one.

    Trimming after every pass is costly twice over: a trim walks every free chunk of a heap that grows with
    the peers, and the pages it returns are faulted back in by the next passes' activations (measured: a
    1,000-peer job 3x slower, a 64-peer one 12% slower). Trimming on growth costs nothing where memory is
    steady and bounds what glibc keeps to about `growth` where it is not.
    """

    growth: int = 64 << 20
    _after_last: int | None = None  # resident bytes right after the last trim (or the first pass)

    async def __call__(self, work: Callable[[], T]) -> T:
        try:
            return work()
        finally:
            resident = resident_bytes()
            if resident is not None and self._after_last is None:
                self._after_last = resident  # the first pass sets the baseline: a steady swarm never trims
            elif resident is not None and resident - self._after_last >= self.growth and trim_heap():
                self._after_last = resident_bytes() or 0
