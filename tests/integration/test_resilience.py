"""Breakers, retries and failover through real gateways, against upstreams we can break."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import create_app
from gateway.state import RedisBackend
from tests.gwtest import auth, chat, policy
from tests.plugin_gateway import GatewayClient, MakeGateway
from tests.redis_server import RedisServer

FAST_BREAKER = {"consecutive_failures": 5, "reset_timeout_s": 1.0, "max_reset_timeout_s": 2.0,
                "reset_jitter": 0.0, "half_open_probes": 2, "sync_interval_s": 0.1}


@dataclass
class Switchable:
    """An OpenAI-shaped upstream whose health the test controls."""

    status: int = 503
    delay_s: float = 0.0
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.status != 200:
                return web.json_response({"error": {"message": "down", "type": "server_error"}},
                                         status=self.status)
            return web.json_response({"choices": [{"message": {"content": "ok"}}],
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
        finally:
            self.in_flight -= 1


async def _serve(aiohttp_server: AiohttpServer, upstream: Switchable) -> str:
    server = await aiohttp_server(upstream.app())
    return str(server.make_url("")).rstrip("/")


async def test_an_outage_opens_the_breaker_fast_and_answers_503_with_retry_after(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway
) -> None:
    upstream = Switchable(status=503)
    gw = await make_gateway(upstream=await _serve(aiohttp_server, upstream),
                            breaker=FAST_BREAKER)
    started = time.monotonic()
    statuses = []
    for i in range(30):
        resp = await gw.post("/v1/chat/completions", json=chat(text=f"{i}"), headers=auth())
        statuses.append(resp.status)
        body = await resp.json()
        if body["error"].get("code") == "upstream_unavailable":
            assert 1 <= int(resp.headers["Retry-After"]) <= 2
            break
    assert body["error"]["code"] == "upstream_unavailable", statuses
    assert upstream.calls <= 20 and time.monotonic() - started < 5
    # While open, nothing reaches the upstream: fast failures.
    calls = upstream.calls
    for i in range(10):
        resp = await gw.post("/v1/chat/completions", json=chat(text=f"again {i}"), headers=auth())
        assert resp.status == 503
    assert upstream.calls == calls


async def test_gave_up_answers_tell_the_sdk_not_to_retry(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway
) -> None:
    upstream = Switchable(status=502)
    gw = await make_gateway(upstream=await _serve(aiohttp_server, upstream))
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 502
    assert resp.headers["x-should-retry"] == "false"
    assert resp.headers["x-gateway-attempts"] == "3"
    assert upstream.calls == 3


async def test_failover_hides_a_dead_deployment(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway
) -> None:
    dead = Switchable(status=500)
    dead_url = await _serve(aiohttp_server, dead)
    gw = await make_gateway(
        providers={"dead": {"kind": "openai", "base_url": f"{dead_url}/v1"}},
        models={"gpt-test": {"deployments": [{"provider": "dead", "model": "x"},
                                             {"provider": "main", "model": "upstream-gpt"}]}},
        breaker=FAST_BREAKER,
    )
    statuses = [(await gw.post("/v1/chat/completions", json=chat(text=f"{i}"),
                               headers=auth())).status for i in range(40)]
    assert statuses == [200] * 40
    assert dead.calls <= 10  # the breaker opened: later calls skip it without trying


@pytest.mark.redis
async def test_half_open_probes_are_limited_fleet_wide_and_recovery_closes(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, clean_redis: RedisServer
) -> None:
    upstream = Switchable(status=503)
    url = await _serve(aiohttp_server, upstream)
    config = policy(url, breaker=FAST_BREAKER, retries={"max_attempts": 1})
    fleet: list[GatewayClient] = [
        await aiohttp_client(create_app(config, state=RedisBackend(clean_redis.url,
                                                                   timeout_s=1.0)))
        for _ in range(3)
    ]
    # Trip the breaker through replica 0 only; the others learn it from the shared store.
    for i in range(8):
        await fleet[0].post("/v1/chat/completions", json=chat(text=f"trip {i}"), headers=auth())
    await asyncio.sleep(0.3)  # > one sync interval
    calls = upstream.calls
    for gw in fleet[1:]:
        resp = await gw.post("/v1/chat/completions", json=chat(text="open?"), headers=auth())
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert upstream.calls == calls, "an open breaker let a request through on another replica"

    # Recovery: the upstream is healthy but slow; after the reset timeout every replica is
    # half-open, and 30 concurrent requests may send at most K=2 probes fleet-wide.
    upstream.status, upstream.delay_s = 200, 0.5
    await asyncio.sleep(1.2)
    calls = upstream.calls
    burst = await asyncio.gather(*(
        fleet[i % 3].post("/v1/chat/completions", json=chat(text=f"probe {i}"), headers=auth())
        for i in range(30)
    ))
    assert upstream.calls - calls <= 2 and upstream.max_in_flight <= 2
    assert sum(r.status == 200 for r in burst) == upstream.calls - calls
    # The probes succeeded: the breaker closes everywhere and traffic flows again.
    await asyncio.sleep(0.3)
    upstream.delay_s = 0.0
    results = [(await fleet[i % 3].post("/v1/chat/completions", json=chat(text=f"after {i}"),
                                        headers=auth())).status for i in range(9)]
    assert results == [200] * 9
