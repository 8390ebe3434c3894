"""Tracing: span tree, W3C traceparent in and out, GenAI attributes, no content by default,
error judgement, the OTEL_* environment, and the disabled path being a no-op."""

from __future__ import annotations

import asyncio
import logging
import timeit
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from gateway.errors import GatewayError
from gateway.observability.tracing import TraceLogFilter, Tracing, TracingConfigError
from gateway.request.record import AttemptRecord, RequestRecord
from gateway.upstream.sse import Usage

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
CHAT = "/v1/chat/completions"
PROMPT = "my secret prompt: the launch codes are 0000"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider)
    provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": "req-1", "started": 0.0, "route": CHAT, "tenant": "acme",
        "model": "gpt-test", "deployment": "main/upstream-gpt", "priority": "high",
        "status": 200, "attempts": 1, "usage": Usage(120, 30, reported=True),
        "agent_session": "run-42", "agent_step": "7", "cost": 0.001, "queue_s": 0.01,
    }
    base.update(fields)
    return RequestRecord(**base)


def run_request(tracing: Tracing, headers: Mapping[str, str],
                upstream_headers: dict[str, str]) -> None:
    """What the pipeline does, in order."""
    with tracing.request_span("POST", CHAT, headers) as span:
        with tracing.stage("auth"):
            pass
        with tracing.stage("limits"):
            pass
        with tracing.stage("queue"):
            pass
        with tracing.attempt_span("main/upstream-gpt", "openai", "upstream-gpt", 1) as attempt:
            tracing.inject(upstream_headers)
            with tracing.stage("relay"):
                pass
            attempt.finish(AttemptRecord("main/upstream-gpt", "success", 0.5, 0.1), status=200,
                           input_tokens=120, output_tokens=30)
        span.finish(record())


