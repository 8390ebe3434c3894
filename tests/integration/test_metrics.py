"""GatewayMetrics: series and labels made from RequestRecords, bounded label values, pulled
gauges, the /metrics handler's content negotiation. Every test builds its own registry."""

from __future__ import annotations

import gzip
import logging
import random
import string
from typing import Any

import orjson
import prometheus_client
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from gateway.config.model import GatewayConfig, parse_config
from gateway.observability.labels import (
    ATTEMPT_OUTCOMES,
    BREAKER_STATES,
    BUDGET_KINDS,
    OUTCOMES,
    PRIORITIES,
    REJECTION_REASONS,
    SHED_REASONS,
    attempt_outcome,
)
from gateway.observability.metrics import GatewayMetrics, metrics_handler
from gateway.observability.pulled import PULLED_GAUGES, AdmissionSnapshot
from gateway.request.auth import hash_key
from gateway.request.record import AttemptRecord, RequestRecord
from gateway.upstream.sse import Usage
from gateway.usage import DIMENSIONS
from tests.gwtest import auth, chat
from tests.plugin_gateway import MakeGateway

MAIN = "main/upstream-gpt"
BACKUP = "backup/upstream-gpt-b"


def make_config(extra_tenant: str | None = None) -> GatewayConfig:
    tenants: dict[str, Any] = {
        "acme": {"api_keys": [hash_key("k-acme")]},
        "umbrella": {"api_keys": [hash_key("k-umbrella")], "models": ["gpt-test"]},
    }
    if extra_tenant:
        tenants[extra_tenant] = {"api_keys": [hash_key("k-" + extra_tenant)]}
    return parse_config({
        "providers": {
            "main": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"},
            "backup": {"kind": "openai", "base_url": "http://127.0.0.1:2/v1"},
            "claude": {"kind": "anthropic", "base_url": "http://127.0.0.1:3"},
        },
        "models": {
            "gpt-test": {"deployments": [{"provider": "main", "model": "upstream-gpt"},
                                         {"provider": "backup", "model": "upstream-gpt-b"}],
                         "context_window": 1000},
            "claude-test": {"deployments": [{"provider": "claude", "model": "upstream-claude"}]},
        },
        "tenants": tenants,
    })


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(make_config(), CollectorRegistry())


