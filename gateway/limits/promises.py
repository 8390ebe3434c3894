"""Retry times this replica has promised in its refusals, per limit key.

Concurrent refusals of one bucket all see the same store state, so the store alone tells each
of them the same earliest retry; every SDK then comes back at that moment and only one of
them can pass (a thundering herd that burns the SDKs' two retries). Remembering what was
promised lets the next refusal of the same key queue behind the earlier ones
(``Limiter._longest_wait``): a GCRA refusal is promised ``max(its own retry, last promise +
cost x interval)``; a concurrency refusal counts the promises still ahead of it.

Local to this replica (refusals on other replicas are not seen: at worst their callers meet
as if there were no promises) and only on the refusal path: an admitted request never reads or writes it.
Memory is bounded: at most ``MAX_KEYS`` keys (least recently refused first out) with at most
``MAX_PER_KEY`` promises each; promises whose time has passed are dropped when the key is read.
Time comes from ``clock`` (monotonic seconds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

MAX_KEYS = 4096
MAX_PER_KEY = 256


class PromiseBook:
    """The retry times (monotonic seconds) promised per limit key, still in the future."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._by_key: OrderedDict[str, list[float]] = OrderedDict()

    def outstanding(self, key: str) -> list[float]:
        """The promises of ``key`` not yet due, oldest promise first."""
        promised = self._by_key.get(key)
        if promised is None:
            return []
        now = self._clock()
        ahead = [at for at in promised if at > now]
        if ahead:
            self._by_key[key] = ahead
        else:
            del self._by_key[key]
        return ahead

    def last(self, key: str) -> float | None:
        """The latest promise of ``key`` not yet due."""
        return max(self.outstanding(key), default=None)

    def promise(self, key: str, at: float) -> None:
        promised = self.outstanding(key)
        promised.append(at)
        self._by_key[key] = promised[-MAX_PER_KEY:]
        self._by_key.move_to_end(key)
        if len(self._by_key) > MAX_KEYS:
            self._by_key.popitem(last=False)
