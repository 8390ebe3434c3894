"""Step 6 and 12: tenant limits and budgets, admitted in one round trip and settled once.

``Limiter.admit`` turns a call into an ``AdmitPlan`` (gateway/ratelimit.py) covering every
limit that applies — tenant, tenant x model, agent session, budgets, the loop guard — and
runs it atomically on the state backend. It returns a ``Hold`` that the pipeline settles in a
``finally`` with the upstream's real usage.

While the shared store is unreachable the limiter is *degraded*: it applies the configured
action (``local`` limits of ``limit / replicas``, ``fail_open`` or ``fail_closed``), journals
every settlement and replays the journal, idempotently, once the store answers again
(see ``degraded.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .classify import ProxyCall
from .config import GatewayConfig, Model, Tenant
from .degraded import DegradedMode
from .errors import GatewayError
from .limits_policy import RateLimits
from .periods import period_keys
from .ratelimit import (
    AdmitPlan,
    AdmitResult,
    Check,
    Counter,
    Gcra,
    Lease,
    Repeat,
    SettlePlan,
)
from .state import StateBackend, StateUnavailable
from .streaming import Usage

log = logging.getLogger("gateway.limits")
LEASE_TTL_MS = 60_000  # renewed every 20 s while the request runs
HOLD_TTL_MS = 30 * 60_000  # a settlement delayed longer than this charges in full
# Settled request ids are remembered this long so a journal replay cannot charge twice.
# The cost is one small key per request for this long (~60 MB of Redis at 1,000 req/s).
DONE_TTL_MS = 10 * 60_000
SETTLE_BATCH_MAX = 64  # settlements per Redis pipeline: well inside one call's deadline
MAX_RETRY_AFTER_S = 60


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


def reservation_max_tokens(call: ProxyCall, tenant: Tenant, model: Model) -> int:
    """Output tokens to reserve: the request's cap, else the tenant's default, capped by the
    model. ``inject_max_tokens`` puts the same number into the body when the client sent none,
    so real usage can never exceed the reservation."""
    if call.route.operation == "embeddings":
        return 0
    asked = call.max_tokens if call.max_tokens is not None else tenant.default_max_tokens
    return min(asked, model.max_output_tokens)


_MAX_TOKENS_FIELD = {"chat": "max_completion_tokens", "text_completion": "max_tokens",
                     "responses": "max_output_tokens"}


def inject_max_tokens(call: ProxyCall, max_tokens: int) -> None:
    if call.max_tokens is None and call.route.provider_kind == "openai":
        name = _MAX_TOKENS_FIELD.get(call.route.operation)
        if name:
            call.body[name] = max_tokens


class InFlight:
    """Work that outlives one version of the policy: the leases of running requests (renewed
    in the background) and settlements not yet written. A reload swaps the Limiter, not this."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, ...]] = {}
        self.settling: set[asyncio.Task[None]] = set()
        # Settlements waiting for this loop iteration's batch (``Limiter.settle_soon``).
        self.batch: list[tuple[Hold, Usage, int]] = []
        # Last budget state seen per tenant, for the metrics scrape (which must not hit Redis).
        self.budgets: dict[str, dict[str, dict[str, float]]] = {}

    def budget_snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        return self.budgets


