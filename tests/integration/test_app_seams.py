"""The whole app driven through its seams: a fake clock and wall clock instead of time, and
an in-process transport instead of an upstream server (no socket to any provider).

What the client sees is asserted, with exact numbers the frozen clocks make possible."""

from __future__ import annotations

import asyncio
import calendar
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from gateway.app.server import GATEWAY, create_app
from gateway.state import MemoryBackend
from gateway.upstream.transport import MockHandler, MockRequest, MockResponse, MockTransport
from tests.gwtest import ACME_KEY, FakeClock, auth, chat, policy
from tests.plugin_gateway import GatewayTestServer

UPSTREAM = "http://upstream.invalid"  # never resolved: the transport answers in-process
EVENING = calendar.timegm((2026, 12, 6, 21, 0, 0))  # three hours before the day resets


def completion(request: MockRequest, content: str = "hi there") -> MockResponse:
    return MockResponse.json({
        "id": "chatcmpl-seams", "object": "chat.completion", "created": 1,
        "model": request.json()["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    })


class World:
    """A gateway app on fake clocks, in front of a MockTransport."""

    def __init__(self, handler: MockHandler | None = None, **overrides: Any) -> None:
        self.clock = FakeClock(1000.0)
        self.wall = FakeClock(EVENING)

        async def answer(request: MockRequest) -> MockResponse:
            return completion(request)

        self.upstream = MockTransport(handler or answer)
        self.app = create_app(policy(UPSTREAM, **overrides), state=MemoryBackend(self.clock),
                              clock=self.clock, wall_clock=self.wall, transport=self.upstream)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)


@pytest.fixture
async def served(aiohttp_client: Any) -> AsyncIterator[tuple[World, TestClient[Any, Any]]]:
    async def serve(world: World) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(GatewayTestServer(world.app))
        return client

    world = World(tenants={"acme": {"limits": {"requests_per_minute": 60, "request_burst": 1}}})
    yield world, await serve(world)


async def test_rate_limit_window_moves_with_the_fake_clock_and_upstream_is_in_process(
    served: tuple[World, TestClient[Any, Any]],
) -> None:
    world, gw = served
    first = await gw.post("/v1/chat/completions", json=chat(text="a"), headers=auth())
    assert first.status == 200
    answer = await first.json()
    assert answer["choices"][0]["message"]["content"] == "hi there"
    # The transport got the forwarded request: provider URL, deployment's model, and none of
    # the client's credentials.
    sent = world.upstream.requests[-1]
    assert sent.url == f"{UPSTREAM}/v1/chat/completions"
    assert sent.json()["model"] == "upstream-gpt"
    assert "authorization" not in {k.lower() for k in sent.headers}

    # One request per second, burst 1, and time frozen: the wait is exactly one interval.
    refused = await gw.post("/v1/chat/completions", json=chat(text="b"), headers=auth())
    assert refused.status == 429
    assert refused.headers["retry-after-ms"] == "1000"
    assert refused.headers["Retry-After"] == "1"
    assert len(world.upstream.requests) == 1  # refused at the door: the upstream saw nothing

    # 400 ms on, the bucket would let one through in 600 ms, but that one was promised to the
    # caller refused first: this caller is told the next interval after it.
    world.advance(0.4)
    again = await gw.post("/v1/chat/completions", json=chat(text="c"), headers=auth())
    assert again.status == 429
    assert again.headers["retry-after-ms"] == "1600"

    world.advance(1.6)  # the promised time: admitted and answered
    later = await gw.post("/v1/chat/completions", json=chat(text="d"), headers=auth())
    assert later.status == 200
    assert len(world.upstream.requests) == 2


async def test_daily_budget_resets_at_the_fake_wall_clocks_midnight(aiohttp_client: Any) -> None:
    world = World(tenants={"acme": {"default_max_tokens": 50,
                                    "budget": {"daily_tokens": 60}}})
    gw: TestClient[Any, Any] = await aiohttp_client(GatewayTestServer(world.app))
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    await world.app[GATEWAY].policy.limiter.drain()  # settled: 7 tokens of 60 spent
    spent = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert spent.status == 429
    assert spent.headers["x-should-retry"] == "false"
    # The real reset: midnight UTC by the wall clock, three hours away.
    assert spent.headers["retry-after-ms"] == str(3 * 3600 * 1000)
    world.advance(3 * 3600)
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    assert len(world.upstream.requests) == 2


async def test_official_sdk_through_the_in_process_upstream(
    served: tuple[World, TestClient[Any, Any]],
) -> None:
    world, gw = served
    async with openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY) as oa:
        answer = await oa.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content == "hi there"
    assert answer.usage is not None and answer.usage.total_tokens == 7
    assert len(world.upstream.requests) == 1


async def test_a_stalled_in_process_stream_is_cut_by_the_idle_timeout(aiohttp_client: Any) -> None:
    """The transport contract the attempt's watchdog needs: ``close()`` wakes a pending read."""
    first = (b'data: {"id":"c1","object":"chat.completion.chunk","model":"upstream-gpt",'
             b'"choices":[{"index":0,"delta":{"content":"hel"}}]}\n\n')

    async def stalls() -> AsyncIterator[bytes]:
        yield first
        await asyncio.sleep(60)  # the watchdog must end this, not the test's patience
        yield b"data: [DONE]\n\n"

    async def answer(request: MockRequest) -> MockResponse:
        return MockResponse(200, stalls(), content_type="text/event-stream")

    world = World(answer, providers={"main": {"timeouts": {"idle_s": 0.2}}})
    gw: TestClient[Any, Any] = await aiohttp_client(GatewayTestServer(world.app))
    async with asyncio.timeout(10):
        resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=auth())
        text = await resp.text()
    assert resp.status == 200
    assert '"content":"hel"' in text
    assert "upstream_idle_timeout" in text
    assert "[DONE]" not in text