def value(m: GatewayMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {"request_id": "r1", "started": 0.0, "route": "/v1/chat/completions",
                            "tenant": "acme", "model": "gpt-test", "priority": "normal",
                            "status": 200, "outcome": "ok"}
    base.update(fields)
    return RequestRecord(**base)


def samples(m: GatewayMetrics) -> list[Any]:
    return [s for family in m.registry.collect() for s in family.samples]


def test_success_feeds_counters_histograms_and_context_use(metrics: GatewayMetrics) -> None:
    metrics.observe_request(record(
        deployment=MAIN, attempts=1, cost=0.0042,
        usage=Usage(400, 120, reported=True, input_seen=True, output_seen=True),
        limits_s=0.0004, queue_s=0.01, first_byte_s=0.3, upstream_s=0.9, total_s=0.95,
        prompt_tokens_estimate=380, context_window=1000,
    ))
    labels = {"tenant": "acme", "model": "gpt-test"}
    assert value(metrics, "gateway_requests_total", priority="normal", outcome="ok",
                 **labels) == 1
    assert value(metrics, "gateway_tokens_total", direction="input", **labels) == 400
    assert value(metrics, "gateway_tokens_total", direction="output", **labels) == 120
    assert value(metrics, "gateway_cost_total", **labels) == pytest.approx(0.0042)
    assert value(metrics, "gateway_limits_check_duration_seconds_count") == 1
    assert value(metrics, "gateway_queue_wait_seconds_sum", priority="normal") == 0.01
    assert value(metrics, "gateway_upstream_first_byte_seconds_count", deployment=MAIN) == 1
    assert value(metrics, "gateway_upstream_duration_seconds_sum", deployment=MAIN) == 0.9
    assert value(metrics, "gateway_request_duration_seconds_count", priority="normal",
                 stream="false") == 1
    # the step that did not run (no stream: no TTFT) leaves no sample
    assert value(metrics, "gateway_time_to_first_token_seconds_count", model="gpt-test",
                 priority="normal") is None
    ratio = "gateway_context_window_usage_ratio"
    assert value(metrics, f"{ratio}_sum", model="gpt-test", phase="estimated") == 0.38
    assert value(metrics, f"{ratio}_sum", model="gpt-test", phase="actual") == 0.4
    assert value(metrics, f"{ratio}_bucket", model="gpt-test", phase="actual", le="0.3") == 0
    assert value(metrics, f"{ratio}_bucket", model="gpt-test", phase="actual", le="0.4") == 1


def test_a_shed_is_a_reason_and_its_answer_a_rejection(metrics: GatewayMetrics) -> None:
    """The two calls a shed makes (admission with its reason, the server with the tenant); the
    wiring end to end is tests/integration/test_overload.py's."""
    metrics.shed("cohort", "low")  # admission: the reason
    metrics.rejected("overloaded", "low", "acme")  # the server, answering: the tenant
    metrics.observe_request(record(priority="low", status=503, outcome="shed",
                                   error_code="overloaded", total_s=0.001))
    assert value(metrics, "gateway_rejections_total", reason="overloaded", priority="low",
                 tenant="acme") == 1
    assert value(metrics, "gateway_sheds_total", priority="low", reason="cohort") == 1
    assert value(metrics, "gateway_requests_total", tenant="acme", model="gpt-test",
                 priority="low", outcome="shed") == 1
    names = {s.name for s in samples(metrics)}
    assert "gateway_upstream_duration_seconds_count" not in names  # never reached an upstream
    assert "gateway_tokens_total" not in names


def test_rejections_accept_reasons_or_error_codes(metrics: GatewayMetrics) -> None:
    metrics.rejected("rate_limit_exceeded", "high", "umbrella")
    metrics.rejected("rate_limited", "high", "umbrella")
    metrics.rejected("insufficient_quota", "normal", "acme")
    metrics.rejected("invalid_api_key")  # before authentication: no tenant, no class
    metrics.rejected("some_new_code", "normal", "acme")
    assert value(metrics, "gateway_rejections_total", reason="rate_limited", priority="high",
                 tenant="umbrella") == 2
    assert value(metrics, "gateway_rejections_total", reason="budget_exhausted",
                 priority="normal", tenant="acme") == 1
    assert value(metrics, "gateway_rejections_total", reason="unauthenticated",
                 priority="none", tenant="none") == 1
    assert value(metrics, "gateway_rejections_total", reason="other", priority="normal",
                 tenant="acme") == 1


async def test_bad_input_is_counted_as_invalid_request_for_its_tenant(
    make_gateway: MakeGateway,
) -> None:
    """400s without an error code of their own (a body that does not parse or validate) were
    counted as reason "other"."""
    gw = await make_gateway()
    bodies: list[bytes] = [b"{not json", b"", orjson.dumps({"model": "gpt-test"}),
                           orjson.dumps({**chat(), "max_tokens": -5})]
    for body in bodies:
        resp = await gw.post("/v1/chat/completions", data=body,
                             headers=auth(**{"Content-Type": "application/json"}))
        assert resp.status == 400, await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(
        await (await gw.get("/metrics")).text())}
    counted = {(s.labels["reason"], s.labels["tenant"]): s.value
               for s in families["gateway_rejections"].samples if s.name.endswith("_total")}
    assert counted == {("invalid_request", "acme"): len(bodies)}


