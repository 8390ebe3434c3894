"""A client that leaves after its call was sent upstream is still charged (red team, HIGH).

``POST /v1/responses`` with a 50,000-token ``instructions``, a 0.7 s client timeout and an
upstream taking 1.5 s: the access log said ``client_disconnected``, the attempt ``cancelled``,
tokens 0 and the whole reservation came back. A stream abandoned before its first byte the
same. Rule: every attempt whose request was written to the upstream and left no usage
(cancelled, timed out, cut) is charged at least the prompt estimate, exactly once; a request
that never reached an upstream is charged nothing. On every state backend.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.app.server import GATEWAY
from gateway.limits.periods import period_keys
from gateway.mock.upstream import RECORDED
from gateway.request.classifier import estimate_prompt_tokens
from gateway.state import MemoryBackend, StateBackend
from tests.gwtest import ACME_KEY, auth, chat
from tests.plugin_gateway import GatewayClient, MakeGateway, settled

ONE_SLOT = {"concurrency": {"min_limit": 1, "initial_limit": 1, "max_limit": 1}}
INSTRUCTIONS = "word " * 8_000  # about 10,000 tokens by the estimate


async def _spent(backend: StateBackend) -> int:
    """The tenant's daily token budget counter, as the store has it."""
    daily = next(part for period, part, _, _ in period_keys(time.time()) if period == "daily")
    key = f"rl:{{t:acme}}:b:tokens:{daily}"
    if isinstance(backend, MemoryBackend):
        return int(backend.limits._get(key, backend.limits.now_ms()) or 0)
    return int(await backend.get(key) or 0)


async def _left(gw: GatewayClient, route: str, body: dict[str, Any], after_s: float,
                **headers: str) -> None:
    """Send, then hang up after ``after_s`` (the client's timeout), before any answer."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(after_s):
            resp = await gw.post(route, json=body, headers=auth(**headers))
            await resp.read()


async def _disconnects_seen(gw: GatewayClient, n: int,
                            outcome: str | None = "client_disconnected") -> None:
    """Wait until the gateway ended ``n`` requests with ``outcome`` (None: any), then for their
    settlements."""
    metrics = gw.app[GATEWAY].metrics.registry
    for _ in range(1000):
        seen = sum(s.value for m in metrics.collect() if m.name == "gateway_requests"
                   for s in m.samples if s.name == "gateway_requests_total"
                   and outcome in (None, s.labels.get("outcome")))
        if seen >= n:
            await settled(gw)
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the gateway never ended {n} requests with {outcome}")


async def _budgeted(make_gateway: MakeGateway, backend: StateBackend, upstream: str | None = None,
                    **extra: Any) -> GatewayClient:
    return await make_gateway(upstream, state=backend,
                              tenants={"acme": {"budget": {"daily_tokens": 10**7}}},
                              admission=extra.pop("admission", {}), **extra)


async def test_a_client_that_leaves_while_the_upstream_works_is_charged_the_prompt(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    gw = await _budgeted(make_gateway, backend)
    body: dict[str, Any] = {"model": "gpt-test", "input": "hi", "instructions": INSTRUCTIONS,
            "max_output_tokens": 100}
    await _left(gw, "/v1/responses", body, 0.5, **{"x-mock-latency-ms": "1500"})
    await _disconnects_seen(gw, 1)
    assert await _spent(backend) == estimate_prompt_tokens(body)


async def test_a_stream_abandoned_before_its_first_byte_is_charged_the_prompt(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    gw = await _budgeted(make_gateway, backend)
    body = chat(text="x" * 40_000, max_tokens=500, stream=True)
    await _left(gw, "/v1/chat/completions", body, 0.5, **{"x-mock-latency-ms": "1500"})
    await _disconnects_seen(gw, 1)
    assert await _spent(backend) == estimate_prompt_tokens(body)


async def test_a_client_that_leaves_before_any_upstream_call_is_charged_nothing(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    # One slot on the deployment, held by a slow request: the second waits in the admission
    # queue and its client leaves there, before anything was sent for it.
    gw = await _budgeted(make_gateway, backend, admission=ONE_SLOT)
    slow = asyncio.create_task(gw.post("/v1/chat/completions", json=chat(max_tokens=5),
                                       headers=auth(**{"x-mock-latency-ms": "1500"})))
    await asyncio.sleep(0.3)
    await _left(gw, "/v1/chat/completions", chat(text="y" * 40_000, max_tokens=5), 0.3)
    answer = await (await slow).json()
    await _disconnects_seen(gw, 1)
    assert await _spent(backend) == answer["usage"]["total_tokens"]


async def test_each_sent_attempt_without_usage_is_charged_once(
    make_gateway: MakeGateway, backend: StateBackend, aiohttp_server: AiohttpServer,
) -> None:
    # The first call gets no answer within the first-byte timeout, the retry answers: the
    # first attempt's prompt was read all the same, so it is charged on top of the answer.
    calls = 0

    async def upstream(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        if calls == 1:
            await asyncio.sleep(3)
        return web.json_response({
            "id": "c", "object": "chat.completion", "model": "upstream-gpt",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}})

    app = web.Application()
    app.router.add_post("/{tail:.*}", upstream)
    server = await aiohttp_server(app)
    gw = await _budgeted(make_gateway, backend, str(server.make_url("")).rstrip("/"),
                         providers={"main": {"timeouts": {"first_byte_s": 0.5}}})
    body = chat(text="z" * 4000, max_tokens=5)
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200, await resp.text()
    await resp.read()
    await settled(gw)
    assert calls == 2
    assert await _spent(backend) == 8 + estimate_prompt_tokens(body)


async def test_the_openai_sdk_timing_out_is_charged_each_call_that_reached_the_upstream(
    make_gateway: MakeGateway, mock_upstream: TestServer,
) -> None:
    # The SDK with its default retries and a client timeout shorter than the upstream. Each
    # call that reached the upstream was read (and is billed) by the provider, so each is
    # charged its prompt; a retry the gateway refuses up front (the SDK's own read timeout
    # cannot be met, 504) reached nothing and is charged nothing.
    # Memory backend only: the store path is the one the tests above cover on every backend.
    backend = MemoryBackend()
    gw = await _budgeted(make_gateway, backend)
    base = str(gw.make_url("")).rstrip("/") + "/v1"
    # 1.2 s: above the gateway's default first-byte expectation (1 s), so the deadline check
    # lets the call through (at 0.5 s the gateway refuses it up front: nothing is charged).
    client = openai.AsyncOpenAI(base_url=base, api_key=ACME_KEY, timeout=1.2,
                                default_headers={"x-mock-latency-ms": "3000"})
    body: dict[str, Any] = {"model": "gpt-test", "input": "hi", "instructions": INSTRUCTIONS,
            "max_output_tokens": 100}
    with pytest.raises((openai.APITimeoutError, openai.InternalServerError)):
        await client.responses.create(**body)
    sent = len([r for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")])
    assert sent >= 1
    # each ended by the gateway's own deadline (the SDK's read timeout, 504) or the client
    await _disconnects_seen(gw, sent, outcome=None)
    assert await _spent(backend) == sent * estimate_prompt_tokens(body)
