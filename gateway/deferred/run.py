"""One run of a claimed deferred entry: start it in the store, send it through the same
attempt loop as a synchronous call of class low (pipeline/attempts.py), then finish it (answer, queue it
again, or give it back unstarted) and charge the run.

Kept apart from ``DeferredService`` (deferred/service.py), which owns the queue: the dispatcher, the
long polls and the sweeper. A run shares none of their state; it reports an entry that reached
a final state back through ``notify``.

Retries: a run that reached the upstream and got a retryable failure (408, 429, 5xx, connect
error, timeout) is queued again after ``retry_backoff_s`` (doubling), up to ``max_runs`` runs;
a run that did not reach the upstream (no free slot after all, breakers open, provider quota)
does not count and is queued again shortly. The result shows every run (``run_log``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.admission import AdmissionController, Deadline
from gateway.config import DeferredPolicy, GatewayConfig, Priority
from gateway.errors import GatewayError, RateLimited
from gateway.limits import Hold, Limiter
from gateway.observability import GatewayMetrics
from gateway.pipeline import CallContext, PolicyVersion, Services, attempt_loop
from gateway.request import ROUTES, RequestRecord, TenantPolicy, classify, parse_json_body
from gateway.state import StateUnavailable
from gateway.usage import Usage, cost_micros

from .hold import charge, hold_from_json, refund, reserved_usage
from .store import Claim, DeferredStore, FinishMode, Result, Started

log = logging.getLogger("gateway.deferred")  # the service's logger: one name for all its lines

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
NOCALL_DELAY_MS = 250  # a run that found no slot after all: soon again, on any replica
MAX_BACKOFF_S = 60.0


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
    served_by: str | None = None  # the provider kind of the deployment called last


class DeferredRunner:
    """Runs the entries one replica's ``DeferredService`` claimed, one ``execute`` per claim."""

    def __init__(self, policy: Callable[[], PolicyVersion], services: Services,
                 store: DeferredStore, metrics: GatewayMetrics, consumer: str, notify: Callable[[str], None],
                 policy_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        self._policy = policy
        self._svc = services
        self.store = store
        self._metrics = metrics
        self.consumer = consumer
        self._notify = notify  # the entry reached a final state here: wake its long polls
        self._policy_idle = policy_idle

    async def execute(self, claim: Claim, has_slot: Callable[[], None]) -> None:
        """Start the claimed entry in the store, run it, and finish it; ``has_slot`` is
        called once the run holds an admission slot."""
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
            await charge(policy.limiter, hold, run, reserved_usage(hold), hold.reserved_cost)
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
            limiter.count_as_served(hold, claim.tenant, outcome.served_by)
            await charge(limiter, hold, run, outcome.usage, outcome.cost_units)
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
                    await charge(self._policy().limiter, hold, run, reserved_usage(hold),
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

    async def _call(self, policy: PolicyVersion, claim: Claim, started: Started, hold: Hold,
                    cfg: DeferredPolicy, has_slot: Callable[[], None]) -> _Outcome:
        """One run through the attempt loop, as a synchronous call of class low."""
        svc, config = self._svc, policy.config
        fields = started.fields
        route = ROUTES[fields["route"].decode()]
        record = RequestRecord(request_id=f"{claim.id}.r{started.run}", started=svc.clock(),
                               route=route.path, tenant=claim.tenant, priority="low")
        began_ms = int(svc.wall_clock() * 1000)
        info: dict[str, Any] = {"replica": self.consumer, "started_ms": began_ms}
        headers = CIMultiDict(orjson.loads(fields["headers"]))
        called = False
        try:
            tenant = _tenant_policy(config, claim.tenant)
            if tenant is None:
                raise GatewayError(403, f"The tenant '{claim.tenant}' no longer exists.",
                                   type="permission_error", code="tenant_removed")
            # Reading the stored body costs the event loop what a client's did, and a run
            # with no slot is tried again every quarter second: no slot on any of the model's
            # deployments (the stored model's, before the body is read), or a tenant past
            # its work budget, is no call; what is read is charged to the tenant.
            model = config.models.get(fields["model"].decode())
            if model is not None and free_low_slots(
                    svc.admission, [d.label for d in model.deployments]) <= 0:
                return self._no_call(record, info, "no_capacity")
            try:
                svc.self_protection.check_work(claim.tenant)
            except RateLimited:
                return self._no_call(record, info, "tenant_work")
            with svc.self_protection.working(claim.tenant):
                # (Read as a client's body is: one stored before a bound is held to it.)
                body = parse_json_body(fields["body"], config.server.max_body_values)
                call = classify(route, tenant, body, headers, config)
                targets = policy.upstreams.targets(call)
            call.priority = Priority.low
            record.model, record.agent_session = call.model, call.agent_session
            record.agent_step = call.agent_step
            record.prompt_tokens_estimate = call.prompt_tokens_estimate
            record.unseen_input_reserved = hold.unseen_tokens
            if not targets:
                raise GatewayError(400, f"The model '{call.model}' is not served on "
                                   f"{route.path}.", code="model_not_supported_on_route")
            if free_low_slots(svc.admission, [t.label for t in targets]) <= 0:
                return self._no_call(record, info, "no_capacity")
            deadline = Deadline(svc.clock() + cfg.run_timeout_s, "default",
                                cfg.run_timeout_s)
            ctx = CallContext(None, policy, svc, call, record, targets, deadline, {},
                              hold.sent_tokens, client_headers=headers, free_slot_only=True,
                              on_permit=has_slot)
            try:
                response = await attempt_loop(ctx)
            finally:
                called = bool(record.attempt_log)
                policy.limiter.remember_response(claim.tenant, call.model, record.usage)
            result = _result(response)
        except GatewayError as exc:
            if not called and exc.transient:
                return self._no_call(record, info, exc.code or f"http_{exc.status}")
            result = Result("failed", exc.status, exc.headers, exc.body(route.dialect))
            record.outcome = "error" if exc.server_fault else "rejected"
            record.error_code = exc.code
        record.status = result.code
        model = config.models.get(record.model or "")
        if model is not None:
            record.set_cost(cost_micros(record.usage, model.price.rates))
        record.total_s = svc.clock() - record.started
        self._metrics.observe_request(record)
        info.update({"outcome": "success" if result.code < 400 else f"http_{result.code}",
                     "status": result.code, "attempts": len(record.attempt_log),
                     "deployment": record.deployment,
                     "duration_ms": int(svc.wall_clock() * 1000) - began_ms})
        if called and result.code >= 400:
            log.info("deferred run failed", extra={"fields": {
                "id": claim.id, "run": started.run, "status": result.code}})
        return _Outcome(result, called, called and result.code in RETRYABLE_STATUS,
                        record.usage, record.cost_micros, info, record.upstream_dialect)

    def _no_call(self, record: RequestRecord, info: dict[str, Any], why: str) -> _Outcome:
        info["outcome"] = why
        return _Outcome(Result("failed", 503, {}, b""), False, True, Usage(), 0, info)


def free_low_slots(admission: AdmissionController, labels: list[str]) -> int:
    """Requests of the low class ``try_acquire`` would grant now on the best of these
    deployments (slots, nobody waiting, and the provider's quota as paced: a run started
    without one would only be requeued)."""
    return max((admission.free_slots(label, Priority.low) for label in labels), default=0)


def _result(response: web.StreamResponse) -> Result:
    body = response.body if isinstance(response, web.Response) else b""
    raw = body if isinstance(body, bytes) else b""
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower() != "content-length"}
    status: Literal["succeeded", "failed"] = "succeeded" if response.status < 400 else "failed"
    return Result(status, response.status, headers, raw)
