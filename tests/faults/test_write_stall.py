"""Resources one client can hold (issue 15 items 7-9), over real sockets on 127.0.0.1.

- A client that stops reading a stream is dropped after ``server.client_write_idle_s``, not at
  the call's total timeout: the upstream call is cancelled, the slot comes back, what was
  produced is charged.
- A request body that never finishes is answered 408 (OpenAI's error shape) after
  ``server.body_read_timeout_s`` and the connection is closed.
- Request-body bytes held at once are bounded per process: beyond it 503 ``overloaded`` with
  Retry-After, before the body is read; ``max_rss_mib`` comes from the cgroup limit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.admission.selfprotect import BodyBudget, SelfProtection
from gateway.app.server import create_app
from gateway.config.admission import AdmissionPolicy
from gateway.errors import RateLimited
from gateway.state import RedisBackend
from tests.faults.helpers import Client, budget_key
from tests.faults.test_client_faults import Flood, _raw_stream_request
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, FakeClock, auth, chat, policy
from tests.plugin_gateway import MakeGateway, gateway_client, settled
from tests.redis_server import RedisServer

ONE_AT_A_TIME = {"acme": {"default_max_tokens": 100, "loop_guard": {"enabled": False},
                          "limits": {"max_concurrent": 1},
                          "budget": {"daily_tokens": 10_000_000}}}


class FloodOrAnswer(Flood):
    """Floods a stream; answers a non-streamed request at once (5 completion tokens)."""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            return await super().handler(request)
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})


@pytest.mark.redis
async def test_a_client_that_stops_reading_is_dropped_after_the_write_idle_time(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, clean_redis: RedisServer
) -> None:
    flood = FloodOrAnswer()
    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", flood.handler)
    server = await aiohttp_server(upstream)
    # The call's total timeout is 120 s: before the fix, the slot was held that long.
    config = policy(str(server.make_url("")).rstrip("/"), tenants=ONE_AT_A_TIME,
                    providers={"main": {"timeouts": {"idle_s": 30, "total_s": 120}}},
                    server={"client_write_idle_s": 1.0})
    gw: Client = await gateway_client(aiohttp_client, create_app(
        config, state=RedisBackend(clean_redis.url)))
    assert gw.server.port is not None
    began = time.monotonic()
    _, writer = await _raw_stream_request(gw.server.port, chat(stream=True))
    try:
        # The client reads nothing more. Within the write idle time (1 s) plus the time the
        # socket buffers take to fill, the upstream call is cancelled.
        while flood.released_at is None and time.monotonic() - began < 15:
            await asyncio.sleep(0.1)
        assert flood.released_at is not None, "the upstream call was never released"
        assert flood.released_at - began < 10, "held far past the write idle time"
        # The only concurrency slot is free again: another request of the tenant is served.
        resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth())
        assert resp.status == 200, await resp.text()
        other = (await resp.json())["usage"]["total_tokens"]
        await settled(gw)
        # What was produced is charged: the prompt and the deltas relayed before the stall
        # (many 16 KB events), far more than the 5-token request beside it.
        charged = int(clean_redis.command("GET", budget_key()))  # type: ignore[arg-type]
        assert charged - other > 10
    finally:
        writer.close()


async def _raw(port: int, head: bytes, body_part: bytes) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body_part)
    await writer.drain()
    return reader, writer


def _head(length: int, key: str = ACME_KEY) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + key.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


async def _response(reader: asyncio.StreamReader, timeout_s: float) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")))
    return head, await asyncio.wait_for(reader.readexactly(length), timeout_s)


async def test_a_body_that_never_finishes_gets_408_and_the_connection_closes(
    make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(server={"body_read_timeout_s": 1.0})
    assert gw.server.port is not None
    began = time.monotonic()
    # The case: authenticated, Content-Length 100000, 10 bytes sent, then nothing.
    reader, writer = await _raw(gw.server.port, _head(100_000), b'{"model":"')
    try:
        head, body = await _response(reader, 10)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"connection: close" in head.lower()
        error = orjson.loads(body)["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        assert 0.9 <= time.monotonic() - began < 5
        # The connection is closed by the gateway (after aiohttp's bounded lingering read
        # of what is left, at most 10 s), not held for the keep-alive timeout or forever.
        assert await asyncio.wait_for(reader.read(), 15) == b""
        assert time.monotonic() - began < 14
    finally:
        writer.close()
    # Others are served meanwhile and after.
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200


async def test_request_bodies_held_at_once_are_bounded_before_they_are_read(
    make_gateway: MakeGateway
) -> None:
    big = 600 * 1024
    gw = await make_gateway(server={"max_body_bytes": big, "max_body_bytes_in_flight": big + 4096,
                                    "body_read_timeout_s": 30})
    port = gw.server.port
    assert port is not None
    # One client is sending a large body slowly: its bytes are held.
    _, slow_writer = await _raw(port, _head(big), b'{"model":')
    try:
        await asyncio.sleep(0.2)
        # A second large body, another tenant's, does not fit: refused at once, before a
        # byte of it is read. (The same tenant's would be refused for its own share: 429.)
        reader, writer = await _raw(port, _head(big, UMBRELLA_KEY), b"")
        head, body = await _response(reader, 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 503"), head
        error = orjson.loads(body)["error"]
        assert error["code"] == "overloaded"
        headers = head.lower()
        assert b"retry-after: " in headers and b"retry-after-ms: " in headers
        # Another tenant's small request still fits beside the slow one; the slow one's
        # tenant holds its whole share (half the budget, at least one body) until it ends.
        resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(UMBRELLA_KEY))
        assert resp.status == 200
        resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
        assert resp.status == 429 and "request bodies" in (await resp.json())["error"]["message"]
    finally:
        slow_writer.close()
    await asyncio.sleep(0.3)  # the slow body's connection is gone: its bytes come back
    resp = await gw.post("/v1/chat/completions", json=chat(text="x" * (big // 2)),
                         headers=auth())
    assert resp.status == 200, await resp.text()


def test_body_budget_retry_after_follows_the_release_rate() -> None:
    clock = FakeClock()
    budget = BodyBudget(clock, cgroup_mib=None)
    assert budget.auto_limit == 256 * 1024 * 1024
    limit = 1000
    holds = [budget.reserve("a", 400, limit, 100), budget.reserve("b", 400, limit, 100)]
    with pytest.raises(Exception) as refused:
        budget.reserve("c", 400, limit, 100)
    assert refused.value.status == 503  # type: ignore[attr-defined]
    assert refused.value.headers["Retry-After"] == "1"  # type: ignore[attr-defined]
    assert budget.held == 800  # a refusal holds nothing
    holds[0].release()
    holds[0].release()  # idempotent
    assert budget.held == 400
    # Bytes came back at 400 per 5 s (80 a second): far over the limit is a longer wait.
    with pytest.raises(Exception) as longer:
        budget.reserve("c", 20_600, limit, 100_000)  # 20,000 over: 250 s at 80 a second
    assert longer.value.status == 503  # type: ignore[attr-defined]
    assert longer.value.headers["retry-after-ms"] == "60000"  # type: ignore[attr-defined]
    assert BodyBudget(clock, cgroup_mib=1024).auto_limit == 256 * 1024 * 1024


def test_one_tenant_holds_at_most_half_of_the_body_budget() -> None:
    clock = FakeClock()
    budget = BodyBudget(clock, cgroup_mib=None)
    limit = 1000
    first = budget.reserve("a", 300, limit, 100)
    second = budget.reserve("a", 200, limit, 100)  # 500: its half
    with pytest.raises(Exception) as refused:
        budget.reserve("a", 1, limit, 100)
    assert refused.value.status == 429  # type: ignore[attr-defined]
    assert "500 bytes of the 500 one tenant may" in str(refused.value)
    assert budget.held_by("a") == 500 and budget.held == 500
    others = [budget.reserve("b", 250, limit, 100), budget.reserve("c", 250, limit, 100)]
    with pytest.raises(Exception) as full:
        budget.reserve("d", 1, limit, 100)
    assert full.value.status == 503  # type: ignore[attr-defined]
    for hold in others:
        hold.release()
    # "a" gave back 300 bytes (a release rate of 300 / 5 s half-life, 60 bytes a second): the
    # 100 it would hold over its share come back in about 1.7 s, by its own releases.
    clock.advance(5)
    first.release()
    budget.reserve("a", 200, limit, 100)  # within its share again
    with pytest.raises(Exception) as again:
        budget.reserve("a", 200, limit, 100)
    wait_ms = int(again.value.headers["retry-after-ms"])  # type: ignore[attr-defined]
    assert 1600 < wait_ms < 1700
    second.release()
    assert budget.held_by("b") == 0 and budget.held == 200
    # At least one body of max_body_bytes, whatever half the budget is.
    assert budget.reserve("e", 400, 600, 400).nbytes == 400


def test_a_body_holds_what_it_turned_out_to_be_once_read() -> None:
    """A chunked body reserves max_body_bytes before it is read; read, it holds its length
    (else 12 small chunked requests in flight held one tenant's whole share)."""
    budget = BodyBudget(FakeClock(), cgroup_mib=None)
    hold = budget.reserve("a", 1000, 4000, 1000)
    hold.keep(10)
    hold.keep(500)  # never more than reserved
    assert budget.held_by("a") == 10 == budget.held
    second = budget.reserve("a", 1000, 4000, 1000)  # 1,010 of its 2,000
    with pytest.raises(Exception) as refused:
        budget.reserve("a", 1000, 4000, 1000)
    assert refused.value.code == "too_many_request_bodies"  # type: ignore[attr-defined]
    hold.release()
    second.release()
    assert budget.held == 0


@pytest.mark.parametrize("v1", [False, True], ids=["cgroup-v2", "cgroup-v1"])
def test_max_rss_defaults_to_the_cgroup_memory_limit(tmp_path: Path, v1: bool) -> None:
    limit = 2 * 1024 * 1024 * 1024
    if v1:
        (tmp_path / "memory").mkdir()
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{limit}\n")
    else:
        (tmp_path / "memory.max").write_text(f"{limit}\n")
    guard = SelfProtection(AdmissionPolicy(), FakeClock(), __import__("random").Random(1),
                           cgroup_root=str(tmp_path))
    assert guard.max_rss_mib == pytest.approx(2048 * 0.85)
    assert guard.bodies.auto_limit == limit // 4
    # A policy value wins over the cgroup.
    explicit = SelfProtection(AdmissionPolicy.model_validate(
        {"self_protection": {"max_rss_mib": 300}}), FakeClock(), __import__("random").Random(1),
        cgroup_root=str(tmp_path))
    assert explicit.max_rss_mib == 300


def test_a_tenants_share_is_half_of_what_the_others_leave() -> None:
    """Half of the whole per tenant let two tenants hold all of it between them; half of what
    the others leave keeps a quarter for everyone else, and shrinks a big holder's share while
    others hold bodies too."""
    budget = BodyBudget(FakeClock(), cgroup_mib=None)
    limit, body = 8000, 1000
    first = [budget.reserve("a", body, limit, body) for _ in range(4)]  # half of 8,000
    second = [budget.reserve("b", body, limit, body) for _ in range(2)]  # half of 4,000 left
    for tenant in ("a", "b"):
        with pytest.raises(Exception) as refused:
            budget.reserve(tenant, body, limit, body)
        assert refused.value.code == "too_many_request_bodies"  # type: ignore[attr-defined]
    third = budget.reserve("c", body, limit, body)  # a quarter is left for the others
    assert budget.held == 7000
    for hold in first[:3]:
        hold.release()
    # "a" now holds 1,000 of the (8,000 - 3,000) / 2 it may: one more, not two.
    budget.reserve("a", body, limit, body)
    with pytest.raises(RateLimited):
        budget.reserve("a", body, limit, body)
    for hold in (*second, third):
        hold.release()
    budget.reserve("a", body, limit, body)  # alone again: half of the whole
    budget.reserve("a", body, limit, body)
    assert budget.held_by("a") == 4000
