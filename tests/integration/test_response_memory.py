"""A follow-up by ``previous_response_id`` reserves of budgets and run caps the stored
conversation it refers to, as the provider reported it, rather than the model's whole context
window (gateway/limits/responses.py): a run cap below the window refused every such step, and
the last window of a budget served only requests that carried their input."""

from __future__ import annotations

import itertools
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import create_app
from gateway.state import RedisBackend
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, policy
from tests.plugin_gateway import GatewayClient, MakeGateway, gateway_client, settled

INLINE = 30_000  # what the first call's (pretend) inline input costs at the provider


async def provider(aiohttp_server: AiohttpServer, calls: list[str] | None = None) -> str:
    """A Responses API that stores each answer and reads it back for a follow-up: the input
    it reports is the stored conversation's size plus 10 for what the body carries. Each
    call's previous_response_id (or "") is appended to ``calls``."""
    stored: dict[str, int] = {}
    ids = itertools.count(1)

    async def responses(request: web.Request) -> web.Response:
        body = await request.json()
        if calls is not None:
            calls.append(body.get("previous_response_id") or "")
        previous = body.get("previous_response_id")
        if previous is not None and previous not in stored:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        input_tokens = stored[previous] + 10 if previous else INLINE
        ident = f"resp_{next(ids)}"
        stored[ident] = input_tokens + 10
        return web.json_response({
            "id": ident, "object": "response", "status": "completed", "model": "m",
            "store": body.get("store", True),
            "output": [{"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "ok"}]}],
            "usage": {"input_tokens": input_tokens, "output_tokens": 10,
                      "total_tokens": input_tokens + 10}})

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def step(previous: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-test", "input": "go on", "max_output_tokens": 10,
                            **extra}
    if previous is not None:
        body["previous_response_id"] = previous
    return body


async def answer(gw: GatewayClient, body: dict[str, Any], key: str | None = None,
                 **headers: str) -> tuple[int, dict[str, Any]]:
    resp = await gw.post("/v1/responses", json=body,
                         headers=auth(key, **headers) if key else auth(**headers))
    data = await resp.json()
    await settled(gw)
    return resp.status, data


async def test_a_follow_up_reserves_the_stored_conversation_it_refers_to(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """With 69,990 tokens of a 100,000 budget left (less than the 128,000 window), a
    follow-up of a 30,010-token conversation was refused; now three steps of the chain are
    served, and the fourth is refused with what it reserves and why."""
    budget = {"budget": {"daily_tokens": 100_000}}
    gw = await make_gateway(await provider(aiohttp_server),
                            tenants={"acme": budget, "umbrella": budget})
    status, first = await answer(gw, step())
    assert status == 200, first
    status, unknown = await answer(gw, step("resp_elsewhere"))  # never seen: the window
    assert status == 429 and "context window of 128,000" in unknown["error"]["message"]
    # Another tenant does not find acme's answers (its own budget has the same room).
    status, data = await answer(gw, step(), UMBRELLA_KEY)
    assert status == 200, data
    status, other = await answer(gw, step(first["id"]), UMBRELLA_KEY)
    assert status == 429 and "context window" in other["error"]["message"], other
    previous = first["id"]
    for _ in range(2):  # 30,010 then 30,030 tokens referred to; 69,990 then 39,960 left
        status, data = await answer(gw, step(previous))
        assert status == 200, data
        previous = data["id"]
    status, refused = await answer(gw, step(previous))  # 30,050 referred to; 9,910 left
    message = refused["error"]["message"]
    assert status == 429 and refused["error"]["code"] == "insufficient_quota", refused
    assert "has 9,910 tokens left" in message, message
    assert "the stored input it refers to by id (30,050 tokens" in message, message
    assert "Its input alone needs more than is left" in message
    assert "context window" not in message


async def test_an_answer_the_provider_does_not_store_is_not_remembered(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer,
        aiohttp_client: AiohttpClient) -> None:
    """``store: false``: nothing to refer to, so nothing is remembered (a follow-up naming it
    reserves the window); nor is an answer's size with the memory turned off."""
    gw = await make_gateway(await provider(aiohttp_server),
                            tenants={"acme": {"budget": {"daily_tokens": 100_000}}})
    status, first = await answer(gw, step(store=False))
    assert status == 200 and first["store"] is False
    status, data = await answer(gw, step(first["id"]))
    assert status == 429 and "context window" in data["error"]["message"], data
    off = policy(await provider(aiohttp_server), state={"remember_responses_s": 0},
                 tenants={"acme": {"budget": {"daily_tokens": 100_000}}})
    gw = await gateway_client(aiohttp_client, create_app(off))
    status, first = await answer(gw, step())
    status, data = await answer(gw, step(first["id"]))
    assert status == 429 and "context window" in data["error"]["message"], data


async def test_a_run_cap_below_the_window_serves_steps_that_refer_to_earlier_ones(
        make_gateway: MakeGateway) -> None:
    """A run capped at 50,000 tokens on a 128,000-token model refused every step that used
    ``previous_response_id``. Streamed on the mock: the id comes in response.completed."""
    gw = await make_gateway(tenants={"acme": {"run_budget": {"max_tokens": 50_000}}})
    session = {"X-Agent-Session": "run-1"}
    resp = await gw.post("/v1/responses", json=step(stream=True), headers=auth(**session))
    assert resp.status == 200
    completed = [orjson.loads(line[6:]) for line in (await resp.read()).splitlines()
                 if line.startswith(b"data: {") and b"response.completed" in line]
    previous = completed[0]["response"]["id"]
    await settled(gw)
    for _ in range(3):
        status, data = await answer(gw, step(previous, stream=False), **session)
        assert status == 200, data
        previous = data["id"]
    status, data = await answer(gw, step("resp_unknown"), **session)
    message = data["error"]["message"]
    assert status == 429 and data["error"]["code"] == "run_budget_exceeded", data
    assert "context window of 128,000" in message and "stopped" not in message, message
    assert "state.remember_responses_s" in message


@pytest.mark.redis
async def test_another_replica_finds_the_size_in_the_store(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer,
        shared_backend_url: str) -> None:
    """Two replicas on one store: the follow-up reaches the replica that did not serve the
    answer it refers to, and reserves its size from the store (Redis and a 3-node Cluster)."""
    url = await provider(aiohttp_server)
    tenants = {"acme": {"budget": {"daily_tokens": 100_000}}}
    one, two = [await make_gateway(url, state=RedisBackend(shared_backend_url, timeout_s=1.0),
                                   tenants=tenants) for _ in range(2)]
    status, first = await answer(one, step())
    assert status == 200, first
    status, data = await answer(two, step(first["id"]))
    assert status == 200, data
    status, data = await answer(one, step(data["id"]))  # the other way round
    assert status == 200, data


async def test_reasoning_items_passed_back_by_id_reserve_what_they_held(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """An agent keeping its own history passes its reasoning items back by id; the provider
    reads them from its store, as input the body does not carry. One it has not seen pass
    reserves the window; one this gateway served reserves its answer's reasoning tokens."""
    reasoning: dict[str, int] = {}

    async def responses(request: web.Request) -> web.Response:
        body = await request.json()
        items = body["input"] if isinstance(body["input"], list) else []
        read = sum(reasoning[i["id"]] for i in items if i.get("type") == "reasoning")
        ident = f"rs_{len(reasoning) + 1}"
        reasoning[ident] = 20_000
        return web.json_response({
            "id": f"resp_{len(reasoning)}", "object": "response", "status": "completed",
            "output": [{"type": "reasoning", "id": ident, "summary": []},
                       {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f",
                        "arguments": "{}"}],
            "usage": {"input_tokens": 10 + read, "output_tokens": 20_010,
                      "output_tokens_details": {"reasoning_tokens": 20_000}}})

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    server = await aiohttp_server(app)
    gw = await make_gateway(str(server.make_url("")).rstrip("/"),
                            tenants={"acme": {"run_budget": {"max_tokens": 100_000}}})
    session = {"X-Agent-Session": "run-2"}
    history: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    status, data = await answer(gw, {**step(), "input": history}, **session)
    assert status == 200, data
    history += [*data["output"], {"type": "function_call_output", "call_id": "c1",
                                  "output": "ok"}]
    status, data = await answer(gw, {**step(), "input": history}, **session)
    assert status == 200, data  # 40,020 of the run's 100,000 used: 20,000 + 40 reserved
    forgotten = [{"type": "reasoning", "id": "rs_elsewhere", "summary": []}, *history]
    status, data = await answer(gw, {**step(), "input": forgotten}, **session)
    message = data["error"]["message"]
    assert status == 429 and "a reasoning item by id" in message, data
    assert "context window of 128,000" in message


async def test_what_it_refers_to_filling_the_window_reserves_the_window_and_says_so(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """A remembered 30,010 tokens and a 100,000-token output cap do not fit a 128,000-token
    window: that reserves the window, and the refusal says so rather than naming a size the
    answer did not report and a cap that would be refused again. Another model, or another
    unseen input beside it, reserves the window too; the hint to refer to what the gateway
    served is given only where that would help."""
    gw = await make_gateway(await provider(aiohttp_server), tenants={"acme": {
        "budget": {"daily_tokens": 100_000}}}, models={"gpt-other": {"deployments": [
            {"provider": "main", "model": "m2"}]}})
    status, first = await answer(gw, step())
    assert status == 200, first
    status, data = await answer(gw, step(first["id"], max_output_tokens=100_000))
    message = data["error"]["message"]
    assert status == 429 and "context window of 128,000" in message, message
    assert "(30,010 tokens, as the provider reported it) and its max_output_tokens would " \
        "not fit the window together. Lower its max_output_tokens." in message, message
    assert "state.remember_responses_s" not in message  # it did refer to such an answer
    status, data = await answer(gw, {**step(first["id"]), "model": "gpt-other"})
    assert status == 429 and "state.remember_responses_s" in data["error"]["message"], data
    status, data = await answer(gw, step(first["id"], tools=[{"type": "web_search"}]))
    message = data["error"]["message"]
    assert status == 429 and "context window" in message, data
    assert "state.remember_responses_s" not in message
    status, data = await answer(gw, step(first["id"]))  # the same model, nothing else
    assert status == 200, data


async def test_a_run_refused_only_for_a_window_it_cannot_fill_is_not_stopped(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """A step reserving the window for something forgotten is refused by a run cap below the
    window; the run has room, so it is not counted as stopped, and its next step runs."""
    gw = await make_gateway(await provider(aiohttp_server),
                            tenants={"acme": {"run_budget": {"max_tokens": 70_000}}})
    session = {"X-Agent-Session": "run-3"}
    status, first = await answer(gw, step(), **session)
    assert status == 200, first
    status, data = await answer(gw, step("resp_forgotten"), **session)
    assert status == 429 and data["error"]["code"] == "run_budget_exceeded", data
    metrics = await (await gw.get("/metrics")).text()
    assert not [line for line in metrics.splitlines()
                if line.startswith("gateway_run_budget_stops_total{")], metrics
    status, data = await answer(gw, step(first["id"]), **session)
    assert status == 200, data


async def test_a_deferred_runs_answer_is_remembered(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """An answer made by a deferred run (Prefer: respond-async) is remembered as one made
    while the client waited."""
    gw = await make_gateway(await provider(aiohttp_server), tenants={"acme": {
        "budget": {"daily_tokens": 100_000}}}, deferred={
        "enabled": True, "poll_interval_s": 0.05, "sweep_interval_s": 0.2})
    resp = await gw.post("/v1/responses", json=step(), headers=auth(Prefer="respond-async"))
    entry = await resp.json()
    assert resp.status == 202, entry
    done = await (await gw.get(f"/v1/deferred/{entry['id']}?wait=8", headers=auth())).json()
    assert done["status"] == "succeeded", done
    await settled(gw)
    status, data = await answer(gw, step(done["response"]["body"]["id"]))
    assert status == 200, data  # 69,990 left: the window would not fit


async def test_an_sdk_agent_chaining_responses_under_a_run_cap_below_the_window(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """The official openai SDK, default settings: an agent run capped at 100,000 tokens on a
    128,000-token model chains three steps by previous_response_id (refused before);
    a step naming an answer the gateway never saw is refused once, final: no SDK retry."""
    calls: list[str] = []
    gw = await make_gateway(await provider(aiohttp_server, calls),
                            tenants={"acme": {"run_budget": {"max_tokens": 100_000}}})
    client = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY,
                                default_headers={"X-Agent-Session": "sdk-run"})
    try:
        first = await client.responses.create(model="gpt-test", input="go",
                                              max_output_tokens=10)
        previous = first.id
        for _ in range(2):  # 30,010 then 30,030 tokens referred to
            reply = await client.responses.create(model="gpt-test", input="go on",
                                                  max_output_tokens=10,
                                                  previous_response_id=previous)
            previous = reply.id
        with pytest.raises(openai.RateLimitError) as info:
            await client.responses.create(model="gpt-test", input="go on",
                                          max_output_tokens=10,
                                          previous_response_id="resp_never_here")
    finally:
        await client.close()
    assert calls == ["", first.id, "resp_2"]  # one call each, none for the refused step
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "context window" in str(info.value)
