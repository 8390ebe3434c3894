"""The usage corpus (tests/data/usage/): real-shaped provider answers, each relayed through the
gateway (whole; streamed; streamed with the client leaving right after the final usage event)
on every state backend, recording exactly the expected tokens per billed dimension, the
expected cost in micro-units, and exactly that cost and those tokens in the tenant's budget
counters in the store."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.app.runtime import Gateway
from gateway.app.server import GATEWAY
from gateway.limits.periods import period_keys
from gateway.state import MemoryBackend, StateBackend
from tests.gwtest import ACME_KEY, auth
from tests.plugin_gateway import MakeGateway, settled

CORPUS = Path(__file__).parent.parent / "data" / "usage"
EXPECTED: dict[str, Any] = json.loads((CORPUS / "expected.json").read_text())
PRICES = {name: {k: v for k, v in p.items() if k != "provider"}
          for name, p in EXPECTED["prices"].items()}
RUNS = [(name, variant) for name in sorted(EXPECTED["cases"])
        for variant in (("stream", "disconnect") if name.endswith(".sse") else ("whole",))]
_GATE: web.AppKey[asyncio.Event] = web.AppKey("gate")


def test_every_corpus_file_has_an_expectation_and_back() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.suffix in (".json", ".sse")}
    assert files - {"expected.json"} == set(EXPECTED["cases"])


def _events(raw: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e.strip()]


def _last_usage_event(events: list[bytes]) -> int:
    """Index of the event with the final usage (the last that carries a usage object)."""
    return max(i for i, e in enumerate(events) if b'"usage":{' in e)


async def _replay(request: web.Request) -> web.StreamResponse:
    """The upstream: answers with the corpus file the x-mock-case header names. With
    x-mock-hold it stops after the final usage event until the test lets it go on."""
    raw = (CORPUS / request.headers["x-mock-case"]).read_bytes()
    await request.read()
    if not request.headers["x-mock-case"].endswith(".sse"):
        return web.Response(body=raw, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    events = _events(raw)
    cut = _last_usage_event(events) + 1
    for event in events[:cut]:
        await resp.write(event)
    if request.headers.get("x-mock-hold"):
        await asyncio.wait_for(request.app[_GATE].wait(), 10)
    try:
        for event in events[cut:]:
            await resp.write(event)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


@pytest.fixture
async def replay(aiohttp_server: AiohttpServer) -> TestServer:
    app = web.Application()
    app[_GATE] = asyncio.Event()
    app.router.add_post("/{tail:.*}", _replay)
    server: TestServer = await aiohttp_server(app)
    return server


def _body(route: str, model: str, stream: bool) -> dict[str, Any]:
    if route == "/v1/embeddings":
        return {"model": model, "input": "hello"}
    body: dict[str, Any] = {"model": model, "stream": stream}
    if route == "/v1/responses":
        body["input"] = "hello"
    elif route == "/v1/completions":
        body.update(prompt="hello", max_tokens=4096)
    else:
        body.update(messages=[{"role": "user", "content": "hello"}], max_tokens=4096)
    if stream and route in ("/v1/chat/completions", "/v1/completions"):
        body["stream_options"] = {"include_usage": True}  # the client sees the usage event
    return body


async def _counter(backend: StateBackend, key: str) -> int:
    if isinstance(backend, MemoryBackend):
        limits = backend.limits
        return int(limits._get(key, limits.now_ms()) or 0)
    raw = await backend.get(key)
    return int(raw or 0)


def _budget_keys() -> tuple[str, str]:
    daily = next(part for period, part, _, _ in period_keys(time.time()) if period == "daily")
    return f"rl:{{t:acme}}:b:cost:{daily}", f"rl:{{t:acme}}:b:tokens:{daily}"


@pytest.mark.parametrize(("name", "variant"), RUNS, ids=[f"{n}-{v}" for n, v in RUNS])
async def test_corpus_case_is_charged_exactly(
    name: str, variant: str, replay: TestServer, make_gateway: MakeGateway,
    backend: StateBackend,
) -> None:
    case = EXPECTED["cases"][name]
    upstream = str(replay.make_url("")).rstrip("/")
    gw = await make_gateway(
        upstream, state=backend,
        models={m: {"deployments": [{"provider": "claude" if p["provider"] == "anthropic"
                                     else "main", "model": m}], "price": PRICES[m]}
                for m, p in EXPECTED["prices"].items()},
        tenants={"acme": {"budget": {"daily_cost": 1000.0, "daily_tokens": 10**9}}},
    )
    gateway = gw.app[GATEWAY]
    cost_key, tokens_key = _budget_keys()
    before = (await _counter(backend, cost_key), await _counter(backend, tokens_key))
    headers = auth(ACME_KEY, **{"x-mock-case": name})
    body = _body(case["route"], case["model"], variant != "whole")
    if variant == "disconnect":
        headers["x-mock-hold"] = "1"
        await _leave_after_usage(gw.make_url(case["route"]), headers, body, name)
        await asyncio.sleep(0.2)  # the gateway's side of the connection is closed by now
        replay.app[_GATE].set()
    else:
        resp = await gw.post(case["route"], json=body, headers=headers)
        assert resp.status == 200, await resp.text()
        await resp.read()
    recorded = await _recorded(gateway)
    await settled(gw)
    assert recorded == {**case["tokens"], "cost_micros": case["cost_micros"]}
    after = (await _counter(backend, cost_key), await _counter(backend, tokens_key))
    assert (after[0] - before[0], after[1] - before[1]) == (case["cost_micros"],
                                                           case["budget_tokens"])
    if variant == "disconnect":
        outcome = gateway.metrics.registry.get_sample_value("gateway_requests_total", {
            "tenant": "acme", "model": case["model"], "priority": "normal",
            "outcome": "client_disconnected"})
        assert outcome == 1


async def _leave_after_usage(url: Any, headers: dict[str, str], body: dict[str, Any],
                             name: str) -> None:
    """Read the stream up to and including the final usage event, then close the connection."""
    wanted = _last_usage_event(_events((CORPUS / name).read_bytes())) + 1
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url, json=body, headers=headers)
        assert resp.status == 200
        seen = b""
        while seen.count(b"\n\n") < wanted:
            chunk = await asyncio.wait_for(resp.content.readany(), 10)
            assert chunk, "the stream ended before its usage event"
            seen += chunk
        assert b'"usage":{' in seen
        resp.close()  # drops the connection: the client is gone mid-stream


async def _recorded(gateway: Gateway) -> dict[str, int]:
    """The tenant's recorded tokens by dimension and cost, once the request was observed."""
    for _ in range(1000):
        totals = gateway.metrics.usage_by_tenant.get("acme")
        if totals:
            return dict(totals)
        await asyncio.sleep(0.01)
    raise AssertionError("the request was never recorded")
