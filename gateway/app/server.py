"""The aiohttp application: routes, the error boundary, request ids, access log, lifecycle.

``create_app`` assembles the whole stack in one place. State hangs off the app (typed AppKeys),
never off modules, so tests can run many gateways in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.config import ConfigError, GatewayConfig
from gateway.errors import GatewayError, InternalError, not_found
from gateway.observability import (
    ACCESS_LOGGER,
    WORKER_GROUP,
    GatewayMetrics,
    Tracing,
    metrics_handler,
)
from gateway.pipeline import handle_proxy, models_listing
from gateway.request import ROUTES, RequestRecord, TenantPolicy, error_dialect
from gateway.state import StateBackend, create_backend
from gateway.upstream import TransportFactory, aiohttp_transport

from . import admin, deferred_api
from .cors import setup_cors
from .endpoints import Routes
from .runtime import Gateway

log = logging.getLogger("gateway")
access_log = logging.getLogger(ACCESS_LOGGER)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/admin/status"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


GATEWAY = web.AppKey("gateway", Gateway)
RECORD = web.RequestKey("record", RequestRecord)


def create_app(
    config: GatewayConfig, *, state: StateBackend | None = None,
    tracing: Tracing | None = None, metrics: GatewayMetrics | None = None,
    clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
    transport: TransportFactory = aiohttp_transport,
) -> web.Application:
    """Build the gateway app; the state backend defaults to what the policy file names,
    tracing to what the OTEL_* environment says (off unless an exporter is configured).
    ``clock``, ``wall_clock`` and ``transport``: the ``Gateway``'s seams (app/runtime.py)."""
    if state is None:
        try:
            state = create_backend(
                config.state.backend,
                redis_url=config.state.redis_url,
                timeout_s=config.state.timeout_s,
                key_prefix=config.state.key_prefix,
            )
        except ValueError as exc:  # no URL (REDIS_URL unset or empty, as a missing Secret
            # key leaves it): one line naming the setting, not a traceback in a crash loop
            problem = f"state.redis_url: {exc} (REDIS_URL, when not empty, replaces it)"
            raise ConfigError("state", [problem]) from None
    # auto_decompress off: aiohttp's parser would inflate a gzip/deflate/br request body as it
    # arrives, before any handler or size limit sees it (a 204 KB gzip bomb became 200 MiB in
    # memory, authenticated or not). The pipeline refuses encoded bodies with a 415 instead
    # (classify.raise_if_content_encoded); the official SDKs never compress requests.
    app = web.Application(middlewares=[_boundary], client_max_size=config.server.max_body_bytes,
                          handler_args={"auto_decompress": False})
    if config.server.cors_origins:
        setup_cors(app, config.server.cors_origins)
    gateway = app[GATEWAY] = Gateway(config, state, tracing or Tracing.from_env(), metrics,
                                     clock=clock, wall_clock=wall_clock, transport=transport)
    app.cleanup_ctx.append(_lifecycle)
    app.on_response_prepare.append(_stamp_request_id)
    # Every route through Routes (app/endpoints.py): the kind decides how it is limited.
    routes = Routes(app, GATEWAY, RECORD, gateway.clock)
    for path in ROUTES:
        routes.proxied("POST", path, _proxy)
    routes.tenant("GET", "/v1/models", _models)
    routes.tenant("GET", "/v1/models/{model}", _model)
    deferred_api.add_routes(routes)  # /v1/deferred/{id}: status, answer, cancel
    routes.public("GET", "/healthz", _healthz)
    routes.public("GET", "/readyz", _readyz)
    if config.server.metrics:
        scrape = metrics_handler(gateway.metrics)
        if config.server.metrics_need_admin_key:
            routes.admin("GET", "/metrics", scrape)
        else:
            routes.public("GET", "/metrics", scrape)
    routes.admin("GET", "/admin/status", _admin_status)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    await gateway.start()
    yield
    await gateway.stop()