class Limiter:
    """Admission and settlement of tenant limits and budgets against the state backend."""

    def __init__(self, config: GatewayConfig, state: StateBackend, degraded: DegradedMode,
                 wall_clock: Any, inflight: InFlight | None = None) -> None:
        self._config = config
        self._state = state
        self.degraded = degraded
        self._wall_clock = wall_clock  # seconds since the epoch: budget periods are UTC dates
        inflight = inflight or InFlight()
        self._active_leases = inflight.leases
        self._settling = inflight.settling
        self._inflight = inflight
        self._budgets = inflight.budgets

    async def admit(self, call: ProxyCall, request_id: str, *, lease: bool = True,
                    hold_ttl_ms: int = HOLD_TTL_MS) -> Hold:
        """``lease=False`` and a longer ``hold_ttl_ms``: a deferred entry (gateway/deferred.py)
        holds no concurrency slot while queued, and its reservation is refundable for its life."""
        tenant = self._config.tenants[call.tenant.name]
        model = self._config.models[call.model]
        max_out = reservation_max_tokens(call, tenant, model)
        inject_max_tokens(call, max_out)
        tokens = call.prompt_tokens_estimate + max_out
        cost = call.prompt_tokens_estimate * model.price.input_per_million + \
            max_out * model.price.output_per_million
        cost_units = math.ceil(cost)  # tokens x price per million = micro-units
        checks, meta = self._checks(call, tenant, tokens, cost_units, lease)
        if not checks:
            return Hold(request_id, "none", tokens, cost_units, None)
        t = _tag(call.tenant.name)
        plan = AdmitPlan(request_id, tuple(checks), f"rl:{t}:hold:{request_id}", hold_ttl_ms)
        settle_plan = _settle_plan(plan)
        leases = tuple(c.key for c in checks if isinstance(c, Lease))
        if self.degraded.active:
            result = self.degraded.admit(plan, call.priority.name)
            mode = self.degraded.action_for(call.priority.name)
        else:
            try:
                began = time.monotonic()
                result = await self._state.admit(plan)
                self.degraded.last_latency_s = time.monotonic() - began
                mode = "global"
                self.degraded.remember(plan, result)  # what degraded mode starts from
            except StateUnavailable as exc:
                self.degraded.enter(str(exc))
                result = self.degraded.admit(plan, call.priority.name)
                mode = self.degraded.action_for(call.priority.name)
        hold = Hold(request_id, mode, tokens, cost_units, settle_plan, leases)
        hold.headers = _headers(plan, result, tenant)
        self._remember_budgets(call.tenant.name, plan, result)
        if not result.allowed:
            raise _refusal(plan.checks[result.failed], result, meta, hold.headers)
        if leases and mode == "global":
            self._active_leases[request_id] = leases
        return hold

    def _remember_budgets(self, tenant: str, plan: AdmitPlan, result: AdmitResult) -> None:
        for check, res in zip(plan.checks, result.results):
            if isinstance(check, Counter):
                period, unit = check.name.split()[:2]  # "daily tokens budget"
                scale = 1e6 if unit == "cost" else 1.0
                self._budgets.setdefault(tenant, {})[f"{period}_{unit}"] = {
                    "remaining": max(0, res.remaining) / scale,
                    "limit": check.limit / scale,
                }

    def _checks(self, call: ProxyCall, tenant: Tenant, tokens: int, cost: int,
                lease: bool = True) -> tuple[list[Check], dict[int, str]]:
        t = _tag(call.tenant.name)
        checks: list[Check] = []
        scopes: dict[int, str] = {}  # check index -> what it limits, for messages

        def add(check: Check, scope: str) -> None:
            if isinstance(check, Lease) and not lease:
                return
            scopes[len(checks)] = scope
            checks.append(check)

        _rate_checks(tenant.limits, f"rl:{t}:", tokens, add, f"tenant {call.tenant.name}")
        per_model = tenant.limits.per_model.get(call.model)
        if per_model:
            _rate_checks(per_model, f"rl:{t}:m:{call.model}:", tokens, add,
                         f"tenant {call.tenant.name} on model {call.model}")
        if tenant.limits.per_session and call.agent_session:
            sid = hashlib.sha256(call.agent_session.encode()).hexdigest()[:16]
            _rate_checks(tenant.limits.per_session, f"rl:{t}:s:{sid}:", tokens, add,
                         "this agent session")
        budget = tenant.budget
        has_budget = budget.daily_tokens or budget.monthly_tokens or budget.daily_cost or \
            budget.monthly_cost
        periods = period_keys(self._wall_clock()) if has_budget else ()
        for period, key_part, reset_ms, ttl_ms in periods:
            for unit, limit, cost_of in (
                ("tokens", getattr(budget, f"{period}_tokens"), tokens),
                ("cost", getattr(budget, f"{period}_cost"), cost),
            ):
                if limit is None:
                    continue
                units = int(limit * 1_000_000) if unit == "cost" else int(limit)
                add(Counter(f"rl:{t}:b:{unit}:{key_part}", units, cost_of, ttl_ms, reset_ms,
                            name=f"{period} {unit} budget", shadow=budget.shadow),
                    f"tenant {call.tenant.name}")
        guard = tenant.loop_guard
        if guard.enabled:
            add(Repeat(f"rl:{t}:loop:{_fingerprint(call)}", guard.max_repeats,
                       int(guard.window_s * 1000), shadow=guard.shadow),
                f"tenant {call.tenant.name}")
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

    def _claim(self, hold: Hold, usage: Usage, cost_units: int) -> SettlePlan | None:
        """Mark the hold settled (once) and give the plan to write to the store, or None when
        there is nothing to write there (already settled, no limits, or degraded mode, which
        settles locally)."""
        if hold.settled:
            return None
        hold.settled = True
        self._active_leases.pop(hold.request_id, None)
        if hold.settle_plan is None:
            return None
        plan = _with_actuals(hold.settle_plan, usage.input_tokens + usage.output_tokens,
                             cost_units)
        if hold.mode != "global":
            self.degraded.settle_local(plan, replay=True)
            return None
        return plan

    async def _write(self, plans: list[SettlePlan]) -> None:
        try:
            await self._state.settle_many(plans)
        except StateUnavailable as exc:
            self.degraded.enter(str(exc))
            for plan in plans:  # replayed on recovery; settling twice is a no-op
                self.degraded.journal(plan)

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


def _tag(tenant: str) -> str:
    return "{t:" + tenant + "}"


