"""The request pipeline for every proxied API route, top to bottom in ``handle_proxy``.

Step numbers follow docs/architecture.md. Errors raised anywhere become ``GatewayError``s that
the error boundary (app/server.py) renders; once a stream has started, the relay ends it with an
error event instead, because the status line has already been sent. Everything acquired on
the way (limit hold, admission permit, breaker trial) is released in a ``finally``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.admission import BodyHold, is_client_retry, request_deadline
from gateway.config import Tenant
from gateway.errors import GatewayError, Overloaded, RateLimited, retry_headers
from gateway.request import (
    ROUTES,
    ApiRoute,
    ProxyCall,
    RequestRecord,
    TenantPolicy,
    classify,
    find_loop,
    parse_json_body,
    raise_if_content_encoded,
    raise_if_json_content_type_wrong,
)
from gateway.usage import Usage, cost_micros

from .attempts import CallContext, attempt_loop
from .services import PolicyVersion, Services


async def handle_proxy(
    request: web.Request, policy: PolicyVersion, svc: Services, record: RequestRecord
) -> web.StreamResponse:
    """The pipeline, holding the request body's bytes against the process's bound (and the
    tenant's share of it) from before the body is read until the request ends."""
    route = ROUTES[request.path]
    record.route = route.path
    # 2 authenticate: before the body's bytes are held, so that they are held as someone's
    with svc.tracing.stage("auth"):
        tenant = policy.auth.authenticate(request.headers)
    record.tenant = tenant.name
    svc.self_protection.check_work(tenant.name)  # before its body is read (WorkBudget)
    server = policy.config.server
    declared = request.content_length
    bodies = svc.self_protection.bodies
    hold = bodies.reserve(
        tenant.name,
        declared if declared is not None and declared <= server.max_body_bytes
        else server.max_body_bytes if request.body_exists else 0,
        bodies.limit(server.max_body_bytes_in_flight, server.max_body_bytes),
        server.max_body_bytes)
    try:
        return await _pipeline(request, policy, svc, record, route, tenant, hold)
    finally:
        hold.release()


async def _pipeline(
    request: web.Request, policy: PolicyVersion, svc: Services, record: RequestRecord,
    route: ApiRoute, tenant: TenantPolicy, body_hold: BodyHold,
) -> web.StreamResponse:
    config = policy.config
    # 3 classify: read and parse the body once
    raise_if_json_content_type_wrong(request.headers.get("Content-Type"))
    raise_if_content_encoded(request.headers.get("Content-Encoding"))
    raw = await _read_body(request, config.server.max_body_bytes,
                           config.server.body_read_timeout_s)
    body_hold.keep(len(raw))  # what it turned out to be, for the rest of the request
    # Again once read: bodies of many connections sent slowly all passed the check before
    # theirs arrived, and would otherwise be parsed together past the tenant's share.
    svc.self_protection.check_work(tenant.name)
    # (The tenant's limits have not run yet: this reading is charged to its work budget.)
    with svc.self_protection.working(tenant.name):
        body = parse_json_body(raw, config.server.max_body_values)
        call = classify(route, tenant, body, request.headers, config)
        record.model, record.stream = call.model, call.stream
        record.priority = call.priority.name
        record.agent_session, record.agent_step = call.agent_session, call.agent_step
        model = config.models[call.model]
        record.prompt_tokens_estimate = call.prompt_tokens_estimate
        record.context_window = model.context_window
        if call.prompt_tokens_estimate > model.context_window and not route.request_only:
            raise GatewayError(
                400, f"This model's maximum context length is {model.context_window} tokens; "
                f"the request's prompt is about {call.prompt_tokens_estimate} tokens.",
                code="context_length_exceeded", param="messages",
            )
        targets = policy.upstreams.targets(call)
        if not targets:
            raise GatewayError(400, f"The model '{call.model}' is not served on {route.path}.",
                               code="model_not_supported_on_route", param="model")
        # 3b the loop detector reads the conversation's tool calls (request/agent_loop.py)
        loop_header = None if route.request_only else _agent_loop(
            call, config.tenants[tenant.name], record, policy)
    # Deferred requests (deferred/service.py): Prefer: respond-async -> stored durably, 202 Accepted.
    # Mode on_shed runs at once and defers only a would-be overload shed of a low request.
    deferred = svc.deferred if not route.request_only else None  # counting is never deferred
    defer = deferred.mode(call, request.headers, config) if deferred is not None else None
    if deferred is not None and defer == "now":
        return await deferred.submit(policy, call, request.headers, record, via="prefer")
    # 4 self-protection: shed the lowest classes at the door before any work
    now = svc.clock()
    try:
        svc.self_protection.check(call.priority, now)
    except GatewayError as exc:
        if deferred is None or defer != "on_shed" or not isinstance(exc, Overloaded):
            raise
        return await deferred.submit(policy, call, request.headers, record, via="shed")
    # 5 deadline feasibility against the fastest candidate's optimistic first byte
    deadline = request_deadline(request.headers, call.priority, tenant.name, now,
                                config.admission)
    deadline.check(now, min(svc.admission.fastest_ttft(t.label, call.prompt_tokens_estimate)
                            for t in targets))
    # 6 tenant limits and budgets: one atomic round trip; settled exactly once below
    began = svc.clock()
    with svc.tracing.stage("limits"):
        # Keyed by a gateway-made id, never the client's X-Request-Id: a reused client id
        # must not share a concurrency lease or a settlement with another request.
        # Token counting: a request and a concurrency lease, no tokens (Limiter.admit); an
        # exempt counting route is not counted as a request but still holds its lease.
        hold = await policy.limiter.admit(
            call, os.urandom(16).hex(), deadline=deadline.at,
            client_retry=is_client_retry(request.headers), count_only=route.request_only,
            rate_exempt=route.request_only
            and route_name(route) in config.tenants[tenant.name].limits.exempt_routes)
    record.limits_s = svc.clock() - began
    record.unseen_input_reserved = hold.unseen_tokens
    if hold.run is not None:
        record.run = hold.run_totals
    if loop_header is not None:
        hold.headers["x-gateway-agent-loop"] = loop_header
    try:
        # 7-11 route, provider quota, admission, attempts with retries and failover, relay
        ctx = CallContext(request, policy, svc, call, record, targets, deadline, hold.headers,
                          hold.sent_tokens)
        return await attempt_loop(ctx)
    except GatewayError as exc:
        # on_shed deferral: an admission shed comes before any upstream call was made
        if deferred is None or defer != "on_shed" or not isinstance(exc, Overloaded) \
                or record.attempt_log:
            raise
        hold.no_step = True  # no model call: the deferred entry's run is the step
        await policy.limiter.settle(hold, record.usage, 0)  # this reservation back at once
        return await deferred.submit(policy, call, request.headers, record, via="shed")
    finally:
        if route.request_only:  # counting tokens bills none (the estimate relay_whole made)
            record.usage = Usage()
        # 12 settle: real usage replaces the reservation, off the client's critical path
        # A run's step is a model call: one refused before any upstream attempt is given back.
        hold.no_step = hold.no_step or not record.attempt_log
        record.set_cost(cost_micros(record.usage, model.price.rates))
        policy.limiter.count_as_served(hold, tenant.name, record.upstream_dialect)
        policy.limiter.settle_soon(hold, record.usage, record.cost_micros)
        # 12b a stored Responses answer's size, for follow-ups that refer to it
        policy.limiter.remember_response(tenant.name, call.model, record.usage)


def route_name(route: ApiRoute) -> str:
    """``POST /v1/...``: how ``limits.exempt_routes`` names a route."""
    return f"POST {route.path}"


def _agent_loop(call: ProxyCall, tenant: Tenant, record: RequestRecord,
                policy: PolicyVersion) -> str | None:
    """The loop detector's verdict: the warning header to add (warn), a 429 (refuse), or
    None (no loop, or shadow: recorded for the metric and the access log only)."""
    settings = tenant.agent_loop
    if not settings.enabled:
        return None
    finding = find_loop(call.body, settings.max_repeats, settings.cycle_steps,
                        policy.limiter.canonical_cache)
    if finding is None:
        return None
    record.loop, record.loop_action = finding.header(), settings.action
    policy.limiter.note_loop(call)
    if settings.action == "refuse":
        raise RateLimited(f"Agent loop detected: {finding.describe()} in this "
                          "conversation. Change the approach instead of repeating the call.",
                          code="agent_loop_detected",
                          headers={**retry_headers(None),
                                   "x-gateway-agent-loop": finding.header()})
    return finding.header() if settings.action == "warn" else None


async def _read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        # A body that never finishes: answer, then close the connection,
        # since the rest of the body may still arrive and the framing is lost.
        raise GatewayError(
            408, f"The request body did not arrive within {timeout_s:g} s.",
            type="invalid_request_error", code="request_timeout",
            headers={"Connection": "close"}) from None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is larger than the gateway's limit of {limit} bytes.",
        code="request_too_large",
    )


def models_listing(policy: PolicyVersion, tenant_models: Callable[[str], bool]) -> dict[str, Any]:
    """GET /v1/models: the models this tenant may use, in OpenAI's list shape."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
            for name in policy.config.models
            if tenant_models(name)
        ],
    }