def test_span_tree_and_traceparent_in_and_out(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    upstream = {"Traceparent": "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01",
                "tracestate": "vendor=client", "x-other": "kept"}
    run_request(tracing, CIMultiDict({"traceparent": TRACEPARENT}), upstream)
    spans = by_name(exporter)
    assert set(spans) == {"POST /v1/chat/completions", "auth", "limits", "queue",
                          "chat upstream-gpt", "relay"}
    server, attempt = spans["POST /v1/chat/completions"], spans["chat upstream-gpt"]
    assert server.kind is SpanKind.SERVER and attempt.kind is SpanKind.CLIENT
    # continued from the client: same trace, the client's span is the remote parent
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == CLIENT_SPAN
    for name in ("auth", "limits", "queue", "chat upstream-gpt"):
        assert parent_id(spans[name]) == server.context.span_id, name
    assert parent_id(spans["relay"]) == attempt.context.span_id
    assert {s.context.trace_id for s in spans.values()} == {server.context.trace_id}
    # forwarded upstream: the attempt span is the parent; the client's copies are replaced
    attempt_id = format(attempt.context.span_id, "016x")
    assert upstream["traceparent"] == f"00-{TRACE_ID}-{attempt_id}-01"
    assert "Traceparent" not in upstream and "tracestate" not in upstream
    assert upstream["x-other"] == "kept"


def test_plain_dict_headers_are_read_case_insensitively(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.request_span("POST", CHAT, {"TraceParent": TRACEPARENT}):
        pass
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_a_request_without_traceparent_starts_a_new_trace(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    upstream: dict[str, str] = {}
    run_request(tracing, CIMultiDict(), upstream)
    server = by_name(exporter)["POST /v1/chat/completions"]
    assert server.parent is None
    assert upstream["traceparent"].split("-")[1] == format(server.context.trace_id, "032x")


def test_genai_and_gateway_attributes(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    run_request(tracing, {}, {})
    spans = by_name(exporter)
    server = dict(spans["POST /v1/chat/completions"].attributes or {})
    assert server["gen_ai.operation.name"] == "chat"
    assert server["gen_ai.request.model"] == "gpt-test"  # what the client asked for
    assert server["gen_ai.response.model"] == "upstream-gpt"  # what answered
    assert server["gen_ai.provider.name"] == "openai"
    assert server["gen_ai.usage.input_tokens"] == 120
    assert server["gen_ai.usage.output_tokens"] == 30
    assert server["gen_ai.conversation.id"] == "run-42"
    assert server["gateway.agent.session"] == "run-42"
    assert server["gateway.agent.step"] == "7"
    assert server["gateway.request_id"] == "req-1"
    assert server["gateway.tenant"] == "acme"
    assert server["http.response.status_code"] == 200
    assert server["http.request.method"] == "POST" and server["http.route"] == CHAT
    assert spans["POST /v1/chat/completions"].status.status_code is StatusCode.UNSET
    attempt = dict(spans["chat upstream-gpt"].attributes or {})
    assert attempt["gen_ai.operation.name"] == "chat"
    assert attempt["gen_ai.request.model"] == "upstream-gpt"
    assert attempt["gen_ai.provider.name"] == "openai"
    assert attempt["gen_ai.usage.output_tokens"] == 30
    assert attempt["gateway.deployment"] == "main/upstream-gpt"
    assert attempt["gateway.attempt"] == 1


def test_unmatched_paths_name_the_span_by_method_only(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.request_span("GET", None, {}) as span:
        span.finish(record(route="/wp-admin/../etc/passwd", status=404, outcome="rejected"))
    (server,) = exporter.get_finished_spans()
    assert server.name == "GET"
    assert "http.route" not in (server.attributes or {})
    assert server.status.status_code is StatusCode.UNSET  # a 404 is the client's problem


def test_embeddings_route_names_its_operation(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.request_span("POST", "/v1/embeddings", {}) as span:
        with tracing.attempt_span("main/upstream-embed", "openai", "upstream-embed", 1):
            pass
        span.finish(record(route="/v1/embeddings"))
    spans = by_name(exporter)
    assert "embeddings upstream-embed" in spans
    server = spans["POST /v1/embeddings"].attributes or {}
    assert server["gen_ai.operation.name"] == "embeddings"


def _all_text(exporter: InMemorySpanExporter) -> str:
    parts: list[str] = []
    for span in exporter.get_finished_spans():
        parts.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            parts.extend(str(v) for v in (event.attributes or {}).values())
    return "\n".join(parts)


def test_no_content_on_spans_unless_opted_in(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    messages = f'[{{"role": "user", "content": "{PROMPT}"}}]'
    with tracing.request_span("POST", CHAT, {}) as span:
        span.finish(record(), input_messages=messages, output_messages="the answer")
    assert PROMPT not in _all_text(exporter)
    assert "the answer" not in _all_text(exporter)
    exporter.clear()
    with tracing.request_span("POST", CHAT, {}) as span:
        span.finish(record(), capture_content=True, input_messages=messages,
                    output_messages="the answer")
    (server,) = exporter.get_finished_spans()
    assert server.attributes is not None
    assert server.attributes["gen_ai.input.messages"] == messages
    assert server.attributes["gen_ai.output.messages"] == "the answer"


def test_errors_refusals_and_cancellation_are_judged_apart(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.request_span("POST", CHAT, {}) as span:
        with pytest.raises(GatewayError), tracing.stage("limits"):
            raise GatewayError(429, "slow down", code="rate_limit_exceeded")
        with pytest.raises(GatewayError), tracing.attempt_span("d/m", "openai", "m", 1):
            raise GatewayError(504, "timed out", code="upstream_timeout")
        with pytest.raises(asyncio.CancelledError), tracing.stage("relay"):
            raise asyncio.CancelledError
        with pytest.raises(RuntimeError), tracing.stage("queue"):
            raise RuntimeError("bug")
        span.finish(record(status=502, outcome="upstream_error", error_code="upstream_timeout"))
    spans = by_name(exporter)
    limits = spans["limits"]
    assert (limits.attributes or {})["error.type"] == "rate_limit_exceeded"
    assert limits.status.status_code is StatusCode.UNSET  # a refusal, not a failure
    assert spans["chat m"].status.status_code is StatusCode.ERROR
    relay = spans["relay"]
    assert (relay.attributes or {})["gateway.cancelled"] is True
    assert relay.status.status_code is StatusCode.UNSET
    queue = spans["queue"]
    assert queue.status.status_code is StatusCode.ERROR
    assert [e.name for e in queue.events] == ["exception"]
    server = spans["POST /v1/chat/completions"]
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "upstream_timeout"


def test_failed_attempt_is_an_error_span(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.attempt_span("d/m", "anthropic", "m", 2) as attempt:
        attempt.finish(AttemptRecord("d/m", "http_529", 0.2, 0.2), status=529)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "http_529"
    assert (span.attributes or {})["gen_ai.provider.name"] == "anthropic"


async def test_concurrent_requests_get_separate_traces(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    async def one(n: int) -> None:
        with tracing.request_span("POST", CHAT, {}) as span:
            with tracing.stage(f"queue-{n}"):
                await asyncio.sleep(0.01)
            span.finish(record(request_id=f"req-{n}"))

    await asyncio.gather(one(1), one(2))
    spans = by_name(exporter)
    for n in (1, 2):
        queue = spans[f"queue-{n}"]
        assert queue.parent is not None
        parents = [s for s in exporter.get_finished_spans()
                   if s.context.span_id == queue.parent.span_id]
        assert (parents[0].attributes or {})["gateway.request_id"] == f"req-{n}"
    assert len({s.context.trace_id for s in exporter.get_finished_spans()}) == 2


def test_sampled_out_requests_still_propagate(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    upstream: dict[str, str] = {}
    run_request(tracing, {}, upstream)
    assert exporter.get_finished_spans() == ()
    flags = int(upstream["traceparent"].rsplit("-", 1)[1], 16)
    assert flags & 1 == 0  # not sampled, yet the upstream still joins the same trace


def test_log_filter_and_log_fields_carry_the_trace(tracing: Tracing) -> None:
    log_filter = TraceLogFilter()
    outside = logging.LogRecord("x", logging.INFO, "f", 1, "msg", None, None)
    log_filter.filter(outside)
    assert not hasattr(outside, "fields")
    with tracing.request_span("POST", CHAT, {"traceparent": TRACEPARENT}) as span:
        inside = logging.LogRecord("x", logging.INFO, "f", 1, "msg", None, None)
        vars(inside)["fields"] = {"request_id": "req-1"}  # as logging's extra= would
        log_filter.filter(inside)
        assert span.trace_id == TRACE_ID
        assert span.log_fields()["trace_id"] == TRACE_ID
    assert vars(inside)["fields"] == {"request_id": "req-1", "trace_id": TRACE_ID,
                             "span_id": span.log_fields()["span_id"]}


def test_disabled_tracing_is_a_no_op() -> None:
    tracing = Tracing(None)
    assert not tracing.enabled
    headers = {"traceparent": TRACEPARENT}
    upstream = {"traceparent": TRACEPARENT}
    with tracing.request_span("POST", CHAT, headers) as span:
        assert not trace.get_current_span().get_span_context().is_valid  # nothing attached
        with tracing.stage("auth"):
            pass
        with tracing.attempt_span("d/m", "openai", "m", 1) as attempt:
            tracing.inject(upstream)
            attempt.finish(AttemptRecord("d/m", "success", 0.1))
        span.finish(record(), capture_content=True, input_messages=PROMPT)
        assert span.trace_id is None and span.log_fields() == {}
    assert upstream == {"traceparent": TRACEPARENT}  # the client's passes through untouched
    # shared null objects: nothing is allocated per request
    assert tracing.request_span("GET", "/x", {}) is tracing.request_span("POST", CHAT, {})
    assert tracing.stage("a") is tracing.stage("b")

    def one() -> None:
        with tracing.request_span("POST", CHAT, headers) as s:
            with tracing.stage("auth"), tracing.stage("limits"), tracing.stage("queue"):
                pass
            with tracing.attempt_span("d/m", "openai", "m", 1) as a:
                tracing.inject(upstream)
                a.finish()
            s.finish(record())

    per_request = min(timeit.repeat(one, number=2000, repeat=3)) / 2000
    assert per_request < 50e-6  # measured ~3 µs; generous for shared CI machines


def test_from_env_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert not Tracing.from_env().enabled  # nothing configured: no provider, no exporter
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not Tracing.from_env().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not Tracing.from_env().enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "carrier-pigeon")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    with pytest.raises(TracingConfigError, match="carrier-pigeon"):
        Tracing.from_env()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(TracingConfigError, match="http/protobuf"):
        Tracing.from_env()


async def test_from_env_builds_an_otlp_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9/")  # never reached
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    tracing = Tracing.from_env()
    try:
        assert tracing.enabled
        assert tracing._provider is not None
        assert tracing._provider.resource.attributes["service.name"] == "llm-gateway"
    finally:
        await tracing.close()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-eu-1")
    tracing = Tracing.from_env()
    try:
        assert tracing._provider is not None
        assert tracing._provider.resource.attributes["service.name"] == "gw-eu-1"
    finally:
        await tracing.close()
