"""p2pfed.memory: in-process peers trim the heap when resident memory has grown, not after every pass."""

import platform

import trio

from p2pfed import memory

MB = 1 << 20


def test_the_trimmer_trims_only_after_resident_memory_grew_by_its_step(monkeypatch):
    resident = [100 * MB]  # what /proc would say; each pass below grows it, a trim gives half the growth back
    trims = []

    def trim() -> bool:
        trims.append(resident[0])
        resident[0] -= 5 * MB
        return True

    monkeypatch.setattr(memory, "resident_bytes", lambda: resident[0])
    monkeypatch.setattr(memory, "trim_heap", trim)
    trimmer = memory.HeapTrimmer(growth=32 * MB)

    def work(i: int) -> int:
        resident[0] += 10 * MB
        return i

    async def main():
        return [await trimmer(lambda i=i: work(i)) for i in range(12)]

    assert trio.run(main) == list(range(12))  # the work's own results, in order
    # The first pass trims (nothing measured yet) and leaves 105 MB; the next trim waits for 32 MB more, at the
    # first pass that reaches 137 MB or more (145), which leaves 140; then 180. Passes in between do not trim.
    assert trims == [110 * MB, 145 * MB, 180 * MB]


def test_a_steady_process_is_not_trimmed_after_the_first_pass(monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "resident_bytes", lambda: 500 * MB)
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1) or True)
    trimmer = memory.HeapTrimmer()

    async def main():
        for _ in range(100):
            await trimmer(lambda: None)

    trio.run(main)
    assert len(trims) == 1


def test_trim_heap_trims_where_the_c_library_is_glibc():
    assert memory.trim_heap() is (platform.libc_ver()[0] == "glibc")
    assert memory.resident_bytes() is None or memory.resident_bytes() > MB
