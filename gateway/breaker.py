"""Circuit breakers per deployment, shared by the fleet (pipeline steps 7 and 10).

How it is built, and why:

- ``pybreaker.CircuitBreaker`` is the state machine (closed -> open -> half-open -> closed,
  consecutive failures, listeners) on an in-memory storage, so it never blocks the loop.
- pybreaker's ``calling()`` has no neutral exit: a block once entered counts as a success
  or a failure however it is left (abandoned, cancelled or an excluded error included). So a
  ``Trial`` enters ``calling()`` only once its outcome is known, as a zero-length block:
  ``with cb.calling(): raise _Counted`` for a failure, ``pass`` for a success. Cancelled,
  4xx and 429 outcomes never enter it, so they neither count nor reset the failure counter.
- A failure *rate* over ``window_s`` (with ``min_calls``) trips it too: our own bucketed
  window calls ``cb.open()``. The open period grows per repeated trip, capped and jittered.
- Time comes from the injected clock: the storage reports ``opened_at`` shifted by that
  clock, so even pybreaker's own open -> half-open check follows it.
- Fleet state goes through the ``StateBackend`` (never pybreaker's blocking Redis storage),
  as TTL'd keys, so replicas with different clocks agree without comparing timestamps:
  ``cb:{dep}:open`` (value ``level:trip_id``, TTL = rest of the open period),
  ``cb:{dep}:cool`` (429 cooldown, TTL = its rest), ``cb:{dep}:probe:<i>`` (half-open probe
  slots, SET NX PX) and ``cb:{dep}:ok`` (value ``trip_id``: a probe closed that trip, so
  replicas still half-open on it close too). Nothing touches the store on the request path
  except the probe reservation in half-open. If the store is down, everything works locally.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import pybreaker
from pydantic import Field, model_validator

from gateway.config_base import StrictModel
from gateway.errors import GatewayError
from gateway.breaker_fleet import _LOCAL_SLOT, FleetSync, _key
from gateway.state.base import StateBackend

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
FailureKind = Literal["connect_error", "timeout", "server_error", "slow_first_byte"]
_BUCKETS = 10  # failure-rate window resolution: window_s / 10
_PROBE_WAIT_S = 1.0  # Retry-After when a deployment is half-open but its probe slots are busy


class BreakerPolicy(StrictModel):
    """When a deployment is taken out of rotation, for how long, and how it comes back."""

    window_s: float = Field(30.0, gt=0, description="failure-rate window, seconds")
    # 20 calls: with fewer, a 20% error rate reaches 50% in one window by chance too often,
    # and a breaker on the only deployment turns a flaky provider into an outage.
    min_calls: int = Field(20, ge=1, description="calls in the window before the rate can trip")
    failure_rate: float = Field(
        0.5, gt=0, le=1, description="failed share of the window's calls that trips it")
    # 10 in a row: a dead deployment still trips within 10 calls, while a 20%-flaky one
    # (0.2**10 per run) practically never does; 5 tripped it about once per 4,000 calls.
    consecutive_failures: int = Field(10, ge=1, description="failures in a row that trip it")
    reset_timeout_s: float = Field(10.0, gt=0, description="open period after a first trip")
    max_reset_timeout_s: float = Field(
        120.0, gt=0, description="cap of the open period, which doubles on each repeated trip; "
        "also the longest 429 cooldown")
    reset_jitter: float = Field(0.2, ge=0, lt=1, description="open periods are up to this "
                                "share shorter, at random, so they do not end in lockstep")
    half_open_probes: int = Field(2, ge=1, le=100, description="probes let through at once, "
                                  "fleet-wide, when the open period ends")
    probe_lease_s: float = Field(60.0, gt=0, description="a probe slot whose replica never "
                                 "released it frees itself after this long")
    slow_first_token_s: float | None = Field(None, gt=0, description="a first byte slower "
                                             "than this counts as a failure (null: off)")
    sync_interval_s: float = Field(0.5, gt=0, le=10, description="how often breaker state is "
                                   "exchanged with the other replicas")
    cooldown_default_s: float = Field(1.0, gt=0, description="cooldown after a 429 that has "
                                      "no Retry-After")

    @model_validator(mode="after")
    def _cap_above_base(self) -> BreakerPolicy:
        if self.max_reset_timeout_s < self.reset_timeout_s:
            raise ValueError("max_reset_timeout_s must be at least reset_timeout_s")
        return self


class BreakerObserver(Protocol):
    """Told about every state change, local or learned from the fleet (for metrics)."""

    def breaker_transition(self, deployment: str, old: str, new: str) -> None:
        """old/new: "closed", "open" or "half-open". Must not block or raise."""


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


class Trial:
    """Permission for one attempt on one deployment; report exactly one outcome.

    Outcome methods are synchronous, never raise and never touch the store; calls after
    the first are ignored, so ``finally: trial.cancelled()`` is a safe catch-all.
    """

    __slots__ = ("_breaker", "_done", "_epoch", "_since", "_slot", "deployment", "probe")

    def __init__(
        self, breaker: _Breaker, epoch: int, slot: int | None = None, since: float = 0.0
    ) -> None:
        self.deployment = breaker.name
        self.probe = slot is not None  # a half-open probe: its outcome closes or reopens
        self._breaker, self._epoch, self._done = breaker, epoch, False
        self._slot, self._since = slot, since  # probe slot and when it was reserved

    def success(self, first_byte_s: float | None = None) -> None:
        """Upstream answered 2xx/3xx; ``first_byte_s`` above ``slow_first_token_s`` counts
        as a failure (the response itself is still relayed)."""
        slow = self._breaker.policy.slow_first_token_s
        too_slow = slow is not None and first_byte_s is not None and first_byte_s > slow
        self._end("slow_first_byte" if too_slow else None, record=True)

    def failure(self, kind: FailureKind) -> None:
        """5xx/529 (``server_error``), connect errors, first-byte/connect timeouts."""
        self._end(kind, record=True)

    def quota(self, retry_after_s: float | None = None) -> None:
        """429: not a failure; cools the deployment down fleet-wide for Retry-After."""
        if not self._done:
            self._breaker.board.cool_down(self.deployment, retry_after_s)
        self._end(None, record=False)

    def neutral(self) -> None:
        """Other 4xx: the client's fault, so neither success nor failure."""
        self._end(None, record=False)

    def cancelled(self) -> None:
        """The request was cancelled (client gone): not counted."""
        self._end(None, record=False)

    def _end(self, kind: FailureKind | None, *, record: bool) -> None:
        if self._done:
            return
        self._done = True
        if record:
            self._breaker.record(self._epoch, kind)
        if self._slot is not None:
            self._breaker.board.release_probe(self._breaker, self._slot, self._since)


