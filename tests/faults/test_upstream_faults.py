"""The upstream misbehaving: 5xx storm, hang under load, slow drip, mid-stream cut, garbage,
oversized answers and wrong content types.

What users see: an OpenAI-shaped error (or, once a stream started, an error event), in
bounded time, and no retry amplification; what is recorded: the tokens that were really
consumed. Single-request cases already covered by tests/integration/test_proxy.py (drop, hang at the
first byte, idle timeout, mid-stream cut/error event, unreachable upstream) are not repeated.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

import gateway.upstream.pool
from gateway.app.server import GATEWAY
from gateway.mock.upstream import RECORDED, estimate_prompt_tokens
from gateway.request.classifier import estimate_prompt_tokens as gateway_estimate
from gateway.state import RedisBackend
from tests.faults.helpers import Client, budget_key
from tests.gwtest import auth, chat
from tests.plugin_gateway import MakeGateway, settled
from tests.redis_server import RedisServer

NO_RETRY_TENANT = {"acme": {"default_max_tokens": 50, "loop_guard": {"enabled": False},
                            "budget": {"daily_tokens": 10_000_000}}}


def _openai_error(data: bytes) -> dict[str, Any]:
    err: dict[str, Any] = orjson.loads(data)["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"]
    return err


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def _budget_used(redis: RedisServer, tenant: str = "acme") -> int:
    value = redis.command("GET", budget_key(tenant))
    return int(value) if isinstance(value, bytes) else 0


# --- 5xx storm and hang -------------------------------------------------------------------


async def test_5xx_storm_fails_fast_once_the_breaker_opens_and_recovers_after(
    make_gateway: MakeGateway, mock_upstream: TestServer
) -> None:
    gw = await make_gateway(breaker={"reset_timeout_s": 0.5, "max_reset_timeout_s": 0.5,
                                     "reset_jitter": 0.0}, tenants=NO_RETRY_TENANT)
    storm = auth(**{"x-mock-status": "500"})
    recorded = mock_upstream.app[RECORDED]
    recorded.clear()
    results: list[tuple[int, dict[str, Any], dict[str, str]]] = []

    async def one() -> None:
        resp = await gw.post("/v1/chat/completions", json=chat(), headers=storm)
        results.append((resp.status, orjson.loads(await resp.read()), dict(resp.headers)))

    started = time.monotonic()
    for _ in range(10):  # 60 requests, 6 at a time
        await asyncio.gather(*(one() for _ in range(6)))
    elapsed = time.monotonic() - started
    statuses = [s for s, _, _ in results]
    assert all(s >= 500 for s in statuses)
    assert all(body["error"]["message"] for _, body, _ in results)
    # The breaker opened: most requests never reached the provider, and those the gateway
    # gave up on tell SDKs not to multiply the retries.
    assert len(recorded) <= 30, len(recorded)
    assert statuses.count(503) >= 30
    fast = [h for s, _, h in results if s == 503]
    assert all("Retry-After" in h for h in fast)
    assert any(h.get("x-should-retry") == "false" for s, _, h in results if s == 500)
    assert elapsed < 5.0
    # The storm ends: after the open period a probe closes the breaker again.
    await asyncio.sleep(0.6)
    for _ in range(20):
        resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
        if resp.status == 200:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 200
    assert gw.app[GATEWAY].services.breakers.states()["main/upstream-gpt"] == "closed"


async def test_a_hanging_provider_does_not_slow_another(make_gateway: MakeGateway) -> None:
    # claude-test goes to another provider (the same mock); gpt-test hangs for everyone.
    gw = await make_gateway(providers={"main": {"timeouts": {"first_byte_s": 1.0}}},
                            admission={"self_protection": {"max_loop_lag_ms": 5000}})
    hang = auth(**{"x-mock-fail": "hang"})
    hung = [asyncio.ensure_future(gw.post("/v1/chat/completions", json=chat(), headers=hang))
            for _ in range(20)]
    await asyncio.sleep(0.1)
    began = time.monotonic()
    body = {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user",
                                                                   "content": "hi"}]}
    for _ in range(10):
        resp = await gw.post("/v1/messages", json=body, headers=auth())
        assert resp.status == 200
    assert time.monotonic() - began < 1.0  # served while 20 calls hang elsewhere
    done = await asyncio.wait_for(asyncio.gather(*hung), timeout=5.0)
    for resp in done:
        assert resp.status in (503, 504)
        _openai_error(await resp.read())


# --- slow drip, cuts, and what gets charged ------------------------------------------------


@pytest.mark.redis
async def test_slow_drip_is_cut_at_the_total_timeout_and_charged_for_what_arrived(
    make_gateway: MakeGateway, clean_redis: RedisServer
) -> None:
    gw = await make_gateway(providers={"main": {"timeouts": {"idle_s": 1.0, "total_s": 1.0}}},
                            tenants=NO_RETRY_TENANT, state=RedisBackend(clean_redis.url))
    headers = auth(**{"x-mock-chunks": "40", "x-mock-chunk-gap-ms": "100"})
    began = time.monotonic()
    body = chat(stream=True)
    resp = await gw.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200
    events = _events(await resp.read())
    assert time.monotonic() - began < 2.0
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_total_timeout"
    deltas = sum(1 for e in events if b'"delta"' in e)
    assert 5 <= deltas < 40
    await settled(gw)
    # charged: the output that reached the client, and the prompt the provider did read
    assert _budget_used(clean_redis) == deltas + gateway_estimate(body)


@pytest.mark.redis
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages", "/v1/completions"])
async def test_a_stream_cut_midway_is_charged_for_prompt_and_delivered_output(
    make_gateway: MakeGateway, clean_redis: RedisServer, route: str
) -> None:
    gw = await make_gateway(tenants=NO_RETRY_TENANT, state=RedisBackend(clean_redis.url))
    bodies: dict[str, dict[str, Any]] = {
        "/v1/chat/completions": chat(stream=True),
        "/v1/messages": {
            "model": "claude-test", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "hello there, a longer prompt to count"}]},
        # legacy completions stream choices[].text, with no "delta" in them
        "/v1/completions": {"model": "gpt-test", "max_tokens": 50, "stream": True,
                            "prompt": "hello there, a longer prompt to count"},
    }
    body = bodies[route]
    resp = await gw.post(route, json=body, headers=auth(**{
        "x-mock-fail": "midstream-cut", "x-mock-fail-after": "3", "x-mock-chunks": "10"}))
    raw = await resp.read()
    assert b"upstream_stream_cut" in raw or b"broke off the response" in raw
    await settled(gw)
    # Anthropic reports input tokens at the start (mock's count); OpenAI only at the end, so
    # the gateway's own estimate stands in. Either way the prompt is not free.
    prompt = estimate_prompt_tokens(body) if route == "/v1/messages" else gateway_estimate(body)
    assert _budget_used(clean_redis) == prompt + 3


# --- garbage, oversized, wrong content type ------------------------------------------------


def _garbage_app() -> web.Application:
    """An upstream whose answer is picked by the (upstream) model name."""

    async def handler(request: web.Request) -> web.StreamResponse:
        mode = (await request.json())["model"]
        if mode == "html-200":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if mode == "html-503":
            return web.Response(status=503, text="<html>LB down</html>",
                                content_type="text/html")
        if mode == "broken-json":
            return web.Response(body=b'{"choices": [{"message": ', content_type="application/json")
        if mode == "sse-for-plain":
            return web.Response(body=b"data: {}\n\n", content_type="text/event-stream")
        if mode == "bad-gzip":
            return web.Response(body=b"\x1f\x8b not gzip at all", headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"})
        if mode == "huge-json":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"pad": "')
            for _ in range(64):
                await resp.write(b"x" * 65536)
            await resp.write(b'"}')
            return resp
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if mode == "sse-junk":
            await resp.write(b"\xff\xfe\x00 not an event\n\nretry: x\n\n: comment\n\n"
                             b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n'
                             b"data: {broken json\n\ndata: [DONE]\n\n")
        elif mode == "sse-endless-event":
            try:
                for _ in range(2048):  # 128 MiB offered, with no blank line ever
                    await resp.write(b"data: " + b"x" * 65530)
            except (ConnectionError, RuntimeError):
                pass
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


MODES = ["html-200", "html-503", "broken-json", "sse-for-plain", "bad-gzip", "huge-json",
         "sse-junk", "sse-endless-event"]


@pytest.fixture
async def garbage_gw(aiohttp_server: AiohttpServer, make_gateway: MakeGateway,
                     monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setattr(gateway.upstream.pool, "MAX_RESPONSE_BYTES", 1024 * 1024)
    server = await aiohttp_server(_garbage_app())
    url = str(server.make_url("")).rstrip("/")
    return await make_gateway(
        upstream=url, retries={"max_attempts": 1},
        models={m: {"deployments": [{"provider": "main", "model": m}]} for m in MODES},
        providers={"main": {"timeouts": {"idle_s": 2, "total_s": 5}}})


@pytest.mark.parametrize(("mode", "code"), [
    ("html-200", "upstream_bad_response"),
    ("html-503", "upstream_bad_response"),
    ("broken-json", "upstream_bad_response"),
    ("sse-for-plain", "upstream_bad_response"),
    ("bad-gzip", "upstream_stream_cut"),
    ("huge-json", "upstream_response_too_large"),
])
async def test_unusable_whole_answers_become_a_502(garbage_gw: Client, mode: str,
                                                   code: str) -> None:
    resp = await garbage_gw.post("/v1/chat/completions", json=chat(model=mode),
                                 headers=auth())
    assert resp.status == 502
    assert _openai_error(await resp.read())["code"] == code


async def test_junk_inside_a_stream_is_relayed_without_crashing(garbage_gw: Client) -> None:
    resp = await garbage_gw.post("/v1/chat/completions", json=chat(model="sse-junk",
                                                                  stream=True), headers=auth())
    assert resp.status == 200
    raw = await resp.read()
    assert b'"content":"ok"' in raw and raw.endswith(b"data: [DONE]\n\n")


async def test_an_endless_stream_event_is_cut_not_buffered(garbage_gw: Client) -> None:
    began = time.monotonic()
    resp = await garbage_gw.post("/v1/chat/completions",
                                 json=chat(model="sse-endless-event", stream=True), headers=auth())
    raw = await asyncio.wait_for(resp.read(), timeout=10)
    assert time.monotonic() - began < 5.0
    assert b"upstream_event_too_large" in raw
    assert len(raw) < 4096  # nothing of the oversized event reached the client


class _LoopStuck(Exception):
    pass


async def test_a_retry_with_no_free_slot_gives_up_instead_of_spinning(
    make_gateway: MakeGateway
) -> None:
    """5xx under load with the deployment's concurrency limit full: the retry finds no free
    slot. It must answer (with the upstream's error), not spin through the attempt loop
    without ever yielding, which froze the whole replica (found by bench/soak.py)."""
    gw = await make_gateway(
        admission={"deployments": {"main/upstream-gpt": {
            "min_limit": 1, "initial_limit": 1, "max_limit": 1}}},
        retries={"max_attempts": 3}, breaker={"consecutive_failures": 100, "min_calls": 100},
        tenants=NO_RETRY_TENANT)

    def stuck(*_: Any) -> None:  # a spinning loop cannot be interrupted by asyncio itself
        raise _LoopStuck("the event loop did not come back for 5 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(5)
    try:
        headers = auth(**{"x-mock-status": "500", "x-mock-latency-ms": "200"})
        began = time.monotonic()
        answers = await asyncio.gather(*(gw.post("/v1/chat/completions", json=chat(text=str(i)),
                                                 headers=headers) for i in range(2)))
        elapsed = time.monotonic() - began
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert elapsed < 3.0
    for resp in answers:
        assert resp.status == 500  # the upstream's own answer, relayed after giving up
        assert resp.headers["x-should-retry"] == "false"
