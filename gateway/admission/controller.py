"""Step 9 of the pipeline: admission to a deployment under its adaptive concurrency limit.

``AdmissionController.acquire(deployment, request)`` returns a ``Permit`` at once when a slot is
free within the request's class share of the limit (holdback), otherwise queues the request in
its class, or sheds it. Every permit must be released exactly once with how the call ended;
``release`` is idempotent and safe in ``finally``::

    permit = await admission.acquire(target.label, admission_request)
    try:
        ...                                        # the upstream call
    finally:
        permit.release(outcome, ttft_s=first_byte_s)

Raises ``GatewayError``:
  503 ``overloaded``      shed: class queue full, the class's cohort shed, or a retry shed in drop
                          mode (Retry-After from the drain rate, x-should-retry false below high)
  504 ``deadline_exceeded`` the deadline cannot be met, at admission or while queued

Queues are per deployment and class: strict priority across classes, start-time fair by tokens
across tenants, FIFO within a tenant. Decisions (holdback, CoDel, cohorts, AIMD, Retry-After)
use only the clock and ``random.Random`` passed in; asyncio futures and loop timers only carry
out the waiting. In shadow mode sheds are counted as ``would_shed`` and the request queues anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import AdmissionPolicy, Priority
from gateway.errors import GatewayError

from .concurrency import Outcome
from .deadlines import deadline_exceeded
from .pacing import read_rate_headers
from .shed import (
    ShedReason,
    ShedState,
    cohort_bucket,
    counts_by_class,
    drain_time_s,
    overloaded_error,
    retry_after_s,
)
from .state import (
    AdmissionObserver,
    AdmissionRequest,
    DeadlineStage,
    DeploymentState,
    Permit,
    QueueEntry,
    is_client_retry,
)

__all__ = [
    "AdmissionController", "AdmissionObserver", "AdmissionPolicy", "AdmissionRequest",
    "DeadlineStage", "Outcome", "Permit", "ShedReason", "is_client_retry",
]

Clock = Callable[[], float]
log = logging.getLogger("gateway.admission")

_MIN_REARM_S = 0.001  # a queue timer that fires early never re-arms for less (no busy loop)
_RUN_MEMORY_MAX = 10_000  # sessions remembered as runs in progress (~1 MB); oldest forgotten


class AdmissionController:
    """Per-deployment limits, queues and shedding for one gateway replica (module docstring).

    ``clock`` returns monotonic seconds (``time.monotonic``; deadlines use the same clock);
    ``rng`` draws Retry-After jitter and cohorts of session-less requests.
    """

    def __init__(self, policy: AdmissionPolicy, clock: Clock, rng: random.Random,
                 observer: AdmissionObserver | None = None, cohort_key: bytes = b"") -> None:
        self._policy = policy
        self._cohort_key = cohort_key  # keys the cohort hash (shed.cohort_key)
        self._clock = clock
        self._rng = rng
        self._observer = observer or AdmissionObserver()
        self._deployments: dict[str, DeploymentState] = {}
        self._shed: Counter[tuple[Priority, str]] = Counter()
        self._would_shed: Counter[tuple[Priority, str]] = Counter()
        self._deadline: Counter[tuple[Priority, str]] = Counter()
        # (tenant, session) -> when this replica last admitted a step of it: runs in progress,
        # which cohort shedding spares (admission/shed.py). Only the gateway's own memory
        # counts: a client-set X-Agent-Step > 1 bought a tenant exemption from shedding
        # (a red team kept 120/120 answered while a peer got 0/120).
        self._runs: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def policy(self) -> AdmissionPolicy:
        return self._policy

    # -- acquiring ------------------------------------------------------------------------------

    async def acquire(self, deployment: str, req: AdmissionRequest) -> Permit:
        """A permit for ``deployment``: at once, after queueing, or a 503/504 ``GatewayError``.

        Cancellation-safe: a cancelled waiter leaves the queue, and a permit granted at the
        moment of cancellation is released again (outcome ``ignore``).
        """
        now = self._clock()
        state = self._state(deployment)
        self._check_deadline(state, req, now)
        self._roll(state, now)
        permit = self._grant_now(state, req, now)
        if permit is not None:
            state.arrived(req.priority, now)
            return permit
        if state.in_flight >= state.cap(req.priority, now):
            state.slots_full_at = now
        reason = self._shed_reason(state, req, now)
        shed_at = None
        if reason == "cohort" and req.agent_session is None and not self._policy.shadow:
            # Cohorts are for agent runs. A plain client first waits in its class queue, up to
            # the class's queue target (and its deadline), and is shed only if no slot came.
            target_s = self._policy.classes.of(req.priority).queue_target_ms / 1000
            shed_at, reason = now + target_s, None
        if reason is not None:
            self._refuse(state, req, reason, now)  # raises unless in shadow mode
        # Present from now (the classes below hold their reserve for it): a request refused
        # at once does not count, or a trickle of them would hold the reserve for nothing.
        state.arrived(req.priority, now)
        entry = QueueEntry(req, now, asyncio.get_running_loop().create_future(), shed_at=shed_at)
        state.queues[req.priority].push(entry)
        self._arm(state, entry, now)
        if not state.quota_allows(req.priority, now):
            self._arm_pace(state, req.priority, now)  # nothing else may wake it: no release
        elif (owed := state.owed_s(req.priority, now)) is not None:
            self._wake(state, owed)  # its share's last slot comes back before a release may
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._abandon(state, entry)
            raise

    def try_acquire(self, deployment: str, req: AdmissionRequest) -> Permit | None:
        """A permit only if one is free now for the request's class (no queueing, no shedding,
        no deadline check): for failover attempts. None when there is no free slot."""
        now = self._clock()
        state = self._state(deployment)
        self._roll(state, now)
        permit = self._grant_now(state, req, now)
        if permit is not None:
            state.arrived(req.priority, now)
        return permit

    def free_slots(self, deployment: str, priority: Priority) -> int:
        """How many requests of ``priority`` ``try_acquire`` would grant now: slots within the
        class share with nobody of the class or above waiting, and no more than the
        provider's quota (as paced) lets the class send."""
        now = self._clock()
        state = self._state(deployment)
        if state.queued(priority):
            return 0
        free = state.cap(priority, now) - state.in_flight
        if state.pacing:
            free = min(free, state.pace.spendable(state.policy_shares[priority], now))
        return max(0, free)

    def check_deadline(self, deployment: str, deadline: float, now: float | None = None,
                       prompt_tokens: int | None = None) -> None:
        """504 ``deadline_exceeded`` unless ``deadline`` leaves time for the deployment's
        optimistic time to first byte (use before a retry or failover)."""
        now = self._clock() if now is None else now
        expected = self.fastest_ttft(deployment, prompt_tokens)
        if deadline - now < expected:
            raise deadline_exceeded(deadline - now, expected)

    def ttft_estimate(self, deployment: str) -> float:
        """Expected seconds to the first byte: EWMA of observed ones, ``ttft_prior_s`` before."""
        state = self._deployments.get(deployment)
        return self._policy.ttft_prior_s if state is None else state.ttft

    def fastest_ttft(self, deployment: str, prompt_tokens: int | None = None) -> float:
        """The optimistic time to first byte that deadline checks use: a low percentile of the
        deployment's recent first bytes for this prompt size (``ttft_prior_s`` before any is
        measured). A request is refused only when even that cannot fit."""
        state = self._deployments.get(deployment)
        return self._policy.ttft_prior_s if state is None else state.fastest_ttft(prompt_tokens)

    def observe_rate(self, deployment: str, headers: Mapping[str, str]) -> None:
        """Headers of an answer sent without a permit of this controller: their report of the
        request quota, if any, replaces the paced prediction (``Permit.observe_rate`` is the
        usual way in)."""
        self._observe_rate(self._state(deployment), -1, headers, False)

    def restart_low(self, deployment: str) -> None:
        """Drop the limit to its minimum (call after the deployment's breaker closes)."""
        state = self._state(deployment)
        now = self._clock()
        state.settle(now)  # the time so far at the old limit
        state.limiter.restart_low(now)
        self._observer.on_limit(deployment, state.limiter.limit)

    def reconfigure(self, policy: AdmissionPolicy, cohort_key: bytes | None = None) -> None:
        """Apply a reloaded policy, keeping in-flight counts, queues, limits and shed levels
        (and the cohort hash's key unless a new one is given)."""
        now = self._clock()
        self._policy = policy
        if cohort_key is not None:
            self._cohort_key = cohort_key
        for state in self._deployments.values():
            state.reconfigure(policy, now)
            level = state.shed.level
            state.shed = ShedState(policy, now)
            state.shed.level = min(level, len(Priority) * policy.cohort_buckets)
            self._dispatch(state, now)

    def sweep(self) -> int:
        """Refuse (504) every queued request whose deadline can no longer be met; the count.
        Loop timers do this per request; this is for tests and a belt-and-braces tick."""
        now = self._clock()
        expired = 0
        for state in self._deployments.values():
            for queue in state.queues:
                for entry in list(queue):
                    if (not state.feasible(entry.req.deadline, now, entry.req.prompt_size)
                            and queue.remove(entry)):
                        self._expire(state, entry, now)
                        expired += 1
        return expired

    # -- internals --------------------------------------------------------------------------------

    def _state(self, deployment: str) -> DeploymentState:
        state = self._deployments.get(deployment)
        if state is None:
            state = self._deployments[deployment] = DeploymentState(
                deployment, self._policy, self._clock()
            )
        return state

    def _grant_now(self, state: DeploymentState, req: AdmissionRequest,
                   now: float) -> Permit | None:
        # A free slot within the class share, and nobody of this class or above waiting for it,
        # and the provider's quota (as paced) not down to the reserve of the classes above.
        if (state.in_flight >= state.cap(req.priority, now) or state.queued(req.priority)
                or not state.quota_allows(req.priority, now)):
            return None
        state.shed.observe(req.priority, 0.0)
        self._observer.on_queue_delay(state.label, req.priority, 0.0)
        return self._grant(state, req, now, 0.0)

    def _grant(self, state: DeploymentState, req: AdmissionRequest, now: float,
               queued_s: float) -> Permit:
        seq = state.take(req.priority, now)
        if req.agent_session is not None and req.step and self._policy.run_memory_s > 0:
            key = (req.tenant, req.agent_session)
            runs = self._runs
            runs[key] = now
            runs.move_to_end(key)
            # Oldest first (every grant moves its run to the end): forget runs idle past the
            # memory here, so the map holds the recent runs only, not _RUN_MEMORY_MAX always.
            horizon = now - self._policy.run_memory_s
            while runs and (len(runs) > _RUN_MEMORY_MAX or next(iter(runs.values())) < horizon):
                runs.popitem(last=False)
        return Permit(state, req, now, queued_s, self._release, self._observe_rate,
                      self._first_token, seq)

    def _in_progress(self, req: AdmissionRequest, now: float) -> bool:
        """A later step of a run: a session this replica admitted within run_memory_s."""
        if req.agent_session is None:
            return False
        at = self._runs.get((req.tenant, req.agent_session))
        return at is not None and now - at <= self._policy.run_memory_s

    def _check_deadline(self, state: DeploymentState, req: AdmissionRequest, now: float) -> None:
        if not state.feasible(req.deadline, now, req.prompt_size):
            self._deadline[(req.priority, "admission")] += 1
            self._observer.on_deadline(state.label, req.priority, "admission")
            raise deadline_exceeded(req.deadline - now, state.fastest_ttft(req.prompt_size))

    def _shed_reason(self, state: DeploymentState, req: AdmissionRequest,
                     now: float) -> ShedReason | None:
        if len(state.queues[req.priority]) >= self._policy.classes.of(req.priority).max_queue:
            return "queue_full"
        bucket = cohort_bucket(
            req.tenant, req.agent_session, self._policy.cohort_buckets, self._rng,
            self._cohort_key,
        )
        return state.shed.decide(req.priority, bucket, req.is_retry, self._in_progress(req, now))

    def _refuse(self, state: DeploymentState, req: AdmissionRequest, reason: ShedReason,
                now: float) -> None:
        shadow = self._policy.shadow
        (self._would_shed if shadow else self._shed)[(req.priority, reason)] += 1
        self._observer.on_shed(state.label, req.priority, reason, shadow)
        fields = {"deployment": state.label, "priority": req.priority.name, "reason": reason,
                  "tenant": req.tenant, "shed_level": state.shed.level}
        if shadow:
            log.info("would shed", extra={"fields": fields})
            return
        log.debug("shed", extra={"fields": fields})
        drain = drain_time_s(state.queued(req.priority), state.drain.rate(now))
        wait = retry_after_s(drain, self._policy, self._rng)
        raise overloaded_error(
            req.priority, wait,
            f"The gateway is overloaded for {req.priority.name} requests to this model "
            f"({reason}); retry after {wait:.1f} s.",
        )

    def _arm(self, state: DeploymentState, entry: QueueEntry, now: float) -> None:
        delay = entry.req.deadline - state.fastest_ttft(entry.req.prompt_size) - now
        if entry.shed_at is not None:
            delay = min(delay, entry.shed_at - now)
        entry.timer = asyncio.get_running_loop().call_later(
            max(_MIN_REARM_S, delay), self._on_timer, state, entry
        )

    def _on_timer(self, state: DeploymentState, entry: QueueEntry) -> None:
        entry.timer = None
        if entry.future.done():
            return
        now = self._clock()
        req = entry.req
        if entry.shed_at is not None and now >= entry.shed_at:
            if self._policy.shadow:  # reloaded into shadow mode meanwhile: nothing is shed
                entry.shed_at = None
                self._arm(state, entry, now)
                return
            # A slot or a turn of the quota that came on this very tick is its own: timers of
            # one tick fire oldest first, and the wake-up that would dispatch it may be later.
            self._dispatch(state, now)
            if entry.future.done():
                return
            if (turn := self._quota_turn(state, entry, now)) is not None:
                entry.shed_at = now + turn + _MIN_REARM_S  # its turn, then asked again
                self._arm(state, entry, now)
            elif state.queues[req.priority].remove(entry):
                try:
                    self._refuse(state, req, "cohort", now)
                except GatewayError as exc:
                    entry.future.set_exception(exc)
            return
        if state.feasible(req.deadline, now, req.prompt_size):  # estimate fell: wait on
            self._arm(state, entry, now)
        elif state.queues[req.priority].remove(entry):
            self._expire(state, entry, now)

    def _quota_turn(self, state: DeploymentState, entry: QueueEntry,
                    now: float) -> float | None:
        """Seconds until the provider's quota, as paced, lets ``entry`` go, when that alone
        holds it: nobody else of its class waits, a slot of its class is free, and its turn
        comes within its deadline. None otherwise. Such a request is being paced, not queued
        behind others of its class: one caller calling in a row at 30 requests a minute waits
        2 s a call, four of the normal class's queue targets, and shed at the target it got a
        503 where the provider itself would have let it through at its turn. (Classes above
        that wait for the same quota go first, and it is asked again at its turn; never past
        its deadline.)"""
        priority = entry.req.priority
        if (len(state.queues[priority]) != 1 or state.in_flight >= state.cap(priority, now)
                or state.quota_allows(priority, now)):
            return None
        turn = state.pace.wait_s(state.policy_shares[priority], now)
        return turn if state.feasible(entry.req.deadline, now + turn,
                                      entry.req.prompt_size) else None

    def _expire(self, state: DeploymentState, entry: QueueEntry, now: float) -> None:
        entry.disarm()
        self._deadline[(entry.req.priority, "queue")] += 1
        self._observer.on_deadline(state.label, entry.req.priority, "queue")
        if not entry.future.done():
            entry.future.set_exception(deadline_exceeded(
                entry.req.deadline - now, state.fastest_ttft(entry.req.prompt_size)))

    def _abandon(self, state: DeploymentState, entry: QueueEntry) -> None:
        entry.disarm()
        future = entry.future
        if not future.done() or future.cancelled():
            future.cancel()
            state.queues[entry.req.priority].remove(entry)
        elif future.exception() is None:
            # Granted in the same loop iteration as the cancel: hand the slot on.
            future.result().release("ignore")

    def _observe_rate(self, state: DeploymentState, seq: int, headers: Mapping[str, str],
                      rejected: bool) -> None:
        if not state.pacing:  # its own sends are not counted: it would learn them as others'
            return
        if seq >= 0:
            state.pace.heard(seq)
            if rejected:
                state.pace.rejected()
        report = read_rate_headers(headers)
        if report is None:
            return
        now = self._clock()
        state.pace.observe(report, now, seq if seq >= 0 else None)
        self._dispatch(state, now)  # more left than predicted: waiters may go now

    def _first_token(self, state: DeploymentState, ttft_s: float,
                     prompt_tokens: int | None, at_top: bool) -> None:
        now = self._clock()
        state.observe_ttft(ttft_s, prompt_tokens)
        state.settle(now)  # the time so far at the current limit
        before = state.limiter.limit
        state.limiter.on_first_token(now, ttft_s, prompt_tokens, state.demand(now), at_top)
        if state.limiter.limit != before:
            self._observer.on_limit(state.label, state.limiter.limit)
            self._dispatch(state, now)  # a higher limit frees slots at once

    def _release(self, state: DeploymentState, priority: Priority, outcome: Outcome,
                 ttft_s: float | None, prompt_tokens: int, granted_at: float,
                 pace_seq: int) -> None:
        now = self._clock()
        if pace_seq >= 0:
            state.pace.heard(pace_seq)  # no answer came (or it was heard already)
        demand = state.demand(now)
        state.give_back(priority, now)
        state.drain.tick(now)
        if ttft_s is not None:
            state.observe_ttft(ttft_s, prompt_tokens)
        before = state.limiter.limit
        state.limiter.on_sample(now, outcome, demand, ttft_s, prompt_tokens, now - granted_at)
        if state.limiter.limit != before:
            self._observer.on_limit(state.label, state.limiter.limit)
        self._roll(state, now)
        self._dispatch(state, now)

    def _dispatch(self, state: DeploymentState, now: float) -> None:
        """Hand free slots to waiters: strict priority, fair order inside a class."""
        for priority in Priority:
            queue = state.queues[priority]
            if not queue:
                continue
            cap = state.cap(priority, now)
            while queue and state.in_flight < cap:
                if not state.quota_allows(priority, now):
                    self._arm_pace(state, priority, now)
                    return  # lower classes keep larger reserves: they cannot go either
                entry = queue.pop()
                entry.disarm()
                if entry.future.done():  # cancelled; its task has not run its handler yet
                    continue
                if not state.feasible(entry.req.deadline, now, entry.req.prompt_size):
                    self._expire(state, entry, now)
                    continue
                delay = now - entry.enqueued_at
                state.shed.observe(priority, delay)
                self._observer.on_queue_delay(state.label, priority, delay)
                entry.future.set_result(self._grant(state, entry.req, now, delay))
            if queue:
                wait = state.owed_s(priority, now)
                if wait is not None:  # its share's slot comes back before any release may
                    self._wake(state, wait)
                return  # lower classes have smaller shares: they cannot fit either

    def _arm_pace(self, state: DeploymentState, priority: Priority, now: float) -> None:
        """Dispatch again when the provider's quota has refilled for ``priority``: with nothing
        in flight, no release would wake the queue."""
        wait = state.pace.wait_s(state.policy_shares[priority], now)
        state.hold_for_quota(priority, now + wait)
        self._wake(state, wait)

    def _wake(self, state: DeploymentState, wait: float) -> None:
        """Dispatch again in ``wait`` seconds (one timer per deployment, the earliest kept)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(_MIN_REARM_S, wait)
        timer = state.wake_timer
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return  # an earlier wake-up is armed: it re-arms if still short
        if timer is not None:
            timer.cancel()
        state.wake_timer = loop.call_at(when, self._on_wake, state)

    def _on_wake(self, state: DeploymentState) -> None:
        state.wake_timer = None
        now = self._clock()
        self._roll(state, now)
        self._dispatch(state, now)

    def _roll(self, state: DeploymentState, now: float) -> None:
        if state.shed.due(now):
            state.shed.roll(now, state.oldest_waits(now),
                            state.exploring(now, self._policy.codel_interval_ms / 1000))

    # -- reporting ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """State for metrics and /admin/status (JSON-serialisable); a superset of
        ``metrics_pulled.AdmissionSnapshot``, so it can be the metrics' admission source as is::

            {"shadow": bool,
             "classes": {class: {"in_flight", "queued", "queue_target_s", "oldest_wait_s",
                                 "drop_mode"}},                   # over all deployments
             "deployments": {label: {"limit", "in_flight", "queued", "ttft_estimate_s",
                 "ttft_baseline_s", "upstream_queue", "upstream_queue_top", "exploring",
                 "drain_rate_per_s", "shed_level",
                 "classes": {class: {"in_flight", "queued", "oldest_wait_s", "overloaded",
                                     "drop_mode", "slots"}}}},
             "shed": {class: {reason: n}}, "would_shed": {...},
             "deadline_exceeded": {class: {"admission"|"queue": n}}}
        """
        now = self._clock()
        totals: dict[str, dict[str, Any]] = {
            p.name: {"in_flight": 0, "queued": 0,
                     "queue_target_s": self._policy.classes.of(p).queue_target_ms / 1000,
                     "oldest_wait_s": 0.0, "drop_mode": False}
            for p in Priority
        }
        deployments: dict[str, Any] = {}
        for label, state in self._deployments.items():
            self._roll(state, now)
            waits = state.oldest_waits(now)
            classes: dict[str, dict[str, Any]] = {}
            for p in Priority:
                cls = classes[p.name] = {
                    "in_flight": state.in_flight_by_class[p],
                    "queued": len(state.queues[p]),
                    "oldest_wait_s": waits[p] or 0.0,
                    "overloaded": state.shed.overloaded(p),
                    "drop_mode": state.shed.drop_mode(p),
                    # Slots the class may fill now: its holdback share of the limit, with the
                    # last partial slot only while lent (DeploymentState.cap). "limit 4, in
                    # flight 3, high queued" is high owing its share of the fourth slot.
                    "slots": state.cap(p, now),
                }
                total = totals[p.name]
                total["in_flight"] += cls["in_flight"]
                total["queued"] += cls["queued"]
                total["oldest_wait_s"] = max(total["oldest_wait_s"], cls["oldest_wait_s"])
                total["drop_mode"] = total["drop_mode"] or cls["drop_mode"]
            deployments[label] = {
                "limit": state.limiter.limit,
                "in_flight": state.in_flight,
                "queued": state.queued(),
                "ttft_estimate_s": state.ttft,
                # How the limit sees the upstream: its no-load first token (for an empty
                # prompt), the prefill it learned per 1,000 prompt tokens, and the requests
                # estimated to wait inside it (None: not measured).
                "ttft_baseline_s": state.limiter.baseline_s,
                "prefill_s_per_1k_tokens": state.limiter.prefill_s,
                "upstream_queue": state.limiter.upstream_queue,
                # ... and the queue the calls sent at the top of the limit met beyond the
                # others (0: none that stood out).
                "upstream_queue_top": state.limiter.top_queue,
                # The limit still finding capacity in slow start: requests queued behind it
                # wait for it to grow and are not shed for that wait (concurrency.py).
                "exploring": state.limit_exploring(now),
                "drain_rate_per_s": state.drain.rate(now),
                # The provider's request quota as paced from its headers (None: not reported).
                "provider_quota": state.pace.snapshot(now) if state.pacing else None,
                "shed_level": state.shed.level,
                "classes": classes,
            }
        return {
            "shadow": self._policy.shadow,
            "classes": totals,
            "deployments": deployments,
            "shed": counts_by_class(self._shed),
            "would_shed": counts_by_class(self._would_shed),
            "deadline_exceeded": counts_by_class(self._deadline),
        }
