"""The request pipeline for every proxied API route, top to bottom in ``handle_proxy``.

Step numbers follow docs/architecture.md. Errors raised anywhere become ``GatewayError``s that
the error boundary (server.py) renders; once a stream has started, the relay ends it with an
error event instead, because the status line has already been sent. Everything acquired on
the way (limit hold, admission permit, breaker trial) is released in a ``finally``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from aiohttp import web

from .attempts import CallContext, attempt_loop
from .classify import ROUTES, classify, parse_json_body, raise_if_json_content_type_wrong
from .context import Policy, RequestRecord, Services
from .deadlines import request_deadline
from .errors import GatewayError


async def handle_proxy(
    request: web.Request, policy: Policy, svc: Services, record: RequestRecord
) -> web.StreamResponse:
    route = ROUTES[request.path]
    record.route = route.path
    config = policy.config
    # 2 authenticate
    with svc.tracing.stage("auth"):
        tenant = policy.auth.authenticate(request.headers)
    record.tenant = tenant.name
    # 3 classify: read and parse the body once
    raise_if_json_content_type_wrong(request.headers.get("Content-Type"))
    body = parse_json_body(await _read_body(request, config.server.max_body_bytes))
    call = classify(route, tenant, body, request.headers, config)
    record.model, record.stream = call.model, call.stream
    record.priority = call.priority.name
    record.agent_session, record.agent_step = call.agent_session, call.agent_step
    model = config.models[call.model]
    record.prompt_tokens_estimate = call.prompt_tokens_estimate
    record.context_window = model.context_window
    if call.prompt_tokens_estimate > model.context_window:
        raise GatewayError(
            400, f"This model's maximum context length is {model.context_window} tokens; the "
            f"request's prompt is about {call.prompt_tokens_estimate} tokens.",
            code="context_length_exceeded", param="messages",
        )
    targets = policy.upstreams.targets(call)
    if not targets:
        raise GatewayError(400, f"The model '{call.model}' is not served on {route.path}.",
                           code="model_not_supported_on_route", param="model")
    # Deferred requests (deferred.py): Prefer: respond-async -> stored durably, 202 Accepted.
    # Mode on_shed runs at once and defers only a would-be overload shed of a low request.
    deferred = svc.deferred
    defer = deferred.mode(call, request.headers, config) if deferred is not None else None
    if deferred is not None and defer == "now":
        return await deferred.submit(policy, call, request.headers, record, via="prefer")
    # 4 self-protection: shed the lowest classes at the door before any work
    now = svc.clock()
    try:
        svc.guard.door_check(call.priority, now)
    except GatewayError as exc:
        if deferred is None or defer != "on_shed" or exc.code != "overloaded":
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
        hold = await policy.limiter.admit(call, os.urandom(16).hex())
    record.limits_s = svc.clock() - began
    try:
        # 7-11 route, provider quota, admission, attempts with retries and failover, relay
        ctx = CallContext(request, policy, svc, call, record, targets, deadline, hold.headers,
                          hold.reserved_tokens)
        return await attempt_loop(ctx)
    except GatewayError as exc:
        # on_shed deferral: an admission shed comes before any upstream call was made
        if deferred is None or defer != "on_shed" or exc.code != "overloaded" \
                or record.attempt_log:
            raise
        await policy.limiter.settle(hold, record.usage, 0)  # this reservation back at once
        return await deferred.submit(policy, call, request.headers, record, via="shed")
    finally:
        # 12 settle: real usage replaces the reservation, off the client's critical path
        record.cost = (record.usage.input_tokens * model.price.input_per_million
                       + record.usage.output_tokens * model.price.output_per_million) / 1e6
        policy.limiter.settle_soon(hold, record.usage, math.ceil(record.cost * 1e6))


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is larger than the gateway's limit of {limit} bytes.",
        code="request_too_large",
    )


def models_listing(policy: Policy, tenant_models: Any) -> dict[str, Any]:
    """GET /v1/models: the models this tenant may use, in OpenAI's list shape."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "gateway"}
            for name in policy.config.models
            if tenant_models(name)
        ],
    }

