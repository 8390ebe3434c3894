"""The load engine against real servers on loopback: the mock upstream alone, the gateway in
front of it (both in this process), and the ``gateway loadtest`` command against
``gateway serve`` + ``gateway mock-upstream --slots`` subprocesses, stopped with Ctrl-C."""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import BaseTestServer, TestServer
from pytest_aiohttp import AiohttpServer

from gateway.loadtest.engine import Engine, EngineOptions
from gateway.loadtest.plots import plot_report
from gateway.loadtest.report import build_report, compare, render
from gateway.loadtest.scenario import parse_scenario
from gateway.loadtest.stats import OUTCOMES
from gateway.mock.upstream import RECORDED, create_mock_app
from gateway.request.auth import hash_key
from tests.gwtest import ACME_KEY, UMBRELLA_KEY
from tests.plugin_gateway import MakeGateway
from tests.redis_server import pick_port


@pytest.fixture
async def counting_mock(aiohttp_server: AiohttpServer) -> TestServer:
    server: TestServer = await aiohttp_server(create_mock_app(max_recorded=100_000, seed=3))
    return server


def _url(server: BaseTestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def _run(data: dict[str, Any], target: str, **options: Any) -> dict[str, Any]:
    scenario = parse_scenario(data)
    engine = Engine(scenario, scenario.api_keys(),
                    EngineOptions(target=target, trace=True, **options))
    await engine.run()
    return build_report(engine)


def _check_sums(report: dict[str, Any]) -> None:
    """Every view of the traffic adds up to the same requests, and outcomes to requests."""
    overall = report["overall"]
    assert sum(overall["outcomes"].values()) == overall["requests"]
    assert overall["requests"] == len(report["trace"]["requests"])
    assert overall["attempts"] == report["attempts_sent"]
    for view in ("classes", "tenants", "workloads"):
        assert sum(g["requests"] for g in report[view].values()) == overall["requests"]
        assert sum(g["attempts"] for g in report[view].values()) == overall["attempts"]
    assert sum(p["stats"]["requests"] for p in report["phases"]) == overall["requests"]
    runs = overall["runs"]
    assert runs["started"] == runs["completed"] + runs["failed"] + runs["unfinished"]
    assert runs["started"] == len(report["trace"]["runs"])
    for klass, rows in report["timeline"]["classes"].items():
        assert sum(r["started"] for r in rows) == report["classes"][klass]["requests"]
        ended = sum(sum(r["outcomes"].values()) for r in rows)
        assert ended == report["classes"][klass]["requests"]


async def test_counts_add_up_to_what_the_mock_received(counting_mock: TestServer) -> None:
    data = {
        "name": "direct", "seed": 11,
        "tenants": {"a": {"api_key": "k1"}, "b": {"api_key": "k2"}},
        "workloads": [
            {"name": "chat", "tenant": "a", "priority": "high", "stream": 0.5, "weight": 2},
            {"name": "run", "tenant": "b", "priority": "low", "steps": 3,
             "think_ms": {"median": 5}, "deadline_s": 5},
        ],
        "client": {"retries": 2, "backoff": "none"},
        "phases": [
            {"name": "calm", "duration_s": 1.0, "arrival": {"process": "poisson", "rate": 60},
             "upstream": {"fail_rate": 0.2, "status": 500}},
            {"name": "cuts", "duration_s": 1.0, "arrival": {"process": "poisson", "rate": 60},
             "upstream": {"fail_rate": 0.1, "fail": "midstream-cut"}},
        ],
        "drain_s": 5,
    }
    report = await _run(data, _url(counting_mock))
    _check_sums(report)
    recorded = counting_mock.app[RECORDED]
    assert len(recorded) == report["attempts_sent"]  # the mock saw exactly what we sent
    outcomes = report["overall"]["outcomes"]
    assert outcomes["ok"] > 0 and report["overall"]["retries"] > 0
    assert outcomes["upstream_error"] + outcomes["stream_error"] + outcomes["transport"] > 0
    assert outcomes["cancelled"] == 0
    # The SDK marks retries; the mock got the workload's knobs and the session of each run.
    retry_counts = {r.headers.get("x-stainless-retry-count") for r in recorded}
    assert {"0", "1"} <= retry_counts
    assert {r.headers.get("x-priority") for r in recorded} == {"high", "low"}
    assert all(r.headers["authorization"] in ("Bearer k1", "Bearer k2") for r in recorded)


async def test_the_offered_rate_and_burstiness_are_as_configured(
    counting_mock: TestServer,
) -> None:
    data = {
        "name": "rate", "seed": 3, "tenants": {"a": {"api_key": "k"}},
        "workloads": [{"name": "w", "tenant": "a", "max_tokens": {"median": 2}}],
        "phases": [
            {"name": "poisson", "duration_s": 2, "arrival": {"process": "poisson", "rate": 200}},
            {"name": "bursts", "duration_s": 2,
             "arrival": {"process": "onoff", "rate": 600, "off_rate": 10, "on_s": 0.25,
                         "off_s": 0.75}},
        ],
        "drain_s": 5,
    }
    report = await _run(data, _url(counting_mock))
    _check_sums(report)
    starts = [r["started"] for r in report["trace"]["requests"]]
    steady = [t for t in starts if t < 2]
    assert len(steady) == pytest.approx(400, abs=3 * 400 ** 0.5), len(steady)
    windows = [0] * 20
    for t in steady:
        windows[int(t / 0.1)] += 1
    dispersion = statistics.pvariance(windows) / statistics.fmean(windows)
    assert 0.3 < dispersion < 2.5, windows  # Poisson counts: variance ~ mean
    bursts = [t - 2 for t in starts if t >= 2]
    # A burst is 0.25 s long; 50 ms of slack for requests dispatched a little late.
    on = sum(1 for t in bursts if t % 1 < 0.3)
    assert on == pytest.approx(2 * 0.25 * 600, rel=0.2), (on, len(bursts))
    assert len(bursts) - on == pytest.approx(2 * 0.7 * 10, abs=15), (on, len(bursts))
    lag = report["engine"]["arrival_lag_ms"]
    assert lag["p50"] < 20  # the generator kept up: these were the arrivals it meant to send


async def test_agent_steps_are_sequential_within_a_run(
    make_gateway: MakeGateway, counting_mock: TestServer,
) -> None:
    gateway = await make_gateway(
        upstream=_url(counting_mock),
        providers={"main": {"forward_headers": ["x-mock-*", "x-agent-*"]}},
        tenants={"acme": {"loop_guard": {"enabled": False}}},
    )
    data = {
        "name": "agents", "seed": 8, "path": "/v1/chat/completions",
        "tenants": {"acme": {"api_key": ACME_KEY}, "umbrella": {"api_key": UMBRELLA_KEY}},
        "workloads": [
            {"name": "agent", "tenant": "acme", "priority": "high", "model": "gpt-test",
             "steps": 4, "stream": 0.5, "think_ms": {"median": 30}},
            {"name": "batch", "tenant": "umbrella", "priority": "low", "model": "gpt-test"},
        ],
        "phases": [{"name": "p", "duration_s": 1.0, "arrival": {"process": "poisson", "rate": 20},
                    "upstream": {"ttft_ms": 20, "chunk_gap_ms": 2}}],
        "drain_s": 10,
    }
    report = await _run(data, _url(gateway.server))
    _check_sums(report)
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    requests = report["trace"]["requests"]
    assert all(r["outcome"] == "ok" for r in requests)
    runs = report["trace"]["runs"]
    agent_runs = [r for r in runs if r["workload"] == "agent"]
    assert agent_runs and all(r["outcome"] == "completed" and r["steps_ok"] == 4
                              for r in agent_runs)
    # From the mock's side: each session's steps arrived one after the other, 1..4.
    for rec in counting_mock.app[RECORDED]:
        if "x-agent-session" in rec.headers:
            by_run[rec.headers["x-agent-session"]].append(rec.headers)
    assert len(by_run) == len(agent_runs)
    for headers in by_run.values():
        assert [h["x-agent-step"] for h in headers] == ["1", "2", "3", "4"]
    # From the client's side: step k+1 started after step k ended, plus think time.
    steps: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in requests:
        if r["workload"] == "agent":
            steps[r["run"]].append(r)
    assert len(steps) == len(agent_runs)
    for chain in steps.values():
        chain.sort(key=lambda r: r["started"])
        assert [r["step"] for r in chain] == [1, 2, 3, 4]
        for before, after in itertools.pairwise(chain):
            # After it ended (the 30 ms think time is not asserted: the two stamps are read
            # at different points of busy loop iterations; a CI run saw a 5 ms gap)
            assert after["started"] >= before["ended"]
    text = render(report)
    assert "class high" in text and "class low" in text


async def test_closed_loop_keeps_its_concurrency(counting_mock: TestServer) -> None:
    data = {
        "name": "closed", "tenants": {"a": {"api_key": "k"}},
        "workloads": [{"name": "w", "tenant": "a", "steps": 2, "think_ms": {"median": 1}}],
        "phases": [{"name": "p", "duration_s": 1.0,
                    "arrival": {"process": "closed", "concurrency": 3},
                    "upstream": {"latency_ms": 50}}],
    }
    report = await _run(data, _url(counting_mock))
    _check_sums(report)
    requests = report["trace"]["requests"]
    events = sorted([(r["started"], 1) for r in requests] + [(r["ended"], -1) for r in requests])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 3  # never more than the workers, whatever the latency
    assert 30 <= len(requests) <= 66  # ~3 workers x 1 s / ~52 ms, plus the runs finishing


async def test_max_requests_bounds_every_run(counting_mock: TestServer) -> None:
    data = {
        "name": "bounded", "tenants": {"a": {"api_key": "k"}}, "max_requests": 15,
        "workloads": [{"name": "w", "tenant": "a", "steps": 3, "think_ms": {"median": 1}}],
        "phases": [{"name": "p", "duration_s": 1.0,
                    "arrival": {"process": "poisson", "rate": 100}}],
    }
    report = await _run(data, _url(counting_mock))
    _check_sums(report)
    assert report["attempts_sent"] == 15 == len(counting_mock.app[RECORDED])
    assert report["max_requests_reached"] is True
    assert report["overall"]["runs"]["failed"] == 0  # stopped runs are unfinished, not failed


def test_loadtest_command_against_gateway_and_mock_stops_cleanly_on_ctrl_c(
    tmp_path: Path,
) -> None:
    mock_port, gw_port = pick_port(), pick_port()
    policy = {
        "server": {"host": "127.0.0.1", "port": gw_port},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                               "forward_headers": ["x-mock-*"]}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": {"t": {"api_keys": [hash_key("sk-t")], "max_priority": "critical",
                          "loop_guard": {"enabled": False}}},
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    scenario = {
        "name": "cli", "target": f"http://127.0.0.1:{gw_port}", "seed": 2,
        "tenants": {"t": {"api_key": "sk-t"}},
        "workloads": [{"name": "w", "tenant": "t", "model": "m", "priority": "normal",
                       "stream": 0.5, "steps": 3, "think_ms": {"median": 20}}],
        "phases": [{"name": "long", "duration_s": 60, "arrival": {"process": "poisson",
                                                                  "rate": 30},
                    "upstream": {"ttft_ms": 100, "chunk_gap_ms": 10}}],
        "drain_s": 30,
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    env = {**os.environ, "GATEWAY_LOG_LEVEL": "WARNING"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "gateway.cli", "mock-upstream", "--port",
                          str(mock_port), "--slots", "8", "--max-queue", "4"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                          str(tmp_path / "policy.yaml")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        _wait_port(gw_port)
        _wait_port(mock_port)
        out = tmp_path / "r.json"
        run = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "loadtest", str(tmp_path / "s.yaml"),
             "--out", str(out), "--no-live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        time.sleep(2.5)
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=20)
        assert run.returncode == 0, stderr
    finally:
        for proc in procs:
            proc.kill()  # their own shutdown is not under test here, and a drain takes seconds
        for proc in procs:
            proc.wait(timeout=10)
    assert "INTERRUPTED" in stdout and "stopping" in stderr
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and report["duration_s"] < 10
    overall = report["overall"]
    assert sum(overall["outcomes"].values()) == overall["requests"] > 20
    assert set(overall["outcomes"]) == set(OUTCOMES)
    assert overall["outcomes"]["ok"] > 0
    # The same report plots, and compares with itself to zero differences.
    png = plot_report(report, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "+0.0" in compare(report, report)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on {port}")
