"""One deployment's breaker: pybreaker on the injected clock, the failure-rate window, the
escalating open period, and the flags fleet sync pushes.

Split from breaker.py (the board that routes across all deployments and hands out ``Trial``s)
because this is the state of a single deployment, synchronous and store-free; breaker_fleet.py
reads and writes the same fields from the store side. It logs as ``gateway.breaker``, so one
logger name still covers every breaker message.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import pybreaker

if TYPE_CHECKING:
    from gateway.breaker import BreakerBoard

log = logging.getLogger("gateway.breaker")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
FailureKind = Literal["connect_error", "timeout", "server_error", "slow_first_byte"]
_BUCKETS = 10  # failure-rate window resolution: window_s / 10


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """One deployment's breaker, for /admin/status and gauges."""

    state: str  # closed | open | half-open
    failure_rate: float  # failed share of the calls in the window (0 when none)
    calls_in_window: int
    consecutive_failures: int
    open_for_s: float  # until half-open; 0 unless open
    cooling_for_s: float  # rest of a 429 cooldown; 0 when none
    trips: int  # escalation level: the next open period is reset_timeout_s * 2**trips
    probes_in_flight: int  # on this replica


class _Counted(Exception):
    """Raised inside pybreaker's ``calling()`` to record one failure."""


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage with ``opened_at`` on the injected clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(CLOSED)
        self._clock = clock
        self.opened_at_s: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        if self.opened_at_s is None:
            return None
        # pybreaker compares this with its own datetime.now(); shifting it by the injected
        # clock's elapsed time makes that comparison follow the injected clock.
        elapsed = self._clock() - self.opened_at_s
        return datetime.now(UTC) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:  # only CircuitBreaker.open() sets it
        self.opened_at_s = self._clock()


@dataclass(slots=True)
class _Bucket:
    start: float
    calls: int = 0
    failures: int = 0


class _Window:
    """Calls and failures of the last ``span`` seconds in ``_BUCKETS`` buckets."""

    def __init__(self, span: float) -> None:
        self._span, self._width = span, span / _BUCKETS
        self._buckets: deque[_Bucket] = deque()

    def add(self, now: float, failed: bool) -> None:
        self._expire(now)
        if not self._buckets or now >= self._buckets[-1].start + self._width:
            self._buckets.append(_Bucket(now))
        bucket = self._buckets[-1]
        bucket.calls += 1
        bucket.failures += failed

    def totals(self, now: float) -> tuple[int, int]:
        self._expire(now)
        return sum(b.calls for b in self._buckets), sum(b.failures for b in self._buckets)

    def clear(self) -> None:
        self._buckets.clear()

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0].start <= now - self._span:
            self._buckets.popleft()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, breaker: _Breaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._breaker.on_transition(old_state.name if old_state else CLOSED, new_state.name)


class _Breaker:
    """One deployment: pybreaker plus the window, escalation, cooldown and fleet flags."""

    def __init__(self, board: BreakerBoard, name: str) -> None:
        p = board.policy
        self.board, self.name, self.policy = board, name, p
        self.storage = _ClockStorage(board.clock)
        self.cb = pybreaker.CircuitBreaker(
            fail_max=p.consecutive_failures, reset_timeout=p.reset_timeout_s,
            state_storage=self.storage, listeners=[_Listener(self)], name=name,
        )  # no `exclude`: pybreaker counts excluded errors as successes
        self.window = _Window(p.window_s)
        self.epoch = 0  # bumped on every open: outcomes of older trials are stale
        self.open_until = -math.inf
        self.cool_until = -math.inf
        self.level = 0
        self.closed_since = board.clock()
        self.trip_id = ""
        self.probes = 0
        self.cause = ""
        self.push_open = self.push_cool = False
        self.push_ok: str | None = None
        self.remote: tuple[float, int, str] | None = None  # (open_s, level, trip id) being applied

    def refresh(self, now: float) -> None:
        if self.cb.current_state == OPEN and now >= self.open_until:
            self.cb.half_open()

    def on_transition(self, old: str, new: str) -> None:
        now = self.board.clock()
        if new == OPEN:
            self.epoch += 1
            self.window.clear()
            if old == CLOSED and now - self.closed_since >= self.policy.max_reset_timeout_s:
                self.level = 0  # stayed closed long enough: forget earlier trips
            if self.remote is not None:
                open_s, level, trip_id = self.remote
                self.level = max(self.level, level)
                cause = "fleet"
            else:
                open_s = self.board.open_period_s(self.level)
                self.level += 1
                trip_id = f"{self.board.rng.getrandbits(48):012x}"
                self.push_open = True
                self.board.wake()
                cause = "probe_failed" if old == HALF_OPEN else self.cause or "consecutive_failures"
            self.trip_id = trip_id
            self.cb.reset_timeout = open_s
            self.open_until = now + open_s
            log.warning("circuit breaker %s opened for %.1f s (%s)", self.name, open_s, cause)
        elif new == CLOSED:
            self.closed_since = now
            self.window.clear()
            log.info("circuit breaker %s closed", self.name)
        self.cause = ""
        self.board.notify(self.name, old, new)

    def record(self, epoch: int, kind: FailureKind | None) -> None:
        """Feed one known outcome through pybreaker's ``calling()`` and the rate window."""
        before = self.cb.current_state
        if epoch != self.epoch or before == OPEN:
            return  # started before the latest trip: it says nothing about now
        if kind is None and before == CLOSED and self.storage.counter == 0:
            # pybreaker would change nothing (closed, no failure to forget; our listener has
            # no success hook): skip its lock and generator, the common path of every request.
            self.window.add(self.board.clock(), False)
            return
        try:
            with self.cb.calling():
                if kind is not None:
                    raise _Counted(kind)
        except (_Counted, pybreaker.CircuitBreakerError):
            pass  # CircuitBreakerError: this failure tripped it; on_transition did the rest
        after = self.cb.current_state
        if before == HALF_OPEN and after == CLOSED:
            self.push_ok = self.trip_id  # tell replicas still half-open on this trip
            self.board.wake()
        if before == CLOSED and after == CLOSED:
            now = self.board.clock()
            self.window.add(now, kind is not None)
            if kind is None:
                return
            calls, failures = self.window.totals(now)
            p = self.policy
            if calls >= p.min_calls and failures >= p.failure_rate * calls:
                self.cause = "failure_rate"
                self.cb.open()

    def apply_remote_open(self, open_s: float, level: int, trip_id: str) -> None:
        now = self.board.clock()
        if self.cb.current_state != OPEN:
            self.remote = (open_s, level, trip_id)
            try:
                self.cb.open()
            finally:
                self.remote = None
        elif now + open_s > self.open_until:  # already open: a longer fleet trip extends it
            self.storage.opened_at_s = now
            self.cb.reset_timeout = open_s
            self.open_until = now + open_s
            self.trip_id, self.level = trip_id, max(self.level, level)

    def status(self, now: float) -> BreakerStatus:
        self.refresh(now)
        calls, failures = self.window.totals(now)
        state = self.cb.current_state
        return BreakerStatus(
            state=state,
            failure_rate=failures / calls if calls else 0.0,
            calls_in_window=calls,
            consecutive_failures=self.cb.fail_counter,
            open_for_s=max(0.0, self.open_until - now) if state == OPEN else 0.0,
            cooling_for_s=max(0.0, self.cool_until - now),
            trips=self.level,
            probes_in_flight=self.probes,
        )