def _rate_checks(limits: RateLimits, prefix: str, tokens: int, add: Any, scope: str) -> None:
    if limits.requests_per_minute:
        rpm = limits.requests_per_minute
        add(Gcra(prefix + "req", 60_000 / rpm, limits.request_burst or max(1, rpm // 10), 1,
                 "requests", limits.shadow), scope)
    if limits.tokens_per_minute and tokens:
        tpm = limits.tokens_per_minute
        add(Gcra(prefix + "tok", 60_000 / tpm, limits.token_burst or tpm, tokens, "tokens",
                 limits.shadow), scope)
    if limits.max_concurrent:
        add(Lease(prefix + "conc", limits.max_concurrent, LEASE_TTL_MS, "concurrent requests",
                  limits.shadow), scope)


def _fingerprint(call: ProxyCall) -> str:
    body = call.body
    content = [body.get(k) for k in ("messages", "prompt", "input", "system")]
    raw = orjson.dumps([call.model, content], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


def _settle_plan(plan: AdmitPlan) -> SettlePlan:
    gcra = tuple((c.key, c.interval_ms, c.cost, c.cost) for c in plan.checks
                 if isinstance(c, Gcra) and c.name == "tokens" and not c.shadow)
    counters = tuple((c.key, c.cost, c.cost, c.ttl_ms) for c in plan.checks
                     if isinstance(c, Counter) and not c.shadow)
    leases = tuple(c.key for c in plan.checks if isinstance(c, Lease) and not c.shadow)
    done = plan.hold_key.replace(":hold:", ":done:")
    return SettlePlan(plan.request_id, done, plan.hold_key, DONE_TTL_MS, gcra, counters, leases)


def _with_actuals(plan: SettlePlan, tokens: int, cost_units: int) -> SettlePlan:
    """The same plan with each reservation's actual amount filled in."""
    counters = tuple(
        (key, reserved, cost_units if ":b:cost:" in key else tokens, ttl)
        for key, reserved, _, ttl in plan.counters
    )
    gcra = tuple((key, interval, reserved, tokens) for key, interval, reserved, _ in plan.gcra)
    return SettlePlan(plan.request_id, plan.done_key, plan.hold_key, plan.done_ttl_ms, gcra,
                      counters, plan.leases)


def _headers(plan: AdmitPlan, result: AdmitResult, tenant: Tenant) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers from the tenant-wide buckets, plus shadow/budget."""
    headers: dict[str, str] = {}
    for i, check in enumerate(plan.checks):
        res = result.results[i]
        if isinstance(check, Gcra) and check.key.endswith(("}:req", "}:tok")) and not check.shadow:
            kind = "requests" if check.name == "requests" else "tokens"
            per_minute = round(60_000 / check.interval_ms)
            headers[f"x-ratelimit-limit-{kind}"] = str(per_minute)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, res.remaining))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(res.reset_ms)
        if isinstance(check, Counter) and res.allowed and check.limit:
            used = 1 - res.remaining / check.limit
            if used >= tenant.budget.soft_ratio:
                headers["x-gateway-budget-warning"] = f"{check.name} {used:.0%} used"
    if result.shadow_failed:
        names = sorted({plan.checks[i].name for i in result.shadow_failed})
        headers["x-gateway-shadow"] = ", ".join(names)
    return headers


def _refusal(check: Check, result: AdmitResult, scopes: dict[int, str],
             headers: dict[str, str]) -> GatewayError:
    index = result.failed
    res = result.results[index]
    scope = scopes.get(index, "")
    wait_ms = min(max(res.retry_after_ms, 1), MAX_RETRY_AFTER_S * 1000)
    out = {**headers, "Retry-After": str(max(1, math.ceil(wait_ms / 1000))),
           "retry-after-ms": str(wait_ms)}
    if isinstance(check, Counter):
        out["x-should-retry"] = "false"
        return GatewayError(429, f"The {check.name} of {scope} is spent; it resets in "
                            f"{format_duration(res.reset_ms)}.", type="insufficient_quota",
                            code="insufficient_quota", headers=out)
    if isinstance(check, Repeat):
        return GatewayError(429, f"Loop detected: the same request was sent more than "
                            f"{check.max} times within {check.window_ms / 1000:g} s by "
                            f"{scope}. Change the request or wait "
                            f"{format_duration(res.retry_after_ms)}.", type="rate_limit_error",
                            code="loop_detected", headers=out)
    if isinstance(check, Gcra) and check.cost > check.burst:
        # No amount of waiting helps: the request alone is larger than the bucket.
        out["x-should-retry"] = "false"
        return GatewayError(429, f"This request needs {check.cost} {check.name}, more than "
                            f"the {check.burst} {scope} may use at once; lower max_tokens or "
                            "shorten the prompt.", type="rate_limit_error",
                            code="rate_limit_exceeded", headers=out)
    if isinstance(check, Gcra):
        per_minute = round(60_000 / check.interval_ms)
        what, detail = f"{check.name} per minute", f" (limit {per_minute}/min)"
    else:
        what, detail = check.name, f" (limit {check.max})"
    return GatewayError(429, f"Rate limit reached for {what} of {scope}{detail}. Retry in "
                        f"{format_duration(wait_ms)}.", type="rate_limit_error",
                        code="rate_limit_exceeded", headers=out)


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
