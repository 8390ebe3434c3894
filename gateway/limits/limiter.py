"""Step 6 and 12: tenant limits and budgets, admitted in one round trip and settled once.

``Limiter.admit`` turns a call into an ``AdmitPlan`` (gateway/state/plan.py) covering every
limit that applies — tenant, tenant x model, agent session, budgets, the loop guard — and
runs it atomically on the state backend. It returns a ``Hold`` that the pipeline settles in a
``finally`` with the upstream's real usage.

While the shared store is unreachable the limiter is *degraded*: it applies the configured
action (``local`` limits of ``limit / replicas``, ``fail_open`` or ``fail_closed``), journals
every settlement and replays the journal, idempotently, once the store answers again
(see ``limits/degraded.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import orjson

from gateway.config import CacheReads, GatewayConfig, Model, RateLimits, Tenant
from gateway.errors import SDK_WAIT_MAX_MS, BudgetExceeded, GatewayError, RateLimited, retry_headers
from gateway.request import CanonicalCache, ProxyCall, reserved_output_tokens
from gateway.state import (
    AdmitPlan,
    AdmitResult,
    Check,
    CheckResult,
    Counter,
    Gcra,
    Kind,
    Lease,
    Repeat,
    Scope,
    SettlePlan,
    Since,
    StateBackend,
    StateUnavailable,
)
from gateway.state import keys as store_keys
from gateway.usage import Rates, Usage, reservation_cost_micros

from .degraded import DegradedMode
from .leases import LeaseBoard
from .periods import period_keys
from .promises import PromiseBook
from .responses import ResponseSizes, response_key
from .runs import RunBoard, is_run_check, run_cap, run_checks, session_id, usage_after, warning

log = logging.getLogger("gateway.limits")
LEASE_TTL_MS = 60_000  # renewed every 20 s while the request runs
HOLD_TTL_MS = 30 * 60_000  # a settlement delayed longer than this charges in full
# Settled request ids are remembered this long so a journal replay cannot charge twice.
# The cost is one small key per request for this long (~60 MB of Redis at 1,000 req/s).
DONE_TTL_MS = 10 * 60_000
SETTLE_BATCH_MAX = 64  # settlements per Redis pipeline: well inside one call's deadline
# Requests that may wait here for a slot of one concurrency scope, per slot of it
# (``Limiter._room_to_wait``).
WAITERS_PER_SLOT = 4


@dataclass(frozen=True, slots=True)
class Counting:
    """Whether a request's cache reads count against its token limits, decided at admission
    (``cache_reads`` of the tenant's limits and budget, by the route's provider kind)."""

    rate_cache_reads: bool = True  # tokens_per_minute buckets
    budget_cache_reads: bool = True  # daily / monthly token budgets


def counts_cache_reads(setting: CacheReads, provider_kind: str) -> bool:
    """``auto``: what the provider's own limit does (docs/architecture.md#accounting)."""
    if setting == "auto":
        return provider_kind != "anthropic"
    return setting == "count"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a refused request reserved and why, for a budget refusal's message: a budget
    with room left refuses a request whose reservation does not fit, and the client needs to
    know that a smaller cap would (``_budget_message``)."""

    prompt: int  # the prompt estimate
    output: int  # output tokens reserved: per choice x choices
    choices: int
    capped: bool  # the body set an output cap; else the estimate (default_max_tokens)
    cap_field: str  # the body's cap field (or the route's usual one)
    default_max_tokens: int
    rates: Rates
    fits: int | None  # the largest cap per choice that fits every refusing budget; None: none
    # What made it reserve input the body does not carry, and the context window it reserved
    # up to (``unseen_input_tokens``); None: its prompt is the body's estimate.
    unseen: tuple[str | None, int] | None = None
    # Of ``prompt``: the size remembered for the stored response it refers to (responses.py).
    stored: int = 0
    # It reserved the window only because what it refers to by id was not remembered.
    rememberable: bool = False
    # What it refers to by id was remembered, this size, but with the output cap it would
    # not fit the window: the window was reserved.
    filled: int = 0
    # Calls of priced tools billed per call that it reserved (``ProxyCall.tool_calls``).
    calls: dict[str, int] = field(default_factory=dict)
    # Run caps refused only the window it reserved (``_window_only``): the run goes on.
    window_only: bool = False


@dataclass(slots=True)
class Hold:
    """One request's admission; ``Limiter.settle`` it exactly once, whatever happens."""

    request_id: str
    mode: str  # global | local | open | none
    reserved_tokens: int
    reserved_cost: int  # micro-units of the price table's currency
    settle_plan: SettlePlan | None
    leases: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    # The agent run (tenant, hashed session id) and its totals after this admission, for the
    # run board and the access log; run_capped: the totals are the store's (fleet-wide).
    run: tuple[str, str] | None = None
    run_capped: bool = False
    run_totals: dict[str, float] = field(default_factory=dict)
    # What each counter of settle_plan counts (aligned with its counters): settlement charges
    # a cost budget the cost, a token budget the tokens, a run's steps cap one step.
    counter_kinds: tuple[Kind, ...] = ()
    # Settle the run's step back to 0: no model call was made under this hold (a deferred
    # entry's submit reservation, refunded because each of its runs is charged as a step).
    no_step: bool = False
    counting: Counting = Counting()
    # Settling gives a reservation back (the store holds this request's hold marker); False
    # for a deferred entry's run, charged its whole usage under an id never reserved.
    reserved: bool = True
    # Tokens reserved of rate limits and provider quotas: the prompt estimate and output cap.
    # ``reserved_tokens`` (budgets and runs) adds input the body does not carry. None: the same.
    rate_tokens: int | None = None

    @property
    def unseen_tokens(self) -> int:
        """Input reserved of budgets beyond the body's estimate (``unseen_input_tokens``)."""
        return 0 if self.rate_tokens is None else self.reserved_tokens - self.rate_tokens

    @property
    def sent_tokens(self) -> int:
        """What the request may take of provider quotas and admission's token counts."""
        return self.reserved_tokens if self.rate_tokens is None else self.rate_tokens


def unseen_input_tokens(call: ProxyCall, model: Model, max_out: int,
                        known: int | None = None) -> int:
    """Input the provider may read beyond the body (``ProxyCall.unseen_input``), reserved of
    budgets: up to the context window less the answer's cap, over the prompt estimate. A
    stored conversation by ``previous_response_id`` of 120,000 tokens reserved 20 and spent
    120,010, twice, past a 200,000-token budget. ``known``: the size remembered for the
    stored response it refers to (responses.py), reserved instead, within the same bound."""
    if call.unseen_input is None:
        return 0
    bound = max(0, model.context_window - max_out // max(1, call.choices)
                - call.prompt_tokens_estimate)
    return bound if known is None else min(known, bound)


