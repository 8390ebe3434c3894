"""The heap housekeeping of a long-running gateway (gateway/process/heap.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway.process.heap import FullCollections, malloc_trim

BURST = textwrap.dedent("""
    import gc, os
    from gateway.process.heap import malloc_trim

    def rss_kib():
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024

    blocks = [bytearray(16_000) for _ in range(2000)]  # a 32 MB burst from the malloc heap
    keep = blocks[1::2]  # half of it stays alive between the freed blocks
    del blocks
    gc.collect()
    freed = rss_kib()
    malloc_trim()()
    print(freed, rss_kib())
""")


@pytest.mark.skipif(malloc_trim() is None, reason="needs glibc (the container image has it)")
def test_memory_freed_after_a_burst_goes_back_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", BURST], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    freed, trimmed = map(int, out.split())
    # 16 MB was freed in whole pages between live blocks: free() kept it, the trim returns it
    assert freed - trimmed > 8_000, (freed, trimmed)


def test_full_collections_run_every_tick_while_cheap_and_back_off_when_slow() -> None:
    collections = FullCollections()
    now = 1000.0
    assert collections.due(now)
    collections.ran(now, 0.01)  # 10 ms: next tick (60 s later) is due again
    assert collections.due(now + 60)
    collections.ran(now + 60, 0.5)  # a 500 ms pass (10,000 open streams): not for 500 s
    assert not collections.due(now + 120)
    assert not collections.due(now + 559)
    assert collections.due(now + 560)
