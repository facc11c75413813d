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
    # The first pass sets the baseline (110 MB); the first trim comes at the first pass 32 MB above it (150),
    # which leaves 145; the next at 185 (leaves 180); the last pass (210) is not 32 MB above that.
    assert trims == [150 * MB, 185 * MB]


def test_a_steady_process_is_never_trimmed(monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "resident_bytes", lambda: 500 * MB)
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1) or True)
    trimmer = memory.HeapTrimmer()

    async def main():
        for _ in range(100):
            await trimmer(lambda: None)

    trio.run(main)
    assert trims == []


def test_trim_heap_trims_where_the_c_library_is_glibc():
    assert memory.trim_heap() is (platform.libc_ver()[0] == "glibc")
    assert memory.resident_bytes() is None or memory.resident_bytes() > MB
