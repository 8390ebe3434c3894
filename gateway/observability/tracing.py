"""OpenTelemetry tracing with the SDK used directly (no auto-instrumentation packages).

One SERVER span per request continues the client's W3C ``traceparent``; INTERNAL child spans
cover the stages (auth, limits, queue, relay); one CLIENT span per upstream attempt carries the
GenAI semantic-convention attributes and is what ``inject`` forwards upstream as the parent.

Configuration is the standard OTEL_* environment (``Tracing.from_env``), with one deliberate
difference: tracing is *opt-in*. The spec's default exporter is ``otlp`` to localhost, which
would make every dev run and test retry a collector that is not there, so nothing is set up
until ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP endpoint is given.

When disabled there is no provider at all: every method returns a shared null object, a few
hundred nanoseconds per call (about 2-4 µs for a whole request's spans on a 2-core VM). The
client's own ``traceparent`` then passes through to the upstream untouched (upstream/pool.py
forwards it), as it would through any plain proxy. A request the sampler drops gets its SERVER
span only: SDK spans cost tens of µs even unsampled, so no children are made for it.

Prompt and completion text never lands on a span unless the caller passes
``capture_content=True`` (a per-tenant opt-in) *and* the text itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from gateway import __version__
from gateway.errors import GatewayError
from gateway.request import ROUTES

if TYPE_CHECKING:
    from gateway.request import AttemptRecord, RequestRecord

# GenAI semantic conventions, as our own constants: the strings are stable, while the Python
# constants live in a private ``_incubating`` module and are marked deprecated (moved repos).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
MAX_CONTENT_CHARS = 64 * 1024  # captured content is truncated: exporters choke on huge spans

_REQUEST_HANDLE = otel_context.create_key("gateway.request_span")  # an immutable context key
_TRACE_HEADERS = ("traceparent", "tracestate")
# True inside a request whose trace is not sampled: its children would be dropped anyway, and
# an SDK span costs tens of us even unsampled (``inject`` then forwards the request span).
_UNSAMPLED: ContextVar[bool] = ContextVar("gateway_trace_unsampled", default=False)
log = logging.getLogger("gateway.tracing")


class TracingConfigError(ValueError):
    """The OTEL_* environment asks for something this gateway cannot do."""


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Header lookup that is case-insensitive for plain dicts too (aiohttp's already is)."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None and not isinstance(carrier, (CIMultiDictProxy, CIMultiDict)):
            value = next((v for k, v in carrier.items() if k.lower() == key), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


class RequestSpan:
    """The request's SERVER span (or a null one). ``finish(record)`` before leaving the block."""

    __slots__ = ("_operation", "_provider", "_response_model", "_span")

    def __init__(self, span: Span | None, operation: str | None = None) -> None:
        self._span = span
        self._operation = operation
        self._provider: str | None = None  # of the last attempt, for the summary attributes
        self._response_model: str | None = None

    @property
    def trace_id(self) -> str | None:
        """32 hex digits, for log lines; None when tracing is off."""
        if self._span is None:
            return None
        return format(self._span.get_span_context().trace_id, "032x")

    def log_fields(self) -> dict[str, str]:
        """``{"trace_id", "span_id"}`` to merge into the access log line ({} when off)."""
        if self._span is None:
            return {}
        ctx = self._span.get_span_context()
        return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def finish(
        self, record: RequestRecord, *, provider: str | None = None,
        response_model: str | None = None, capture_content: bool = False,
        input_messages: str | None = None, output_messages: str | None = None,
    ) -> None:
        """Summary attributes from the finished record; ``provider``/``response_model`` default
        to the last attempt's. Content (JSON text of the messages) is recorded only with
        ``capture_content=True``; pass it only then, so the default costs no serialisation."""
        span = self._span
        if span is None or not span.is_recording():
            return
        attrs: dict[str, AttributeValue] = {
            "gateway.request_id": record.request_id,
            "gateway.outcome": record.outcome,
            "gateway.stream": record.stream,
            "gateway.attempts": record.attempts,
            GEN_AI_USAGE_INPUT_TOKENS: record.usage.input_tokens,
            GEN_AI_USAGE_OUTPUT_TOKENS: record.usage.output_tokens,
        }
        optional: dict[str, AttributeValue | None] = {
            HTTP_STATUS: record.status or None,
            "gateway.tenant": record.tenant,
            "gateway.priority": record.priority,
            "gateway.deployment": record.deployment,
            "gateway.error_code": record.error_code,
            "gateway.agent.session": record.agent_session,
            "gateway.agent.step": record.agent_step,
            GEN_AI_CONVERSATION_ID: record.agent_session,
            GEN_AI_OPERATION_NAME: self._operation,
            GEN_AI_REQUEST_MODEL: record.model,
            GEN_AI_RESPONSE_MODEL: response_model or self._response_model,
            GEN_AI_PROVIDER_NAME: provider or self._provider,
            "gateway.cost": record.cost or None,
            # OTel GenAI semconv names for the cache parts of input_tokens (which includes them)
            "gen_ai.usage.cache_read.input_tokens": record.usage.cache_read_tokens or None,
            "gen_ai.usage.cache_creation.input_tokens": record.usage.cache_write_tokens or None,
            "gateway.usage.reasoning_tokens": record.usage.reasoning_tokens or None,
            "gateway.queue_s": record.queue_s,
            "gateway.ttft_s": record.ttft_s,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        if capture_content:
            if input_messages is not None:
                attrs[GEN_AI_INPUT_MESSAGES] = input_messages[:MAX_CONTENT_CHARS]
            if output_messages is not None:
                attrs[GEN_AI_OUTPUT_MESSAGES] = output_messages[:MAX_CONTENT_CHARS]
        span.set_attributes(attrs)
        failed = record.status >= 500 or record.outcome in ("error", "upstream_error")
        if failed:
            span.set_attribute(ERROR_TYPE, record.error_code or str(record.status or "error"))
            span.set_status(Status(StatusCode.ERROR))


class AttemptSpan:
    """One upstream attempt's CLIENT span (or a null one)."""

    __slots__ = ("_span",)

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def finish(
        self, attempt: AttemptRecord | None = None, *, status: int | None = None,
        input_tokens: int | None = None, output_tokens: int | None = None,
        response_model: str | None = None,
    ) -> None:
        """How the attempt ended; any outcome but ``success`` marks the span as an error."""
        span = self._span
        if span is None or not span.is_recording():
            return
        optional: dict[str, AttributeValue | None] = {
            HTTP_STATUS: status,
            GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
            GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
            GEN_AI_RESPONSE_MODEL: response_model,
        }
        if attempt is not None:
            optional["gateway.attempt.outcome"] = attempt.outcome
            optional["gateway.attempt.first_byte_s"] = attempt.first_byte_s
        span.set_attributes({k: v for k, v in optional.items() if v is not None})
        if attempt is not None and attempt.outcome != "success":
            span.set_attribute(ERROR_TYPE, attempt.outcome)
            span.set_status(Status(StatusCode.ERROR))


H = TypeVar("H")


class _Null(Generic[H]):
    """A reusable do-nothing ``with`` block that yields a fixed (null) handle."""

    __slots__ = ("_handle",)

    def __init__(self, handle: H) -> None:
        self._handle = handle

    def __enter__(self) -> H:
        return self._handle

    def __exit__(self, *exc: object) -> None:
        return None


class _Scope(Generic[H]):
    """Makes ``span`` current for the block and ends it on exit.

    Exceptions are judged here rather than by ``use_span``: a cancellation (client gone) is
    not an error, and a GatewayError below 500 is a refusal, not a failure of the gateway.
    A request scope whose trace is not sampled also marks the block ``_UNSAMPLED``.
    """

    __slots__ = ("_ctx", "_handle", "_span", "_token", "_unsampled")

    def __init__(self, span: Span, ctx: Context, handle: H) -> None:
        self._span, self._ctx, self._handle = span, ctx, handle
        self._token: Token[Context] | None = None
        self._unsampled: Token[bool] | None = None

    def __enter__(self) -> H:
        self._token = otel_context.attach(self._ctx)
        if isinstance(self._handle, RequestSpan) and not self._span.is_recording():
            self._unsampled = _UNSAMPLED.set(True)
        return self._handle

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        try:
            if exc is not None and span.is_recording():
                if isinstance(exc, asyncio.CancelledError):
                    span.set_attribute("gateway.cancelled", True)
                elif isinstance(exc, GatewayError):
                    span.set_attribute(ERROR_TYPE, exc.code or str(exc.status))
                    if exc.server_fault:
                        span.set_status(Status(StatusCode.ERROR))
                elif isinstance(exc, Exception):
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        finally:
            if self._unsampled is not None:
                _UNSAMPLED.reset(self._unsampled)
            if self._token is not None:
                otel_context.detach(self._token)
            span.end()


class Tracing:
    """Spans for the request pipeline; a cheap no-op when built without a provider."""

    def __init__(self, provider: TracerProvider | None, *, owns_provider: bool = False) -> None:
        """``provider=None``: disabled. Tests pass their own provider (and keep ownership)."""
        self.enabled = provider is not None
        self._provider = provider
        self._owns = owns_provider and provider is not None
        self._tracer = provider.get_tracer("gateway", __version__) if provider else None
        self._propagator = TraceContextTextMapPropagator()
        self._getter = _HeaderGetter()
        self._null_request = _Null(RequestSpan(None))
        self._null_attempt = _Null(AttemptSpan(None))
        self._null_stage: _Null[None] = _Null(None)

    @classmethod
    def from_env(cls) -> Tracing:
        """Build from the OTEL_* environment. Read here: OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER
        (``otlp``, ``console``, ``none``, comma-separated), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
        OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (http/protobuf only). Read by the SDK itself:
        OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_*,
        OTEL_EXPORTER_OTLP_[TRACES_]{HEADERS,TIMEOUT,COMPRESSION,CERTIFICATE}, OTEL_*_LIMIT."""
        env = os.environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(None)
        names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
        names = [n for n in names if n]
        if not names and (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                          or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            names = ["otlp"]
        exporters = [_exporter(n) for n in names if n != "none"]
        if not exporters:
            return cls(None)
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "llm-gateway"}))
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter in exporters:
            processor: SpanProcessor = BatchSpanProcessor(exporter)  # export off the loop
            provider.add_span_processor(processor)
        log.info("tracing enabled", extra={"fields": {"exporters": names}})
        return cls(provider, owns_provider=True)

    def request_span(
        self, method: str, route: str | None, headers: Mapping[str, str]
    ) -> _Scope[RequestSpan] | _Null[RequestSpan]:
        """The request's SERVER span, continuing the client's ``traceparent``.

        ``route`` is the matched route template (``/v1/chat/completions``,
        ``/v1/models/{model}``), never a raw path: span names must stay few. None or "" for an
        unmatched path names the span by the method alone, as the HTTP conventions say.
        """
        if self._tracer is None:
            return self._null_request
        parent = self._propagator.extract(headers, getter=self._getter)
        attributes: dict[str, AttributeValue] = {HTTP_METHOD: method}
        if route:
            attributes[HTTP_ROUTE] = route
        api_route = ROUTES.get(route) if route else None
        span = self._tracer.start_span(
            f"{method} {route}" if route else method, context=parent, kind=SpanKind.SERVER,
            attributes=attributes,
        )
        handle = RequestSpan(span, api_route.operation if api_route else None)
        ctx = otel_context.set_value(_REQUEST_HANDLE, handle, trace.set_span_in_context(span, parent))
        return _Scope(span, ctx, handle)

    def stage(self, name: str) -> _Scope[None] | _Null[None]:
        """A child span for one pipeline stage: ``auth``, ``limits``, ``queue``, ``relay``..."""
        if self._tracer is None or _UNSAMPLED.get():
            return self._null_stage
        span = self._tracer.start_span(name, kind=SpanKind.INTERNAL)
        return _Scope(span, trace.set_span_in_context(span), None)

    def attempt_span(
        self, deployment: str, provider_kind: str, upstream_model: str, attempt_no: int,
        *, operation: str | None = None,
    ) -> _Scope[AttemptSpan] | _Null[AttemptSpan]:
        """A CLIENT span per upstream attempt, named ``"{operation} {upstream_model}"`` as the
        GenAI conventions ask. ``operation`` defaults to the route's (chat, embeddings, ...)."""
        if self._tracer is None or _UNSAMPLED.get():
            return self._null_attempt
        request = otel_context.get_value(_REQUEST_HANDLE)
        if isinstance(request, RequestSpan):
            request._provider, request._response_model = provider_kind, upstream_model
            operation = operation or request._operation
        operation = operation or "chat"
        span = self._tracer.start_span(
            f"{operation} {upstream_model}", kind=SpanKind.CLIENT,
            attributes={
                GEN_AI_OPERATION_NAME: operation, GEN_AI_PROVIDER_NAME: provider_kind,
                GEN_AI_REQUEST_MODEL: upstream_model, "gateway.deployment": deployment,
                "gateway.attempt": attempt_no,
            },
        )
        return _Scope(span, trace.set_span_in_context(span), AttemptSpan(span))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Put the current span's ``traceparent`` (and ``tracestate``) into upstream headers,
        replacing the client's copies. Call inside ``attempt_span``. No-op when disabled."""
        if self._tracer is None or not trace.get_current_span().get_span_context().is_valid:
            return
        for name in [n for n in headers if n.lower() in _TRACE_HEADERS]:
            del headers[name]
        self._propagator.inject(headers)

    async def close(self) -> None:
        """Flush and stop the exporters (in a thread: the flush is blocking I/O)."""
        if self._owns and self._provider is not None:
            provider, self._provider = self._provider, None
            await asyncio.to_thread(provider.shutdown)


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter '{name}' "
                                 "(use otlp, console or none)")
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol.strip() != "http/protobuf":
        raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only http/protobuf "
                                 "is installed (port 4318, not gRPC's 4317)")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # an optional dependency in some installs
        raise TracingConfigError("OTLP export needs opentelemetry-exporter-otlp-proto-http") from exc
    return OTLPSpanExporter()


class TraceLogFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the current span to a record's ``fields`` (what
    logs.JsonFormatter prints), so any log line joins its trace and the access line. Attach to
    the JSON handler; it changes nothing while tracing is off (no valid current span)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            fields = getattr(record, "fields", None)
            merged = dict(fields) if isinstance(fields, dict) else {}
            merged.setdefault("trace_id", format(ctx.trace_id, "032x"))
            merged.setdefault("span_id", format(ctx.span_id, "016x"))
            record.fields = merged
        return True
