"""What the limiter does while the shared store (Redis) is unreachable, and the way back.

Entering is immediate: the first ``StateUnavailable`` (at most 2 x ``state.timeout_s``) flips the
mode. Then, per the policy's action for the request's class:

- ``local``: the same plan, every limit divided by the replica count, evaluated in process;
- ``fail_open``: admitted without limits;
- ``fail_closed``: refused with 503 ``limits_unavailable``.

Budgets in ``local`` mode start from what this replica last saw of them: every global
admission records, per budget counter, what was spent (``remember``); a degraded episode then
allows each replica its share of what was left (``(limit - spent) / replicas``), so a tenant
known to have spent its budget stays refused. A budget this replica never saw since it started
falls back to ``limit / replicas``.

Every settlement made meanwhile is journaled (bounded) and replayed to the store when it
answers again. Replays use the idempotent settle script, so nothing is lost and nothing is
charged twice; requests admitted while degraded never left a hold in the store, so their
whole usage is charged. What is still journaled when the process stops is written to a
journal file (``limits/journal.py``) and replayed by the next start; what is lost even so is logged
and counted (``journal_lost``).

A fleet epoch key (``EPOCH_KEY``) detects a store that came back empty (a Redis restarted
without persistence, or flushed): it is written at start and checked every
``EPOCH_CHECK_S``; when it is gone, or another replica replaced it, every counter in the store
restarted from zero. That is logged (with this replica's last-known spend per budget), counted
(``resets``) and the epoch written again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from gateway.config import Degraded
from gateway.errors import Unavailable, retry_headers
from gateway.state import (
    AdmitPlan,
    AdmitResult,
    Check,
    CheckResult,
    Counter,
    Gcra,
    Lease,
    LocalLimits,
    Repeat,
    Scope,
    SettlePlan,
    StateBackend,
    StateUnavailable,
    keys,
)

from .journal import JournalFile

log = logging.getLogger("gateway.limits")
FLEET_KEY = keys.FLEET_REPLICAS
HEARTBEAT_TTL_MS = 30_000
# Each beat also reads the count. A replica counts the others only when it beats: one that
# beat before the rest of a rollout (or a scale-out) joined enforced a whole limit alone when
# Redis failed in the next 10 s, and the fleet let 6 calls in at max_concurrent: 4. One
# script call a second per replica keeps that window to a second.
BEAT_EVERY_S = 1.0
EPOCH_KEY = keys.FLEET_EPOCH
EPOCH_TTL_MS = 32 * 24 * 3600 * 1000  # refreshed on every check: gone only if the store lost it
EPOCH_CHECK_S = 5.0
KNOWN_BUDGETS_MAX = 100_000  # budget counters remembered (tenants x periods); oldest dropped


class DegradedMode:
    """Tracks the store's health, applies the degraded action and owns the usage journal."""

    def __init__(self, policy: Degraded, state: StateBackend, clock: Callable[[], float],
                 replica_id: str, journal_file: JournalFile | None = None) -> None:
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
        # Budget counter key -> units spent, as the store answered this replica's last
        # admission on it: degraded mode starts from it.
        self._known: dict[str, int] = {}
        self.journal_file = journal_file
        self._epoch: bytes | None = None
        self._next_epoch_check = 0.0
        self.resets = 0  # times the store was found restarted empty
        self._replaying = asyncio.Lock()

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
        # No round trip completes while degraded: the last one's figure would show a healthy
        # store on the dashboard through the outage (gateway_redis_latency_seconds is then
        # absent, beside gateway_redis_degraded 1), until the store answers again.
        self.last_latency_s = None
        self.transitions += 1
        log.error("shared state unavailable: limits degraded", extra={"fields": {
            "reason": reason, "action": self.policy.action, "replicas": self.replicas}})

    def action_for(self, priority: str) -> str:
        return self.policy.per_priority.get(priority, self.policy.action)  # type: ignore[call-overload, no-any-return]

    def admit(self, plan: AdmitPlan, priority: str) -> AdmitResult:
        action = self.action_for(priority)
        if action == "fail_closed":
            raise Unavailable(
                "Limits cannot be checked right now (shared state unavailable); "
                "this class of request is refused until it returns.",
                code="limits_unavailable",
                # The store is probed again within this long: the earliest a retry can pass.
                headers=retry_headers(self.policy.probe_interval_s * 1000),
            )
        if action == "fail_open":
            # Nothing is counted, but a budget's figure (status, metrics, the budget warning
            # header) stays what the store last said, not "nothing left"
            return AdmitResult(True, [CheckResult(True, remaining=self._open_remaining(c))
                                      for c in plan.checks])
        return self.local.admit(self._scaled(plan))

    def _open_remaining(self, check: Check) -> int:
        if not isinstance(check, Counter):
            return 0
        return max(0, check.limit - (self._known.get(check.key) or 0) - check.cost)

    def remember(self, plan: AdmitPlan, result: AdmitResult) -> None:
        """Record what the store said each budget counter has spent (a global admission)."""
        for check, res in zip(plan.checks, result.results):
            if isinstance(check, Counter) and not check.shadow:
                self._known.pop(check.key, None)  # re-insert: the dict stays oldest-first
                self._known[check.key] = max(0, check.limit - res.remaining)
                if len(self._known) > KNOWN_BUDGETS_MAX:
                    del self._known[next(iter(self._known))]

    def _local_key(self, key: str) -> str:
        # A budget with a known spend gets fresh local counters per episode: its limit there
        # is the headroom left when the episode began, not the whole budget.
        return f"{key}#e{self.transitions}" if key in self._known else key

    def _scaled(self, plan: AdmitPlan) -> AdmitPlan:
        n = max(1, self.replicas)
        checks: list[Check] = []
        for c in plan.checks:
            if n == 1 and not isinstance(c, Counter):
                checks.append(c)  # one replica: the limit as it is
            elif isinstance(c, Gcra):
                burst = max(1, c.burst // n, c.cost)
                checks.append(replace(c, interval_ms=c.interval_ms * n, burst=burst))
            elif isinstance(c, Lease):
                checks.append(replace(c, max=max(1, c.max // n)))
            elif isinstance(c, Counter):
                spent = self._known.get(c.key)
                if spent is None:
                    checks.append(replace(c, limit=max(1, c.limit // n)))
                else:  # what the fleet had left, shared; nothing left: refused
                    checks.append(replace(c, key=self._local_key(c.key),
                                          limit=max(0, c.limit - spent) // n))
            elif isinstance(c, Repeat):
                checks.append(replace(c, max=max(2, c.max // n)))
            else:  # Since: a run's age is the same on every replica
                checks.append(c)
        return dataclasses.replace(plan, checks=tuple(checks))

    def settle_local(self, plan: SettlePlan, replay: bool) -> None:
        counters = tuple((self._local_key(k), *rest) for k, *rest in plan.counters)
        self.local.settle(dataclasses.replace(plan, counters=counters))  # type: ignore[arg-type]
        if replay:
            self.journal(plan)

    def journal(self, plan: SettlePlan) -> None:
        if len(self._journal) >= self.policy.journal_max:
            self.lost(1, "usage journal full", request_id=plan.request_id,
                      journal_max=self.policy.journal_max)
            return
        self._journal.append(plan)

    def lost(self, count: int, why: str, **fields: object) -> None:
        """Settlements that will never reach the store: logged and counted, never silent."""
        self.journal_lost += count
        log.error(f"{why}: usage lost", extra={"fields": {"lost": count, **fields}})

    def load_journal(self) -> int:
        """Take over journal files left by stopped replicas (start); how many settlements.
        They are replayed like this replica's own journal, ahead of it."""
        if self.journal_file is None:
            return 0
        plans, corrupt = self.journal_file.claim()
        if corrupt:
            self.lost(corrupt, "unreadable lines in a usage journal file",
                      directory=self.journal_file.directory)
        self._journal.extendleft(reversed(plans))
        if plans:
            log.warning("replaying a usage journal left by a stopped replica", extra={
                "fields": {"settlements": len(plans), "directory": self.journal_file.directory}})
        return len(plans)

    def save_journal(self) -> None:
        """Write what is still journaled to the journal file (stop); loss is counted."""
        plans = list(self._journal)
        if self.journal_file is None:
            if plans:
                self.lost(len(plans), "stopping with an unflushed usage journal and no "
                          "journal directory (state.degraded.journal_dir)")
            return
        try:
            self.journal_file.save(plans)
        except OSError as exc:
            self.lost(len(plans), "the usage journal file could not be written",
                      directory=self.journal_file.directory, error=str(exc))
            return
        self._journal.clear()
        if plans:
            log.warning("usage journal written for the next start to replay", extra={
                "fields": {"settlements": len(plans), "directory": self.journal_file.directory}})

    async def flush(self, timeout_s: float) -> bool:
        """Keep replaying until the journal is empty, for at most ``timeout_s`` (drain)."""
        deadline = self._clock() + timeout_s
        while True:
            if not self._journal or await self.recover_once() and not self._journal:
                return True
            left = deadline - self._clock()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.policy.probe_interval_s, left))

    async def recover_once(self) -> bool:
        """Replay the journal if the store answers; leave degraded mode when it is empty.
        One replay at a time: the background loop and a drain's ``flush`` may both ask."""
        async with self._replaying:
            return await self._recover_once()

    async def _recover_once(self) -> bool:
        if not self._journal and not self.active:
            return True
        began = self._clock()
        if not await self._state.ping():
            return False
        self.last_latency_s = self._clock() - began
        try:
            while self._journal:
                await self._state.settle(self._journal[0])
                self._journal.popleft()
                self.replayed += 1
        except StateUnavailable:
            return False
        if self.journal_file is not None:
            self.journal_file.replayed()  # every claimed file is in the store now
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
        plan = AdmitPlan(self.replica_id, (Lease(FLEET_KEY, 1_000_000, HEARTBEAT_TTL_MS,
                                                 scope=Scope.fleet),),
                         keys.fleet_heartbeat(self.replica_id), HEARTBEAT_TTL_MS)
        try:
            result = await self._state.admit(plan)
        except StateUnavailable as exc:
            self.enter(str(exc))
            return
        self._known_replicas = max(1, 1_000_000 - result.results[0].remaining)

    async def leave(self) -> None:
        """Take this replica's heartbeat out of the fleet count at a clean stop, so the others'
        degraded-mode shares grow at their next heartbeat instead of after the lease's TTL.
        A crash leaves it to expire; so does a stop while the store is unreachable."""
        if isinstance(self.policy.replicas, int) or self.active:
            return
        plan = SettlePlan(self.replica_id, keys.fleet_left(self.replica_id),
                          keys.fleet_heartbeat(self.replica_id), HEARTBEAT_TTL_MS, (), (),
                          (FLEET_KEY,))
        try:
            await self._state.settle(plan)
        except StateUnavailable:
            pass  # the lease expires on its own

    async def check_epoch(self) -> bool:
        """Detect a store restarted empty (module docstring); False when it was."""
        try:
            seen = await self._state.get(EPOCH_KEY)
            if seen is None:
                mine = os.urandom(8).hex().encode()
                if not await self._state.set(EPOCH_KEY, mine, EPOCH_TTL_MS, only_if_absent=True):
                    seen = await self._state.get(EPOCH_KEY)  # another replica wrote it first
                current = seen or mine
            else:
                current = seen
                await self._state.set(EPOCH_KEY, seen, EPOCH_TTL_MS)  # keep it from expiring
        except StateUnavailable as exc:
            self.enter(str(exc))
            return True
        previous, self._epoch = self._epoch, current
        if previous is None or previous == current:
            return True
        self.resets += 1
        log.error("shared state restarted empty: every limit, budget and lease counted in it "
                  "is back to zero", extra={"fields": {
                      "resets": self.resets, "known_budgets": len(self._known),
                      "last_known_spent": dict(list(self._known.items())[-50:])}})
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Background loop: probe and replay while degraded, heartbeat while healthy."""
        beat_every = BEAT_EVERY_S
        next_beat = 0.0
        while not stop.is_set():
            try:
                if self.active or self._journal:
                    await self.recover_once()
                elif self._clock() >= next_beat:
                    await self.heartbeat()
                    next_beat = self._clock() + beat_every
                if not self.active and self._clock() >= self._next_epoch_check:
                    self._next_epoch_check = self._clock() + EPOCH_CHECK_S
                    await self.check_epoch()
            except Exception:
                log.exception("degraded-mode loop failed")
            try:
                await asyncio.wait_for(stop.wait(), self.policy.probe_interval_s)
            except TimeoutError:
                pass
