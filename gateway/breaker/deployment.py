"""One deployment's circuit breaker: pybreaker's state machine on a storage that keeps the
current trip on the injected clock, the failure-rate window beside it, and the escalating
open period.

- ``pybreaker.CircuitBreaker`` owns the states (closed -> open -> half-open -> closed), the
  consecutive-failure count and the transitions; every reaction to a transition (escalation,
  logging, the board's metrics and fleet wake-up) is a ``CircuitBreakerListener``.
- An attempt runs outside pybreaker (it is async, and it may end neither well nor badly: a
  cancelled client, a 4xx, a 429), so its verdict is replayed through ``cb.call()`` once
  known: a failure raises ``DeploymentFailure``, a success returns. Neutral outcomes never
  reach pybreaker, so they neither count nor reset the failure count.
- ``TripStorage`` is the custom ``CircuitBreakerStorage``: pybreaker's state and counters,
  plus the current ``Trip`` (when it opened on the injected clock, for how long, its id and
  escalation level). The open period lives there, not in pybreaker's ``reset_timeout``:
  ``DeploymentBreaker.refresh`` calls ``cb.half_open()`` when the trip's period is over on
  the injected clock, and no call is ever passed to pybreaker while it is open, so its own
  wall-clock timeout check never decides anything.
- A trip learned from the fleet is written into the storage as a shared storage would see
  another replica's trip; reading ``cb.state`` then makes pybreaker notice the change and
  fire the listeners (pybreaker's own mechanism for state changed elsewhere).

Synchronous and store-free: ``breaker_fleet`` exchanges what ``DeploymentBreaker`` exposes
with the other replicas, and ``breaker`` routes across deployments.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random
from typing import Literal

import pybreaker

from gateway.config import BreakerPolicy

log = logging.getLogger("gateway.breaker")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
FailureKind = Literal["connect_error", "timeout", "server_error", "slow_first_byte"]
_BUCKETS = 10  # failure-rate window resolution: window_s / 10
_SAME_COOL_S = 0.05  # a fleet cool-down ending this close to our own is our own, read back


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


@dataclass(frozen=True, slots=True)
class Trip:
    """One opening of a breaker, as the fleet shares it."""

    trip_id: str  # tells replicas which trip a key or a probe verdict is about
    level: int  # escalation level once this trip counted
    opened_at_s: float  # injected clock
    open_for_s: float

    @property
    def until_s(self) -> float:
        return self.opened_at_s + self.open_for_s


@dataclass(frozen=True, slots=True)
class FleetNews:
    """What a deployment has to tell the other replicas since the last sync."""

    tripped: bool = False  # a local trip (the current one) to share
    closed_trip: str | None = None  # the trip id a local probe closed
    cooled: bool = False  # a longer 429 cooldown to share

    def merge(self, newer: FleetNews) -> FleetNews:
        return FleetNews(self.tripped or newer.tripped, newer.closed_trip or self.closed_trip,
                         self.cooled or newer.cooled)


class DeploymentFailure(Exception):
    """An attempt's failure, replayed through pybreaker's ``call()`` so it counts."""

    def __init__(self, kind: FailureKind) -> None:
        super().__init__(kind)
        self.kind = kind


class TripStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's state and counters in memory (never blocking), plus the current trip.

    ``CircuitBreaker.open()`` writes ``opened_at`` (pybreaker's wall-clock datetime, kept as
    given) just before it announces the transition: that marks a local trip, which the
    escalation listener then describes in ``trip``. ``adopt`` records a trip another
    replica made, state included, as a storage shared by the fleet would show it.
    """

    def __init__(self) -> None:
        super().__init__("memory")
        self._state = CLOSED
        self._failures = self._successes = 0
        self._opened_at: datetime | None = None
        self.trip: Trip | None = None  # the current trip while open, else the last one
        self.opened_locally = False  # set by open(), until the listener describes the trip

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state

    @property
    def counter(self) -> int:
        return self._failures

    def increment_counter(self) -> None:
        self._failures += 1

    def reset_counter(self) -> None:
        self._failures = 0

    @property
    def success_counter(self) -> int:
        return self._successes

    def increment_success_counter(self) -> None:
        self._successes += 1

    def reset_success_counter(self) -> None:
        self._successes = 0

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:  # only CircuitBreaker.open() sets it
        self._opened_at = value
        self.opened_locally = True

    def adopt(self, trip: Trip) -> None:
        """Open (or stay open) on a trip learned from the fleet."""
        # pybreaker's wall-clock view of the same instant, as its open() would write it
        # (while open, a None would read as "timeout over" to pybreaker).
        self._opened_at = datetime.now(UTC)
        self.trip = trip
        self._state = OPEN


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


