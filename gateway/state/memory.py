"""``MemoryBackend``: the state store for a single gateway process, no Redis needed.

Atomicity comes from asyncio itself: no operation awaits anything, so each one runs to
completion before any other coroutine can touch the dict.

Expiry is checked against an injectable clock (``time.monotonic`` by default), so tests
drive time by hand. Expired keys are invisible at once and are removed in two ways:
lazily when an operation touches them, and by an incremental sweep that every write
advances by a few keys (see ``_sweep_step``), which keeps memory bounded under churn of
distinct keys without ever pausing the event loop for a full scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .plan import AdmitPlan, AdmitResult, LocalLimits, SettlePlan

# Keys examined per write by the incremental sweep. With k keys per write, a full pass
# over n stored keys takes n/k writes, during which at most n/k new keys can arrive; so
# expired-but-unswept keys stay below about 2n/k and the dict below about
# live / (1 - 2/k) + a small constant. 8 keeps that within ~1.33x of the live keys.
_SWEEP_BATCH = 8



@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float  # clock seconds; the key is gone once now >= expires_at


def check_ttl(ttl_ms: int) -> None:
    """Reject TTLs Redis would refuse, so both backends fail the same way (ValueError:
    a caller bug, not an unavailable store)."""
    if ttl_ms < 1:
        raise ValueError(f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}")


class MemoryBackend:
    """In-process ``StateBackend``: a dict of values with absolute expiry times.

    ``clock`` returns seconds (monotonic); a key written with ``ttl_ms`` at time ``t``
    is visible while ``clock() < t + ttl_ms / 1000`` and gone from then on.
    Never raises ``StateUnavailable``: the store is this process.
    """

    name: str = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, _Entry] = {}
        # Snapshot of keys the incremental sweep is walking, and how far it got.
        self._sweep_keys: list[str] = []
        self._sweep_pos = 0
        # Limits keep their own structures (sorted-set-like leases, float TATs): same
        # evaluator as the degraded mode, same semantics as the Redis scripts.
        self.limits = LocalLimits(clock)

    async def start(self) -> None:
        """Nothing to start: the sweep is driven by writes, not by a background task."""

    async def close(self) -> None:
        """Drop all state; idempotent."""
        self._data.clear()
        self._sweep_keys = []
        self._sweep_pos = 0

    async def ping(self) -> bool:
        return True

    async def admit(self, plan: AdmitPlan) -> AdmitResult:
        return self.limits.admit(plan)

    async def settle(self, plan: SettlePlan) -> bool:
        return self.limits.settle(plan)

    async def settle_many(self, plans: Sequence[SettlePlan]) -> list[bool]:
        return [self.limits.settle(plan) for plan in plans]

    async def renew_leases(self, key: str, members: list[str], ttl_ms: int) -> None:
        self.limits.renew([(key, m) for m in members], ttl_ms)

    def shared_redis(self) -> None:
        return None  # nothing is shared: the state is this process's

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key, self._clock())
        if entry is None:
            return None
        return entry.value

    async def set(
        self, key: str, value: bytes, ttl_ms: int, *, only_if_absent: bool = False
    ) -> bool:
        check_ttl(ttl_ms)
        now = self._clock()
        self._sweep_step(now)
        if only_if_absent and self._live(key, now) is not None:
            return False
        self._data[key] = _Entry(value, now + ttl_ms / 1000)
        return True

    async def delete(self, key: str) -> bool:
        if self._live(key, self._clock()) is None:
            return False
        del self._data[key]
        return True

    async def ttl_ms(self, key: str) -> int | None:
        now = self._clock()
        entry = self._live(key, now)
        if entry is None:
            return None
        # round, not int(): float seconds make e.g. 99.9999 ms out of an exact 100 ms.
        # A visible key always reports at least 1 ms.
        return max(1, round((entry.expires_at - now) * 1000))

    def stored_count(self) -> int:
        """Entries physically held, expired-but-unpurged ones included (tests, metrics)."""
        return len(self._data)

    def _live(self, key: str, now: float) -> _Entry | None:
        """The entry if present and unexpired; an expired one is purged on the way."""
        entry = self._data.get(key)
        if entry is not None and now >= entry.expires_at:
            del self._data[key]
            return None
        return entry

    def _sweep_step(self, now: float) -> None:
        """Examine the next few keys of a snapshot and purge the expired ones.

        Walking a snapshot (``list(dict)`` is one fast C-level copy per pass) lets the
        dict change freely between steps, and the per-write cost stays O(_SWEEP_BATCH).
        """
        if self._sweep_pos >= len(self._sweep_keys):
            self._sweep_keys = list(self._data)
            self._sweep_pos = 0
        end = self._sweep_pos + _SWEEP_BATCH
        for key in self._sweep_keys[self._sweep_pos : end]:
            self._live(key, now)
        self._sweep_pos = end
