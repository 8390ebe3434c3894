"""Deferred requests: ``Prefer: respond-async`` work is queued durably and run at the low class's
spare capacity, so background agent work waits instead of being shed.

Submit (``DeferredService.submit``, from pipeline.py right after classify): the tenant's limits
and budgets are checked and the token/cost reservation is held (``Limiter.admit`` without a
concurrency lease, with a hold that lives as long as the entry); the request is stored
(gateway/deferred_store.py) and answered ``202 Accepted`` with ``Location: /v1/deferred/{id}``.
A tenant in mode ``on_shed`` runs such requests at once and defers only a would-be overload
shed of its ``low`` class.

Run (``DeferredService.run``, one dispatcher per replica): while this replica's admission
controller has a free ``low`` slot and fewer than ``workers`` runs are going, claim the next
entry (tenants in turn; an entry whose claim went idle first), and run it through the same
attempt loop as a synchronous call (attempts.py) with the stored headers, taking only a free
slot (``try_acquire``), so deferred work never holds a slot a waiting interactive request needs.
The claim is renewed while the run goes; a replica that dies stops renewing it and another
replica re-claims the entry after the visibility timeout and runs it again.

Accounting (the tenant is charged once per upstream call actually made):
- the reservation made at submit is refunded exactly once, when the entry reaches a final
  state (succeeded, failed, cancelled, expired): settle of the submit hold with zero usage;
- each run that reached the upstream is charged its real usage under its own request id
  (``<id>.r<run>``; settlement is idempotent per id);
- a run lost with its replica (its usage unknown) is charged its reservation, an upper bound
  of what it can have cost (max_tokens is always set), by whoever accounts it first.
So the charge is at most one reservation per lost run above the real usage of the runs that
finished; a run cut off before it sent anything (a replica killed in the few milliseconds
between starting a run and sending it, or stopped while it ran) is charged like a lost one.

Retries: a run that reached the upstream and got a retryable failure (408, 429, 5xx, connect
error, timeout) is queued again after ``retry_backoff_s`` (doubling), up to ``max_runs`` runs;
a run that did not reach the upstream (no free slot after all, breakers open, provider quota)
does not count and is queued again shortly. The result shows every run (``run_log``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .attempts import CallContext, attempt_loop
from .auth import TenantPolicy
from .classify import ROUTES, ProxyCall, classify
from .config import GatewayConfig
from .config_base import Priority
from .context import Policy, RequestRecord, Services
from .deadlines import Deadline
from .deferred_policy import DeferredPolicy
from .deferred_store import (
    Claim,
    DeferredStore,
    Fields,
    FinishMode,
    QueueFull,
    Result,
    Started,
)
from .errors import GatewayError
from .limits import DONE_TTL_MS, Hold, Limiter
from .metrics import GatewayMetrics
from .ratelimit import SettlePlan
from .state import StateUnavailable
from .streaming import Usage
from .upstream import FORWARDED_REQUEST_HEADERS

log = logging.getLogger("gateway.deferred")

FINAL = frozenset({"succeeded", "failed", "expired", "cancelled"})
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
NOCALL_DELAY_MS = 250  # a run that found no slot after all: soon again, on any replica
MAX_BACKOFF_S = 60.0
MIN_POLL_S = 0.02
CAPACITY_POLL_S = 0.05  # while this replica has no free low slot
# Long polls wake at once for an entry that finished on this replica; for one finishing on
# another replica they re-read it, first after 0.1 s, then less and less often (at most 2 s).
WAIT_POLL_S = (0.1, 2.0)
STOP_GRACE_S = 2.0  # runs still going when the replica stops are given this long
SWEEP_HEAD = 20  # oldest entries looked at per tenant and sweep
_ID = re.compile(r"^dfr_[0-9a-f]{32}$")
_STORED_HEADERS = frozenset({*FORWARDED_REQUEST_HEADERS, "x-priority", "x-agent-session",
                             "x-agent-step"})


def prefers_async(headers: Mapping[str, str]) -> bool:
    """Whether the request carries ``Prefer: respond-async`` (RFC 7240; several preferences per
    header, parameters after ``;``, several Prefer headers)."""
    getall = getattr(headers, "getall", None)
    values = getall("Prefer", ()) if getall is not None else [headers.get("Prefer", "")]
    for value in values:
        for pref in value.split(","):
            if pref.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async":
                return True
    return False


def valid_id(entry_id: str) -> bool:
    return bool(_ID.match(entry_id))


# --- the hold, stored with the entry so any replica can settle it -----------------------------


def hold_to_json(hold: Hold) -> bytes:
    plan = hold.settle_plan
    return orjson.dumps({
        "request_id": hold.request_id, "mode": hold.mode, "tokens": hold.reserved_tokens,
        "cost": hold.reserved_cost,
        "plan": None if plan is None else {
            "done_key": plan.done_key, "hold_key": plan.hold_key,
            "gcra": plan.gcra, "counters": plan.counters,
        },
    })


def hold_from_json(raw: bytes) -> Hold:
    data = orjson.loads(raw)
    plan = data["plan"]
    settle = None if plan is None else SettlePlan(
        data["request_id"], plan["done_key"], plan["hold_key"], DONE_TTL_MS,
        tuple((k, float(i), int(r), int(a)) for k, i, r, a in plan["gcra"]),
        tuple((k, int(r), int(a), int(t)) for k, r, a, t in plan["counters"]), ())
    return Hold(data["request_id"], data["mode"], int(data["tokens"]), int(data["cost"]), settle)


def run_hold(hold: Hold, run: int) -> Hold:
    """The hold's plan under run ``run``'s own request id and without a hold marker, so a
    settlement charges the whole amount once (the submit hold stays for the refund)."""
    plan = hold.settle_plan
    rid = f"{hold.request_id}.r{run}"
    charge = None if plan is None else SettlePlan(
        rid, plan.done_key.removesuffix(hold.request_id) + rid,
        plan.hold_key.removesuffix(hold.request_id) + rid, DONE_TTL_MS, plan.gcra,
        plan.counters, ())
    return Hold(rid, hold.mode, hold.reserved_tokens, hold.reserved_cost, charge)


async def refund(limiter: Limiter, hold: Hold) -> None:
    """Give the submit reservation back (idempotent: settled once per request id)."""
    await limiter.settle(hold, Usage(), 0)


async def charge(limiter: Limiter, hold: Hold, run: int, tokens: int, cost_units: int) -> None:
    """Charge one run ``tokens`` and ``cost_units`` (idempotent per run)."""
    await limiter.settle(run_hold(hold, run), Usage(input_tokens=tokens), cost_units)


def _stored_headers(headers: Mapping[str, str], config: GatewayConfig) -> dict[str, str]:
    """The request headers a run needs later: what classify reads and what may go upstream
    (the allow-list and the providers' forward_headers); never credentials or cookies."""
    rules = {r for p in config.providers.values() for r in p.forward_headers}
    out: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _STORED_HEADERS or any(
                lowered == r or (r.endswith("*") and lowered.startswith(r[:-1])) for r in rules):
            out[lowered] = value
    return out


def _tenant_policy(config: GatewayConfig, name: str) -> TenantPolicy | None:
    tenant = config.tenants.get(name)
    if tenant is None:
        return None
    return TenantPolicy(name=name, all_models="*" in tenant.models,
                        models=frozenset(tenant.models),
                        default_priority=Priority[tenant.default_priority],
                        max_priority=Priority[tenant.max_priority])


@dataclass(slots=True)
class _Outcome:
    """How one run ended."""

    result: Result
    called: bool  # reached the upstream at least once
    retryable: bool
    usage: Usage
    cost_units: int
    info: dict[str, Any]


class DeferredService:
    """Submit, look up, cancel and run deferred requests for one replica."""

    def __init__(self, policy: Callable[[], Policy], services: Services, store: DeferredStore,
                 metrics: GatewayMetrics, consumer: str,
                 policy_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        self._policy = policy
        self._svc = services
        self.store = store
        self._metrics = metrics
        self.consumer = consumer
        self._policy_idle = policy_idle
        self._running: set[asyncio.Task[None]] = set()
        self._starting = 0  # runs claimed that hold no admission slot yet
        self._wake = asyncio.Event()  # a local submit, or a run finished
        self._waiters: dict[str, tuple[asyncio.Event, int]] = {}  # entry id -> (event, waiters)
        self._stats: dict[str, dict[str, float]] = {}
        self._rr = 0
        self._last_error_log = 0.0

    # --- submit --------------------------------------------------------------------------------

    def mode(self, call: ProxyCall, headers: Mapping[str, str], config: GatewayConfig
             ) -> Literal["now", "on_shed"] | None:
        """"now": store and answer 202; "on_shed": run, defer a would-be shed; None: run."""
        if not config.deferred.enabled or call.stream or not prefers_async(headers):
            return None
        mode = config.deferred.for_tenant(call.tenant.name).mode
        if mode == "always":
            return "now"
        if mode == "on_shed" and call.priority == Priority.low:
            return "on_shed"
        return None

    async def submit(self, policy: Policy, call: ProxyCall, headers: Mapping[str, str],
                     record: RequestRecord, *, via: Literal["prefer", "shed"]) -> web.Response:
        """Reserve, store, and answer 202 (429 for limits, budgets or a full queue; 503 when
        the store is unreachable)."""
        config = policy.config
        cfg = config.deferred
        tenant = call.tenant.name
        settings = cfg.for_tenant(tenant)
        entry_id = "dfr_" + uuid.uuid4().hex
        ttl_ms, grace_ms = settings.ttl_s * 1000, cfg.result_grace_s * 1000
        began = self._svc.clock()
        hold = await policy.limiter.admit(call, entry_id, lease=False,
                                          hold_ttl_ms=ttl_ms + grace_ms)
        record.limits_s = self._svc.clock() - began
        if hold.mode not in ("global", "none"):
            await refund(policy.limiter, hold)
            raise unavailable()
        fields = {
            "tenant": tenant.encode(), "route": call.route.path.encode(),
            "model": call.model.encode(), "body": orjson.dumps(call.body),
            "headers": orjson.dumps(_stored_headers(headers, config)),
            "hold": hold_to_json(hold), "via": via.encode(),
            "request_id": record.request_id.encode(),
        }
        try:
            sub = await self.store.submit(tenant, entry_id, fields, ttl_ms=ttl_ms,
                                          grace_ms=grace_ms, max_queued=settings.max_queued)
        except QueueFull as exc:
            await refund(policy.limiter, hold)
            raise GatewayError(
                429, f"Tenant {tenant} already has {exc.depth} deferred requests waiting (limit "
                f"{settings.max_queued}); submit more when some have finished.",
                type="rate_limit_error", code="deferred_queue_full",
                headers={**hold.headers, "Retry-After": "30", "x-should-retry": "false"},
            ) from None
        except StateUnavailable as exc:
            await refund(policy.limiter, hold)
            self._log_error("deferred submit failed", exc)
            raise unavailable() from None
        self._metrics.deferred_submitted(tenant, via)
        self._wake.set()
        record.status = 202
        body = {
            "id": entry_id, "object": "deferred.request", "status": "queued",
            "queue_position": sub.position, "created_at": sub.created_ms // 1000,
            "expires_at": sub.expires_ms // 1000, "endpoint": call.route.path,
            "model": call.model, "url": f"/v1/deferred/{entry_id}",
        }
        out_headers = {**hold.headers, "Content-Type": "application/json",
                       "Location": f"/v1/deferred/{entry_id}",
                       "Preference-Applied": "respond-async"}
        return web.Response(status=202, body=orjson.dumps(body), headers=out_headers)

    # --- look up and cancel -------------------------------------------------------------------

    async def wait(self, tenant: str, entry_id: str, wait_s: float) -> Fields | None:
        """The entry, once final or after ``wait_s`` (long poll); None when unknown."""
        clock = self._svc.clock
        until = clock() + wait_s
        poll = WAIT_POLL_S[0]
        event, count = self._waiters.get(entry_id) or (asyncio.Event(), 0)
        self._waiters[entry_id] = (event, count + 1)
        try:
            while True:
                fields = await self.store.get(tenant, entry_id)
                left = until - clock()
                if fields is None or fields["status"].decode() in FINAL or left <= 0:
                    return fields
                try:
                    await asyncio.wait_for(event.wait(), min(poll, left))
                except TimeoutError:
                    poll = min(poll * 2, WAIT_POLL_S[1])
        finally:
            event, count = self._waiters.get(entry_id, (event, 1))
            if count <= 1:
                self._waiters.pop(entry_id, None)
            else:
                self._waiters[entry_id] = (event, count - 1)

    async def cancel(self, tenant: str, entry_id: str) -> str:
        """Cancel a queued entry and refund its reservation; the status it has now
        (``missing`` when there is none)."""
        status, raw_hold = await self.store.cancel(tenant, entry_id)
        if raw_hold is not None:  # this call cancelled it
            await refund(self._policy().limiter, hold_from_json(raw_hold))
            self._metrics.deferred_finished(tenant, "cancelled")
            self._notify(entry_id)
        return status

    def _notify(self, entry_id: str) -> None:
        """The entry reached a final state here: wake its long polls (at once)."""
        waiting = self._waiters.get(entry_id)
        if waiting is not None:
            waiting[0].set()
        self._wake.set()

    # --- the dispatcher ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run entries until ``stop``; then give running ones ``STOP_GRACE_S``."""
        loop = asyncio.get_running_loop()
        sweeper = loop.create_task(self._sweep_loop(stop))
        stopper = loop.create_task(self._wake_on(stop))
        try:
            await self._dispatch(stop)
        finally:
            sweeper.cancel()
            stopper.cancel()
            await asyncio.gather(sweeper, stopper, return_exceptions=True)
            await self._drain()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _dispatch(self, stop: asyncio.Event) -> None:
        idle = MIN_POLL_S
        while not stop.is_set():
            policy = self._policy()
            cfg = policy.config.deferred
            if not cfg.enabled or cfg.workers == 0:
                await self._pause(stop, cfg.poll_interval_s)
                continue
            if len(self._running) >= cfg.workers or \
                    self._free_low_slots(_labels(policy)) <= self._starting:
                await self._pause(stop, CAPACITY_POLL_S)
                continue
            try:
                claim = await self._next_claim(policy.config, cfg)
            except StateUnavailable as exc:
                self._log_error("deferred queue unreachable", exc)
                await self._pause(stop, cfg.poll_interval_s)
                continue
            if claim is None:
                await self._pause(stop, idle)
                idle = min(idle * 2, cfg.poll_interval_s)
                continue
            idle = MIN_POLL_S
            self._starting += 1  # until its attempt holds a slot (or it ends without one)
            task = asyncio.get_running_loop().create_task(self._execute(claim))
            self._running.add(task)
            task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Until woken (a local submit, a run ended, stop) or ``seconds`` passed."""
        if stop.is_set():
            return
        self._wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _next_claim(self, config: GatewayConfig, cfg: DeferredPolicy) -> Claim | None:
        """Tenants in turn, one entry each: a tenant with a deep queue cannot starve others."""
        tenants = sorted(config.tenants)
        visibility_ms = int(cfg.visibility_timeout_s * 1000)
        for i in range(len(tenants)):
            tenant = tenants[(self._rr + i) % len(tenants)]
            claim = await self.store.claim(tenant, self.consumer, reclaim_idle_ms=visibility_ms)
            if claim is not None:
                self._rr = (self._rr + i + 1) % len(tenants)
                return claim
        return None

    def _free_low_slots(self, labels: list[str]) -> int:
        """Slots the low class may take now on the best of these deployments, with nobody
        waiting (the rule ``AdmissionController.try_acquire`` applies)."""
        admission = self._svc.admission
        deployments = admission.snapshot()["deployments"]
        share = admission.policy.classes.of(Priority.low).holdback_share
        best = 0
        for label in labels:
            state = deployments.get(label)
            if state is None:  # never used here: its whole initial limit is free
                limit = admission.policy.concurrency_for(label).initial_limit
                state = {"limit": limit, "in_flight": 0, "queued": 0}
            limit = state["limit"]
            cap = limit if share >= 1.0 else max(1, math.floor(share * limit + 1e-9))
            if state["queued"] == 0:
                best = max(best, cap - state["in_flight"])
        return best

    async def _drain(self) -> None:
        tasks = list(self._running)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # --- one run -----------------------------------------------------------------------------

    async def _execute(self, claim: Claim) -> None:
        starting = True

        def has_slot() -> None:
            nonlocal starting
            if starting:
                starting = False
                self._starting -= 1

        try:
            await self._execute_claim(claim, has_slot)
        except StateUnavailable as exc:
            # The entry stays claimed by nobody alive: re-claimed after the visibility timeout.
            self._log_error("deferred run lost its store", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deferred run failed", extra={"fields": {"id": claim.id}})
        finally:
            has_slot()

    async def _execute_claim(self, claim: Claim, has_slot: Callable[[], None]) -> None:
        policy = self._policy()
        cfg = policy.config.deferred
        visibility_ms = int(cfg.visibility_timeout_s * 1000)
        started = await self.store.start(claim, self.consumer)
        if started.kind == "later":
            await self.store.release(claim, self.consumer, delay_ms=started.wait_ms,
                                     visibility_ms=visibility_ms)
            return
        if started.kind in ("gone", "done"):
            return
        hold = hold_from_json(started.fields["hold"])
        for run in started.lost:
            await charge(policy.limiter, hold, run, hold.reserved_tokens, hold.reserved_cost)
            self._metrics.deferred_run(claim.tenant, "lost")
        if started.kind == "expired":
            await refund(policy.limiter, hold)
            self._metrics.deferred_finished(claim.tenant, "expired")
            self._notify(claim.id)
            return
        heartbeat = asyncio.get_running_loop().create_task(
            self._heartbeat(claim, cfg.visibility_timeout_s / 3))
        policy.active += 1  # a reload must not close this policy's upstream pools under us
        try:
            outcome = await self._call(policy, claim, started, hold, cfg, has_slot)
        except asyncio.CancelledError:
            await self._interrupted(claim, started.run, hold, visibility_ms)
            raise
        finally:
            heartbeat.cancel()
            policy.active -= 1
            if policy is not self._policy() and policy.active == 0 and self._policy_idle:
                await self._policy_idle()
        await self._finish(claim, started.run, hold, outcome, cfg, policy.limiter)

    async def _finish(self, claim: Claim, run: int, hold: Hold, outcome: _Outcome,
                      cfg: DeferredPolicy, limiter: Limiter) -> None:
        visibility_ms = int(cfg.visibility_timeout_s * 1000)
        mode: FinishMode = "done"
        if not outcome.called:
            if outcome.retryable:
                await self.store.finish(claim, self.consumer, run, "nocall", "none",
                                        outcome.info, delay_ms=NOCALL_DELAY_MS,
                                        visibility_ms=visibility_ms)
                self._metrics.deferred_run(claim.tenant, "no_slot")
                return
        elif outcome.retryable and run < cfg.max_runs:
            mode = "retry"
        delay_ms = int(min(MAX_BACKOFF_S, cfg.retry_backoff_s * 2 ** (run - 1)) * 1000)
        finished = await self.store.finish(
            claim, self.consumer, run, mode, "actual" if outcome.called else "none",
            outcome.info, result=outcome.result, grace_ms=cfg.result_grace_s * 1000,
            delay_ms=delay_ms, visibility_ms=visibility_ms)
        if finished.charge:
            usage = outcome.usage
            await charge(limiter, hold, run, usage.input_tokens + usage.output_tokens,
                         outcome.cost_units)
        self._metrics.deferred_run(claim.tenant, "retried" if mode == "retry" else "answered")
        if finished.won:
            await refund(limiter, hold)
            self._metrics.deferred_finished(claim.tenant, outcome.result.status)
            self._notify(claim.id)
            log.info("deferred request finished", extra={"fields": {
                "id": claim.id, "tenant": claim.tenant, "status": outcome.result.status,
                "code": outcome.result.code, "runs": run}})

    async def _interrupted(self, claim: Claim, run: int, hold: Hold, visibility_ms: int) -> None:
        """This replica stops mid-run: queue the entry again at once (best effort). The run may
        have reached the upstream: it is charged its reservation."""
        try:
            async with asyncio.timeout(1.0):
                finished = await self.store.finish(
                    claim, self.consumer, run, "retry", "reserved",
                    {"replica": self.consumer, "outcome": "interrupted"}, delay_ms=0,
                    visibility_ms=visibility_ms)
                if finished.charge:
                    await charge(self._policy().limiter, hold, run, hold.reserved_tokens,
                                 hold.reserved_cost)
            self._metrics.deferred_run(claim.tenant, "interrupted")
        except (StateUnavailable, TimeoutError):
            pass  # re-claimed after the visibility timeout and charged as lost then

    async def _heartbeat(self, claim: Claim, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not await self.store.heartbeat(claim, self.consumer):
                    log.warning("deferred claim taken over by another replica",
                                extra={"fields": {"id": claim.id}})
                    return
            except StateUnavailable:
                continue

    async def _call(self, policy: Policy, claim: Claim, started: Started, hold: Hold,
                    cfg: DeferredPolicy, has_slot: Callable[[], None]) -> _Outcome:
        """One run through the attempt loop, as a synchronous call of class low."""
        svc, config = self._svc, policy.config
        fields = started.fields
        route = ROUTES[fields["route"].decode()]
        record = RequestRecord(request_id=f"{claim.id}.r{started.run}", started=time.monotonic(),
                               route=route.path, tenant=claim.tenant, priority="low")
        began_ms = int(time.time() * 1000)
        info: dict[str, Any] = {"replica": self.consumer, "started_ms": began_ms}
        headers = CIMultiDict(orjson.loads(fields["headers"]))
        called = False
        try:
            tenant = _tenant_policy(config, claim.tenant)
            if tenant is None:
                raise GatewayError(403, f"The tenant '{claim.tenant}' no longer exists.",
                                   type="permission_error", code="tenant_removed")
            call = classify(route, tenant, orjson.loads(fields["body"]), headers, config)
            call.priority = Priority.low
            record.model, record.agent_session = call.model, call.agent_session
            record.agent_step = call.agent_step
            record.prompt_tokens_estimate = call.prompt_tokens_estimate
            targets = policy.upstreams.targets(call)
            if not targets:
                raise GatewayError(400, f"The model '{call.model}' is not served on "
                                   f"{route.path}.", code="model_not_supported_on_route")
            if self._free_low_slots([t.label for t in targets]) <= 0:
                return self._no_call(record, info, "no_capacity")
            deadline = Deadline(svc.clock() + cfg.run_timeout_s, "default")
            ctx = CallContext(None, policy, svc, call, record, targets, deadline, {},
                              hold.reserved_tokens, client_headers=headers, free_slot_only=True,
                              on_permit=has_slot)
            try:
                response = await attempt_loop(ctx)
            finally:
                called = bool(record.attempt_log)
            result = _result(response)
        except GatewayError as exc:
            if not called and exc.status in RETRYABLE_STATUS and exc.code != "tenant_removed":
                return self._no_call(record, info, exc.code or f"http_{exc.status}")
            result = Result("failed", exc.status, exc.headers, exc.body(route.dialect))
            record.outcome = "rejected" if exc.status < 500 else "error"
            record.error_code = exc.code
        record.status = result.code
        model = config.models.get(record.model or "")
        if model is not None:
            record.cost = (record.usage.input_tokens * model.price.input_per_million
                           + record.usage.output_tokens * model.price.output_per_million) / 1e6
        record.total_s = time.monotonic() - record.started
        self._metrics.observe_request(record)
        info.update({"outcome": "success" if result.code < 400 else f"http_{result.code}",
                     "status": result.code, "attempts": len(record.attempt_log),
                     "deployment": record.deployment,
                     "duration_ms": int(time.time() * 1000) - began_ms})
        if called and result.code >= 400:
            log.info("deferred run failed", extra={"fields": {
                "id": claim.id, "run": started.run, "status": result.code}})
        return _Outcome(result, called, called and result.code in RETRYABLE_STATUS,
                        record.usage, math.ceil(record.cost * 1e6), info)

    def _no_call(self, record: RequestRecord, info: dict[str, Any], why: str) -> _Outcome:
        info["outcome"] = why
        return _Outcome(Result("failed", 503, {}, b""), False, True, Usage(), 0, info)

    # --- sweeper and metrics --------------------------------------------------------------------

    async def _sweep_loop(self, stop: asyncio.Event) -> None:
        sweeps = 0
        while not stop.is_set():
            cfg = self._policy().config.deferred
            if cfg.enabled:
                try:
                    await self.sweep(forget=sweeps % 100 == 0)
                except StateUnavailable as exc:
                    self._log_error("deferred sweep failed", exc)
                sweeps += 1
            try:
                await asyncio.wait_for(stop.wait(), cfg.sweep_interval_s)
            except TimeoutError:
                pass

    async def sweep(self, *, forget: bool = False) -> int:
        """Expire queued entries past their expiry (refunding them) and refresh the depth and
        age gauges; the number expired."""
        policy = self._policy()
        config = policy.config
        expired = 0
        stats: dict[str, dict[str, float]] = {}
        for tenant in sorted(config.tenants):
            scan = await self.store.scan(tenant, SWEEP_HEAD,
                                         forget_idle_ms=86_400_000 if forget else -1)
            stats[tenant] = {"depth": scan.depth, "oldest_age_s": scan.oldest_age_s,
                             "ttl_s": config.deferred.for_tenant(tenant).ttl_s}
            for sid, entry_id, expires_ms in scan.head:
                if expires_ms > scan.now_ms:
                    continue
                status, raw_hold = await self.store.expire(tenant, entry_id, sid)
                if status == "expired" and raw_hold is not None:
                    await refund(policy.limiter, hold_from_json(raw_hold))
                    self._metrics.deferred_finished(tenant, "expired")
                    self._notify(entry_id)
                    expired += 1
        self._stats = stats
        return expired

    def snapshot(self) -> dict[str, Any] | None:
        """The metrics' deferred source (no store round trip: the last sweep's figures)."""
        if not self._policy().config.deferred.enabled:
            return None
        return {"running": len(self._running), "tenants": self._stats}

    def _log_error(self, message: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:  # at most one line per 10 s
            self._last_error_log = now
            log.warning(message, extra={"fields": {"error": str(exc)}})


def _labels(policy: Policy) -> list[str]:
    return sorted({d.label for m in policy.config.models.values() for d in m.deployments})


def _result(response: web.StreamResponse) -> Result:
    body = response.body if isinstance(response, web.Response) else b""
    raw = body if isinstance(body, bytes) else b""
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower() != "content-length"}
    status: Literal["succeeded", "failed"] = "succeeded" if response.status < 400 else "failed"
    return Result(status, response.status, headers, raw)


def unavailable() -> GatewayError:
    return GatewayError(
        503, "Deferred requests are unavailable now: the queue cannot be reached; retry later "
        "or send the request without Prefer: respond-async.", type="server_error",
        code="deferred_unavailable", headers={"Retry-After": "5"},
    )