def test_retried_then_failed_over_counts_every_attempt(metrics: GatewayMetrics) -> None:
    metrics.retry(MAIN, "http_503")
    metrics.retry(MAIN, "connect_error")
    metrics.retry_budget_exhausted(BACKUP)
    metrics.observe_request(record(
        deployment=BACKUP, attempts=3, total_s=2.0, first_byte_s=0.3, upstream_s=1.5,
        attempt_log=[AttemptRecord(MAIN, "http_503", 0.2, 0.2),
                     AttemptRecord(MAIN, "connect_error", 0.01),
                     AttemptRecord(BACKUP, "success", 1.5, 0.3)],
    ))
    attempts = "gateway_upstream_attempts_total"
    assert value(metrics, attempts, deployment=MAIN, outcome="http_5xx") == 1
    assert value(metrics, attempts, deployment=MAIN, outcome="connect_error") == 1
    assert value(metrics, attempts, deployment=BACKUP, outcome="success") == 1
    assert value(metrics, "gateway_retries_total", deployment=MAIN, reason="http_5xx") == 1
    assert value(metrics, "gateway_retries_total", deployment=MAIN, reason="connect_error") == 1
    assert value(metrics, "gateway_retry_budget_exhausted_total", deployment=BACKUP) == 1
    # per attempt, not the request-level copy of the last one
    assert value(metrics, "gateway_upstream_first_byte_seconds_count", deployment=MAIN) == 1
    assert value(metrics, "gateway_upstream_duration_seconds_count", deployment=MAIN) == 2
    assert value(metrics, "gateway_upstream_duration_seconds_count", deployment=BACKUP) == 1


def test_streamed_request_records_ttft_and_stream_label(metrics: GatewayMetrics) -> None:
    metrics.observe_request(record(stream=True, priority="high", deployment=MAIN, ttft_s=0.42,
                                   first_byte_s=0.4, upstream_s=12.0, total_s=12.1,
                                   usage=Usage(10, 900, reported=False)))
    assert value(metrics, "gateway_time_to_first_token_seconds_sum", model="gpt-test",
                 priority="high") == 0.42
    assert value(metrics, "gateway_request_duration_seconds_bucket", priority="high",
                 stream="true", le="10.0") == 0
    assert value(metrics, "gateway_request_duration_seconds_bucket", priority="high",
                 stream="true", le="20.0") == 1
    # counted (not reported) usage still counts as tokens, but not as "actual" context use
    assert value(metrics, "gateway_tokens_total", tenant="acme", model="gpt-test",
                 direction="output") == 900
    assert value(metrics, "gateway_context_window_usage_ratio_count", model="gpt-test",
                 phase="actual") is None


def test_unknown_and_missing_values_become_other_and_none(metrics: GatewayMetrics) -> None:
    metrics.observe_request(record(tenant="mallory", model="gpt-9000", priority="urgent",
                                   outcome="weird", deployment="evil/x", upstream_s=1.0))
    metrics.observe_request(record(tenant=None, model=None, priority=None, outcome="rejected",
                                   status=401))
    assert value(metrics, "gateway_requests_total", tenant="other", model="other",
                 priority="other", outcome="other") == 1
    assert value(metrics, "gateway_requests_total", tenant="none", model="none",
                 priority="none", outcome="rejected") == 1
    assert value(metrics, "gateway_upstream_duration_seconds_count", deployment="other") == 1


def test_breaker_transitions_normalise_pybreaker_state_names(metrics: GatewayMetrics) -> None:
    metrics.breaker_transition(MAIN, "closed", "open")
    metrics.breaker_transition(MAIN, "open", "half-open")
    metrics.breaker_transition(MAIN, "half-open", "closed")
    for old, new in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert value(metrics, "gateway_breaker_transitions_total", deployment=MAIN,
                     from_state=old, to_state=new) == 1


def test_shadow_reload_and_update_config(metrics: GatewayMetrics) -> None:
    metrics.shadow_decision("rate_limited")
    metrics.config_reload(False)
    assert value(metrics, "gateway_shadow_decisions_total", reason="rate_limited") == 1
    assert value(metrics, "gateway_config_last_reload_successful") == 0
    metrics.observe_request(record(tenant="initech"))
    metrics.update_config(make_config(extra_tenant="initech"))
    metrics.config_reload(True)
    metrics.observe_request(record(tenant="initech"))
    assert value(metrics, "gateway_config_reloads_total", result="failure") == 1
    assert value(metrics, "gateway_config_last_reload_successful") == 1
    for tenant in ("other", "initech"):  # before and after the reload
        assert value(metrics, "gateway_requests_total", tenant=tenant, model="gpt-test",
                     priority="normal", outcome="ok") == 1


def _random(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + "/-_", k=rng.randint(1, 40)))


