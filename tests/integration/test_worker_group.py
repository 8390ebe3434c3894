"""``--workers N``: one scrape of /metrics (and one /admin/status) covers every worker, with the
same totals whichever worker takes it (gateway/observability/worker_group.py)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import main
from gateway.observability.worker_group import WorkerGroup, merge_families, merge_status
from gateway.request.auth import hash_key
from tests.gwtest import auth, chat, policy_dict
from tests.integration.test_lifecycle import GatewayProcess, mock_url, write_policy

__all__ = ["mock_url"]  # the module-scoped mock upstream fixture, shared

ADMIN_KEY = "sk-test-admin"
REQUESTS = 40


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))


async def test_one_scrape_sees_every_worker_and_every_scrape_the_same_totals(
    tmp_path: Path, mock_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = policy_dict(mock_url, server={"drain_delay_s": 0},
                       admin={"api_keys": [hash_key(ADMIN_KEY)]},
                       breaker={"window_s": 600},  # every call still in the window when read
                       tenants={"acme": {"loop_guard": {"enabled": False}}})
    gw = GatewayProcess(write_policy(tmp_path / "policy.yaml", data), tmp_path / "gw.log",
                        "--workers", "2")
    try:
        # A fresh connection per request: SO_REUSEPORT balances connections, not requests.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await gw.wait_ready(session)
            await gw.wait_log("gateway listening", count=2)

            async def one() -> int:
                async with session.post(gw.url + "/v1/chat/completions", json=chat(),
                                        headers=auth()) as resp:
                    await resp.read()
                    return resp.status

            statuses = [s for _ in range(4)
                        for s in await asyncio.gather(*(one() for _ in range(REQUESTS // 4)))]
            assert statuses == [200] * REQUESTS
            served = {e["worker"] for e in gw.messages("request") if "worker" in e}
            assert served == {0, 1}, "the kernel sent every connection to one worker"

            scraped_by: set[str] = set()
            for _ in range(40):  # until both workers have answered a scrape (>= 6 scrapes)
                async with session.get(gw.url + "/metrics") as resp:
                    assert resp.status == 200
                    scraped_by.add(resp.headers["x-gateway-worker"])
                    samples = _samples(await resp.text())
                # every scrape, whichever worker: all the requests, counted once
                assert _total(samples, "gateway_requests_total", tenant="acme",
                              outcome="ok") == REQUESTS
                assert _total(samples, "gateway_request_duration_seconds_count") == REQUESTS
                assert _total(samples, "gateway_workers_answering") == 2
                assert _total(samples, "gateway_in_flight_requests") == 0
                if len(scraped_by) == 2 and _ >= 5:
                    break
            assert scraped_by == {"0", "1"}

            status_by: dict[str, dict[str, Any]] = {}
            for _ in range(40):
                async with session.get(gw.url + "/admin/status",
                                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
                    assert resp.status == 200
                    status_by[resp.headers["x-gateway-worker"]] = await resp.json()
                if len(status_by) == 2:
                    break
            assert set(status_by) == {"0", "1"}
            for status in status_by.values():
                workers = status["workers"]
                assert [w["answered"] for w in workers] == [True, True]
                assert len({w["pid"] for w in workers}) == 2
                calls = sum(b["calls_in_window"] for b in status["breakers"].values())
                assert calls == REQUESTS  # each worker's breaker window, added up
            assert await asyncio.to_thread(
                main, ["status", "--url", gw.url, "--admin-key", ADMIN_KEY]) == 0
            assert "workers 2/2 answering" in capsys.readouterr().out
            pid = gw.messages("gateway listening")[0]["pid"]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            group_dir = Path(argv[argv.index(b"--worker-dir") + 1].decode())
            assert sorted(p.name for p in group_dir.iterdir()) == [
                "worker-0.sock", "worker-1.sock"]
        gw.signal(signal.SIGTERM)
        assert await gw.exit_code(15) == 0
        assert not group_dir.exists()  # each run starts from a fresh directory
    finally:
        gw.close()


# --- the merge, in process -------------------------------------------------------------------


def _registry(requests: int, in_flight: int, budget_left: float, lag: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("gateway_requests", "r", ["tenant"], registry=registry).labels("acme").inc(requests)
    Gauge("gateway_in_flight_requests", "f", registry=registry).set(in_flight)
    Gauge("gateway_budget_remaining", "b", ["tenant"], registry=registry).labels("acme").set(
        budget_left)
    Gauge("gateway_event_loop_lag_seconds", "l", registry=registry).set(lag)
    histogram = Histogram("gateway_queue_wait_seconds", "q", registry=registry, buckets=(1.0,))
    for _ in range(requests):
        histogram.observe(0.5)
    return registry


def _values(families: Iterable[Metric]) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items()) if s.labels else ''}": s.value
            for m in families for s in m.samples if not s.name.endswith("_created")}


def test_counters_add_up_and_each_gauge_merges_by_meaning() -> None:
    a = list(_registry(3, 2, 900.0, 0.01).collect())
    b = list(_registry(5, 1, 700.0, 0.2).collect())
    merged = _values(merge_families([a, b]))
    assert merged["gateway_requests_total[('tenant', 'acme')]"] == 8
    assert merged["gateway_in_flight_requests"] == 3  # summed
    assert merged["gateway_budget_remaining[('tenant', 'acme')]"] == 700  # the least left
    assert merged["gateway_event_loop_lag_seconds"] == 0.2  # the worst
    assert merged["gateway_queue_wait_seconds_count"] == 8
    assert merged["gateway_queue_wait_seconds_bucket[('le', '1.0')]"] == 8


def test_status_sums_counts_keeps_policy_once_and_the_worst_breaker() -> None:
    def status(in_flight: int, state: str, remaining: int) -> dict[str, Any]:
        return {"replica": "r", "ready": True, "state": {"limits_mode": "global",
                                                         "usage_journal": 1},
                "tenants": {"acme": {"limits": {"requests_per_minute": 60},
                                     "budget_remaining": {"daily_tokens": {
                                         "remaining": remaining, "limit": 1000}}}},
                "admission": {"classes": {"normal": {"in_flight": in_flight, "queued": 1,
                                                     "oldest_wait_s": in_flight / 10,
                                                     "drop_mode": in_flight > 2}}},
                "breakers": {"main/gpt": {"state": state, "trips": 1}}}

    merged = merge_status([status(1, "closed", 900), None, status(3, "open", 800)], 0)
    assert merged["tenants"]["acme"]["limits"] == {"requests_per_minute": 60}
    assert merged["tenants"]["acme"]["budget_remaining"]["daily_tokens"] == {
        "remaining": 800, "limit": 1000}
    normal = merged["admission"]["classes"]["normal"]
    assert (normal["in_flight"], normal["queued"], normal["oldest_wait_s"], normal["drop_mode"]
            ) == (4, 2, 0.3, True)
    assert merged["breakers"]["main/gpt"] == {"state": "open", "trips": 2}
    assert merged["state"]["usage_journal"] == 2
    assert [w["answered"] for w in merged["workers"]] == [True, False, True]


@pytest.fixture
def group_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gw-"))  # short: a Unix socket path has ~100 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_worker_that_stops_answering_keeps_its_last_counts(group_dir: Path) -> None:
    first, second = WorkerGroup(group_dir, 0, 2, 0.5), WorkerGroup(group_dir, 1, 2, 0.5)
    reg0, reg1 = _registry(3, 0, 1.0, 0.0), _registry(5, 0, 1.0, 0.0)
    await first.start(reg0, lambda: {"replica": "a", "ready": True})
    await second.start(reg1, lambda: {"replica": "b", "ready": True})
    try:
        registry = await first.metrics_registry(reg0)
        merged = _values(registry.collect())
        assert merged["gateway_requests_total[('tenant', 'acme')]"] == 8
        assert merged["gateway_workers_answering"] == 2
        only = _values(registry.restricted_registry(["gateway_requests_total"]).collect())
        assert list(only) == ["gateway_requests_total[('tenant', 'acme')]"]  # ?name[]= works
        await second.close()
        merged = _values((await first.metrics_registry(reg0)).collect())
        assert merged["gateway_requests_total[('tenant', 'acme')]"] == 8  # never backwards
        assert merged["gateway_workers_answering"] == 1
        status = await first.status({"replica": "a", "ready": True})
        assert [w["answered"] for w in status["workers"]] == [True, False]
    finally:
        await first.close()
        await second.close()


def test_merged_status_lists_each_tenants_biggest_runs_of_every_worker() -> None:
    def status(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"replica": "r", "ready": True, "state": {"limits_mode": "global"},
                "tenants": {"acme": {"run_budget": {"max_tokens": 1000, "soft_ratio": 0.8},
                                     "runs": runs}}}

    def run(rid: str, tokens: int, warnings: int = 0, stopped: str | None = None
            ) -> dict[str, Any]:
        return {"run": rid, "tokens": tokens, "cost": tokens / 1e6, "steps": 1, "age_s": 5.0,
                "idle_s": 1.0, "loop_warnings": warnings, "stopped_by": stopped}

    merged = merge_status([status([run("a", 900, 1), run("b", 50)]),
                           status([run("a", 950, 2, "tokens"), run("c", 400)])], 0)
    acme = merged["tenants"]["acme"]
    assert acme["run_budget"] == {"max_tokens": 1000, "soft_ratio": 0.8}  # policy: not summed
    assert [(r["run"], r["tokens"], r["loop_warnings"], r["stopped_by"]) for r in acme["runs"]
            ] == [("a", 950, 3, "tokens"), ("c", 400, 0, None), ("b", 50, 0, None)]
