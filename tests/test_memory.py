"""p2pfed.memory: the heap trimmer of in-process peers spends at most its share of the time trimming."""

import platform
import time

import trio

from p2pfed import memory


def timed(spent: list[float], seconds: float):
    start = time.perf_counter()
    time.sleep(seconds)
    spent.append(time.perf_counter() - start)
    return True


def test_the_trimmer_trims_again_only_after_enough_work_to_pay_for_it(monkeypatch):
    trims: list[float] = []
    work: list[float] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: timed(trims, 0.02))  # a trim as slow as on a large heap
    trimmer = memory.HeapTrimmer(share=0.25)
    results = []

    async def main():
        for i in range(40):
            results.append(await trimmer(lambda i=i: timed(work, 0.005) and i))

    trio.run(main)
    assert results == list(range(40))  # the work's own results, in order
    assert len(trims) >= 2  # the first pass trims at once, and it trims again once the work paid for it
    # At most its share of the work's time, give or take the trim that starts each stretch.
    assert sum(trims) <= 0.25 * sum(work) + max(trims)
    assert len(trims) < 20  # not after every pass


def test_trim_heap_trims_where_the_c_library_is_glibc():
    assert memory.trim_heap() is (platform.libc_ver()[0] == "glibc")
