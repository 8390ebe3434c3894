"""Circuit breakers per deployment, shared by the fleet (pipeline steps 7 and 10).

``BreakerBoard`` holds one ``DeploymentBreaker`` per deployment and routes across them:
``begin``/``begin_first`` hand out a ``Trial`` for one attempt (or None: skip that
deployment), and every attempt reports exactly one outcome to its ``Trial``.

- pybreaker is the state machine of each deployment (``breaker_deployment``): consecutive
  failures, open -> half-open -> closed, listeners; a failure *rate* over ``window_s``
  (with ``min_calls``) trips it too, and the open period grows per repeated trip, capped
  and jittered. Time comes from the injected clock.
- Half-open lets at most ``half_open_probes`` attempts through fleet-wide: slots are
  reserved in the store (``breaker_fleet``), the only store access on the request path.
- Cancelled, 4xx and 429 outcomes never reach pybreaker, so they neither count nor reset
  the failure count; a 429 cools the deployment down fleet-wide instead.
- ``FleetSync`` shares trips, cooldowns and probe verdicts with the other replicas in the
  background; with the store down everything works per replica.

Module graph (acyclic): ``breaker_policy`` <- ``breaker_deployment`` <- ``breaker_fleet``
<- ``breaker``; this module is the public face (``BreakerBoard``, ``Trial``,
``BreakerObserver``, ``BreakerStatus``, ``FailureKind``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import partial
from typing import Protocol

from gateway.config import BreakerPolicy
from gateway.errors import Unavailable, retry_headers
from gateway.state import StateBackend

from .deployment import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerStatus,
    DeploymentBreaker,
    FailureKind,
    TransitionListener,
)
from .fleet import FleetSync

__all__ = ["BreakerBoard", "BreakerObserver", "BreakerStatus", "FailureKind", "Trial"]

log = logging.getLogger("gateway.breaker")

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

    __slots__ = ("_board", "_breaker", "_done", "_epoch", "_since", "_slot", "deployment",
                 "probe")

    def __init__(
        self, board: BreakerBoard, breaker: DeploymentBreaker, epoch: int,
        slot: int | None = None, since: float = 0.0,
    ) -> None:
        self.deployment = breaker.name
        self.probe = slot is not None  # a half-open probe: its outcome closes or reopens
        self._board, self._breaker, self._epoch, self._done = board, breaker, epoch, False
        self._slot, self._since = slot, since  # probe slot and when it was reserved

    @property
    def stale(self) -> bool:
        """The deployment's breaker opened since this trial began (a request that queued for a
        slot meanwhile): sending now would only add to the failures that opened it."""
        return not self.probe and self._breaker.epoch != self._epoch

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
            self._board.cool_down(self.deployment, retry_after_s)
        self._end(None, record=False)

    def neutral(self) -> None:
        """Other 4xx, or a client's impatient deadline: the client's doing, so neither success
        nor failure."""
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
            self._board.release_probe(self._breaker, self._slot, self._since)


class BreakerBoard:
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
        self._rng = rng if rng is not None else random.Random()
        self._observer = observer
        replica_id = replica_id or f"{self._rng.getrandbits(48):012x}"
        self._breakers: dict[str, DeploymentBreaker] = {}
        self._fleet = FleetSync(policy, state, self._breakers, clock=clock,
                                replica_id=replica_id)
        for name in deployments:
            self._get(name)

    @property
    def degraded(self) -> bool:
        """True while the state store is unreachable (breakers then work per replica)."""
        return self._fleet.degraded

    async def sync_once(self) -> bool:
        """Exchange state with the other replicas once (see ``FleetSync.sync_once``)."""
        return await self._fleet.sync_once()

    async def run_sync(self, stop: asyncio.Event) -> None:
        """Background fleet sync until ``stop`` is set (see ``FleetSync.run``)."""
        await self._fleet.run(stop)

    def usable(self, deployment: str) -> bool:
        """False when open or cooling down, or half-open with this replica's probes busy.
        A True for a half-open deployment can still end in ``begin() -> None``."""
        b, now = self._get(deployment), self.clock()
        b.refresh(now)
        if now < b.cool_until:
            return False
        state = b.state
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
            state = b.state
            if state == OPEN:
                wait = max(wait, b.open_until - now)
            elif state == HALF_OPEN:
                wait = max(wait, _PROBE_WAIT_S)  # probes are out; their verdict comes soon
            waits.append(wait)
        return min(waits) if waits else self.policy.reset_timeout_s

    def unavailable_error(self, deployments: Iterable[str]) -> Unavailable:
        """The fast 503 for "no deployment usable", with Retry-After until the first one is."""
        wait = self.retry_after_s(deployments)
        return Unavailable(
            "Every deployment of this model is temporarily unavailable; retry later.",
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
        state = b.state
        if state == CLOSED:
            return Trial(self, b, b.epoch)
        if state == OPEN or b.probes >= self.policy.half_open_probes:
            return None
        epoch = b.epoch
        b.probes += 1  # before the await, so concurrent begins see it
        try:
            slot = await self._fleet.reserve_probe(b)
        except BaseException:
            b.probes -= 1
            raise
        if slot is None:
            b.probes -= 1
            return None
        if b.epoch != epoch or b.state != HALF_OPEN:
            self.release_probe(b, slot, now)  # the verdict arrived while we reserved
            return Trial(self, b, b.epoch) if b.state == CLOSED else None
        return Trial(self, b, epoch, slot, now)

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
        b.cool_down(now + min(max(s, 0.0), self.policy.max_reset_timeout_s))

    def snapshot(self) -> dict[str, BreakerStatus]:
        now = self.clock()
        return {name: b.status(now) for name, b in self._breakers.items()}

    def states(self) -> dict[str, str]:
        """Deployment -> "closed" | "open" | "half-open" (a metrics gauge source)."""
        return {name: status.state for name, status in self.snapshot().items()}

    def release_probe(self, b: DeploymentBreaker, slot: int, reserved_at: float) -> None:
        """Give back a probe slot from ``begin`` (the ``Trial`` does, once settled)."""
        b.probes -= 1
        self._fleet.release_probe(b.name, slot, reserved_at)

    def _announce(self, deployment: str, old: str, new: str) -> None:
        assert self._observer is not None
        try:
            self._observer.breaker_transition(deployment, old, new)
        except Exception:  # metrics must never break the request path
            log.exception("breaker observer failed")

    def _get(self, name: str) -> DeploymentBreaker:
        b = self._breakers.get(name)
        if b is None:
            listeners = [] if self._observer is None else [
                TransitionListener(partial(self._announce, name))]
            b = self._breakers[name] = DeploymentBreaker(
                name, self.policy, clock=self.clock, rng=self._rng, on_news=self._fleet.wake,
                listeners=listeners)
        return b
