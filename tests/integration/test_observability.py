"""Metrics, spans, access-log timings, /admin/status and CORS, read after real requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import create_app
from gateway.mock.upstream import RECORDED
from gateway.observability.tracing import Tracing
from gateway.request.auth import hash_key
from gateway.state import StateBackend
from gateway.upstream.sse import Usage
from tests.gwtest import ACME_KEY, auth, chat, log_fields, policy
from tests.plugin_gateway import GatewayClient, MakeGateway

ADMIN_KEY = "sk-admin-test"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


@pytest.fixture
def traced(exporter: InMemorySpanExporter) -> Tracing:
    exporter.clear()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider)


async def _metrics(gw: GatewayClient) -> str:
    resp = await gw.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return await resp.text()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exposed")


async def test_metrics_count_requests_tokens_rejections_and_retries(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer, upstream_url: str
) -> None:
    failing = web.Application()

    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "down"}}, status=503)

    failing.router.add_post("/v1/chat/completions", unavailable)
    broken = await aiohttp_server(failing)
    gw = await make_gateway(
        providers={"broken": {"kind": "openai", "base_url": str(broken.make_url("/v1"))}},
        models={"gpt-test": {"deployments": [{"provider": "broken", "model": "b"},
                                             {"provider": "main", "model": "upstream-gpt"}]}},
        tenants={"acme": {"limits": {"requests_per_minute": 60, "request_burst": 3}}},
    )
    ok = await gw.post("/v1/chat/completions", json=chat(text="1"), headers=auth())
    assert ok.status == 200  # failed over from the broken deployment, invisibly
    stream = await gw.post("/v1/chat/completions", json=chat(text="2", stream=True),
                           headers=auth(**{"x-mock-chunks": "4"}))
    await stream.read()
    await gw.post("/v1/chat/completions", json=chat(text="3"), headers=auth())
    limited = await gw.post("/v1/chat/completions", json=chat(text="4"), headers=auth())
    assert limited.status == 429
    text = await _metrics(gw)
    assert _value(text, 'gateway_requests_total{model="gpt-test",outcome="ok",'
                        'priority="normal",tenant="acme"}') == 3
    assert _value(text, 'gateway_rejections_total{priority="normal",reason="rate_limited",'
                        'tenant="acme"}') == 1
    assert _value(text, 'gateway_tokens_total{direction="output",model="gpt-test",'
                        'tenant="acme"}') >= 4
    assert _value(text, 'gateway_upstream_attempts_total{deployment="broken/b",'
                        'outcome="http_5xx"}') >= 1
    assert _value(text, 'gateway_retries_total{deployment="broken/b",reason="http_5xx"}') >= 1
    assert _value(text, 'gateway_time_to_first_token_seconds_count{model="gpt-test",'
                        'priority="normal"}') == 1
    assert 'gateway_queue_wait_seconds_bucket{le="0.001",priority="normal"}' in text
    assert "gateway_concurrency_limit{" in text and "gateway_breaker_state{" in text
    assert "gateway_event_loop_lag_seconds" in text
    assert ACME_KEY not in text and "upstream-gpt" not in text.split("deployment=")[0]


async def test_spans_continue_the_client_trace_and_reach_the_upstream(
    upstream_url: str, aiohttp_client: AiohttpClient, mock_upstream: TestServer, traced: Tracing,
    exporter: InMemorySpanExporter,
) -> None:
    gw = await aiohttp_client(create_app(policy(upstream_url), tracing=traced))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    secret = "the prompt that must not leak"
    resp = await gw.post("/v1/chat/completions", json=chat(text=secret), headers=auth(**{
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Agent-Session": "run-7",
        "X-Agent-Step": "4"}))
    assert resp.status == 200
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {"auth", "limits", "queue", "chat upstream-gpt"} <= names
    server = next(s for s in spans if s.parent is None or s.parent.span_id == 0x00f067aa0ba902b7)
    assert format(server.context.trace_id, "032x") == trace_id
    assert all(format(s.context.trace_id, "032x") == trace_id for s in spans)
    attrs = server.attributes or {}
    assert attrs.get("gen_ai.usage.input_tokens") and attrs.get("gateway.agent.session") == "run-7"
    attempt = next(s for s in spans if s.name == "chat upstream-gpt")
    # The upstream saw the attempt span as its parent, not the client's span.
    sent = mock_upstream.app[RECORDED][-1].headers["traceparent"]
    assert sent.split("-")[1] == trace_id and sent.split("-")[2] == format(
        attempt.context.span_id, "016x")
    for span in spans:
        assert secret not in repr(dict(span.attributes or {}))


async def test_access_log_explains_a_slow_step(
    gw: GatewayClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=auth(**{
        "x-mock-ttft-ms": "150", "x-mock-chunks": "2", "X-Agent-Session": "s1",
        "X-Agent-Step": "9"}))
    await resp.read()
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    assert line["agent_session"] == "s1" and line["agent_step"] == "9"
    for key in ("limits_ms", "queue_ms", "upstream_first_byte_ms", "ttft_ms", "duration_ms"):
        assert line[key] is not None, key
    assert line["ttft_ms"] >= 140
    assert line["attempt_log"][0]["deployment"] == "main/upstream-gpt"
    assert 0 < line["context_use"] < 1


async def test_context_window_overflow_is_refused_before_any_upstream_cost(
    make_gateway: MakeGateway, mock_upstream: TestServer
) -> None:
    gw = await make_gateway(models={"gpt-test": {"context_window": 100}})
    before = len(mock_upstream.app[RECORDED])
    resp = await gw.post("/v1/chat/completions", json=chat(text="word " * 500), headers=auth())
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "context_length_exceeded"
    assert len(mock_upstream.app[RECORDED]) == before


async def test_admin_status_needs_the_admin_key(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)]},
                            tenants={"acme": {"budget": {"daily_tokens": 10_000}}})
    await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert (await gw.get("/admin/status")).status == 401
    assert (await gw.get("/admin/status", headers=auth())).status == 401  # a tenant key
    resp = await gw.get("/admin/status", headers=auth(ADMIN_KEY))
    assert resp.status == 200
    data = await resp.json()
    assert data["state"]["limits_mode"] == "global"
    assert data["tenants"]["acme"]["budget_remaining"]["daily_tokens"]["limit"] == 10_000
    assert data["breakers"]["main/upstream-gpt"]["state"] == "closed"
    assert set(data["admission"]["classes"]) == {"critical", "high", "normal", "low"}
    # and an admin key is not a tenant key
    refused = await gw.post("/v1/chat/completions", json=chat(), headers=auth(ADMIN_KEY))
    assert refused.status == 401


async def test_metrics_can_be_switched_off(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"metrics": False})
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    assert (await gw.get("/metrics")).status == 404
    on = await make_gateway()
    assert (await on.get("/metrics")).status == 200


async def test_metrics_can_require_the_admin_key(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"metrics_need_admin_key": True},
                            admin={"api_keys": [hash_key(ADMIN_KEY)]})
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    assert (await gw.get("/metrics")).status == 401
    assert (await gw.get("/metrics", headers=auth())).status == 401  # a tenant key
    scraped = await gw.get("/metrics", headers=auth(ADMIN_KEY))
    assert scraped.status == 200 and "gateway_requests_total" in await scraped.text()


async def test_admin_api_is_off_without_admin_keys(gw: GatewayClient) -> None:
    assert (await gw.get("/admin/status", headers=auth(ADMIN_KEY))).status == 403


async def test_cors_is_off_by_default_and_exact_when_configured(
    gw: GatewayClient, make_gateway: MakeGateway
) -> None:
    resp = await gw.post("/v1/chat/completions", json=chat(),
                         headers=auth(Origin="https://app.example"))
    assert "Access-Control-Allow-Origin" not in resp.headers
    gw2 = await make_gateway(server={"cors_origins": ["https://app.example"]})
    pre = await gw2.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = await gw2.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status == 403
    resp = await gw2.post("/v1/chat/completions", json=chat(stream=True),
                          headers=auth(Origin="https://app.example"))
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    await resp.read()


async def test_gateway_status_cli_prints_a_table(make_gateway: MakeGateway) -> None:
    import subprocess
    import sys

    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)]})
    await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    url = str(gw.make_url("")).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "status", "--url", url, "--admin-key", ADMIN_KEY,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    text = out.decode()
    assert "acme" in text and "main/upstream-gpt" in text and "critical" in text
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "status", "--url", url, "--admin-key", "nope",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    await asyncio.wait_for(bad.communicate(), 20)
    assert bad.returncode == 1


async def test_budget_remaining_is_corrected_once_the_request_settles(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    # max_tokens 4000 reserves ~4000 tokens at admission; the answer uses a handful. Once
    # settled, the gauge and /admin/status say what is really left, not the reservation.
    from tests.plugin_gateway import settled

    gw = await make_gateway(state=backend, admin={"api_keys": [hash_key(ADMIN_KEY)]},
                            tenants={"acme": {"budget": {"daily_tokens": 20_000,
                                                         "daily_cost": 50.0}}})
    resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=4000), headers=auth())
    assert resp.status == 200
    usage = (await resp.json())["usage"]
    await settled(gw)
    text = await _metrics(gw)
    tokens = 'gateway_budget_remaining{budget="daily_tokens",tenant="acme"}'
    assert _value(text, tokens) == 20_000 - usage["total_tokens"]
    # gpt-test: 1.0 per million input tokens, 2.0 per million output tokens
    spent = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    cost = _value(text, 'gateway_budget_remaining{budget="daily_cost",tenant="acme"}')
    assert abs(cost - (50.0 - spent)) < 2e-6  # micro-units, rounded up per request
    status = await (await gw.get("/admin/status", headers=auth(ADMIN_KEY))).json()
    figure = status["tenants"]["acme"]["budget_remaining"]["daily_tokens"]
    assert figure == {"remaining": 20_000 - usage["total_tokens"], "limit": 20_000}


async def test_remembered_budget_is_refunded_exactly_once_also_in_degraded_mode() -> None:
    from tests.integration.test_retry_after_truth import World

    world = World({"budget": {"daily_tokens": 100_000}})
    budgets = world.limiter._budgets
    hold = await world.admit(max_tokens=4000)
    assert budgets["acme"]["daily_tokens"]["remaining"] == 100_000 - hold.reserved_tokens
    used = Usage(input_tokens=2, output_tokens=1000)
    await world.limiter.settle(hold, used, 0)
    await world.limiter.settle(hold, used, 0)  # a second settlement is a no-op
    assert budgets["acme"]["daily_tokens"]["remaining"] == 100_000 - 1002
    # degraded (local counters): the same correction, and the journal replay adds none
    world.limiter.degraded.enter("test")
    hold = await world.admit(max_tokens=4000, text="another")
    assert hold.mode == "local"
    local_before = budgets["acme"]["daily_tokens"]["remaining"]
    await world.limiter.settle(hold, used, 0)
    corrected = local_before + hold.reserved_tokens - 1002
    assert budgets["acme"]["daily_tokens"]["remaining"] == corrected
    assert await world.limiter.degraded.recover_once()  # the journal replayed to the store
    assert world.limiter.degraded.journal_size == 0
    assert budgets["acme"]["daily_tokens"]["remaining"] == corrected
    # fail_open counts nothing: the figure is the store's last word, not "nothing left"
    from gateway.config.limits import Degraded
    world.limiter.degraded.policy = Degraded(action="fail_open")
    world.limiter.degraded.enter("test")
    hold = await world.admit(max_tokens=4000, text="open")
    assert hold.mode == "fail_open"
    figure = budgets["acme"]["daily_tokens"]["remaining"]
    assert 90_000 < figure <= 100_000 - hold.reserved_tokens  # was 0: "all spent"
    assert "x-gateway-budget-warning" not in hold.headers
    await world.limiter.settle(hold, used, 0)
    assert budgets["acme"]["daily_tokens"]["remaining"] == figure + hold.reserved_tokens - 1002
    world.limiter.degraded.policy = Degraded()
    assert await world.limiter.degraded.recover_once()
    # a settlement of yesterday's reservation does not touch today's figure
    hold = await world.admit(max_tokens=4000, text="late")
    world.advance(86_400)
    await world.admit(text="today")
    today = dict(budgets["acme"]["daily_tokens"])
    await world.limiter.settle(hold, used, 0)
    assert budgets["acme"]["daily_tokens"] == today


async def test_a_relayed_upstream_error_is_not_counted_ok(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    # The upstream answers 429/503/500 on every attempt: the gateway relays its answer, and
    # the access log and the request counter say it failed upstream.
    caplog.set_level(logging.INFO, logger="gateway.access")
    for status in ("429", "503", "500"):  # a fresh gateway each: no breaker opened by the last
        gw = await make_gateway(retries={"backoff_base_s": 0.001, "backoff_cap_s": 0.002})
        resp = await gw.post("/v1/chat/completions", json=chat(text=status),
                             headers=auth(**{"x-mock-status": status}))
        assert resp.status == int(status) and resp.headers["x-should-retry"] == "false"
        line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
        assert line["status"] == int(status) and line["attempts"] >= 1
        assert line["outcome"] == "upstream_error" and line["error_code"]  # the upstream's
        text = await _metrics(gw)
        assert _value(text, 'gateway_requests_total{model="gpt-test",outcome="upstream_error",'
                            'priority="normal",tenant="acme"}') == 1
        assert 'outcome="ok"' not in text.split("gateway_requests_total")[1].split("# HELP")[0]
    # the upstream refusing this request (its 400) is not counted as the upstream failing
    gw = await make_gateway()
    resp = await gw.post("/v1/chat/completions", json=chat(text="bad"),
                         headers=auth(**{"x-mock-status": "400"}))
    assert resp.status == 400
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    assert line["outcome"] == "upstream_rejected" and line["error_code"]
    # Anthropic's error bodies have a type and no code. One attempt: a retry of a 529 can meet
    # the deployment cooling down and get the gateway's own 503 instead (a CI run did).
    gw = await make_gateway(retries={"max_attempts": 1})
    resp = await gw.post("/v1/messages", json={
        "model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        headers=auth(**{"x-mock-status": "529"}))
    assert resp.status == 529
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    assert line["outcome"] == "upstream_error" and line["error_code"] == "overloaded_error"


async def test_status_table_prints_budgets_as_integers_with_their_used_share(
    make_gateway: MakeGateway,
) -> None:
    from gateway.app.admin import render_table

    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)]}, tenants={"acme": {
        "limits": {"tokens_per_minute": 5_000_000,
                   "per_session": {"requests_per_minute": 20, "max_concurrent": 2}},
        "budget": {"daily_tokens": 500_000_000, "daily_cost": 50.0}}})
    resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=4000), headers=auth())
    usage = (await resp.json())["usage"]
    from tests.plugin_gateway import settled
    await settled(gw)
    data = await (await gw.get("/admin/status", headers=auth(ADMIN_KEY))).json()
    assert data["tenants"]["acme"]["limits"]["per_session"] == {
        "requests_per_minute": 20, "tokens_per_minute": None, "max_concurrent": 2}
    table = render_table(data)
    assert "e+" not in table
    left = 500_000_000 - usage["total_tokens"]
    assert f"daily_tokens {left:,}/500,000,000 (0.0% used)" in table
    assert "daily_cost 49.99" in table and "/50 (0.0% used)" in table
    assert "5,000,000" in table  # the tenant's tokens per minute
    session = next(line for line in table.splitlines() if "per session" in line)
    assert session.split()[2:] == ["20", "-", "2"]
    assert "replicas 1" in table and "workers" not in table
    # under --workers 2 (the status merged across the group): the workers, not "replicas 1"
    grouped = render_table({**data, "workers": [{"answered": True}, {"answered": True}]})
    state_line = next(line for line in grouped.splitlines() if line.startswith("state:"))
    assert "workers 2" in state_line and "replicas" not in state_line


async def test_access_log_shows_the_wait_of_a_request_that_ran_out_of_time_in_the_queue(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that queued for a slot and was refused there (its deadline, a shed) logs
    where it queued and for how long: that wait is the whole story of its latency."""
    gw = await make_gateway(admission={"concurrency": {
        "min_limit": 1, "initial_limit": 1, "max_limit": 1}})
    caplog.set_level(logging.INFO, logger="gateway.access")
    holder = asyncio.create_task(gw.post("/v1/chat/completions", json=chat(), headers=auth(
        **{"x-mock-latency-ms": "2500"})))
    await asyncio.sleep(0.2)
    resp = await gw.post("/v1/chat/completions", json=chat(),
                         headers=auth(**{"X-Request-Timeout": "1.3"}))
    assert resp.status == 504
    await resp.read()
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    assert line["status"] == 504 and line["deployment"] == "main/upstream-gpt"
    assert line["queue_ms"] is not None and line["queue_ms"] >= 200, line
    await (await holder).read()
    # The queue-wait histogram (and the alert on it) counts admitted requests' waits only.
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_queue_wait_seconds_count{priority="normal"} 1.0' in metrics
