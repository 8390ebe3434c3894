"""Three gateway processes share one Redis (and, in parallel, one 3-node Redis Cluster):
limits hold for the fleet, not per replica, over a full one-minute window at 3x the limit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.limits.periods import period_keys
from gateway.request.auth import hash_key
from tests.redis_server import RedisCluster3, RedisServer, pick_port

pytestmark = pytest.mark.redis

WINDOW_S = 61.0  # one full limit window (a minute), plus a second of slack
RPM, REQ_BURST = 600, 10
TPM, TOK_BURST, MAX_TOKENS = 30_000, 3_000, 100
BUDGET = 1_000


def _policy(mock_port: int) -> dict[str, Any]:
    def tenant(key: str, **extra: Any) -> dict[str, Any]:
        return {"api_keys": [hash_key(key)], "default_max_tokens": MAX_TOKENS,
                "loop_guard": {"enabled": False}, **extra}

    return {
        "state": {"backend": "redis", "timeout_s": 1.0, "degraded": {"replicas": 3}},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                               "forward_headers": ["x-mock-*"]}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": {
            "req": tenant("sk-req", limits={"requests_per_minute": RPM,
                                            "request_burst": REQ_BURST}),
            "tok": tenant("sk-tok", limits={"tokens_per_minute": TPM, "token_burst": TOK_BURST}),
            "budget": tenant("sk-budget", budget={"daily_tokens": BUDGET}),
        },
    }


class Fleet:
    """N ``gateway serve`` processes sharing one state store."""

    def __init__(self, config: Path, redis_url: str, n: int = 3) -> None:
        self.ports = [pick_port() for _ in range(n)]
        env = {**os.environ, "REDIS_URL": redis_url, "GATEWAY_LOG_LEVEL": "WARNING"}
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                              str(config), "--port", str(p)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in self.ports
        ]

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def mock_port() -> Iterator[int]:
    port = pick_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "mock-upstream", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _wait_ready(session: aiohttp.ClientSession, urls: list[str]) -> None:
    deadline = time.monotonic() + 20
    for url in urls:
        while True:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} never became ready"
            await asyncio.sleep(0.1)


async def _drive(session: aiohttp.ClientSession, urls: list[str], key: str, rate: float,
                 results: list[tuple[int, int]]) -> None:
    """Open-loop arrivals at ``rate``/s for the window, round-robin over the replicas."""
    started = time.monotonic()
    tasks = []
    i = 0
    while (due := started + i / rate) < started + WINDOW_S:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(_one(session, urls[i % len(urls)], key, i, results)))
        i += 1
    await asyncio.gather(*tasks)


async def _one(session: aiohttp.ClientSession, url: str, key: str, i: int,
               results: list[tuple[int, int]]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": f"call {i}"}]}
    # The token tenant's calls use their whole max_tokens, so actual usage ~= reservation.
    chunks = str(MAX_TOKENS) if key == "sk-tok" else "5"
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}",
                                     "x-mock-chunks": chunks}) as resp:
        data = await resp.json()
        used = data["usage"]["total_tokens"] if resp.status == 200 else 0
        results.append((resp.status, used))


async def _run_fleet(urls: list[str]) -> dict[str, list[tuple[int, int]]]:
    results: dict[str, list[tuple[int, int]]] = {"req": [], "tok": [], "budget": []}
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _wait_ready(session, urls)
        await asyncio.gather(
            _drive(session, urls, "sk-req", 3 * RPM / 60, results["req"]),
            # each request reserves about 107 tokens: 3x the token rate is ~14 requests/s
            _drive(session, urls, "sk-tok", 3 * TPM / 60 / 107, results["tok"]),
            _drive(session, urls, "sk-budget", 5, results["budget"]),
        )
    return results


def _check(results: dict[str, list[tuple[int, int]]], budget_used: int) -> None:
    admitted = sum(1 for status, _ in results["req"] if status == 200)
    allowed = RPM * WINDOW_S / 60 + REQ_BURST
    assert abs(admitted - allowed) <= 0.01 * allowed + 1, (admitted, allowed)
    assert {s for s, _ in results["req"]} == {200, 429}

    tokens = sum(used for status, used in results["tok"] if status == 200)
    token_cap = TPM * WINDOW_S / 60 + TOK_BURST + (MAX_TOKENS + 10)
    assert tokens <= token_cap, (tokens, token_cap)
    assert tokens >= 0.9 * (token_cap - MAX_TOKENS - 10), (tokens, token_cap)

    spent = sum(used for status, used in results["budget"] if status == 200)
    assert spent == budget_used <= BUDGET
    assert any(status == 429 for status, _ in results["budget"])


async def test_three_replicas_share_limits_exactly_on_redis_and_on_a_cluster(
    tmp_path: Path, mock_port: int, redis_cluster: RedisCluster3
) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump(_policy(mock_port)))
    with RedisServer() as redis:
        redis.command("FLUSHALL")
        redis_cluster.flushall()
        fleets = [Fleet(config, redis.url), Fleet(config, redis_cluster.url)]
        try:
            outcomes = await asyncio.gather(*(_run_fleet(f.urls()) for f in fleets))
        finally:
            for fleet in fleets:
                fleet.close()  # SIGTERM drains pending settlements before exit
        _, day, _, _ = period_keys(time.time())[0]
        key = f"gw:rl:{{t:budget}}:b:tokens:{day}"
        standalone_used = int(redis.command("GET", key) or 0)
        cluster_used = int(_cluster_get(redis_cluster, key) or 0)
    _check(outcomes[0], standalone_used)
    _check(outcomes[1], cluster_used)


def _cluster_get(cluster: RedisCluster3, key: str) -> bytes | int | None:
    for node in cluster.nodes:
        try:
            value = node.command("GET", key)
        except RuntimeError:  # MOVED: another node owns the slot
            continue
        if value is not None:
            return value
    return None
