"""Redis slowed, stalled, and a Redis Cluster losing a node, under load.

What users see: every request is answered, none waits more than about one Redis timeout;
what is recorded: usage never under-counted (exact when the fault is a crash), and the
gateway returns to global limits by itself once the store answers again.

Redis killed and restarted (standalone) is tests/integration/test_redis_outage.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from gateway.app.server import GATEWAY, create_app
from gateway.state import RedisBackend
from tests.faults.helpers import budget_key, chat_load, until
from tests.faults.tcpproxy import FaultProxy
from tests.gwtest import auth, chat, policy
from tests.plugin_gateway import GatewayClient, MakeGateway, settled
from tests.redis_server import RedisCluster3, RedisServer, pick_port

pytestmark = pytest.mark.redis

TENANT = {"acme": {
    "default_max_tokens": 50,
    "limits": {"requests_per_minute": 100_000, "tokens_per_minute": 10_000_000,
               "max_concurrent": 100},
    "budget": {"daily_tokens": 10_000_000},
    "loop_guard": {"enabled": False},
}}
# These tests judge Redis faults, not the gateway's own overload shedding, which a starved CI
# machine (loop lag over 200 ms) would trigger: shed only on a far worse lag here.
RELAXED = {"self_protection": {"max_loop_lag_ms": 5000}}
RESERVATION_MAX = 50 + 20  # max_tokens + the largest prompt estimate of chat_load's bodies


@pytest.fixture
async def proxy(clean_redis: RedisServer) -> AsyncIterator[FaultProxy]:
    assert clean_redis.port is not None
    p = await FaultProxy(clean_redis.port).start()
    yield p
    await p.close()


def _recorded(server: RedisServer) -> int:
    value = server.command("GET", budget_key())
    return int(value) if isinstance(value, bytes) else 0


async def _back_to_global(gw: GatewayClient) -> None:
    gateway = gw.app[GATEWAY]
    await until(lambda: not gateway.degraded.active and gateway.degraded.journal_size == 0,
                10.0, "limits to return to global mode")
    await settled(gw)


async def test_redis_slowed_below_its_timeout_stays_global_and_exact(
    make_gateway: MakeGateway, clean_redis: RedisServer, proxy: FaultProxy
) -> None:
    # Every Redis round trip +50 ms (a new connection's handshake pays it ~3 times); the
    # timeout is 250 ms per read and 500 ms per call.
    proxy.delay_s = 0.025
    gw = await make_gateway(state=RedisBackend(proxy.url, timeout_s=0.25), tenants=TENANT,
                            admission=RELAXED)
    load = await chat_load(gw, seconds=2.0, workers=6)
    await settled(gw)
    gateway = gw.app[GATEWAY]
    assert set(load.statuses) == {200}, load.errors[:3]
    assert gateway.degraded.transitions == 0, "a slow but answering Redis must not degrade"
    assert min(load.latencies) >= 0.05  # the delay really was on the path
    assert _recorded(clean_redis) == load.reported_tokens


async def test_redis_slower_than_its_timeout_then_stalled_serves_degraded_and_never_undercounts(
    make_gateway: MakeGateway, clean_redis: RedisServer, proxy: FaultProxy
) -> None:
    gw = await make_gateway(state=RedisBackend(proxy.url, timeout_s=0.25), tenants=TENANT,
                            admission=RELAXED)
    gateway = gw.app[GATEWAY]
    readiness: list[dict[str, Any]] = []

    async def faults() -> None:
        await asyncio.sleep(0.5)
        proxy.delay_s = 0.4  # slower than the 250 ms read timeout: Redis "answers" too late
        await asyncio.sleep(1.2)
        proxy.stall()  # then nothing at all gets through
        await asyncio.sleep(0.4)
        readiness.append(await (await gw.get("/readyz")).json())
        await asyncio.sleep(0.8)
        proxy.delay_s = 0.0
        proxy.resume()

    _, load = await asyncio.gather(faults(), chat_load(gw, seconds=4.0, workers=6))
    assert set(load.statuses) == {200}, load.errors[:3]
    # One Redis timeout (2 x 250 ms at most) is the worst a request pays; once degraded,
    # requests no longer wait on Redis at all.
    assert max(load.latencies) < 1.5
    assert load.p50 < 0.2
    assert gateway.degraded.transitions >= 1
    assert readiness[0]["limits_mode"] == "degraded" and readiness[0]["status"] == "ready"
    await _back_to_global(gw)
    assert (await (await gw.get("/readyz")).json())["limits_mode"] == "global"
    recorded = _recorded(clean_redis)
    # Never under-counted. A command that reached Redis after the client gave up on it can
    # leave one reservation charged in full (its settlement was replayed first): bounded by
    # the requests in flight when the fault began, one per worker.
    assert recorded >= load.reported_tokens
    assert recorded - load.reported_tokens <= 6 * RESERVATION_MAX


@pytest.fixture
def durable_cluster() -> Iterator[RedisCluster3]:
    """A 3-master cluster of its own whose nodes fsync every write (a SIGKILLed node comes
    back with every acknowledged write), so the session cluster stays untouched."""
    cluster = RedisCluster3()
    cluster.nodes = [RedisServer(cluster_bus=True, extra_args=[
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "2000", "--appendonly", "yes", "--appendfsync", "always",
    ]) for _ in range(3)]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


async def test_redis_cluster_losing_a_node_serves_throughout_and_loses_no_accounting(
    make_gateway: MakeGateway, durable_cluster: RedisCluster3
) -> None:
    backend = RedisBackend(durable_cluster.url, timeout_s=0.25)
    gw = await make_gateway(state=backend, tenants=TENANT,
                            admission=RELAXED)
    gateway = gw.app[GATEWAY]
    warm = await chat_load(gw, seconds=0.5, workers=2)
    await settled(gw)
    owner = _owner(durable_cluster, budget_key())  # the node holding acme's counters

    async def fault() -> None:
        await asyncio.sleep(0.3)
        owner.kill()
        await asyncio.sleep(2.5)  # past cluster-node-timeout: the cluster itself says fail
        await asyncio.to_thread(durable_cluster.start)  # restarts the node, waits for ok

    _, load = await asyncio.gather(fault(), chat_load(gw, seconds=5.0, workers=6))
    assert set(load.statuses) == {200}, load.errors[:3]
    assert max(load.latencies) < 1.5
    assert gateway.degraded.transitions >= 1
    await _back_to_global(gw)
    value = owner.command("GET", budget_key())
    assert int(value) == warm.reported_tokens + load.reported_tokens  # type: ignore[arg-type]


def _owner(cluster: RedisCluster3, key: str) -> RedisServer:
    for node in cluster.nodes:
        try:
            if node.command("GET", key) is not None:
                return node
        except RuntimeError:  # MOVED: another node serves the slot
            continue
    raise AssertionError(f"no node holds {key}")


async def test_redis_down_applies_each_class_its_degraded_action(
    aiohttp_client: AiohttpClient, upstream_url: str
) -> None:
    """Fail-open / fail-closed per class while the store is unreachable: critical passes
    unlimited, normal gets local limits, low is refused with a 503 that says why."""
    config = policy(upstream_url, state={"degraded": {
        "action": "local", "replicas": 1,
        "per_priority": {"critical": "fail_open", "low": "fail_closed"}}},
        tenants={"acme": {"max_priority": "critical", "loop_guard": {"enabled": False},
                          "limits": {"requests_per_minute": 2, "request_burst": 2}}})
    dead = RedisBackend(f"redis://127.0.0.1:{pick_port()}", timeout_s=0.1)
    gw = await aiohttp_client(create_app(config, state=dead))

    async def status(priority: str) -> tuple[int, dict[str, Any]]:
        resp = await gw.post("/v1/chat/completions", json=chat(),
                             headers=auth(**{"X-Priority": priority}))
        return resp.status, await resp.json()

    low = await status("low")
    assert low[0] == 503 and low[1]["error"]["code"] == "limits_unavailable"
    normal = [await status("normal") for _ in range(3)]
    assert [s for s, _ in normal] == [200, 200, 429]  # the limit, counted in this process
    assert all(s == 200 for s, _ in [await status("critical") for _ in range(5)])
    ready = await gw.get("/readyz")
    assert ready.status == 200 and (await ready.json())["limits_mode"] == "degraded"


async def test_redis_down_with_every_class_fail_closed_is_not_ready(
    aiohttp_client: AiohttpClient, upstream_url: str
) -> None:
    # A tenant with a limit: one without any has nothing to check and never asks the store.
    config = policy(upstream_url, state={"degraded": {"action": "fail_closed"}},
                    tenants={"acme": {"limits": {"requests_per_minute": 100}}})
    dead = RedisBackend(f"redis://127.0.0.1:{pick_port()}", timeout_s=0.1)
    gw = await aiohttp_client(create_app(config, state=dead))
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "limits_unavailable"
    assert (await gw.get("/readyz")).status == 503
