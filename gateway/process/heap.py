"""The process heap: garbage-collector tuning and giving freed memory back to the OS.

Both matter for a gateway that runs for weeks with thousands of open streams: the cyclic GC
can pause the loop for seconds, and after a burst (an outage that piles requests up, a storm of
large answers) the C allocator keeps the freed pages, so RSS stays at the burst's high-water
mark and a container memory limit sees a "leak" that is not one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("gateway.heap")

TRIM_INTERVAL_S = 60.0
_SLOW_STEP_S = 0.05  # a GC pass + trim taking longer than this is logged: it held the loop


def tune_gc() -> None:
    """Keep the cyclic GC from pausing a busy gateway for seconds.

    With thousands of open streams the heap holds hundreds of thousands of long-lived objects
    and every full collection walks them all: measured at 10,000 streams, 43% of the CPU went
    to full collections and the longest paused the loop for 1.9 s (connections then queue
    and reset). Everything alive after startup (modules, config, app) is frozen out of the
    GC, and young-generation collections run less often; per-request garbage is freed by
    reference counting anyway, and CPython still skips a full collection until the
    long-lived generation has grown by a quarter.
    """
    gc.collect()
    gc.freeze()
    # (50_000, 50, 1_000) left cyclic garbage in the old generation for hours: a 30-minute
    # soak with error storms grew RSS 11.5 %. Older generations are collected as usual.
    gc.set_threshold(50_000, 10, 10)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``, or None on other C libraries (musl, macOS).

    It returns every whole free page of every malloc arena to the OS (madvise), not only the
    top of the heap, so RSS falls back after a burst. CPython's own small-object arenas go back
    by themselves once empty; this covers the rest (buffers, bodies, redis-py and aiohttp
    internals)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


class FullCollections:
    """When the heap task runs a full GC pass: at every tick, unless the last pass was slow.

    Cyclic garbage that outlived a young collection (a cut upstream stream or a client that
    left: aiohttp's protocol and the exception it keeps refer to each other) waits for a full
    collection, which CPython runs only once the old generation grew by a quarter: minutes at
    40 req/s, while the garbage raises the heap's high-water mark that fragmentation then keeps
    (the soak's RSS climb). A pass a minute bounds that. Its cost grows with the live objects
    (startup objects are frozen out): at the soak's load the loop lag never passed 2.2 ms,
    with ~10,000 open streams one pass took 608 ms (docs/benchmarks.md); so the next pass waits
    ``COST_FACTOR`` times the last pass's duration, which keeps full passes under 0.1 % of the
    time and a slow one rare (~10 minutes apart at 10,000 streams)."""

    COST_FACTOR = 1000.0

    def __init__(self) -> None:
        self._next_at = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def ran(self, now: float, took_s: float) -> None:
        self._next_at = now + took_s * self.COST_FACTOR


async def maintain_heap(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Every ``interval_s`` for the life of the process (a background task): a full GC pass
    when due (``FullCollections``), then give freed pages back to the OS. Slow steps are
    logged: they held the event loop."""
    trim = malloc_trim()
    if trim is None:
        log.info("malloc_trim is not available: freed memory stays with the process")
    collections = FullCollections()
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        if collections.due(started):
            gc.collect()
            collected = time.perf_counter()
            collections.ran(collected, collected - started)
        if trim is not None:
            trim()
        took = time.perf_counter() - started
        if took > _SLOW_STEP_S:
            log.warning("heap maintenance held the event loop",
                        extra={"fields": {"ms": round(took * 1000, 1)}})