def test_label_cardinality_stays_bounded_under_random_input(metrics: GatewayMetrics) -> None:
    rng = random.Random(1)
    for i in range(1000):
        pick = rng.random() < 0.3  # some configured values, mostly garbage
        metrics.observe_request(record(
            request_id=_random(rng), agent_session=_random(rng), agent_step=str(i),
            route="/" + _random(rng),
            tenant="acme" if pick else _random(rng), model="gpt-test" if pick else _random(rng),
            priority=rng.choice(["low", "high", _random(rng)]), outcome=_random(rng),
            deployment=_random(rng), stream=rng.random() < 0.5, usage=Usage(5, 5, True),
            cost=0.1, queue_s=0.1, ttft_s=0.1, total_s=0.2, upstream_s=0.1,
            prompt_tokens_estimate=10, context_window=100,
            attempt_log=[AttemptRecord(_random(rng), _random(rng), 0.1, 0.05)],
        ))
        metrics.rejected(_random(rng), _random(rng), _random(rng))
        metrics.shed(_random(rng), _random(rng))
        metrics.retry(_random(rng), _random(rng))
        metrics.breaker_transition(_random(rng), _random(rng), _random(rng))
        metrics.shadow_decision(_random(rng))
    allowed = {
        "tenant": {"acme", "umbrella"}, "model": {"gpt-test", "claude-test"},
        "deployment": {MAIN, BACKUP, "claude/upstream-claude"}, "priority": set(PRIORITIES),
        "outcome": OUTCOMES | ATTEMPT_OUTCOMES, "reason": REJECTION_REASONS | SHED_REASONS
        | ATTEMPT_OUTCOMES, "from_state": set(BREAKER_STATES), "to_state": set(BREAKER_STATES),
        "direction": {"input", "output"}, "dimension": set(DIMENSIONS),
        "stream": {"true", "false"},
        "phase": {"estimated", "actual"}, "le": None, "result": {"success", "failure"},
    }
    series = samples(metrics)
    for sample in series:
        for label, got in sample.labels.items():
            assert label in allowed, f"unexpected label {label} on {sample.name}"
            values = allowed[label]
            assert values is None or got in values | {"other", "none"}, (sample.name, label, got)
    # everything above, whatever the input, fits in a fixed number of series
    assert len(series) < 600, len(series)


def test_pulled_gauges_come_from_sources_at_scrape_time(metrics: GatewayMetrics) -> None:
    admission: AdmissionSnapshot = {
        "classes": {"critical": {"in_flight": 3, "queued": 0, "queue_target_s": 0.25},
                    "low": {"in_flight": 7, "queued": 12}, "bogus": {"in_flight": 1, "queued": 1}},
        "deployments": {MAIN: {"limit": 40.0, "in_flight": 10,
                               "provider_quota": {"remaining": 17.5}},
                        BACKUP: {"limit": 4.0, "provider_quota": None},
                        "stale/x": {"limit": 9.0}},
    }
    state = {"lag": 0.002}
    metrics.set_admission_source(lambda: admission)
    metrics.set_breaker_source(lambda: {MAIN: "half-open", BACKUP: "closed", "gone/x": "open"})
    metrics.set_budget_source(lambda: {
        "acme": {"daily_tokens": {"remaining": 50.0, "limit": 1000.0}, "weird": {
            "remaining": 1.0, "limit": 1.0}},
        "mallory": {"daily_cost": {"remaining": 1.0, "limit": 2.0}},
    })
    metrics.set_redis_source(lambda: {"degraded": True, "latency_s": 0.0008})
    metrics.set_loop_lag_source(lambda: state["lag"])
    assert value(metrics, "gateway_in_flight_requests", priority="low") == 7
    assert value(metrics, "gateway_queued_requests", priority="low") == 12
    assert value(metrics, "gateway_queue_target_seconds", priority="critical") == 0.25
    assert value(metrics, "gateway_concurrency_limit", deployment=MAIN) == 40
    assert value(metrics, "gateway_deployment_in_flight_requests", deployment=MAIN) == 10
    assert value(metrics, "gateway_provider_requests_remaining", deployment=MAIN) == 17.5
    assert value(metrics, "gateway_provider_requests_remaining", deployment=BACKUP) is None
    assert value(metrics, "gateway_breaker_state", deployment=MAIN, state="half_open") == 1
    assert value(metrics, "gateway_breaker_state", deployment=MAIN, state="open") == 0
    assert value(metrics, "gateway_budget_remaining", tenant="acme", budget="daily_tokens") == 50
    assert value(metrics, "gateway_budget_limit", tenant="acme", budget="daily_tokens") == 1000
    assert value(metrics, "gateway_redis_degraded") == 1
    assert value(metrics, "gateway_redis_latency_seconds") == 0.0008
    state["lag"] = 0.5  # read at scrape time, not at registration
    assert value(metrics, "gateway_event_loop_lag_seconds") == 0.5
    text = generate_latest(metrics.registry).decode()
    for stale in ("bogus", "stale/x", "gone/x", "mallory", "weird"):
        assert stale not in text


