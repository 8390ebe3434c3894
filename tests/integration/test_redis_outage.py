"""Redis killed under load and restarted: nobody hangs, the degraded mode serves, and the
usage recorded afterwards equals what the upstream reported, exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from gateway.app.server import GATEWAY, create_app
from gateway.limits.periods import period_keys
from gateway.state import RedisBackend
from tests.gwtest import auth, chat, policy
from tests.plugin_gateway import MakeGateway, gateway_client, settled
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    # appendfsync always: a SIGKILLed server comes back with every acknowledged write.
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_redis_killed_and_restarted_mid_load_loses_no_accounting(
    make_gateway: MakeGateway, durable_redis: RedisServer
) -> None:
    backend = RedisBackend(durable_redis.url, timeout_s=0.25, key_prefix="gw:")
    # Loop-lag shedding off: this test is about accounting, and the test process (a pytest
    # heap after a thousand tests, without `gateway serve`'s GC tuning in process/heap.py) has
    # gen-2 collections of 60-100 ms here, over the 200 ms threshold on a loaded CI machine.
    gw = await make_gateway(state=backend, tenants={"acme": {
        "default_max_tokens": 50,
        "limits": {"requests_per_minute": 100_000, "tokens_per_minute": 10_000_000},
        "budget": {"daily_tokens": 10_000_000},
        "loop_guard": {"enabled": False},
    }}, admission={"self_protection": {"max_loop_lag_ms": 5000}})
    reported: list[int] = []
    latencies: list[float] = []
    statuses: list[int] = []
    stop_at = time.monotonic() + 4.0

    async def worker(n: int) -> None:
        i = 0
        while time.monotonic() < stop_at and i < 400:
            i += 1
            stream = i % 3 == 0
            usage: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
            body = chat(text=f"worker {n} call {i}", stream=stream, **usage)
            started = time.monotonic()
            resp = await gw.post("/v1/chat/completions", json=body,
                                 headers=auth(**{"x-mock-chunks": str(1 + i % 5)}))
            statuses.append(resp.status)
            if stream:
                raw = await resp.read()
                usage = _stream_usage(raw)
            else:
                usage = (await resp.json())["usage"]
            latencies.append(time.monotonic() - started)
            reported.append(usage["prompt_tokens"] + usage["completion_tokens"])

    async def outage() -> None:
        await asyncio.sleep(1.0)
        # In threads: killing and starting wait for the process, and blocking the loop the
        # gateway runs on would make it shed for loop lag, which a real restart never causes.
        await asyncio.to_thread(durable_redis.kill)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(durable_redis.start)

    await asyncio.gather(outage(), *(worker(n) for n in range(6)))
    gateway = gw.app[GATEWAY]
    assert gateway.degraded.transitions >= 1, "the outage was never noticed"
    assert gateway.degraded.replayed + gateway.degraded.journal_size > 0
    assert set(statuses) == {200}
    assert max(latencies) < 1.5, "a request hung on the dead Redis"

    # Back to global mode by itself, with the journal replayed.
    for _ in range(100):
        await settled(gw)
        if not gateway.degraded.active and gateway.degraded.journal_size == 0:
            break
        await asyncio.sleep(0.05)
    assert not gateway.degraded.active and gateway.degraded.journal_size == 0
    ready = await (await gw.get("/readyz")).json()
    assert ready["limits_mode"] == "global"

    _, day, _, _ = period_keys(time.time())[0]
    recorded = durable_redis.command("GET", f"gw:rl:{{t:acme}}:b:tokens:{day}")
    assert recorded is not None
    assert int(recorded) == sum(reported)


def _stream_usage(raw: bytes) -> Any:
    import orjson

    for event in raw.split(b"\n\n"):
        if b'"usage":{' in event:
            return orjson.loads(event.removeprefix(b"data: "))["usage"]
    raise AssertionError("no usage chunk")


async def test_every_key_has_a_ttl_and_the_count_stays_bounded_under_churn(
    make_gateway: MakeGateway, clean_redis: RedisServer
) -> None:
    backend = RedisBackend(clean_redis.url, timeout_s=1.0, key_prefix="gw:")
    gw = await make_gateway(state=backend, tenants={"acme": {
        "limits": {"requests_per_minute": 100_000, "tokens_per_minute": 10_000_000,
                   "max_concurrent": 50,
                   "per_session": {"requests_per_minute": 1000, "max_concurrent": 5}},
        "budget": {"daily_tokens": 10_000_000, "monthly_cost": 1000.0},
    }})
    n = 300
    for i in range(n):  # a new agent session every call: the worst case for key churn
        resp = await gw.post("/v1/chat/completions", json=chat(text=f"c{i}"),
                             headers=auth(**{"X-Agent-Session": f"run-{i}"}))
        assert resp.status == 200
    await settled(gw)
    keys = _scan(clean_redis)
    # Per request only the short-lived "settled" marker stays; per-session buckets and the
    # loop guard's fingerprints expire within seconds to a minute.
    assert len(keys) <= 4 * n + 20
    for key in keys:
        ttl = clean_redis.command("PTTL", key)
        # -2: expired since the scan; -1 (no expiry) is what must never happen
        assert isinstance(ttl, int) and (ttl == -2 or 0 <= ttl <= 33 * 86_400_000), (key, ttl)


def _scan(server: RedisServer) -> list[str]:
    import redis

    assert server.port is not None
    client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    try:
        return list(client.scan_iter(count=1000))
    finally:
        client.close()


async def test_budget_figures_stay_the_fleets_while_redis_is_down(
    aiohttp_client: AiohttpClient, upstream_url: str, durable_redis: RedisServer
) -> None:
    """In degraded mode each of N replicas enforces its share of the budget locally; status
    and the budget gauge kept showing that share as what the fleet had left, so with 2
    replicas every tenant read half spent (and the shipped alert fires from 1 - 1/N)."""
    backend = RedisBackend(durable_redis.url, timeout_s=0.25, key_prefix="gw:")
    config = policy(upstream_url, state={"degraded": {"replicas": 2}}, tenants={"acme": {
        "default_max_tokens": 50, "budget": {"daily_tokens": 1_000_000, "soft_ratio": 0.4},
        "loop_guard": {"enabled": False}}})
    gw = await gateway_client(aiohttp_client, create_app(config, state=backend))

    async def remaining() -> float:
        text = await (await gw.get("/metrics")).text()
        line = next(li for li in text.splitlines() if li.startswith(
            'gateway_budget_remaining{budget="daily_tokens",tenant="acme"}'))
        return float(line.rsplit(" ", 1)[1])

    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    await settled(gw)
    before = await remaining()
    assert before > 999_000
    await asyncio.to_thread(durable_redis.kill)
    try:
        for i in range(3):
            resp = await gw.post("/v1/chat/completions", json=chat(text=f"down {i}"),
                                 headers=auth())
            assert resp.status == 200
            # nor does the warning read this replica's half as half the budget spent
            assert "x-gateway-budget-warning" not in resp.headers
        assert gw.app[GATEWAY].degraded.active
        await settled(gw)
        during = await remaining()
        assert before - 500 < during <= before  # what it spent meanwhile, not half of it all
    finally:
        await asyncio.to_thread(durable_redis.start)


async def test_readiness_names_the_degraded_action_before_any_request_meets_it(
    make_gateway: MakeGateway, durable_redis: RedisServer
) -> None:
    gw = await make_gateway(state=RedisBackend(durable_redis.url, timeout_s=0.25))
    await asyncio.to_thread(durable_redis.kill)
    try:
        ready = await (await gw.get("/readyz")).json()  # no request has met the outage yet
        assert (ready["limits_mode"], ready["degraded_action"]) == ("degraded", "local")
    finally:
        await asyncio.to_thread(durable_redis.start)
    for _ in range(100):  # Redis back: global again, with no action to name
        ready = await (await gw.get("/readyz")).json()
        if ready["limits_mode"] == "global":
            break
        await asyncio.sleep(0.05)
    assert (ready["limits_mode"], ready["degraded_action"]) == ("global", None)
