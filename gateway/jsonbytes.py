"""JSON for bytes the gateway keeps beyond the moment it made them.

orjson 3.12 and later returns a ``bytes`` whose allocation is the buffer it grew while
encoding, at least 4 KiB and a power of two past that: a 70-byte error body holds 4 KiB, a
4.3 KB chat request 64 KiB (``sys.getsizeof`` shows the length, tracemalloc the allocation).
Written at once (a response, a log line) that is a short peak. Kept while a call runs (the
upstream request body: seconds, minutes for a stream) or stored (deferred entries in process
memory), it multiplies the memory each request holds and fragments the heap. A copy is
right-sized and costs ~0.7 us for 4 KB, paid only where bytes are kept.
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps_kept(obj: Any) -> bytes:
    """``orjson.dumps(obj)`` in an allocation of its own length, for bytes that are kept."""
    return bytes(memoryview(orjson.dumps(obj)))