def reservation_max_tokens(call: ProxyCall, tenant: Tenant, model: Model) -> int:
    """Output tokens to reserve (``classify.reserved_output_tokens``): the body's cap times its
    generations, else the tenant's estimate capped by the model."""
    return reserved_output_tokens(call, tenant.default_max_tokens, model.output_limit)


class InFlight:
    """Work that outlives one version of the policy: the leases of running requests (renewed
    in the background) and settlements not yet written. A reload swaps the Limiter, not this."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.leases: dict[str, tuple[str, ...]] = {}
        # Start times and typical durations of the leases held here, and their waiters.
        self.lease_board = LeaseBoard(clock)
        # Retry times promised in refusals, so concurrent refusals queue (gateway/limits/promises.py).
        self.promises = PromiseBook(clock)
        self.settling: set[asyncio.Task[None]] = set()
        # Settlements waiting for this loop iteration's batch (``Limiter.settle_soon``).
        self.batch: list[tuple[Hold, Usage, int]] = []
        # Last budget state seen per tenant, for the metrics scrape (which must not hit Redis).
        self.budgets: dict[str, dict[str, dict[str, float]]] = {}
        # The agent runs this replica has seen (gateway/limits/runs.py), for /admin/status.
        self.runs = RunBoard(wall_clock)
        # Canonical tool-call arguments already seen (the loop detector, request/agent_loop.py).
        self.canonical = CanonicalCache()
        # Sizes of stored Responses answers, for follow-ups that refer to them (responses.py).
        self.responses = ResponseSizes(clock)
        # Called once per run (on this replica) at its first refusal by a cap: the metric.
        self.on_run_stop: Callable[[str, str], None] | None = None
        # Which store counter each remembered figure came from (tenant, "daily_tokens") -> key,
        # and back (with the figure's unit: 1e6 micro-units of a cost budget per currency
        # unit): a settlement corrects the figure only while it is still that period's.
        self.budget_keys: dict[tuple[str, str], str] = {}
        self.budget_of_key: dict[str, tuple[str, str, float]] = {}

    def budget_snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        return self.budgets


class Limiter:
    """Admission and settlement of tenant limits and budgets against the state backend."""

    def __init__(self, config: GatewayConfig, state: StateBackend, degraded: DegradedMode,
                 wall_clock: Callable[[], float], inflight: InFlight | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._state = state
        self.degraded = degraded
        self._wall_clock = wall_clock  # seconds since the epoch: budget periods are UTC dates
        self._clock = clock  # monotonic: waiting for a lease, lease durations
        inflight = inflight or InFlight(clock)
        self._lease_board = inflight.lease_board
        self._promises = inflight.promises
        self._active_leases = inflight.leases
        self._settling = inflight.settling
        self._inflight = inflight
        self._budgets = inflight.budgets
        self.canonical_cache = inflight.canonical

    async def admit(self, call: ProxyCall, request_id: str, *, lease: bool = True,
                    hold_ttl_ms: int = HOLD_TTL_MS, deadline: float | None = None,
                    client_retry: bool = False, count_only: bool = False,
                    rate_exempt: bool = False) -> Hold:
        """``lease=False`` and a longer ``hold_ttl_ms``: a deferred entry (gateway/deferred/service.py)
        holds no concurrency slot while queued, and its reservation is refundable for its life.

        ``count_only``: a token-counting call (``/v1/messages/count_tokens``,
        ``/v1/responses/input_tokens``). It bills no tokens, so it reserves none and meets no
        budget, loop guard or run cap; but it is a call to the provider that holds a connection
        and an admission slot for as long as the provider takes, so it counts as a request and
        holds a concurrency lease like any other (without one, a tenant held five counting
        calls at once under ``max_concurrent: 2``). ``rate_exempt``: the route is in the
        tenant's ``limits.exempt_routes``, so it is not counted as a request either; the lease
        stays (exempting a route from the request rate must not reopen the concurrency hole).

        A request refused only for want of a concurrency slot waits for one up to the tenant's
        ``concurrency_wait_s``, never past ``deadline`` (monotonic seconds, the clock this
        Limiter was given); the uncontended path makes exactly one store call (and, before
        it, one read per stored item a request refers to by id that this replica does not
        remember: ``_stored_size``).
        ``client_retry``: the SDK marks this as a retry of a failed call, which the loop
        guard does not count as a repeat."""
        tenant = self._config.tenants[call.tenant.name]
        model = self._config.models[call.model]
        max_out = 0 if count_only else reservation_max_tokens(call, tenant, model)
        tokens = 0 if count_only else call.prompt_tokens_estimate + max_out
        # Budgets are hard caps: input the body does not carry is reserved up to the context
        # window there; rate limits reserve the estimate and settle the rest.
        known = None if count_only or not call.stored_refs else \
            await self._stored_size(call)
        unseen = 0 if count_only else unseen_input_tokens(call, model, max_out, known)
        filled = 0  # what it refers to, found, but filling the window with the output cap
        if known is not None and unseen < known:
            filled, known = known, None  # the window is reserved
        budget_tokens = tokens + unseen
        cost_units = 0 if count_only else reservation_cost_micros(
            call.prompt_tokens_estimate + unseen, max_out, model.price.rates, call.tool_calls)
        # (Until a deployment serves it: then ``count_as_served`` decides by that one's kind.)
        counting = self._counting(call.tenant.name, call.route.provider_kind)
        planned_at = self._wall_clock()  # budget resets in the plan count from here
        checks, meta = self._checks(call, tenant, tokens, budget_tokens, cost_units, lease,
                                    client_retry, count_only, rate_exempt)
        if not checks:
            return Hold(request_id, "none", budget_tokens, cost_units, None, counting=counting,
                        rate_tokens=tokens)
        name = call.tenant.name
        leases = tuple(c.key for c in checks if isinstance(c, Lease))
        # Counting without a lease reserves nothing: no settlement, and a hold marker that
        # lives 1 ms, so the call costs one store round trip as admit_request's do.
        unsettled = count_only and not leases
        plan = AdmitPlan(request_id, tuple(checks), store_keys.hold(name, request_id),
                         1 if unsettled else hold_ttl_ms)
        settle_plan, counter_kinds = _settle_plan(plan, store_keys.done(name, request_id))
        result, mode = await self._run(plan, call.priority.name)
        waiting_for = _leases_only(plan, result)
        waited = False  # a caller that did not wait queues behind the waiters still here
        if waiting_for and self._room_to_wait(plan, waiting_for):
            wait_s = tenant.limits.concurrency_wait_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - self._clock())
            if wait_s > 0:
                waited = True
                result, mode = await self._wait_for_lease(plan, call.priority.name,
                                                          waiting_for, wait_s, result, mode)
        hold = Hold(request_id, mode, budget_tokens, cost_units,
                    None if unsettled else settle_plan, leases, counting=counting,
                    counter_kinds=counter_kinds, settled=unsettled, rate_tokens=tokens)
        self._remember_budgets(call.tenant.name, plan, result, mode)
        hold.headers = _headers(plan, result, tenant, None if mode == "global"
                                else self._budgets.get(call.tenant.name, {}))
        # Refused by run caps only for the window it reserved: the run is not over.
        window_only = not result.allowed and unseen > 0 and known is None and _window_only(
            plan, result, unseen, cost_units - reservation_cost_micros(
                call.prompt_tokens_estimate, max_out, model.price.rates, call.tool_calls))
        if call.agent_session and not count_only:  # counting a prompt is no step of a run
            self._track_run(call, hold, plan, result, tenant, window_only)
        if not result.allowed:
            index, wait_ms = self._longest_wait(plan, result, waited)
            reservation = _reservation(call, tenant, model, max_out, unseen, known, filled,
                                       self._config.state.remember_responses_s > 0, plan,
                                       result) \
                if isinstance(plan.checks[index], Counter) else None
            if reservation is not None:
                reservation = replace(reservation, window_only=window_only)
            raise _refusal(plan.checks[index], result.results[index], meta.get(index, ""),
                           hold.headers, planned_at, wait_ms, reservation)
        if leases:
            self._lease_board.started(request_id, leases)
            if mode == "global":
                self._active_leases[request_id] = leases
        return hold

    def note_loop(self, call: ProxyCall) -> None:
        """The loop detector flagged this run's conversation (the run board's counter)."""
        if call.agent_session:
            self._inflight.runs.entry(call.tenant.name,
                                      session_id(call.agent_session)).loop_warnings += 1

    def _track_run(self, call: ProxyCall, hold: Hold, plan: AdmitPlan, result: AdmitResult,
                   tenant: Tenant, window_only: bool) -> None:
        """The run board, the access log's run totals, the soft-cap warning and the count of
        runs stopped by each cap. ``window_only``: the run caps refused only the context
        window the request reserved for input it does not carry (``_window_only``): that
        stopped no run (``_run_refusal``)."""
        assert call.agent_session is not None
        sid = session_id(call.agent_session)
        totals = usage_after(plan, result)
        if result.allowed:
            hold.run, hold.run_capped = (call.tenant.name, sid), bool(totals)
            run = self._inflight.runs.admitted(call.tenant.name, sid, totals)
            hold.run_totals = {"tokens": run.tokens, "cost": round(run.cost, 6),
                               "steps": run.steps, "age_s": round(
                                   self._wall_clock() - run.first_seen, 3)}
            warn = warning(plan, result, tenant.run_budget.soft_ratio)
            if warn:
                hold.headers["x-gateway-run-budget-warning"] = warn
            return
        failed = plan.checks[result.failed] if result.failed >= 0 else None
        if failed is not None and is_run_check(failed):
            if window_only:
                return
            cap = run_cap(failed)
            run = self._inflight.runs.entry(call.tenant.name, sid)
            if run.stopped_by is None and self._inflight.on_run_stop is not None:
                self._inflight.on_run_stop(call.tenant.name, cap)
            run.stopped_by = cap

    async def admit_request(self, tenant: str, session: str | None, request_id: str,
                            priority: str) -> Hold:
        """The request-only plan of the routes that are not proxied (gateway/app/endpoints.py):
        one request against the tenant's and, with
        X-Agent-Session, the session's ``requests_per_minute``, in the same single atomic call
        ``admit`` makes. No tokens, budget, loop guard or concurrency lease, so nothing to
        settle: the hold marker lives 1 ms and the returned hold has no settle plan."""
        config = self._config.tenants[tenant]
        checks: list[Check] = []
        scopes: dict[int, str] = {}

        def add(check: Check, scope: str) -> None:
            if isinstance(check, Gcra):  # tokens=0 below: only the request buckets come here
                scopes[len(checks)] = scope
                checks.append(check)

        _rate_checks(config.limits, store_keys.limits(tenant), 0, add, Scope.tenant,
                     f"tenant {tenant}")
        if config.limits.per_session and session:
            sid = hashlib.sha256(session.encode()).hexdigest()[:16]
            _rate_checks(config.limits.per_session, store_keys.session_limits(tenant, sid), 0,
                         add, Scope.session, "this agent session")
        if not checks:
            return Hold(request_id, "none", 0, 0, None)
        plan = AdmitPlan(request_id, tuple(checks), store_keys.hold(tenant, request_id), 1)
        planned_at = self._wall_clock()
        result, mode = await self._run(plan, priority)
        hold = Hold(request_id, mode, 0, 0, None, settled=True)
        hold.headers = _headers(plan, result, config)
        if not result.allowed:
            index, wait_ms = self._longest_wait(plan, result)
            raise _refusal(plan.checks[index], result.results[index], scopes.get(index, ""),
                           hold.headers, planned_at, wait_ms)
        return hold

    def _longest_wait(self, plan: AdmitPlan, result: AdmitResult,
                      waited: bool = True) -> tuple[int, float]:
        """The failed check a retry has to wait for longest (a retry succeeds only once every
        one of them passes), and that wait in ms (``inf``: no wait is long enough).

        The wait of a rate or concurrency check queues behind the refusals of the same key
        this replica answered before (gateway/limits/promises.py), and is remembered as a promise
        for the key(s) that set it. ``waited``: the caller waited for a slot (else every
        request still waiting here for one is ahead of it)."""
        best, longest = result.failed, -1.0
        waits: list[tuple[Check, float]] = []
        for i, (check, res) in enumerate(zip(plan.checks, result.results)):
            if res.allowed or check.shadow:
                continue
            wait = self._wait_ms(check, res, waited)
            waits.append((check, wait))
            if wait > longest:
                best, longest = i, wait
        if 0 <= longest < math.inf:
            at = self._clock() + longest / 1000
            for check, wait in waits:
                if isinstance(check, Gcra | Lease) and wait >= longest:
                    self._promises.promise(check.key, at)
        return best, longest

    def _wait_ms(self, check: Check, res: CheckResult, waited: bool = True) -> float:
        if is_run_check(check):
            return math.inf  # a run's totals never go down: no wait helps
        if isinstance(check, Counter):
            return math.inf if check.cost > check.limit else float(res.reset_ms)
        if isinstance(check, Gcra):
            if check.cost > check.burst:
                return math.inf
            own = float(max(1, res.retry_after_ms))
            # Concurrent refusals all see the same bucket: the store tells each the same
            # earliest retry, yet only one retry fits then; each later refusal comes one
            # request's emission interval after the last one promised.
            last = self._promises.last(check.key)
            if last is None:
                return own
            queued = (last - self._clock()) * 1000 + float(check.cost * check.interval_ms)
            # Never past what an SDK sits out because of the queue alone: promises are not
            # reservations (a client ignoring Retry-After adds some), so they must not turn
            # an honest caller's answer into x-should-retry: false.
            queued = min(queued, SDK_WAIT_MAX_MS)
            return max(own, float(math.ceil(round(queued, 3))))
        if isinstance(check, Lease):
            # The store only knows when a lease would expire (a crashed holder's, 60 s); the
            # board knows how long this scope's requests run: a slot is expected to free then.
            # The k-th caller in line (refused earlier and not back yet, or still waiting
            # here) gets a slot in round ceil(k / slots), each round about that long.
            ahead = len(self._promises.outstanding(check.key))
            if not waited:
                ahead += self._lease_board.waiting(check.key)
            rounds = math.ceil((ahead + 1) / check.max)
            expected_s = self._lease_board.expected_wait_s(check.key) * rounds
            expected = math.ceil(round(expected_s * 1000, 3))
            return float(min(max(1, res.retry_after_ms), expected))
        return float(max(1, res.retry_after_ms))  # Repeat: until the window lets one through

    async def _run(self, plan: AdmitPlan, priority: str) -> tuple[AdmitResult, str]:
        """The plan evaluated once: in the store, or by the degraded mode's action."""
        if self.degraded.active:
            return self.degraded.admit(plan, priority), self.degraded.action_for(priority)
        try:
            began = self._clock()
            result = await self._state.admit(plan)
            self.degraded.last_latency_s = self._clock() - began
            self.degraded.remember(plan, result)  # what degraded mode starts from
            return result, "global"
        except StateUnavailable as exc:
            self.degraded.enter(str(exc))
            return self.degraded.admit(plan, priority), self.degraded.action_for(priority)

    def _room_to_wait(self, plan: AdmitPlan, keys: tuple[str, ...]) -> bool:
        """At most ``WAITERS_PER_SLOT`` x slots requests wait here per scope. Waiting only
        as many as the slots refused the next round of a burst at once, each with a guess
        that ignored the queue ahead (six calls at ``max_concurrent: 2`` ended in SDK
        errors); a few rounds' worth keeps a burst inside the gateway, where a release
        wakes a waiter at once. Still bounded: each waiter costs about ten store calls over
        the default 2 s wait (the schedule in ``_wait_for_lease``) plus one per release, so a
        tenant flooding its limit adds at most 4 x slots x that to the store's load."""
        limits = {c.key: c.max for c in plan.checks if isinstance(c, Lease)}
        return all(self._lease_board.waiting(key) < WAITERS_PER_SLOT * limits[key]
                   for key in keys)

    async def _wait_for_lease(self, plan: AdmitPlan, priority: str, keys: tuple[str, ...],
                              wait_s: float, result: AdmitResult, mode: str) -> tuple[
        AdmitResult, str
    ]:
        """Ask again whenever a lease of ``keys`` is released on this replica, and on a
        schedule (50 ms doubling to 250 ms) for releases on other replicas, until admitted,
        refused for another reason, or ``wait_s`` is over."""
        end = self._clock() + wait_s
        pause = 0.05
        while keys:
            left = end - self._clock()
            if left <= 0:
                break
            await self._lease_board.wait_release(keys, min(pause, left))
            pause = min(pause * 2, 0.25)
            result, mode = await self._run(plan, priority)
            keys = _leases_only(plan, result)
        return result, mode

    def _remember_budgets(self, tenant: str, plan: AdmitPlan, result: AdmitResult,
                          mode: str = "global") -> None:
        """What is left of the tenant's budgets, for status and metrics: the store's word.
        Without the store (degraded mode) the local counters hold this replica's share of
        the budget only (a limit over N replicas): read as the fleet's, every tenant looked
        1 - 1/N spent and the shipped budget alert fired for all of them at 10 replicas. The
        last fleet-wide figure is kept, less what this replica reserves meanwhile."""
        for check, res in zip(plan.checks, result.results):
            if isinstance(check, Counter) and not check.idle:
                name, scale = _budget_name(check)
                old = self._inflight.budget_keys.get((tenant, name))
                figure = self._budgets.get(tenant, {}).get(name)
                taken = check.cost if result.allowed else 0
                if mode == "global":
                    remaining = max(0, res.remaining) / scale
                elif figure is None:
                    continue  # nothing fleet-wide known yet: no figure rather than a share
                elif old == check.key:  # the last fleet figure, less what this one takes
                    figure["limit"] = check.limit / scale  # (a reload may have moved it)
                    figure["remaining"] = max(0.0, figure["remaining"] - taken / scale)
                    continue
                else:  # a new period began while degraded: all of it, less what this takes
                    remaining = (check.limit - taken) / scale
                self._budgets.setdefault(tenant, {})[name] = {
                    "remaining": remaining, "limit": check.limit / scale}
                if old != check.key:  # a new period: the old counter's figure is gone
                    self._inflight.budget_of_key.pop(old or "", None)
                    self._inflight.budget_keys[(tenant, name)] = check.key
                    self._inflight.budget_of_key[check.key] = (tenant, name, scale)

    def _refund_remembered(self, plan: SettlePlan, reserved_held: bool = True) -> None:
        """The remembered figures (metrics, status) were taken at admission, with this request's
        whole reservation spent; settlement charged the actual amount instead. Correct them by
        the difference, once (from ``_claim``), whether the store or the degraded mode's local
        counters were charged (both hold the same difference), or nothing (fail_open: the
        figure then stays the store's last word less this request's actual use). A settlement
        that gives no reservation back (``reserved_held`` False: a deferred entry's run,
        whose entry's reservation comes back by its own refund) charges the actual amount
        alone: counted as a refund, three runs left status reporting more budget than the
        tenant had before it spent any."""
        for key, reserved, actual, _ in plan.counters:
            owner = self._inflight.budget_of_key.get(key)
            figure = self._budgets.get(owner[0], {}).get(owner[1]) if owner else None
            if figure is None or owner is None:
                continue
            scale = owner[2]
            back = reserved if reserved_held else 0
            figure["remaining"] = min(figure["limit"], max(
                0.0, figure["remaining"] + (back - actual) / scale))

    def _checks(self, call: ProxyCall, tenant: Tenant, tokens: int, budget_tokens: int,
                cost: int, lease: bool = True, client_retry: bool = False,
                count_only: bool = False, rate_exempt: bool = False,
                ) -> tuple[list[Check], dict[int, str]]:
        name = call.tenant.name
        checks: list[Check] = []
        scopes: dict[int, str] = {}  # check index -> what it limits, for messages

        def add(check: Check, scope: str) -> None:
            if (isinstance(check, Lease) and not lease) or (isinstance(check, Gcra)
                                                            and rate_exempt):
                return
            scopes[len(checks)] = scope
            checks.append(check)

        _rate_checks(tenant.limits, store_keys.limits(name), tokens, add, Scope.tenant,
                     f"tenant {call.tenant.name}")
        per_model = tenant.limits.per_model.get(call.model)
        if per_model:
            _rate_checks(per_model, store_keys.model_limits(name, call.model), tokens, add,
                         Scope.model, f"tenant {call.tenant.name} on model {call.model}")
        if tenant.limits.per_session and call.agent_session:
            sid = hashlib.sha256(call.agent_session.encode()).hexdigest()[:16]
            _rate_checks(tenant.limits.per_session, store_keys.session_limits(name, sid),
                         tokens, add, Scope.session, "this agent session")
        if count_only:  # requests and concurrency only (see admit)
            return checks, scopes
        budget = tenant.budget
        has_budget = budget.daily_tokens or budget.monthly_tokens or budget.daily_cost or \
            budget.monthly_cost
        periods = period_keys(self._wall_clock()) if has_budget else ()
        for period, key_part, reset_ms, ttl_ms in periods:
            for unit, kind, limit, cost_of in (
                ("tokens", Kind.budget_tokens, getattr(budget, f"{period}_tokens"),
                 budget_tokens),
                ("cost", Kind.budget_cost, getattr(budget, f"{period}_cost"), cost),
            ):
                if limit is None:
                    continue
                units = int(limit * 1_000_000) if kind is Kind.budget_cost else int(limit)
                add(Counter(store_keys.budget(name, kind, key_part), units, cost_of, ttl_ms,
                            reset_ms, name=f"{period} {unit} budget", shadow=budget.shadow,
                            kind=kind, period=period),
                    f"tenant {call.tenant.name}")
        guard = tenant.loop_guard
        if guard.enabled and not client_retry and _may_repeat(call.body):
            if guard.scope == "tenant":
                add(Repeat(store_keys.loop(name, _fingerprint(call)), guard.max_repeats,
                           int(guard.window_s * 1000), shadow=guard.shadow),
                    f"tenant {call.tenant.name}")
            elif call.agent_session:
                sid = hashlib.sha256(call.agent_session.encode()).hexdigest()[:16]
                add(Repeat(store_keys.loop(name, _fingerprint(call), sid), guard.max_repeats,
                           int(guard.window_s * 1000), shadow=guard.shadow,
                           scope=Scope.session),
                    "this agent session")
        if call.agent_session:
            run_checks(name, call.agent_session, call.model, tenant.run_budget, budget_tokens,
                       cost, add)
        return checks, scopes

    def settle_soon(self, hold: Hold, usage: Usage, cost_units: int) -> None:
        """Settle in the background: the client's response does not wait for the round trip.
        Settlements of requests that finish in the same loop iteration go to the store as one
        batch (one Redis pipeline), by a task that shutdown can drain (``drain``)."""
        if hold.settle_plan is None:
            hold.settled = True
            self._active_leases.pop(hold.request_id, None)
            return
        batch = self._inflight.batch
        batch.append((hold, usage, cost_units))
        if len(batch) == 1:  # the first of a batch: its task settles every one that joins
            task = asyncio.get_running_loop().create_task(self._settle_batch())
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle_batch(self) -> None:
        # Runs in the next loop iteration: every request that finished in this one has joined.
        # No longer wait than that: the lease is held until this lands, and the client may
        # already be sending its next request.
        batch, self._inflight.batch = self._inflight.batch, []
        plans = [p for p in (self._claim(*item) for item in batch) if p is not None]
        # One pipeline per chunk, awaited here: the first goes out in this very iteration.
        for i in range(0, len(plans), SETTLE_BATCH_MAX):
            await self._write(plans[i:i + SETTLE_BATCH_MAX])

    async def drain(self) -> None:
        """Wait for every pending settlement (shutdown)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def settle(self, hold: Hold, usage: Usage, cost_units: int) -> None:
        """Record real usage once. Never raises: a store failure journals it for replay."""
        plan = self._claim(hold, usage, cost_units)
        if plan is not None:
            await self._write([plan])

    def _counting(self, tenant: str, provider_kind: str) -> Counting:
        settings = self._config.tenants[tenant]
        return Counting(counts_cache_reads(settings.limits.cache_reads, provider_kind),
                        counts_cache_reads(settings.budget.cache_reads, provider_kind))

    def count_as_served(self, hold: Hold, tenant: str, provider_kind: str | None) -> None:
        """Count the hold's cache reads as the provider kind that served it does (``auto``),
        not as the client's dialect: one OpenAI deployment's 9,000 cached tokens were
        charged on /v1/chat/completions and free on /v1/messages, so a tenant chose. None:
        no deployment was called, the admission's choice stands. A tenant gone from a
        reloaded policy keeps it too."""
        if provider_kind is not None and tenant in self._config.tenants:
            hold.counting = self._counting(tenant, provider_kind)

    def remember_response(self, tenant: str, model: str, usage: Usage) -> None:
        """Remember what a stored Responses answer holds (``Usage.stored``: the answer and
        its reasoning items, as the provider reported them) for the requests that refer to
        them by id (responses.py): here at once, and in the store for the other replicas,
        off the client's path."""
        ttl_s = self._config.state.remember_responses_s
        if not usage.stored or ttl_s <= 0:
            return
        shared = self._state.shared_redis() is not None and not self.degraded.active
        for ident, tokens in usage.stored:
            key = response_key(tenant, model, ident)
            self._inflight.responses.remember(tenant, key, tokens, ttl_s)
            if shared:
                task = asyncio.get_running_loop().create_task(
                    self._share_size(key, tokens, ttl_s))
                self._settling.add(task)  # (drained at shutdown with the settlements)
                task.add_done_callback(self._settling.discard)

    async def _share_size(self, key: str, tokens: int, ttl_s: float) -> None:
        try:
            await self._state.set(store_keys.response_size(key), b"%d" % tokens,
                                  max(1, int(ttl_s * 1000)))
        except StateUnavailable:
            pass  # other replicas reserve the window for its followers, as before

    async def _stored_size(self, call: ProxyCall) -> int | None:
        """What the stored answers and reasoning items the call refers to hold together, as
        remembered here, else in the store (for every tenant: the size is also what a call
        that reports no input is charged, which must not depend on the replica); None when
        one of them is not known (or the store cannot answer now): the window is reserved."""
        if self._config.state.remember_responses_s <= 0:
            return None
        tenant = call.tenant.name
        keys = [response_key(tenant, call.model, ident) for ident in call.stored_refs]
        local = [self._inflight.responses.size(tenant, key) for key in keys]
        missing = [key for key, size in zip(keys, local) if size is None]
        if not missing:
            return sum(size or 0 for size in local)
        if self._state.shared_redis() is None or self.degraded.active:
            return None
        try:
            values = await asyncio.gather(*(self._state.get(store_keys.response_size(key))
                                            for key in missing))
        except StateUnavailable:
            return None  # (the admission that follows finds out about the store)
        if not all(value is not None and value.isdigit() for value in values):
            return None
        return sum(size or 0 for size in local) + sum(int(v or 0) for v in values)

    def _claim(self, hold: Hold, usage: Usage, cost_units: int) -> SettlePlan | None:
        """Mark the hold settled (once) and give the plan to write to the store, or None when
        there is nothing to write there (already settled, no limits, or degraded mode, which
        settles locally)."""
        if hold.settled:
            return None
        hold.settled = True
        self._active_leases.pop(hold.request_id, None)
        self._lease_board.finished(hold.request_id)
        counting = hold.counting
        if hold.run is not None:  # the run's tokens count as the tenant's budgets do
            self._inflight.runs.settled(
                *hold.run, hold.reserved_tokens, usage.limit_tokens(counting.budget_cache_reads),
                hold.reserved_cost / 1e6, cost_units / 1e6, hold.run_capped, hold.no_step)
        if hold.settle_plan is None:
            return None
        plan = _with_actuals(hold.settle_plan, hold.counter_kinds,
                             usage.limit_tokens(counting.rate_cache_reads),
                             usage.limit_tokens(counting.budget_cache_reads), cost_units,
                             hold.no_step)
        self._refund_remembered(plan, hold.reserved)
        if hold.mode != "global":
            self.degraded.settle_local(plan, replay=True)
            self._lease_board.released(plan.leases)
            return None
        return plan

    async def _write(self, plans: list[SettlePlan]) -> None:
        try:
            await self._state.settle_many(plans)
        except StateUnavailable as exc:
            self.degraded.enter(str(exc))
            for plan in plans:  # replayed on recovery; settling twice is a no-op
                self.degraded.journal(plan)
        finally:
            # Requests waiting for one of these slots ask the store again now.
            self._lease_board.released(key for plan in plans for key in plan.leases)

    async def renew_leases(self) -> None:
        """Keep the concurrency slots of long-running requests (called every ~20 s)."""
        by_key: dict[str, list[str]] = {}
        for rid, keys in list(self._active_leases.items()):
            for key in keys:
                by_key.setdefault(key, []).append(rid)
        for key, members in by_key.items():
            try:
                await self._state.renew_leases(key, members, LEASE_TTL_MS)
            except StateUnavailable as exc:
                self.degraded.enter(str(exc))
                return


