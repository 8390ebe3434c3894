"""The request pipeline for every proxied API route, top to bottom in ``handle_proxy``.

Step numbers follow docs/architecture.md. Errors raised anywhere become ``GatewayError``s that
the error boundary (server.py) renders; once a stream has started, the relay ends it with an
error event instead, because the status line has already been sent.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .auth import Authenticator
from .classify import ROUTES, ProxyCall, classify, parse_json_body, raise_if_json_content_type_wrong
from .config import GatewayConfig
from .errors import GatewayError, upstream_failure
from .limits import Limiter
from .streaming import SseRelay, Usage, usage_from_body
from .upstream import FORWARDED_RESPONSE_HEADERS, Target, UpstreamAttempt, UpstreamPool


@dataclass(slots=True)
class AttemptRecord:
    """One upstream attempt: where, how it ended, how long it took."""

    deployment: str
    outcome: str  # success | http_<status> | connect_error | timeout | stream_cut | ...
    duration_s: float
    first_byte_s: float | None = None


@dataclass(slots=True)
class RequestRecord:
    """What one request did, filled in as it goes. The access log line, the metrics and the
    span attributes are all made from it, so they always agree."""

    request_id: str
    started: float  # loop.time() when the request arrived
    route: str = ""
    tenant: str | None = None
    model: str | None = None
    deployment: str | None = None  # the one that answered (or was tried last)
    priority: str | None = None
    stream: bool = False
    status: int = 0
    outcome: str = "ok"  # ok | rejected | shed | error | upstream_error | client_disconnected
    error_code: str | None = None
    attempts: int = 0
    attempt_log: list[AttemptRecord] = field(default_factory=list)
    # wait time at every step, in seconds (None: the step did not run)
    limits_s: float | None = None
    queue_s: float | None = None
    first_byte_s: float | None = None  # upstream response headers, last attempt
    ttft_s: float | None = None  # first content event relayed to the client
    upstream_s: float | None = None
    total_s: float | None = None
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0
    prompt_tokens_estimate: int = 0
    context_window: int = 0
    agent_session: str | None = None
    agent_step: str | None = None


@dataclass(slots=True)
class Policy:
    """Everything derived from one version of the policy file; swapped whole on reload."""

    config: GatewayConfig
    auth: Authenticator
    upstreams: UpstreamPool
    limiter: Limiter
    active: int = 0  # requests running under this policy (a retired one closes at 0)


async def handle_proxy(request: web.Request, policy: Policy, record: RequestRecord) -> web.StreamResponse:
    route = ROUTES[request.path]
    record.route = route.path
    # 2 authenticate
    tenant = policy.auth.authenticate(request.headers)
    record.tenant = tenant.name
    # 3 classify: read and parse the body once
    raise_if_json_content_type_wrong(request.headers.get("Content-Type"))
    body = parse_json_body(await _read_body(request, policy.config.server.max_body_bytes))
    call = classify(route, tenant, body, request.headers, policy.config)
    record.model, record.stream = call.model, call.stream
    record.priority = call.priority.name
    record.agent_session, record.agent_step = call.agent_session, call.agent_step
    # 6 tenant limits and budgets: one atomic round trip; settled exactly once below
    model = policy.config.models[call.model]
    record.prompt_tokens_estimate = call.prompt_tokens_estimate
    record.context_window = model.context_window
    loop = asyncio.get_running_loop()
    began = loop.time()
    hold = await policy.limiter.admit(call, record.request_id)
    record.limits_s = loop.time() - began
    try:
        # 7 route: the model's deployments that speak this route's API
        targets = policy.upstreams.targets(call)
        if not targets:
            raise GatewayError(
                400, f"The model '{call.model}' is not served on {route.path}.",
                code="model_not_supported_on_route", param="model",
            )
        # 10 attempt (retries and failover arrive with the resilience policy)
        target = targets[0]
        record.deployment = target.label
        record.attempts += 1
        attempt = policy.upstreams.attempt(call, target, request.headers, record.request_id)
        async with attempt:
            upstream = await attempt.open()
            record.first_byte_s = loop.time() - attempt.started
            try:
                if call.stream and upstream.status == 200 and _is_event_stream(upstream):
                    return await _relay_stream(request, call, attempt, record, hold.headers)
                return await _relay_whole(call, attempt, target, record, hold.headers)
            finally:
                record.upstream_s = loop.time() - attempt.started
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


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


async def _relay_whole(
    call: ProxyCall, attempt: UpstreamAttempt, target: Target, record: RequestRecord,
    extra_headers: dict[str, str],
) -> web.Response:
    upstream = attempt.response
    body = await attempt.read_body()
    status = upstream.status
    if status in (401, 403):
        # Our provider credential was refused: the client's key is fine, so this is a 502.
        raise upstream_failure(
            502, f"The upstream {target.label} refused the gateway's credentials.",
            "upstream_auth_error",
        )
    if not _looks_like_json(upstream, body):
        raise upstream_failure(
            502, f"The upstream {target.label} answered {status} with a non-JSON body.",
            "upstream_bad_response",
        )
    if status < 400:
        record.usage = usage_from_body(body)
    record.status = status
    headers = {"Content-Type": "application/json", **extra_headers}
    _copy_headers(upstream, headers)
    return web.Response(status=status, body=body, headers=headers)


def _looks_like_json(upstream: aiohttp.ClientResponse, body: bytes) -> bool:
    return upstream.content_type.endswith("json") and body[:1] in (b"{", b"[")


def _copy_headers(upstream: aiohttp.ClientResponse, headers: dict[str, str]) -> None:
    for name in FORWARDED_RESPONSE_HEADERS:
        value = upstream.headers.get(name)
        if value is not None:
            headers[name] = value


async def _relay_stream(
    request: web.Request, call: ProxyCall, attempt: UpstreamAttempt, record: RequestRecord,
    extra_headers: dict[str, str],
) -> web.StreamResponse:
    relay = SseRelay(
        call.route.dialect,
        strip_usage_chunk=call.route.injects_stream_usage and not call.client_wants_usage,
    )
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                 "X-Accel-Buffering": "no", **extra_headers},
    )
    await response.prepare(request)
    record.status = 200
    try:
        while chunk := await attempt.next_chunk():
            out = relay.feed(chunk)
            if out:
                await response.write(out)
        out = relay.leftover()
        if out:
            await response.write(out)
        if not relay.finished:
            raise upstream_failure(
                502, f"The upstream {attempt.target.label} ended the stream early.",
                "upstream_stream_cut",
            )
    except GatewayError as exc:
        # The status line is gone: end the stream with an error event the SDKs understand.
        record.outcome, record.error_code = "upstream_error", exc.code
        await _write_quietly(response, exc.sse_event(call.route.dialect))
    finally:
        record.usage = relay.final_usage()
    await _write_eof_quietly(response)
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        pass  # the client is gone too; nothing left to tell it


async def _write_eof_quietly(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass


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
