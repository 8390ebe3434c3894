"""What the limiter does while the shared store (Redis) is unreachable, and the way back.

Entering is immediate: the first ``StateUnavailable`` (at most one Redis timeout) flips the
mode. Then, per the policy's action for the request's class:

- ``local``: the same plan, every limit divided by the replica count, evaluated in process;
- ``fail_open``: admitted without limits;
- ``fail_closed``: refused with 503 ``limits_unavailable``.

Every settlement made meanwhile is journaled (bounded) and replayed to the store when it
answers again. Replays use the idempotent settle script, so nothing is lost and nothing is
charged twice; requests admitted while degraded never left a hold in the store, so their
whole usage is charged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from .errors import GatewayError, retry_headers
from .limits_policy import Degraded
from .ratelimit import (
    AdmitPlan,
    AdmitResult,
    Check,
    CheckResult,
    Counter,
    Gcra,
    Lease,
    LocalLimits,
    Repeat,
    SettlePlan,
)
from .state import StateBackend, StateUnavailable

log = logging.getLogger("gateway.limits")
FLEET_KEY = "rl:{fleet}:replicas"
HEARTBEAT_TTL_MS = 30_000


class DegradedMode:
    """Tracks the store's health, applies the degraded action and owns the usage journal."""

    def __init__(self, policy: Degraded, state: StateBackend, clock: Callable[[], float],
                 replica_id: str) -> None:
        self.policy = policy
        self._state = state
        self._clock = clock
        self.replica_id = replica_id
        self.local = LocalLimits(clock)
        self.active = False
        self.since: float | None = None
        self.reason = ""
        self._journal: deque[SettlePlan] = deque()
        self.journal_lost = 0
        self.replayed = 0
        self.transitions = 0
        self.last_latency_s: float | None = None  # of the last admit round trip
        self._known_replicas = policy.replicas if isinstance(policy.replicas, int) else 1

    @property
    def replicas(self) -> int:
        return self._known_replicas

    @property
    def journal_size(self) -> int:
        return len(self._journal)

    def enter(self, reason: str) -> None:
        if self.active:
            return
        self.active, self.since, self.reason = True, self._clock(), reason
        self.transitions += 1
        log.error("shared state unavailable: limits degraded", extra={"fields": {
            "reason": reason, "action": self.policy.action, "replicas": self.replicas}})

    def action_for(self, priority: str) -> str:
        return self.policy.per_priority.get(priority, self.policy.action)  # type: ignore[call-overload, no-any-return]

    def admit(self, plan: AdmitPlan, priority: str) -> AdmitResult:
        action = self.action_for(priority)
        if action == "fail_closed":
            raise GatewayError(
                503, "Limits cannot be checked right now (shared state unavailable); "
                "this class of request is refused until it returns.", type="server_error",
                code="limits_unavailable",
                # The store is probed again within this long: the earliest a retry can pass.
                headers=retry_headers(self.policy.probe_interval_s * 1000),
            )
        if action == "fail_open":
            return AdmitResult(True, [CheckResult(True) for _ in plan.checks])
        return self.local.admit(self._scaled(plan))

    def _scaled(self, plan: AdmitPlan) -> AdmitPlan:
        n = self.replicas
        if n <= 1:
            return plan
        checks: list[Check] = []
        for c in plan.checks:
            if isinstance(c, Gcra):
                burst = max(1, c.burst // n, c.cost)
                checks.append(replace(c, interval_ms=c.interval_ms * n, burst=burst))
            elif isinstance(c, Lease):
                checks.append(replace(c, max=max(1, c.max // n)))
            elif isinstance(c, Counter):
                checks.append(replace(c, limit=max(1, c.limit // n)))
            elif isinstance(c, Repeat):
                checks.append(replace(c, max=max(2, c.max // n)))
        return dataclasses.replace(plan, checks=tuple(checks))

    def settle_local(self, plan: SettlePlan, replay: bool) -> None:
        self.local.settle(plan)
        if replay:
            self.journal(plan)

    def journal(self, plan: SettlePlan) -> None:
        if len(self._journal) >= self.policy.journal_max:
            self.journal_lost += 1
            log.error("usage journal full: a settlement is lost", extra={"fields": {
                "request_id": plan.request_id, "journal_max": self.policy.journal_max}})
            return
        self._journal.append(plan)

    async def recover_once(self) -> bool:
        """Replay the journal if the store answers; leave degraded mode when it is empty."""
        if not self._journal and not self.active:
            return True
        if not await self._state.ping():
            return False
        try:
            while self._journal:
                await self._state.settle(self._journal[0])
                self._journal.popleft()
                self.replayed += 1
        except StateUnavailable:
            return False
        if self.active:
            log.warning("shared state back: limits global again", extra={"fields": {
                "degraded_s": round(self._clock() - (self.since or self._clock()), 3),
                "replayed": self.replayed}})
        self.active, self.since, self.reason = False, None, ""
        return True

    async def heartbeat(self) -> None:
        """Count live replicas through a lease set, for ``replicas: auto``."""
        if isinstance(self.policy.replicas, int) or self.active:
            return
        plan = AdmitPlan(self.replica_id, (Lease(FLEET_KEY, 1_000_000, HEARTBEAT_TTL_MS),),
                         "rl:{fleet}:hb:" + self.replica_id, HEARTBEAT_TTL_MS)
        try:
            result = await self._state.admit(plan)
        except StateUnavailable as exc:
            self.enter(str(exc))
            return
        self._known_replicas = max(1, 1_000_000 - result.results[0].remaining)

    async def run(self, stop: asyncio.Event) -> None:
        """Background loop: probe and replay while degraded, heartbeat while healthy."""
        beat_every = HEARTBEAT_TTL_MS / 3000
        next_beat = 0.0
        while not stop.is_set():
            try:
                if self.active or self._journal:
                    await self.recover_once()
                elif self._clock() >= next_beat:
                    await self.heartbeat()
                    next_beat = self._clock() + beat_every
            except Exception:
                log.exception("degraded-mode loop failed")
            try:
                await asyncio.wait_for(stop.wait(), self.policy.probe_interval_s)
            except TimeoutError:
                pass