def _rate_checks(limits: RateLimits, prefix: str, tokens: int,
                 add: Callable[[Check, str], None], scope: Scope, text: str) -> None:
    """The request, token and concurrency checks of ``limits`` for ``scope`` (``text``
    names it in messages)."""
    if limits.requests_per_minute:
        rpm = limits.requests_per_minute
        add(Gcra(prefix + store_keys.RATE_SUFFIXES[Kind.requests], Fraction(60_000, rpm),
                 limits.request_burst or max(1, rpm // 10), 1, "requests", limits.shadow,
                 Kind.requests, scope), text)
    if limits.tokens_per_minute and tokens:
        tpm = limits.tokens_per_minute
        add(Gcra(prefix + store_keys.RATE_SUFFIXES[Kind.tokens], Fraction(60_000, tpm),
                 limits.token_burst or tpm, tokens,
                 "tokens", limits.shadow, Kind.tokens, scope), text)
    if limits.max_concurrent:
        add(Lease(prefix + store_keys.RATE_SUFFIXES[Kind.concurrency], limits.max_concurrent,
                  LEASE_TTL_MS, "concurrent requests", limits.shadow, Kind.concurrency, scope),
            text)


def _may_repeat(body: dict[str, Any]) -> bool:
    """Whether an identical request counts toward the loop guard: one asking for several
    choices (``n`` > 1) wants different answers on purpose."""
    n = body.get("n")
    return not (isinstance(n, int) and not isinstance(n, bool) and n > 1)


def _fingerprint(call: ProxyCall) -> str:
    """What makes two requests "the same" for the loop guard (docs/architecture.md): the
    model and the prompt, plus the seed of a sampled request (temperature absent or not 0),
    since a new seed asks for a new answer. Nothing else of the body counts."""
    body = call.body
    content = [body.get(k) for k in ("messages", "prompt", "input", "system")]
    temperature = body.get("temperature")
    sampled = not (isinstance(temperature, int | float) and temperature == 0)
    seed = body.get("seed") if sampled else None
    raw = orjson.dumps([call.model, content, seed], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _settle_plan(plan: AdmitPlan, done: str) -> tuple[SettlePlan, tuple[Kind, ...]]:
    """The settlement of ``plan`` (``done``: its idempotence marker's key), and what each of
    its counters counts."""
    gcra = tuple((c.key, c.interval_ms, c.cost, c.cost) for c in plan.checks
                 if isinstance(c, Gcra) and c.kind is Kind.tokens and not c.shadow)
    counted = [c for c in plan.checks if isinstance(c, Counter) and not c.shadow]
    counters = tuple((c.key, c.cost, c.cost, c.ttl_ms) for c in counted)
    leases = tuple(c.key for c in plan.checks if isinstance(c, Lease) and not c.shadow)
    return (SettlePlan(plan.request_id, done, plan.hold_key, DONE_TTL_MS, gcra, counters, leases),
            tuple(c.kind for c in counted))


def _with_actuals(plan: SettlePlan, kinds: tuple[Kind, ...], rate_tokens: int,
                  budget_tokens: int, cost_units: int, no_step: bool = False) -> SettlePlan:
    """The same plan with each reservation's actual amount filled in; ``kinds``: what each
    counter counts (a run's tokens cap counts tokens as the tenant's budgets do)."""
    def actual(kind: Kind, reserved: int) -> int:
        if kind is Kind.run_steps:
            return 0 if no_step else reserved  # a step is a step, whatever the call used
        return cost_units if kind in (Kind.budget_cost, Kind.run_cost) else budget_tokens

    counters = tuple((key, reserved, actual(kind, reserved), ttl)
                     for (key, reserved, _, ttl), kind in zip(plan.counters, kinds, strict=True))
    gcra = tuple((key, interval, reserved, rate_tokens)
                 for key, interval, reserved, _ in plan.gcra)
    return SettlePlan(plan.request_id, plan.done_key, plan.hold_key, plan.done_ttl_ms, gcra,
                      counters, plan.leases)


def _budget_name(check: Counter) -> tuple[str, float]:
    """How status and metrics name a budget counter (``daily_tokens``, ``monthly_cost``),
    and the scale from its stored units (cost in micro-units) to theirs."""
    cost = check.kind is Kind.budget_cost
    return f"{check.period}_{'cost' if cost else 'tokens'}", 1e6 if cost else 1.0


def _headers(plan: AdmitPlan, result: AdmitResult, tenant: Tenant,
             fleet: dict[str, dict[str, float]] | None = None) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers from the tenant-wide buckets, plus shadow/budget.
    ``fleet``: in degraded mode, the remembered fleet-wide budget figures, which the budget
    warning reads instead of this replica's local share (that read 1 - 1/N used)."""
    headers: dict[str, str] = {}
    for i, check in enumerate(plan.checks):
        res = result.results[i]
        if isinstance(check, Gcra) and check.scope is Scope.tenant and not check.shadow \
                and check.kind in (Kind.requests, Kind.tokens):
            kind = "requests" if check.kind is Kind.requests else "tokens"
            per_minute = round(60_000 / check.interval_ms)
            headers[f"x-ratelimit-limit-{kind}"] = str(per_minute)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, res.remaining))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(res.reset_ms)
        if isinstance(check, Counter) and res.allowed and check.limit and not check.idle:
            used = 1 - res.remaining / check.limit
            if fleet is not None:
                name, scale = _budget_name(check)
                figure = fleet.get(name)
                used = 1 - figure["remaining"] * scale / check.limit if figure else 0.0
            if used >= tenant.budget.soft_ratio:
                # What admission sees: spent, plus what requests in flight (this one with
                # its whole output cap) have reserved. Settled, the share is often lower.
                headers["x-gateway-budget-warning"] = f"{check.name} {used:.0%} used or reserved"
    if result.shadow_failed:
        names = sorted({plan.checks[i].name for i in result.shadow_failed})
        headers["x-gateway-shadow"] = ", ".join(names)
    return headers


