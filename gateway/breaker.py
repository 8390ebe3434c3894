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

Modules: breaker_policy.py (the ``breaker:`` policy model), breaker_deployment.py (one
deployment's breaker), breaker_fleet.py (sync through the store) and this one: the board that
routes across all deployments, and the ``Trial`` every attempt reports its outcome to.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from gateway.breaker_deployment import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerStatus,
    FailureKind,
    _Breaker,
)
from gateway.breaker_fleet import _LOCAL_SLOT, FleetSync, _key
from gateway.breaker_policy import BreakerPolicy
from gateway.errors import GatewayError, retry_headers
from gateway.state.base import StateBackend

log = logging.getLogger(__name__)

_PROBE_WAIT_S = 1.0  # Retry-After when a deployment is half-open but its probe slots are busy


class BreakerObserver(Protocol):
    """Told about every state change, local or learned from the fleet (for metrics)."""

    def breaker_transition(self, deployment: str, old: str, new: str) -> None:
        """old/new: "closed", "open" or "half-open". Must not block or raise."""



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
            headers=retry_headers(wait * 1000),
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