async def _proxy(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    policy = gateway.policy  # read once: a reload mid-request does not change it
    policy.active += 1
    try:
        return await handle_proxy(request, policy, gateway.services, request[RECORD])
    finally:
        policy.active -= 1
        if policy is not gateway.policy and policy.active == 0:
            await gateway.close_idle_retired()


async def _models(request: web.Request, tenant: TenantPolicy) -> web.Response:
    policy = request.app[GATEWAY].policy
    listing = models_listing(policy, tenant.may_use)
    if _anthropic_client(request):  # anthropic SDK client.models.list(): its page shape
        data = [_anthropic_model(m["id"]) for m in listing["data"]]
        return _json({"data": data, "has_more": False,
                      "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None})
    return _json(listing)


async def _model(request: web.Request, tenant: TenantPolicy) -> web.Response:
    policy = request.app[GATEWAY].policy
    name = request.match_info["model"]
    if name not in policy.config.models or not tenant.may_use(name):
        raise not_found(f"The model '{name[:64]}' does not exist or you do not have access to it.",
                        code="model_not_found", param="model")
    if _anthropic_client(request):
        return _json(_anthropic_model(name))
    return _json({"id": name, "object": "model", "created": 0, "owned_by": "gateway"})


def _anthropic_client(request: web.Request) -> bool:
    """The Anthropic SDKs send ``anthropic-version`` on every call and the OpenAI SDKs never
    do: on the routes both APIs share (``/v1/models``) it picks the answer's dialect."""
    return "anthropic-version" in request.headers


def _anthropic_model(name: str) -> dict[str, Any]:
    return {"type": "model", "id": name, "display_name": name,
            "created_at": "1970-01-01T00:00:00Z"}


async def _admin_status(request: web.Request) -> web.Response:
    # the admin key and the admin limit: Routes.admin (app/endpoints.py)
    group = request.app.get(WORKER_GROUP)  # --workers N: every worker's status, merged
    if group is not None:
        response = _json(await group.status(admin.status(request.app[GATEWAY])))
        response.headers["x-gateway-worker"] = str(group.index)
        return response
    return _json(admin.status(request.app[GATEWAY]))



async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "version": __version__})


async def _readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    state_ok = await gateway.state.ping()
    degraded = gateway.degraded
    # Redis trouble does not make a replica unready while its degraded mode serves requests
    # (taking every replica out of the Service at once would turn a Redis blip into an
    # outage); it is reported here instead. With fail_closed for every class it cannot serve.
    serves_degraded = not (degraded.policy.action == "fail_closed" and all(
        a == "fail_closed" for a in degraded.policy.per_priority.values()))
    ready = gateway.ready and (state_ok or serves_degraded)
    body = {
        "status": "ready" if ready else "not_ready",
        "state_backend": gateway.state.name,
        "state_reachable": state_ok,
        "limits_mode": "degraded" if (limited := degraded.active or not state_ok) else "global",
        # (unreachable before any request noticed: the action the next one will meet)
        "degraded_action": degraded.policy.action if limited else None,
        "usage_journal": degraded.journal_size,
    }
    return _json(body, status=200 if ready else 503)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def _boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, span, error rendering, metrics and the access log line, for every request."""
    gateway = request.app[GATEWAY]
    client_id = request.headers.get("X-Request-Id", "")
    request_id = client_id if _CLIENT_REQUEST_ID.match(client_id) else os.urandom(16).hex()
    record = RequestRecord(request_id=request_id, started=gateway.clock(), route=request.path)
    request[RECORD] = record
    quiet = request.path in _QUIET_PATHS  # probes and scrapes: no span, metrics or log line
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else None
    span_scope = contextlib.nullcontext(None) if quiet else gateway.tracing.request_span(
        request.method, template, request.headers)
    with span_scope as span:
        try:
            response = await handler(request)
            record.status = record.status or response.status
            return response
        except GatewayError as exc:
            return _error_response(request, record, exc)
        except web.HTTPException as exc:
            return _error_response(request, record, _from_http_exception(request, exc))
        except (asyncio.CancelledError, ConnectionResetError):
            record.outcome = "client_disconnected"
            raise
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            internal = InternalError("The gateway failed to handle this request.")
            return _error_response(request, record, internal)
        finally:
            if span is not None:
                record.total_s = gateway.clock() - record.started
                span.finish(record)
                if gateway.policy.config.server.metrics:
                    if record.outcome in ("rejected", "error"):  # sheds too: "overloaded"
                        gateway.metrics.rejected(record.error_code, record.priority,
                                                 record.tenant, record.status)
                    gateway.metrics.observe_request(record)
                if not _refused(record) or gateway.refusals.allow(record.tenant,
                                                                  record.error_code):
                    _log_access(record, span.log_fields())


def _refused(record: RequestRecord) -> bool:
    """Refused by the gateway itself, before any upstream attempt: its access line is
    rate-bounded per tenant and reason (logs.RefusalLog); metrics count it regardless."""
    return record.status >= 400 and record.attempts == 0 \
        and record.outcome in ("rejected", "error")


def _error_response(request: web.Request, record: RequestRecord, exc: GatewayError) -> web.Response:
    record.status = exc.status
    if record.outcome == "ok":
        record.outcome = "error" if exc.server_fault else "rejected"
    record.error_code = exc.code
    headers = {"Content-Type": "application/json", **exc.headers}
    dialect = error_dialect(request.path)
    if request.path not in ROUTES and _anthropic_client(request):
        dialect = "anthropic"  # models, deferred, unknown URLs: answer the SDK that asked
    return web.Response(status=exc.status, body=exc.body(dialect), headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPNotFound):
        return not_found(f"Unknown request URL: {request.method} {request.path[:200]}.",
                         code="unknown_url")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return GatewayError(405, f"Method {request.method} is not allowed on {request.path[:200]}.",
                            code="method_not_allowed",  # RFC 9110: a 405 names what is allowed
                            headers={"Allow": exc.headers.get("Allow", "")})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return GatewayError(413, "The request body is too large.", code="request_too_large")
    return GatewayError(exc.status, exc.reason, code=f"http_{exc.status}")


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get(RECORD)
    if record is not None:
        response.headers["X-Request-Id"] = record.request_id


def _log_access(record: RequestRecord, trace_fields: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "route": record.route,
        "tenant": record.tenant,
        "model": record.model,
        "deployment": record.deployment,
        "client_dialect": error_dialect(record.route) if record.route in ROUTES else None,
        "upstream_dialect": record.upstream_dialect,
        "priority": record.priority,
        "stream": record.stream,
        "status": record.status,
        "outcome": record.outcome,
        "error_code": record.error_code,
        "attempts": record.attempts,
        "duration_ms": _ms(record.total_s),
        "limits_ms": _ms(record.limits_s),
        "queue_ms": _ms(record.queue_s),
        "upstream_first_byte_ms": _ms(record.first_byte_s),
        "ttft_ms": _ms(record.ttft_s),
        "upstream_ms": _ms(record.upstream_s),
        "attempt_log": [
            {"deployment": a.deployment, "outcome": a.outcome, "ms": _ms(a.duration_s),
             "first_byte_ms": _ms(a.first_byte_s)} for a in record.attempt_log
        ] or None,
        "tokens_in": record.usage.input_tokens,
        "tokens_out": record.usage.output_tokens,
        # by billed dimension (gateway/usage.py); zero dimensions left out to keep lines short
        "tokens": {k: v for k, v in record.usage.dimensions().items() if v} or None,
        "tool_calls": record.usage.tool_calls or None,  # billed per call (usage.SERVER_TOOLS)
        "usage_reported": record.usage.reported,
        "cost": round(record.cost, 8),
        "cost_micros": record.cost_micros,
        "context_use": round(record.usage.input_tokens / record.context_window, 6)
        if record.context_window and record.usage.input_tokens else None,
        "agent_session": record.agent_session,
        "agent_step": record.agent_step,
        "run": record.run,
        "agent_loop": record.loop,
    }
    fields.update(trace_fields)
    access_log.info("request", extra={"fields": fields})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