def _leases_only(plan: AdmitPlan, result: AdmitResult) -> tuple[str, ...]:
    """The keys of the failed concurrency leases when nothing but leases refused the plan
    (only then is waiting for a slot worth it), else ()."""
    if result.allowed:
        return ()
    failed = [c for c, r in zip(plan.checks, result.results) if not r.allowed and not c.shadow]
    if not all(isinstance(c, Lease) for c in failed):
        return ()
    return tuple(c.key for c in failed)


def _reservation(call: ProxyCall, tenant: Tenant, model: Model, max_out: int, unseen: int,
                 known: int | None, filled: int, remembering: bool, plan: AdmitPlan,
                 result: AdmitResult) -> Reservation:
    """The refused request's reservation, and the largest output cap per choice with which
    it would pass every budget that refused it (refusal path only; none when it reserves
    the window for input the body does not carry: that grows as the cap shrinks)."""
    prompt, choices = call.prompt_tokens_estimate + unseen, max(1, call.choices)
    window = unseen and known is None
    fits: int | None = None if window else max_out // choices
    for check, res in zip(plan.checks, result.results):
        if res.allowed or check.shadow or not isinstance(check, Counter) or \
                is_run_check(check):
            continue
        left = res.remaining
        if check.kind is Kind.budget_cost:
            # the largest total output whose reserved price fits: cost grows with it
            low, high = -1, max_out
            while low < high:
                mid = (low + high + 1) // 2
                if reservation_cost_micros(prompt, mid, model.price.rates,
                                           call.tool_calls) <= left:
                    low = mid
                else:
                    high = mid - 1
            total = low
        else:
            total = left - prompt
        fits = None if fits is None or total < choices else min(fits, total // choices)
    present = [f for f in ("max_completion_tokens", "max_tokens", "max_output_tokens")
               if f in call.body]
    usual = "max_output_tokens" if call.route.path == "/v1/responses" else "max_tokens"
    return Reservation(prompt, max_out, choices, call.max_tokens is not None,
                       present[0] if present else usual, tenant.default_max_tokens,
                       model.price.rates, fits,
                       (call.unseen_input, model.context_window) if window else None,
                       unseen if unseen and not window else 0,
                       remembering and bool(call.stored_refs) and not filled, filled,
                       {tool: n for tool, n in call.tool_calls.items()
                        if tool in dict(model.price.rates.per_thousand_calls)})


def _window_only(plan: AdmitPlan, result: AdmitResult, unseen: int, unseen_cost: int) -> bool:
    """Whether every run cap that refused would have taken the request without the window it
    reserved for input it does not carry (``unseen`` tokens, ``unseen_cost`` micro-units):
    a steps or age cap, or one spent even without it, ends the run."""
    failing = [(c, r) for c, r in zip(plan.checks, result.results)
               if not r.allowed and not c.shadow and is_run_check(c)]
    for check, res in failing:
        if not isinstance(check, Counter) or check.kind not in (Kind.run_tokens, Kind.run_cost):
            return False
        part = unseen if check.kind is Kind.run_tokens else unseen_cost
        if check.cost - part > res.remaining:
            return False
    return bool(failing)


def _budget_message(check: Counter, res: CheckResult, scope: str, reset: str,
                    r: Reservation | None) -> str:
    """A budget refusal that says what is true: spent, or room left that this request's
    reservation does not fit (how much it reserves, why, and the cap that would fit)."""
    if res.remaining <= 0 or r is None:
        return f"The {check.name} of {scope} is spent; it resets at {reset}."
    cost = check.kind is Kind.budget_cost

    def amount(units: int) -> str:
        return f"{units / 1_000_000:.6g}" if cost else f"{units:,} tokens"

    text = (f"The {check.name} of {scope} has {amount(res.remaining)} left, but this "
            f"request reserves {amount(check.cost)}") + _what_it_reserves(r)
    return (text + " As it is, this request cannot fit before the budget resets at "
            f"{reset} unless requests still running give back reservations they do not use.")


def _what_it_reserves(r: Reservation) -> str:
    """How a refused request's reservation is made up (its prompt, and the answer's cap with
    where that cap came from), and the cap that would fit, if one would."""
    calls = "".join(f", and up to {n:,} {tool} calls" for tool, n in r.calls.items())
    if calls:
        calls += " (billed per call: max_tool_calls, or a tool's max_uses, reserves fewer)"
    if r.unseen is not None and r.filled:
        return (f": up to the model's context window of {r.unseen[1]:,} tokens, as the "
                f"stored input it refers to by id ({r.filled:,} tokens, as the provider "
                f"reported it) and its {r.cap_field} would not fit the window together"
                f"{calls}. Lower its {r.cap_field}.")
    if r.unseen is not None:
        what, window = r.unseen
        remembered = (" (or refer to what this gateway served within "
                      "state.remember_responses_s: its size is reserved)"
                      if r.rememberable else "")
        subject = what if what is None or what.startswith(("a ", "an ", "its ")) \
            else f"its {what}"
        return (f": up to the model's context window of {window:,} tokens, for the input "
                f"{subject} makes the provider read, which the body does not carry, and its "
                f"answer{calls}. Send that input in the body instead to reserve its size "
                f"alone{remembered}.")
    if not r.output:
        return f" for its input (about {r.prompt:,} tokens){calls}."
    per_choice = r.output // r.choices
    times = f" x {r.choices} choices" if r.choices > 1 else ""
    if r.capped:
        why = f"its {r.cap_field} {per_choice:,}{times}"
    elif per_choice == r.default_max_tokens:
        why = (f"default_max_tokens {per_choice:,}{times} (the estimate reserved when a "
               f"request sets no {r.cap_field})")
    else:
        why = (f"the model's output limit {per_choice:,}{times} (reserved when a request "
               f"sets no {r.cap_field})")
    prompt = f"its prompt (about {r.prompt:,} tokens)" if not r.stored else (
        f"its prompt (about {r.prompt - r.stored:,} tokens), the stored input it refers to "
        f"by id ({r.stored:,} tokens, as the provider reported it)")
    text = f": {prompt} and, for the answer, {why}{calls}."
    if r.fits:
        return text + f" Set {r.cap_field} to {r.fits:,} or less to fit."
    alone = "input" if r.stored else "prompt"
    return text + (f" Its {alone} and tool calls alone need more than is left." if calls
                   else f" Its {alone} alone needs more than is left.")


def _refusal(check: Check, res: CheckResult, scope: str, headers: dict[str, str],
             planned_at_s: float, wait_ms: float,
             reservation: Reservation | None = None) -> GatewayError:
    """The 429 for ``check``, with the earliest time a retry can succeed, ``wait_ms``
    (``inf``: never) in its headers (docs/architecture.md, "Errors and backpressure")."""
    out = {**headers, **retry_headers(None if math.isinf(wait_ms) else wait_ms)}
    if isinstance(check, Since) or (isinstance(check, Counter) and check.idle):
        return _run_refusal(check, res, out, reservation)
    if isinstance(check, Counter):
        if math.isinf(wait_ms):  # no period's budget is ever large enough
            text = (f"This request needs {check.cost} of the {check.name} of {scope}, more "
                    f"than the whole budget ({check.limit})")
            return BudgetExceeded(text + (_what_it_reserves(reservation)
                                          if reservation is not None else "."), headers=out)
        # Periods end on a whole second; reset_ms was cut to the ms below it.
        reset_at = datetime.fromtimestamp(round(planned_at_s + res.reset_ms / 1000), UTC)
        reset = f"{reset_at:%Y-%m-%dT%H:%M:%SZ} (in {format_duration(res.reset_ms)})"
        return BudgetExceeded(_budget_message(check, res, scope, reset, reservation),
                              headers=out)
    if isinstance(check, Repeat):
        return RateLimited(f"Loop detected: the same request was sent more than "
                           f"{check.max} times within {check.window_ms / 1000:g} s by "
                           f"{scope}. Change the request or wait "
                           f"{format_duration(int(wait_ms))}.", code="loop_detected",
                           headers=out)
    if isinstance(check, Gcra) and math.isinf(wait_ms):
        # No amount of waiting helps: the request alone is larger than the bucket.
        return RateLimited(f"This request needs {check.cost} {check.name}, more than "
                           f"the {check.burst} {scope} may use at once; lower max_tokens or "
                           "shorten the prompt.", headers=out)
    if isinstance(check, Gcra):
        per_minute = round(60_000 / check.interval_ms)
        what, detail = f"{check.name} per minute", f" (limit {per_minute}/min)"
    else:
        what, detail = check.name, f" (limit {check.max})"
    return RateLimited(f"Rate limit reached for {what} of {scope}{detail}. Retry in "
                       f"{format_duration(math.ceil(wait_ms))}.", headers=out)


def _run_refusal(check: Check, res: CheckResult, headers: dict[str, str],
                 reservation: Reservation | None = None) -> BudgetExceeded:
    """429 run_budget_exceeded naming the cap: the run is over, so no retry (the SDKs read
    ``x-should-retry: false``); the agent must wrap up or start a new run. Unless the run
    has room and this request reserved the context window for input it does not carry: then
    the message says so, and what would reserve less."""
    cap = run_cap(check)
    setting = f"run_budget.max_{'age_s' if cap == 'age' else cap}"
    if isinstance(check, Since):
        detail = f"is older than its age cap of {check.max_ms / 1000:g} s"
    else:
        assert isinstance(check, Counter)
        used = check.limit - res.remaining
        if cap == "cost":
            detail = (f"has spent {used / 1e6:g} of its cost cap of {check.limit / 1e6:g}; "
                      f"this request would reserve {check.cost / 1e6:g} more")
        else:
            detail = (f"has used {used} of its {cap} cap of {check.limit}; this request "
                      f"would reserve {check.cost} more")
        if reservation is not None and reservation.window_only:
            return BudgetExceeded(
                f"Run budget exceeded: this agent run (X-Agent-Session) {detail} ({setting})"
                + _what_it_reserves(reservation), code="run_budget_exceeded",
                headers=headers)
    return BudgetExceeded(f"Run budget exceeded: this agent run (X-Agent-Session) {detail} "
                          f"({setting}). The run is stopped: start a new run to continue.",
                          code="run_budget_exceeded", headers=headers)


def format_duration(ms: int) -> str:
    """OpenAI's style for x-ratelimit-reset-*: 20ms, 1.5s, 6m0s."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{rest}s"
