"""Clients that misbehave: stop reading a stream, disconnect mid-stream, trickle headers.

What users (the others) see: nothing; the gateway keeps serving. What is recorded: the
disconnected stream is charged for the prompt and the output that was relayed, and its
concurrency slot comes back at once. Buffering per stream is bounded by socket buffers, and a
client that stops reading is dropped at the call's total timeout, releasing the upstream.
(tests/integration/test_proxy.py already shows a disconnect cancels the upstream call at once.)
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import create_app
from gateway.request.classifier import estimate_prompt_tokens
from gateway.state import RedisBackend
from tests.faults.helpers import Client, budget_key
from tests.gwtest import ACME_KEY, NO_LAG_SHEDDING, auth, chat, policy
from tests.plugin_gateway import MakeGateway, settled
from tests.redis_server import RedisServer

ONE_AT_A_TIME = {"acme": {"default_max_tokens": 100, "loop_guard": {"enabled": False},
                          "limits": {"max_concurrent": 1},
                          "budget": {"daily_tokens": 10_000_000}}}


async def _raw_stream_request(port: int, body: dict[str, Any], rcvbuf: int = 4096) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:
    """Send a streamed chat request on a socket with a small receive buffer; read the head."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = orjson.dumps(body)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                 + ACME_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


class Flood:
    """An upstream that streams as fast as it is allowed to: 16 KB events, 256 MB in all."""

    EVENT = b'data: {"choices":[{"delta":{"content":"' + b"x" * 16000 + b'"}}]}\n\n'

    def __init__(self) -> None:
        self.written = 0
        self.released_at: float | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(16_000):
                await resp.write(self.EVENT)
                self.written += len(self.EVENT)
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            self.released_at = time.monotonic()
            raise
        return resp


async def test_a_client_that_stops_reading_is_buffered_boundedly_then_dropped(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway
) -> None:
    flood = Flood()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", flood.handler)
    server = await aiohttp_server(app)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"),
                            providers={"main": {"timeouts": {"idle_s": 1.5, "total_s": 3}}},
                            tenants=ONE_AT_A_TIME)
    began = time.monotonic()
    assert gw.server.port is not None
    _, writer = await _raw_stream_request(gw.server.port, chat(stream=True))
    try:
        await asyncio.sleep(1.0)  # the client reads nothing more
        stalled_at = flood.written
        await asyncio.sleep(0.5)
        # Backpressure reached the upstream: it is blocked, having sent a few socket
        # buffers' worth of the 256 MB it had, and the gateway holds no more than that.
        assert flood.written == stalled_at
        assert flood.written < 32 * 1024 * 1024
        # A client that never reads again is dropped at the call's total timeout (3 s), and
        # the upstream call with it, rather than holding both forever.
        while flood.released_at is None and time.monotonic() - began < 6:
            await asyncio.sleep(0.1)
        assert flood.released_at is not None, "the upstream call was never released"
        assert flood.released_at - began < 4.5
        # ... and its concurrency slot is free again (the limit is 1).
        resp = await gw.post("/v1/chat/completions", json=chat(model="claude-test",
                                                                max_tokens=5),
                             headers=auth(), timeout=None)
        assert resp.status != 429
    finally:
        writer.close()


@pytest.mark.redis
@pytest.mark.parametrize("handler_cancellation", [True, False],
                         ids=["cancelling-server", "non-cancelling-server"])
async def test_disconnect_mid_stream_frees_the_slot_and_charges_what_was_sent(
    aiohttp_client: AiohttpClient, upstream_url: str, clean_redis: RedisServer,
    handler_cancellation: bool,
) -> None:
    # `gateway serve` runs with handler_cancellation=True; aiohttp's default is False.
    config = policy(upstream_url, tenants=ONE_AT_A_TIME)
    gw: Client = await aiohttp_client(
        create_app(config, state=RedisBackend(clean_redis.url)),
        server_kwargs={"handler_cancellation": handler_cancellation})
    body = chat(stream=True, text="a prompt that is about forty bytes long..")
    headers = auth(**{"x-mock-chunks": "60", "x-mock-chunk-gap-ms": "30"})
    resp = await gw.post("/v1/chat/completions", json=body, headers=headers)
    seen = 0
    while seen < 3:
        seen += (await resp.content.readuntil(b"\n\n")).count(b'"delta"')
    resp.close()  # the client goes away after three deltas
    # The only slot is free again straight away.
    for _ in range(40):
        again = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
        if again.status == 200:
            break
        await asyncio.sleep(0.05)
    assert again.status == 200, await again.text()
    first = await again.json()
    await settled(gw)
    used = int(clean_redis.command("GET", budget_key()))  # type: ignore[arg-type]
    charged_for_stream = used - first["usage"]["total_tokens"]
    prompt = estimate_prompt_tokens(body)
    # The prompt and the deltas relayed before the disconnect (a few more may have been in
    # flight), not the 60 + prompt reservation.
    assert prompt + 3 <= charged_for_stream <= prompt + 20


async def test_slow_header_clients_do_not_hold_up_others(make_gateway: MakeGateway) -> None:
    # 200 connections dripping their headers share this test's one loop with the gateway, its
    # upstream and the client: a CI stall there once tripped the loop-lag shedding (a 503 for
    # a normal request). What is tested is that the slow clients do not hold the others up.
    gw = await make_gateway(admission=NO_LAG_SHEDDING)
    port = gw.server.port
    trickle = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Slow: "
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(200):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(trickle)
            writers.append(writer)

        async def drip() -> None:
            for _ in range(10):
                for writer in writers:
                    writer.write(b"a")
                await asyncio.sleep(0.1)

        dripping = asyncio.ensure_future(drip())
        began = time.monotonic()
        for _ in range(20):
            resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
            assert resp.status == 200, await resp.text()
        assert time.monotonic() - began < 2.0
        await dripping
    finally:
        for writer in writers:
            writer.close()