class TransitionListener(pybreaker.CircuitBreakerListener):
    """Hands pybreaker's transitions on as state names: to ``DeploymentBreaker`` (escalation,
    logs) and to the board's observer (metrics)."""

    def __init__(self, on_transition: Callable[[str, str], None]) -> None:
        self._on_transition = on_transition

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._on_transition(old_state.name if old_state else CLOSED, new_state.name)


class DeploymentBreaker:
    """One deployment: pybreaker plus the window, escalation, cooldown and fleet outbox.

    ``listeners`` are added after the breaker's own (so they see a trip already described).
    ``on_news`` is called when something waits to be pushed to the fleet.

    Read by the board and fleet sync: ``state``, ``epoch`` (bumped on every open, so a
    ``Trial`` begun before a trip is recognised as stale), ``level`` (escalation: trips not
    yet forgiven), ``trip_id``, ``open_until``, ``cool_until`` (429 cooldown end, injected
    clock) and ``probes`` (half-open probes in flight here, kept by the board). Fleet sync
    takes what is new with ``take_news`` and hands in what the fleet knows with
    ``learn_trip``, ``learn_closed`` and ``learn_cooldown``.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float],
        rng: Random,
        on_news: Callable[[], None],
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
    ) -> None:
        self.name, self.policy = name, policy
        self._clock, self._rng, self._on_news = clock, rng, on_news
        self.storage = TripStorage()
        self.cb = pybreaker.CircuitBreaker(
            fail_max=policy.consecutive_failures, reset_timeout=policy.reset_timeout_s,
            state_storage=self.storage, name=name, throw_new_error_on_trip=False,
            listeners=[TransitionListener(self._on_transition), *listeners],
        )  # no `exclude`: pybreaker counts excluded errors as successes. reset_timeout is
        # the base period for pybreaker's own check, which no call reaches (see module doc).
        self._window = _Window(policy.window_s)
        self.epoch = 0  # bumped on every open: outcomes of older trials are stale
        self.cool_until = -math.inf
        self.level = 0
        self._closed_since = clock()
        self.probes = 0
        self._cause = ""
        self._news = FleetNews()

    @property
    def state(self) -> str:
        return self.cb.current_state

    @property
    def trip_id(self) -> str:
        return self.storage.trip.trip_id if self.storage.trip is not None else ""

    @property
    def open_until(self) -> float:
        """When the current trip's open period ends (injected clock); -inf when none."""
        trip = self.storage.trip
        return trip.until_s if trip is not None and self.state == OPEN else -math.inf

    def _open_period_s(self, level: int) -> float:
        p = self.policy
        full = min(p.max_reset_timeout_s, p.reset_timeout_s * 2.0 ** min(level, 30))
        return full * self._rng.uniform(1 - p.reset_jitter, 1.0)

    def refresh(self, now: float) -> None:
        """Half-open once the trip's open period is over on the injected clock."""
        if self.state == OPEN and now >= self.open_until:
            self.cb.half_open()

    def record(self, epoch: int, kind: FailureKind | None) -> None:
        """Replay one known outcome through pybreaker and into the rate window."""
        before = self.state
        if epoch != self.epoch or before == OPEN:
            return  # started before the latest trip: it says nothing about now
        try:
            self.cb.call(_verdict, kind)
        except DeploymentFailure:
            pass  # counted (and, if it tripped, the listener did the rest)
        after = self.state
        if before == HALF_OPEN and after == CLOSED:
            # tell replicas still half-open on this trip
            self._news = self._news.merge(FleetNews(closed_trip=self.trip_id))
            self._on_news()
        if before == CLOSED and after == CLOSED:
            now = self._clock()
            self._window.add(now, kind is not None)
            if kind is None:
                return
            calls, failures = self._window.totals(now)
            p = self.policy
            if calls >= p.min_calls and failures >= p.failure_rate * calls:
                self._cause = "failure_rate"
                self.cb.open()

    def cool_down(self, until: float) -> None:
        """Skip this deployment until ``until`` (injected clock) unless already longer."""
        if until > self.cool_until:
            self.cool_until = until
            self._news = self._news.merge(FleetNews(cooled=True))
            self._on_news()

    def take_news(self) -> FleetNews:
        """What waits to be pushed to the fleet; cleared (``put_back`` if the push fails)."""
        news, self._news = self._news, FleetNews()
        return news

    def put_back(self, news: FleetNews) -> None:
        """Keep news whose push failed for the next sync (news since then wins)."""
        self._news = news.merge(self._news)

    def learn_cooldown(self, until: float) -> None:
        """Another replica cooled this deployment down until ``until`` (injected clock).

        Not when it ends within ``_SAME_COOL_S`` of this replica's own: the fleet's copy of
        a cool-down this replica wrote comes back a little later (its TTL is written in whole
        ms, rounded up, after the write's round trip), and a retry timed to the provider's
        Retry-After woke to find the deployment cooling down for another fraction of a
        millisecond, and gave up."""
        if until > self.cool_until + _SAME_COOL_S:
            self.cool_until = until

    def learn_trip(self, open_s: float, level: int, trip_id: str) -> None:
        """Another replica tripped: open for ``open_s`` from now, or extend a shorter trip."""
        now = self._clock()
        if self.state == OPEN and now + open_s <= self.open_until:
            return
        if self.state == OPEN:  # already open: a longer fleet trip extends it
            self.level = max(self.level, level)
        self.storage.adopt(Trip(trip_id, level, now, open_s))
        _ = self.cb.state  # pybreaker notices the stored change and fires the listeners

    def learn_closed(self, trip_id: str) -> None:
        """A probe on another replica closed ``trip_id``: close too if still half-open on it."""
        if self.state == HALF_OPEN and trip_id == self.trip_id:
            self.cb.close()

    def status(self, now: float) -> BreakerStatus:
        self.refresh(now)
        calls, failures = self._window.totals(now)
        state = self.state
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

    def _on_transition(self, old: str, new: str) -> None:
        now = self._clock()
        if new == OPEN:
            self.epoch += 1
            self._window.clear()
            if old == CLOSED and now - self._closed_since >= self.policy.max_reset_timeout_s:
                self.level = 0  # stayed closed long enough: forget earlier trips
            trip = self.storage.trip
            if not self.storage.opened_locally and trip is not None:
                self.level = max(self.level, trip.level)
                cause = "fleet"
            else:
                open_s = self._open_period_s(self.level)
                self.level += 1
                trip = Trip(f"{self._rng.getrandbits(48):012x}", self.level, now, open_s)
                self.storage.trip, self.storage.opened_locally = trip, False
                self._news = self._news.merge(FleetNews(tripped=True))
                self._on_news()
                cause = "probe_failed" if old == HALF_OPEN else self._cause or "consecutive_failures"
            log.warning("circuit breaker %s opened for %.1f s (%s)",
                        self.name, trip.open_for_s, cause)
        elif new == CLOSED:
            self._closed_since = now
            self._window.clear()
            log.info("circuit breaker %s closed", self.name)
        self._cause = ""


def _verdict(kind: FailureKind | None) -> None:
    """The guarded "call" pybreaker judges: the attempt's outcome, already known."""
    if kind is not None:
        raise DeploymentFailure(kind)