class BreakerBoard(FleetSync):
    """All deployments' breakers of one process.

    ``clock`` returns monotonic seconds; ``rng`` jitters open periods. ``deployments``
    pre-registers names so fleet sync watches them from startup (others appear on use).
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        state: StateBackend,
        *,
        deployments: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        observer: BreakerObserver | None = None,
        replica_id: str | None = None,
    ) -> None:
        self.policy, self.clock = policy, clock
        self.rng = rng if rng is not None else random.Random()
        self._state, self._observer = state, observer
        self.replica_id = replica_id or f"{self.rng.getrandbits(48):012x}"
        self._breakers: dict[str, _Breaker] = {}
        self._releases: list[tuple[str, float]] = []  # probe keys to delete, reserved at
        self._wake = asyncio.Event()
        self._degraded = False
        for name in deployments:
            self._get(name)

    @property
    def degraded(self) -> bool:
        """True while the state store is unreachable (breakers then work per replica)."""
        return self._degraded

    def usable(self, deployment: str) -> bool:
        """False when open or cooling down, or half-open with this replica's probes busy.
        A True for a half-open deployment can still end in ``begin() -> None``."""
        b, now = self._get(deployment), self.clock()
        b.refresh(now)
        if now < b.cool_until:
            return False
        state = b.cb.current_state
        return state == CLOSED or (state == HALF_OPEN and b.probes < self.policy.half_open_probes)

    def retry_after_s(self, deployments: Iterable[str]) -> float:
        """Seconds until the first of ``deployments`` is worth trying again."""
        now, waits = self.clock(), []
        for name in deployments:
            if self.usable(name):
                waits.append(0.0)
                continue
            b = self._get(name)
            wait = max(0.0, b.cool_until - now)
            state = b.cb.current_state
            if state == OPEN:
                wait = max(wait, b.open_until - now)
            elif state == HALF_OPEN:
                wait = max(wait, _PROBE_WAIT_S)  # probes are out; their verdict comes soon
            waits.append(wait)
        return min(waits) if waits else self.policy.reset_timeout_s

    def unavailable_error(self, deployments: Iterable[str]) -> GatewayError:
        """The fast 503 for "no deployment usable", with Retry-After until the first one is."""
        wait = self.retry_after_s(deployments)
        return GatewayError(
            503, "Every deployment of this model is temporarily unavailable; retry later.",
            type="upstream_error", code="upstream_unavailable",
            headers={"Retry-After": str(max(1, math.ceil(wait))),
                     "retry-after-ms": str(max(1, round(wait * 1000)))},
        )

    async def begin(self, deployment: str) -> Trial | None:
        """A ``Trial`` for one attempt, or None: skip this deployment (open, cooling, or
        half-open with every fleet-wide probe slot taken). Touches the store only when
        half-open; with the store down, one probe per replica is let through."""
        b, now = self._get(deployment), self.clock()
        b.refresh(now)
        if now < b.cool_until:
            return None
        state = b.cb.current_state
        if state == CLOSED:
            return Trial(b, b.epoch)
        if state == OPEN or b.probes >= self.policy.half_open_probes:
            return None
        epoch = b.epoch
        b.probes += 1  # before the await, so concurrent begins see it
        try:
            slot = await self._reserve(b)
        except BaseException:
            b.probes -= 1
            raise
        if slot is None:
            b.probes -= 1
            return None
        if b.epoch != epoch or b.cb.current_state != HALF_OPEN:
            self.release_probe(b, slot, now)  # the verdict arrived while we reserved
            return Trial(b, b.epoch) if b.cb.current_state == CLOSED else None
        return Trial(b, epoch, slot, now)

    async def begin_first(
        self, deployments: Sequence[str], tried: Collection[str] = ()
    ) -> Trial | None:
        """A ``Trial`` on the first deployment, in failover order, that admits one, those
        not in ``tried`` first (failover before retrying the same one); None when none does."""
        fresh = [d for d in deployments if d not in tried]
        for name in fresh + [d for d in deployments if d in tried]:
            if self.usable(name) and (trial := await self.begin(name)) is not None:
                return trial
        return None

    def cool_down(self, deployment: str, seconds: float | None) -> None:
        """Skip ``deployment`` fleet-wide for ``seconds`` (default ``cooldown_default_s``,
        at most ``max_reset_timeout_s``). Not a breaker failure."""
        b, now = self._get(deployment), self.clock()
        s = self.policy.cooldown_default_s if seconds is None else seconds
        s = min(max(s, 0.0), self.policy.max_reset_timeout_s)
        if now + s > b.cool_until:
            b.cool_until = now + s
            b.push_cool = True
            self.wake()

    def snapshot(self) -> dict[str, BreakerStatus]:
        now = self.clock()
        return {name: b.status(now) for name, b in self._breakers.items()}

    def states(self) -> dict[str, str]:
        """Deployment -> "closed" | "open" | "half-open" (a metrics gauge source)."""
        return {name: status.state for name, status in self.snapshot().items()}

    # --- internals used by _Breaker and Trial ------------------------------------------

    def open_period_s(self, level: int) -> float:
        p = self.policy
        full = min(p.max_reset_timeout_s, p.reset_timeout_s * 2.0 ** min(level, 30))
        return full * self.rng.uniform(1 - p.reset_jitter, 1.0)

    def notify(self, deployment: str, old: str, new: str) -> None:
        if self._observer is not None:
            try:
                self._observer.breaker_transition(deployment, old, new)
            except Exception:  # metrics must never break the request path
                log.exception("breaker observer failed")

    def wake(self) -> None:
        self._wake.set()

    def release_probe(self, b: _Breaker, slot: int, reserved_at: float) -> None:
        b.probes -= 1
        if slot != _LOCAL_SLOT:
            self._releases.append((_key(b.name, f"probe:{slot}"), reserved_at))
            self.wake()

    def _get(self, name: str) -> _Breaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = _Breaker(self, name)
        return b
