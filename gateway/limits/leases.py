"""This replica's view of the tenant concurrency leases (``max_concurrent``).

The leases themselves live in the state backend (a sorted set per scope, gateway/state/plan.py);
this board keeps what the store does not need but the answers do:

- when each lease held here started, and how long the leases of each scope have lasted (an
  EWMA of finished requests), so a refusal can say when a lease is expected to free
  (``expected_wait_s``) instead of the lease's 60 s safety expiry;
- who waits for a lease of a scope (``wait_release``), woken as soon as a lease of that scope
  held here is released in the store. Leases released by other replicas send no
  notification: the waiter asks the store again on a short bounded schedule (Limiter).

Time comes from ``clock`` (monotonic seconds). Nothing here touches the store.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable

_WEIGHT = 0.2  # EWMA weight of a finished request's duration
_MAX_SCOPES = 4096  # scopes whose typical duration is remembered (sessions come and go)
# Bounds of the expected wait: a lease already overdue is expected "any moment", but an SDK
# told 0 ms would spin; past a minute no SDK should wait (errors.SDK_WAIT_MAX_MS).
MIN_WAIT_S = 0.2
MAX_WAIT_S = 60.0
# Without any finished request to learn from, a request is expected to take this long.
FIRST_GUESS_S = 1.0


class LeaseBoard:
    """Start times, typical durations and waiters of the concurrency leases held here."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._held: dict[str, tuple[float, tuple[str, ...]]] = {}  # request id -> start, keys
        self._by_key: dict[str, dict[str, float]] = {}  # lease key -> request id -> start
        self._typical: OrderedDict[str, float] = OrderedDict()  # lease key -> seconds
        # Per lease key, its waiters oldest first (a dict as an ordered set).
        self._waiters: dict[str, dict[asyncio.Future[None], None]] = {}

    def started(self, request_id: str, keys: tuple[str, ...]) -> None:
        now = self._clock()
        self._held[request_id] = (now, keys)
        for key in keys:
            self._by_key.setdefault(key, {})[request_id] = now

    def finished(self, request_id: str) -> tuple[str, ...]:
        """The request let go of its leases (not yet written to the store): learn its
        duration. Returns its lease keys (empty when it held none here)."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            return ()
        began, keys = entry
        took = max(0.0, self._clock() - began)
        for key in keys:
            members = self._by_key.get(key)
            if members is not None:
                members.pop(request_id, None)
                if not members:
                    del self._by_key[key]
            old = self._typical.pop(key, None)
            self._typical[key] = took if old is None else old + _WEIGHT * (took - old)
            if len(self._typical) > _MAX_SCOPES:
                self._typical.popitem(last=False)
        return keys

    def released(self, keys: Iterable[str]) -> None:
        """The store has freed a lease of each of ``keys``: wake the longest waiter for each
        (one per freed slot, so a release costs one store call, not one per waiter)."""
        for key in keys:
            for waiter in self._waiters.get(key, {}):
                if not waiter.done():
                    waiter.set_result(None)
                    break

    def waiting(self, key: str) -> int:
        """How many requests wait here for a lease of ``key``."""
        return len(self._waiters.get(key, ()))

    async def wait_release(self, keys: Iterable[str], timeout_s: float) -> None:
        """Return when a lease of one of ``keys`` is released here, or after ``timeout_s``."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = tuple(keys)
        for key in keys:
            self._waiters.setdefault(key, {})[waiter] = None
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            pass
        finally:
            for key in keys:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.pop(waiter, None)
                    if not waiters:
                        del self._waiters[key]

    def expected_wait_s(self, key: str) -> float:
        """When a lease of ``key`` is expected to free, from the running durations of the
        requests holding one here and how long that scope's requests usually take.

        Each local holder is expected to end at ``typical - age`` (at least ``MIN_WAIT_S``);
        the soonest wins. With no local holder (every lease is held by another replica) half
        the typical duration: a holder's expected remaining time at a random moment. Before
        any request of the scope finished there is no typical duration: a holder that has
        run for ``age`` is expected to run about as long again (the best guess knowing only
        that it has lasted this long; "the oldest holder's age" as the whole duration told
        callers a 3 s request was due at once once it passed 1 s), ``FIRST_GUESS_S`` in all
        at least.
        Bounded to [``MIN_WAIT_S``, ``MAX_WAIT_S``]."""
        now = self._clock()
        ages = [now - began for began in self._by_key.get(key, {}).values()]
        typical = self._typical.get(key)
        if typical is None:
            # Lasted ``age`` so far: expected to take about twice that in all.
            wait = min((max(FIRST_GUESS_S, 2 * age) - age for age in ages),
                       default=FIRST_GUESS_S / 2)
        elif ages:
            wait = typical - max(ages)
        else:
            wait = typical / 2
        return min(MAX_WAIT_S, max(MIN_WAIT_S, wait))
