"""Tools the provider runs and bills per call are charged to cost budgets by the calls its
answer reports, and reserved by the calls a request may make (gateway/usage.py
``tool_calls``; ``price.per_thousand_calls``): a web search on a cheap model was free."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.gwtest import auth
from tests.plugin_gateway import GatewayClient, MakeGateway, settled

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRICE = {"input_per_million": 1.0, "output_per_million": 2.0,
         "per_thousand_calls": {"web_search": 10.0}}


async def searching_provider(aiohttp_server: AiohttpServer) -> str:
    """Each Responses answer made three web searches; each Anthropic message two."""
    async def responses(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({
            "id": "resp_1", "object": "response", "status": "completed",
            "output": [*({"type": "web_search_call", "id": f"ws_{n}", "status": "completed",
                          "action": {"type": "search", "query": "q"}} for n in range(3)),
                       {"type": "message", "id": "msg_1", "role": "assistant", "content": [
                           {"type": "output_text", "text": "found", "annotations": []}]}],
            "usage": {"input_tokens": 1_000, "output_tokens": 100}})

    async def messages(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "found"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1_000, "output_tokens": 100,
                      "server_tool_use": {"web_search_requests": 2}}})

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def gateway_before(make_gateway: MakeGateway, aiohttp_server: AiohttpServer,
                         handler: Handler, **overrides: Any) -> GatewayClient:
    """A gateway (``overrides`` to its policy) before a provider whose Responses and
    Messages routes are ``handler``."""
    app = web.Application()
    app.router.add_post("/v1/responses", handler)
    app.router.add_post("/v1/messages", handler)
    server = await aiohttp_server(app)
    return await make_gateway(str(server.make_url("")).rstrip("/"), **overrides)


async def web_searches_billed(gw: GatewayClient) -> str:
    """The acme/gpt-test sample of gateway_billed_tool_calls_total for web_search, or ''."""
    await settled(gw)
    metrics = await (await gw.get("/metrics")).text()
    name = 'gateway_billed_tool_calls_total{model="gpt-test",tenant="acme",tool="web_search"} '
    return next((line[len(name):] for line in metrics.splitlines() if line.startswith(name)),
                "")


def searching(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": "look it up", "max_output_tokens": 100,
            "tools": [{"type": "web_search"}], **extra}


async def test_web_searches_are_charged_and_reserved_of_a_cost_budget(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """A 0.05 daily budget: one answer of three searches costs 0.0312 (0.03 of it the
    searches); a second request that may make three more (0.03, beside the search results it
    may read: up to the 8,000-token window, 0.008) does not fit what is left."""
    gw = await make_gateway(await searching_provider(aiohttp_server),
                            models={"gpt-test": {"price": PRICE, "context_window": 8_000}},
                            tenants={"acme": {"budget": {"daily_cost": 0.05}}})
    resp = await gw.post("/v1/responses", json=searching(max_tool_calls=3), headers=auth())
    assert resp.status == 200, await resp.text()
    await settled(gw)
    resp = await gw.post("/v1/responses", json=searching(max_tool_calls=3), headers=auth())
    refusal = (await resp.json())["error"]
    assert resp.status == 429 and refusal["code"] == "insufficient_quota", refusal
    assert "has 0.0188 left" in refusal["message"], refusal
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_billed_tool_calls_total{model="gpt-test",tenant="acme",tool="web_search"}' \
        ' 3.0' in metrics
    assert 'gateway_cost_total{model="gpt-test",tenant="acme"} 0.0312' in metrics


async def test_anthropic_server_tool_use_is_charged(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    gw = await make_gateway(await searching_provider(aiohttp_server),
                            models={"claude-test": {"price": PRICE}})
    resp = await gw.post("/v1/messages", json={
        "model": "claude-test", "max_tokens": 100, "messages": [
            {"role": "user", "content": "look it up"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]},
        headers=auth())
    assert resp.status == 200, await resp.text()
    await settled(gw)
    metrics = await (await gw.get("/metrics")).text()
    # 1,000 x 1 + 100 x 2 = 1,200 micro-units of tokens; 2 searches x 0.01
    assert 'gateway_cost_total{model="claude-test",tenant="acme"} 0.0212' in metrics, metrics


async def test_a_stream_cut_after_its_searches_is_charged_them(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """The provider ran two searches and the stream broke before response.completed, which
    would have counted them: they are charged from the events that showed them."""
    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(2):
            kind = "response.web_search_call.completed"
            await response.write(f'event: {kind}\ndata: {{"type": "{kind}", "item_id": '
                                 f'"ws_{n}", "output_index": {n}}}\n\n'.encode())
        assert request.transport is not None
        request.transport.close()  # cut: no response.completed
        return response

    gw = await gateway_before(make_gateway, aiohttp_server, responses,
                              models={"gpt-test": {"price": PRICE}})
    resp = await gw.post("/v1/responses", json=searching(stream=True), headers=auth())
    await resp.read()
    assert await web_searches_billed(gw) == "2.0"


async def test_a_call_that_ends_without_a_report_is_charged_the_calls_it_reserved(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """The provider was asked, ran for longer than the client's deadline, and never said what
    it did: as for the input, the calls the request reserved are charged."""
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(2.5)
        return web.json_response({})

    gw = await gateway_before(make_gateway, aiohttp_server, slow,
                              models={"gpt-test": {"price": PRICE}})
    resp = await gw.post("/v1/responses", json=searching(max_tool_calls=4),
                         headers=auth(**{"X-Request-Timeout": "1.2"}))
    assert resp.status == 504, await resp.text()
    assert await web_searches_billed(gw) == "4.0"


async def test_a_refusal_names_the_calls_it_reserved(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    gw = await make_gateway(await searching_provider(aiohttp_server), models={"gpt-test": {
        "price": {**PRICE, "per_thousand_calls": {"image_generation": 40.0}}}},
        tenants={"acme": {"budget": {"daily_cost": 0.05}}})
    resp = await gw.post("/v1/responses", json={
        "model": "gpt-test", "input": "draw", "max_output_tokens": 10, "max_tool_calls": 5,
        "tools": [{"type": "image_generation"}]}, headers=auth())
    message = (await resp.json())["error"]["message"]
    assert resp.status == 429, message
    assert "and up to 5 image_generation calls (billed per call: max_tool_calls, or a tool's " \
        "max_uses, reserves fewer)" in message, message


async def test_an_operator_bound_on_calls_is_written_into_bodies_only_when_asked(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """Opt-in ``max_tool_calls``: a request's tools billed per call get that bound (lowered
    to it when larger) in the forwarded body, so its reservation holds; without the opt-in
    the body reaches the provider as the client sent it."""
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.json())
        if request.path == "/v1/messages":
            return web.json_response({"id": "msg_1", "type": "message", "role": "assistant",
                                      "content": [], "stop_reason": "end_turn",
                                      "usage": {"input_tokens": 5, "output_tokens": 1}})
        return web.json_response({"id": "resp_1", "object": "response", "output": [],
                                  "usage": {"input_tokens": 5, "output_tokens": 1}})

    bounded = await gateway_before(make_gateway, aiohttp_server, record,
                                   tenants={"acme": {"max_tool_calls": 2}})
    plain = await gateway_before(make_gateway, aiohttp_server, record)
    search = {"type": "web_search_20250305", "name": "web_search"}
    anthropic = {"model": "claude-test", "max_tokens": 10, "tools": [search],
                 "messages": [{"role": "user", "content": "look"}]}
    for gw in (bounded, plain):
        for body in (searching(), searching(max_tool_calls=10)):
            assert (await gw.post("/v1/responses", json=body, headers=auth())).status == 200
        assert (await gw.post("/v1/messages", json=anthropic, headers=auth())).status == 200
    assert [b.get("max_tool_calls") for b in seen if "input" in b] == [2, 2, None, 10]
    assert [b["tools"][0].get("max_uses") for b in seen if "messages" in b] == [2, None]


async def test_tools_a_stored_prompt_may_bring_are_reserved_and_bounded(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """A stored prompt template (Responses ``prompt``) may carry a web search tool the body
    does not name: one request ran 50 searches past a 0.10 budget, unbounded and unreserved.
    Its priced tools are reserved, and the operator's bound is written into it too."""
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"id": "resp_1", "object": "response", "output": [],
                                  "usage": {"input_tokens": 5, "output_tokens": 1}})

    gw = await gateway_before(make_gateway, aiohttp_server, record, tenants={"acme": {
        "max_tool_calls": 2, "budget": {"daily_cost": 0.015}}}, models={"gpt-test": {
            "price": PRICE, "context_window": 1_000}})
    prompted = {"model": "gpt-test", "prompt": {"id": "pmpt_web"}, "input": "go",
                "max_output_tokens": 10}
    resp = await gw.post("/v1/responses", json=prompted, headers=auth())
    message = (await resp.json())["error"]["message"]
    assert resp.status == 429 and "up to 2 web_search calls" in message, message
    gw = await gateway_before(make_gateway, aiohttp_server, record, tenants={"acme": {
        "max_tool_calls": 2}}, models={"gpt-test": {"price": PRICE}})
    assert (await gw.post("/v1/responses", json=prompted, headers=auth())).status == 200
    assert seen[-1]["max_tool_calls"] == 2