def test_a_failing_source_loses_its_series_only(
    metrics: GatewayMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> float:
        raise RuntimeError("boom")

    metrics.set_loop_lag_source(broken)
    metrics.set_redis_source(lambda: {"degraded": False})
    with caplog.at_level(logging.WARNING, logger="gateway.metrics"):
        generate_latest(metrics.registry)
        generate_latest(metrics.registry)
    assert value(metrics, "gateway_event_loop_lag_seconds") is None
    assert value(metrics, "gateway_redis_degraded") == 0
    errors = value(metrics, "gateway_metrics_source_errors_total", source="loop_lag")
    assert errors is not None and errors >= 2  # one per collection, and nothing else breaks
    assert len([r for r in caplog.records if "loop_lag" in r.getMessage()]) == 1  # not per scrape


def test_exposition_names_prefix_and_no_created_series(metrics: GatewayMetrics) -> None:
    metrics.observe_request(record(deployment=MAIN, total_s=1.0, upstream_s=1.0))
    metrics.rejected("overloaded")
    text = generate_latest(metrics.registry).decode()
    assert "_created" not in text
    families = list(metrics.registry.collect())
    assert families and all(f.name.startswith("gateway_") for f in families)
    for family in families:
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_ratio")), family.name
    # the process-wide default registry is left alone
    assert prometheus_client.REGISTRY.get_sample_value("gateway_requests_total") is None
    # a second instance in the same process has its own series
    other = GatewayMetrics(make_config())
    assert value(other, "gateway_requests_total", tenant="acme", model="gpt-test",
                 priority="normal", outcome="ok") is None
    assert set(PULLED_GAUGES) >= {"gateway_breaker_state", "gateway_event_loop_lag_seconds"}
    assert BUDGET_KINDS == {"daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"}


@pytest.mark.parametrize(
    ("accept", "content_type", "tail"),
    [
        (None, "text/plain; version=0.0.4; charset=utf-8", "gateway_rejections_total"),
        ("application/openmetrics-text; version=1.0.0",
         "application/openmetrics-text; version=1.0.0; charset=utf-8", "# EOF\n"),
    ],
)
async def test_handler_negotiates_format_and_compresses(
    metrics: GatewayMetrics, aiohttp_client: AiohttpClient, accept: str | None, content_type: str,
    tail: str,
) -> None:
    metrics.rejected("overloaded")
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics))
    client = await aiohttp_client(app)
    headers = {"Accept-Encoding": "identity"}
    if accept:
        headers["Accept"] = accept
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith(content_type)
    body = await response.text()
    assert tail in body and "_created" not in body
    zipped = await client.get("/metrics", headers={**headers, "Accept-Encoding": "gzip"},
                              auto_decompress=False)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await zipped.read()).decode() == body



@pytest.mark.parametrize(("raw", "bounded"), [
    ("success", "success"), ("http_429", "http_429"), ("http_503", "http_5xx"),
    ("http_529", "http_5xx"), ("http_400", "http_4xx"), ("connect_error", "connect_error"),
    ("first_byte_timeout", "timeout"), ("idle_timeout", "timeout"), ("stream_cut", "stream_cut"),
    ("server_error", "http_5xx"), ("slow_first_byte", "timeout"), ("http_status", "other"),
    ("", "other"), (None, "other"), ("http_abc", "other"),
])
def test_attempt_outcomes_map_to_a_fixed_set(raw: str | None, bounded: str) -> None:
    assert attempt_outcome(raw) == bounded
