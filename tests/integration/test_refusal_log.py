"""Refused requests flood neither the access log nor skew metrics (issue 15 item 10)."""

from __future__ import annotations

import logging
import re

import pytest

from gateway.app.server import GATEWAY
from gateway.observability.logs import ACCESS_LOGGER, RefusalLog
from tests.gwtest import FakeClock, auth, chat, log_fields
from tests.plugin_gateway import MakeGateway


def test_bounded_rate_per_tenant_and_reason_with_a_summary_of_what_was_folded() -> None:
    clock = FakeClock()
    log = RefusalLog(clock, per_s=1.0, burst=3, summary_every_s=60)
    logged = sum(log.allow("acme", "rate_limit_exceeded") for _ in range(100))
    assert logged == 3  # the burst, then nothing within the same instant
    # Another tenant, and another reason of the same tenant, have buckets of their own.
    assert log.allow("umbrella", "rate_limit_exceeded")
    assert log.allow("acme", "insufficient_quota")
    clock.now += 10  # 10 s at 1 line/s, capped at the burst
    assert sum(log.allow("acme", "rate_limit_exceeded") for _ in range(100)) == 3
    assert log.summary() is None  # not due yet
    clock.now += 50
    summary = log.summary()
    assert summary is not None
    assert summary["folded"] == 97 + 97
    assert summary["by_tenant_reason"] == [
        {"tenant": "acme", "reason": "rate_limit_exceeded", "count": 194}]
    assert log.summary(force=True) is None  # nothing folded since


def test_rate_zero_logs_every_refusal() -> None:
    log = RefusalLog(FakeClock(), per_s=0)
    assert all(log.allow("acme", "x") for _ in range(1000))
    assert log.summary(force=True) is None


async def test_a_refusal_flood_is_folded_in_the_log_and_exact_in_metrics(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make_gateway(tenants={"acme": {
        "limits": {"requests_per_minute": 1, "request_burst": 1},
        "loop_guard": {"enabled": False}}})
    gateway = gw.app[GATEWAY]
    statuses = []
    with caplog.at_level(logging.INFO, ACCESS_LOGGER):
        for i in range(60):
            resp = await gw.post("/v1/chat/completions", json=chat(text=f"call {i}"),
                                 headers=auth())
            statuses.append(resp.status)
            await resp.read()
        gateway.log_refusal_summary(force=True)
    refused = statuses.count(429)
    assert statuses[0] == 200 and refused == 59
    lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    full = [r for r in lines if r.getMessage() == "request"]
    summaries = [r for r in lines if r.getMessage() == "refused requests folded"]
    logged_refusals = [r for r in full if log_fields(r)["status"] == 429]
    assert len(logged_refusals) <= 10 + 2  # the burst, and what a slow machine refills
    assert len(full) - len(logged_refusals) == 1  # the 200 is always logged
    assert len(summaries) == 1
    fields = log_fields(summaries[0])
    assert fields["folded"] == refused - len(logged_refusals)
    assert fields["by_tenant_reason"] == [
        {"tenant": "acme", "reason": "rate_limit_exceeded", "count": fields["folded"]}]
    # Metrics stay exact: every refusal counted.
    scrape = await (await gw.get("/metrics")).text()
    counted = re.search(r'gateway_rejections_total\{[^}]*reason="rate_limited"[^}]*'
                        r'tenant="acme"[^}]*\} (\S+)', scrape)
    assert counted is not None, [line for line in scrape.splitlines() if "reject" in line]
    assert float(counted.group(1)) == refused
