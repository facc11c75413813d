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
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class HeapTrimmer:
    """loop.PeerHooks.compute for many peers in one process: the work, then now and then a trim.

    A trim's cost grows with the heap (it walks every free chunk): after every pass it made a 1,000-peer
    job three times slower. So it trims only once the model work since the last trim is `1 / share` times
    what that trim took: at most `share` of the time goes to trimming, and between two trims only the
    pages of a few peers' passes stay resident. When it trims does not change any result.
    """

    share: float = 0.02
    _work_s: float = 0.0  # model work since the last trim
    _trim_s: float = 0.0  # what the last trim took

    async def __call__(self, work: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return work()
        finally:
            now = time.perf_counter()
            self._work_s += now - start
            if self._work_s * self.share >= self._trim_s:
                trim_heap()
                self._trim_s, self._work_s = time.perf_counter() - now, 0.0
