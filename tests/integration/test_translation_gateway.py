"""Translation through a running gateway, with the official SDKs on the client side.

The openai SDK talks to a model served by an Anthropic-kind deployment and the anthropic SDK
to one served by an OpenAI-kind deployment. Text answers come from the mock upstream (which
speaks both dialects); tool calls and structured output from a replay upstream that answers
with the corpus's recorded provider transcripts (tests/data/translation/), so the exact
provider wire format is what the gateway translates.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, cast

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from anthropic.types import Message, MessageParam, ToolParam
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionMessageToolCallUnion,
)
from pydantic import BaseModel
from pytest_aiohttp import AiohttpServer

from gateway.mock.upstream import RECORDED
from tests.gwtest import ACME_KEY, auth, chat, log_fields
from tests.plugin_gateway import GatewayClient, MakeGateway, settled

DATA = Path(__file__).parent.parent / "data" / "translation"
TIMEOUTS = {"connect_s": 2, "first_byte_s": 5, "idle_s": 2, "total_s": 20}


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> GatewayClient:
    return await make_gateway()


def _base(gw: GatewayClient) -> str:
    return str(gw.make_url("")).rstrip("/")


def _access(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    return log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])


class Replay:
    """An upstream answering with a corpus case's recorded answer (whole or streamed),
    chosen by the ``x-mock-replay`` header; keeps every body it received."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append((request.path, body))
        case = json.loads((DATA / f"{request.headers['x-mock-replay']}.json").read_text())
        if not body.get("stream"):
            return web.json_response(case["answer"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in case["stream"]:
            await resp.write(event.encode() + b"\n\n")
        return resp


@pytest.fixture
async def replay(aiohttp_server: AiohttpServer) -> tuple[Replay, str]:
    upstream = Replay()
    app = web.Application()
    app.router.add_post("/v1/messages", upstream.handle)
    app.router.add_post("/v1/chat/completions", upstream.handle)
    server = await aiohttp_server(app)
    return upstream, str(server.make_url("")).rstrip("/")


async def _replay_gateway(make_gateway: MakeGateway, url: str) -> GatewayClient:
    return await make_gateway(
        providers={"r_openai": {"kind": "openai", "base_url": f"{url}/v1",
                                "forward_headers": ["x-mock-*"], "timeouts": TIMEOUTS},
                   "r_claude": {"kind": "anthropic", "base_url": url,
                                "forward_headers": ["x-mock-*"], "timeouts": TIMEOUTS}},
        models={"claude-tools": {"deployments": [{"provider": "r_claude", "model": "claude-x"}]},
                "gpt-tools": {"deployments": [{"provider": "r_openai", "model": "gpt-x"}]}})


# --- openai SDK -> Anthropic-kind deployment ------------------------------------------------

async def test_openai_sdk_chat_and_stream_on_an_anthropic_deployment(
        gw: GatewayClient, mock_upstream: TestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="claude-test", messages=[{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "hello"}],
            extra_headers={"x-mock-chunks": "3"})
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.content == "tok " * 3
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        sent = mock_upstream.app[RECORDED][-1]
        assert sent.path == "/v1/messages"
        assert sent.body["system"] == [{"type": "text", "text": "Be brief."}]
        # no cap in the request: Anthropic gets the cap the gateway reserved for it
        assert sent.body["max_tokens"] == 1024 and sent.body["model"] == "upstream-claude"
        line = _access(caplog)
        assert (line["client_dialect"], line["upstream_dialect"]) == ("openai", "anthropic")

        stream = await client.chat.completions.create(
            model="claude-test", messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-mock-chunks": "5"})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok " * 5
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        await settled(gw)
        line = _access(caplog)
        assert (line["tokens_out"], line["usage_reported"]) == (5, True)
        metrics = await (await gw.get("/metrics")).text()
        assert 'gateway_dialect_requests_total{client="openai",upstream="anthropic"} 2.0' \
            in metrics
    finally:
        await client.close()


async def test_openai_sdk_tool_calls_and_structured_output_on_an_anthropic_deployment(
        make_gateway: MakeGateway, replay: tuple[Replay, str]) -> None:
    upstream, url = replay
    gw = await _replay_gateway(make_gateway, url)
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    case = json.loads((DATA / "openai_client_tools.json").read_text())
    request = {k: v for k, v in case["request"].items() if k != "model"}
    try:
        reply = await client.chat.completions.create(
            model="claude-tools", **request, extra_headers={"x-mock-replay": "openai_client_tools"})
        calls = reply.choices[0].message.tool_calls or []
        assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("toolu_A", "get_weather", {"city": "Rome"}),
            ("toolu_B", "get_time", {"tz": "Europe/Rome"})]
        assert reply.choices[0].finish_reason == "tool_calls"
        path, sent = upstream.bodies[-1]
        assert path == "/v1/messages"
        assert sent == {**case["expected_request"], "model": "claude-x"}

        # streamed: the SDK's own accumulator rebuilds both calls from the argument deltas
        async with client.chat.completions.stream(
                model="claude-tools", **request,
                extra_headers={"x-mock-replay": "openai_client_tools"}) as stream:
            final = await stream.get_final_completion()
        calls = final.choices[0].message.tool_calls or []
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Rome"}), ("get_time", {"tz": "Europe/Rome"})]

        class Person(BaseModel):
            name: str
            age: int

        parsed = await client.chat.completions.parse(
            model="claude-tools", messages=[{"role": "user", "content": "Ada, 36"}],
            response_format=Person, extra_headers={"x-mock-replay": "openai_client_json_schema"})
        assert parsed.choices[0].message.parsed == Person(name="Ada", age=36)
        assert upstream.bodies[-1][1]["tool_choice"] == {"type": "tool", "name": "json_answer"}
    finally:
        await client.close()


# --- anthropic SDK -> OpenAI-kind deployment ------------------------------------------------

async def test_anthropic_sdk_messages_and_stream_on_an_openai_deployment(
        gw: GatewayClient, mock_upstream: TestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    client = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY, max_retries=0)
    try:
        msg = await client.messages.create(
            model="gpt-test", max_tokens=20, system="Be brief.",
            messages=[{"role": "user", "content": "hi"}], extra_headers={"x-mock-chunks": "3"})
        assert msg.type == "message" and msg.stop_reason == "end_turn"
        assert msg.content[0].type == "text" and msg.content[0].text == "tok " * 3
        assert msg.usage.output_tokens == 3
        sent = mock_upstream.app[RECORDED][-1]
        assert sent.path == "/v1/chat/completions"
        assert sent.body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert sent.body["max_completion_tokens"] == 20

        async with client.messages.stream(
                model="gpt-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-mock-chunks": "4"}) as stream:
            text = await stream.get_final_text()
            final = await stream.get_final_message()
        assert text == "tok " * 4
        assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0
        await settled(gw)
        line = _access(caplog)
        assert (line["client_dialect"], line["upstream_dialect"]) == ("anthropic", "openai")
        assert line["tokens_out"] == 4
        assert line["tokens_in"] == final.usage.input_tokens
    finally:
        await client.close()


async def test_anthropic_sdk_tool_use_on_an_openai_deployment(
        make_gateway: MakeGateway, replay: tuple[Replay, str]) -> None:
    upstream, url = replay
    gw = await _replay_gateway(make_gateway, url)
    client = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY, max_retries=0)
    case = json.loads((DATA / "anthropic_client_tools.json").read_text())
    request = {k: v for k, v in case["request"].items() if k not in ("model", "stream")}
    headers = {"x-mock-replay": "anthropic_client_tools"}
    try:
        msg = await client.messages.create(model="gpt-tools", **request, extra_headers=headers)
        assert [(b.type, getattr(b, "name", None), getattr(b, "input", None))
                for b in msg.content] == [("tool_use", "get_weather", {"city": "Rome"}),
                                          ("tool_use", "get_time", {"tz": "Europe/Rome"})]
        assert msg.stop_reason == "tool_use"
        path, sent = upstream.bodies[-1]
        assert path == "/v1/chat/completions"
        assert sent == {**case["expected_request"], "model": "gpt-x"}

        async with client.messages.stream(model="gpt-tools", **request,
                                          extra_headers=headers) as stream:
            final = await stream.get_final_message()
        assert [getattr(b, "input", None) for b in final.content] == [
            {"city": "Rome"}, {"tz": "Europe/Rome"}]
        assert final.stop_reason == "tool_use"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (520, 61)
    finally:
        await client.close()


# --- errors, cut streams, refusals ----------------------------------------------------------

async def test_upstream_errors_reach_each_client_in_its_own_dialect_with_the_same_headers(
        make_gateway: MakeGateway) -> None:
    gw = await make_gateway(retries={"max_attempts": 1})
    headers = auth(**{"x-mock-status": "429", "x-mock-retry-after": "7"})
    resp = await gw.post("/v1/chat/completions", json=chat(model="claude-test"), headers=headers)
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]["type"] == "rate_limit_error"

    resp = await gw.post("/v1/messages", json=chat(model="gpt-test", max_tokens=5),
                         headers={**headers, "x-mock-status": "503"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "7"
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"


async def test_openai_sdk_sees_the_translated_429_as_a_rate_limit_error(
        make_gateway: MakeGateway) -> None:
    gw = await make_gateway(retries={"max_attempts": 1})
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="claude-test", messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-mock-status": "429", "x-mock-retry-after": "1"})
    finally:
        await client.close()


@pytest.mark.parametrize(("path", "model", "error_prefix"), [
    ("/v1/chat/completions", "claude-test", b"data: {\"error\""),
    ("/v1/messages", "gpt-test", b"event: error\n"),
])
async def test_a_cut_translated_stream_ends_with_the_clients_error_event_and_is_charged(
        gw: GatewayClient, caplog: pytest.LogCaptureFixture, path: str, model: str,
        error_prefix: bytes) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    headers = auth(**{"x-mock-fail": "midstream-cut", "x-mock-fail-after": "3",
                      "x-mock-chunks": "10"})
    resp = await gw.post(path, json=chat(model=model, stream=True, max_tokens=50),
                         headers=headers)
    raw = await resp.read()
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1].startswith(error_prefix)
    assert b"[DONE]" not in raw and b"message_stop" not in raw
    await settled(gw)
    line = _access(caplog)
    assert line["error_code"] == "upstream_stream_cut"
    assert line["tokens_out"] >= 3 and line["tokens_in"] > 0  # the deltas sent were charged


async def test_a_field_without_counterpart_is_refused_in_the_clients_dialect(
        gw: GatewayClient, mock_upstream: TestServer) -> None:
    before = len(mock_upstream.app[RECORDED])
    resp = await gw.post("/v1/chat/completions", json=chat(model="claude-test", n=2),
                         headers=auth())
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["param"] == "n" and "Anthropic" in body["error"]["message"]
    resp = await gw.post("/v1/messages", json=chat(model="gpt-test", max_tokens=5, top_k=3),
                         headers=auth())
    assert resp.status == 400 and (await resp.json())["type"] == "error"
    assert len(mock_upstream.app[RECORDED]) == before  # nothing was sent upstream


async def test_a_request_the_other_kind_cannot_carry_stays_on_its_own_kind(
        make_gateway: MakeGateway, mock_upstream: TestServer) -> None:
    """n=2 cannot go to Anthropic: a mixed model serves it from its OpenAI deployment only."""
    gw = await make_gateway(models={"mixed": {"deployments": [
        {"provider": "claude", "model": "upstream-claude"},
        {"provider": "main", "model": "upstream-gpt"}]}})
    resp = await gw.post("/v1/chat/completions", json=chat(model="mixed", n=2), headers=auth())
    assert resp.status == 200
    assert mock_upstream.app[RECORDED][-1].path == "/v1/chat/completions"


async def test_anthropic_gets_the_cap_the_gateway_reserved(
        make_gateway: MakeGateway, mock_upstream: TestServer) -> None:
    """No cap in the OpenAI body: Anthropic needs one, and gets exactly the per-answer output
    the reservation assumed (the tenant's default_max_tokens bounded by the model's maximum),
    so the upstream cannot generate more than was reserved."""
    gw = await make_gateway(tenants={"acme": {"default_max_tokens": 300}},
                            models={"claude-test": {"max_output_tokens": 200}})
    resp = await gw.post("/v1/chat/completions", json=chat(model="claude-test"), headers=auth())
    assert resp.status == 200
    assert mock_upstream.app[RECORDED][-1].body["max_tokens"] == 200
    resp = await gw.post("/v1/chat/completions", json=chat(model="claude-test", max_tokens=150),
                         headers=auth())
    assert mock_upstream.app[RECORDED][-1].body["max_tokens"] == 150


async def test_client_disconnect_cancels_a_translated_upstream_stream(
        aiohttp_server: AiohttpServer, make_gateway: MakeGateway) -> None:
    cancelled = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b'event: message_start\ndata: {"type":"message_start","message":'
                             b'{"id":"m","model":"c","usage":{"input_tokens":3,'
                             b'"output_tokens":1}}}\n\n')
            for _ in range(100):
                await resp.write(b'event: content_block_delta\ndata: {"type":'
                                 b'"content_block_delta","index":0,"delta":{"type":'
                                 b'"text_delta","text":"x"}}\n\n')
                await asyncio.sleep(0.2)
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise
        return resp

    upstream = web.Application()
    upstream.router.add_post("/v1/messages", slow_stream)
    server = await aiohttp_server(upstream)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"))
    resp = await gw.post("/v1/chat/completions", json=chat(model="claude-test", stream=True),
                         headers=auth())
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"data: ") and b"chat.completion.chunk" in first
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(cancelled.wait(), timeout=2.0)


# --- failover across kinds ------------------------------------------------------------------

@pytest.mark.parametrize("client_kind", ["openai", "anthropic"])
async def test_failover_to_the_other_kind_streams_with_exact_usage(
        make_gateway: MakeGateway, mock_upstream: TestServer, upstream_url: str,
        caplog: pytest.LogCaptureFixture, client_kind: str) -> None:
    """The first deployment (the client's own kind) is down; the answer streams from a
    deployment of the other kind, translated, and the usage charged is the one it reported."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    down = {"kind": client_kind, "base_url": dead + ("/v1" if client_kind == "openai" else ""),
            "timeouts": TIMEOUTS}
    other = "claude" if client_kind == "openai" else "main"
    other_model = "upstream-claude" if client_kind == "openai" else "upstream-gpt"
    gw = await make_gateway(
        providers={"down": down},
        models={"mixed": {"deployments": [{"provider": "down", "model": "x"},
                                          {"provider": other, "model": other_model}]}})
    headers = {"x-mock-chunks": "6"}
    if client_kind == "openai":
        oclient = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY,
                                     max_retries=0)
        try:
            stream = await oclient.chat.completions.create(
                model="mixed", messages=[{"role": "user", "content": "hello there"}],
                stream=True, stream_options={"include_usage": True}, extra_headers=headers)
            chunks = [c async for c in stream]
        finally:
            await oclient.close()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage is not None
        seen = (usage.prompt_tokens, usage.completion_tokens)
    else:
        aclient = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY, max_retries=0)
        try:
            async with aclient.messages.stream(
                    model="mixed", max_tokens=50, extra_headers=headers,
                    messages=[{"role": "user", "content": "hello there"}]) as astream:
                text = await astream.get_final_text()
                final = await astream.get_final_message()
        finally:
            await aclient.close()
        seen = (final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0),
                final.usage.output_tokens)
    assert text == "tok " * 6
    assert mock_upstream.app[RECORDED][-1].body["model"] == other_model
    await settled(gw)
    line = _access(caplog)
    assert [a["deployment"] for a in line["attempt_log"]] == ["down/x", f"{other}/{other_model}"]
    assert line["upstream_dialect"] != line["client_dialect"]
    assert seen[1] == 6 and seen[0] > 0
    assert (line["tokens_in"], line["tokens_out"]) == seen  # exactly what the upstream reported


async def test_the_provider_outage_scenario_keeps_critical_traffic_up(
        make_gateway: MakeGateway, mock_upstream: TestServer, upstream_url: str) -> None:
    """config/scenarios/provider-outage.yaml against config/provider-outage.yaml, in this
    process and compressed in time (its phases 1 s, 3 s, 1 s): the Anthropic-kind primary
    answers 503 to everything in the middle phase; critical requests still succeed >= 99.5 %
    through the OpenAI-kind deployment."""
    import yaml

    from gateway.loadtest.engine import Engine, EngineOptions
    from gateway.loadtest.report import build_report
    from gateway.loadtest.scenario import parse_scenario

    root = Path(__file__).parent.parent.parent / "config"
    policy = yaml.safe_load((root / "provider-outage.yaml").read_text())
    policy["providers"]["anthropic-primary"]["base_url"] = upstream_url
    policy["providers"]["openai-fallback"]["base_url"] = f"{upstream_url}/v1"
    gw = await make_gateway(providers=policy["providers"],
                            models=policy["models"],
                            tenants={"acme": {"max_priority": "critical"}})
    data = yaml.safe_load((root / "scenarios" / "provider-outage.yaml").read_text())
    for phase, seconds in zip(data["phases"], (1.0, 3.0, 1.0)):
        phase["duration_s"] = seconds
        phase["arrival"]["rate"] = 10
        for outage in phase["upstream"].get("outages", []):
            outage["duration_s"] = seconds
    data["drain_s"] = 10
    scenario = parse_scenario(data)
    engine = Engine(scenario, scenario.api_keys({"acme": ACME_KEY}),
                    EngineOptions(target=_base(gw)))
    await engine.run()
    report = build_report(engine)
    critical = report["classes"]["critical"]
    assert critical["requests"] >= 10
    assert critical["outcomes"]["ok"] / critical["requests"] >= 0.995, critical["outcomes"]
    paths = {r.path for r in mock_upstream.app[RECORDED]}
    assert paths == {"/v1/messages", "/v1/chat/completions"}  # both kinds answered
    failed_primary = [r for r in mock_upstream.app[RECORDED]
                      if r.path == "/v1/messages" and r.headers.get("x-mock-status") == "503"]
    assert failed_primary  # the outage did reach the primary


# --- the mock upstream's own tool answers, in both dialects -----------------------------------

WEATHER_TOOL: ChatCompletionFunctionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _function_calls(calls: list[ChatCompletionMessageToolCallUnion],
                    ) -> list[ChatCompletionMessageFunctionToolCall]:
    """The tool calls as function calls: any other kind here fails the test."""
    function_calls = [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert len(function_calls) == len(calls), calls
    return function_calls


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_tool_call_answered_by_the_anthropic_kind_mock(
        gw: GatewayClient, mock_upstream: TestServer, stream: bool) -> None:
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Weather in Paris?"}]
        reply: ChatCompletion
        if stream:
            async with client.chat.completions.stream(
                    model="claude-test", messages=messages, tools=[WEATHER_TOOL]) as events:
                reply = await events.get_final_completion()
        else:
            reply = await client.chat.completions.create(
                model="claude-test", messages=messages, tools=[WEATHER_TOOL])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = _function_calls(choice.message.tool_calls or [])
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "tok"})]
        sent = mock_upstream.app[RECORDED][-1]
        assert sent.path == "/v1/messages"
        assert sent.body["tools"][0]["input_schema"] == WEATHER_TOOL["function"]["parameters"]

        # the tool result goes back: Anthropic gets it as a tool_result, the model answers text
        follow = await client.chat.completions.create(model="claude-test", tools=[WEATHER_TOOL],
                                                      messages=[*messages, {
            "role": "assistant", "content": None,
            "tool_calls": [cast(ChatCompletionMessageFunctionToolCallParam, c.model_dump())
                           for c in calls]}, {
            "role": "tool", "tool_call_id": calls[0].id, "content": "18C"}])
        assert follow.choices[0].finish_reason == "stop" and follow.choices[0].message.content
        turn = mock_upstream.app[RECORDED][-1].body["messages"][-1]
        assert turn["role"] == "user" and turn["content"][0]["type"] == "tool_result"
    finally:
        await client.close()


async def test_openai_sdk_structured_output_answered_by_the_anthropic_kind_mock(
        gw: GatewayClient) -> None:
    class City(BaseModel):
        name: str
        population: int

    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        parsed = await client.chat.completions.parse(
            model="claude-test", messages=[{"role": "user", "content": "Paris"}],
            response_format=City)
        assert parsed.choices[0].message.parsed == City(name="tok", population=0)
        assert parsed.choices[0].finish_reason == "stop"
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_sdk_tool_use_answered_by_the_openai_kind_mock(
        gw: GatewayClient, mock_upstream: TestServer, stream: bool) -> None:
    client = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY, max_retries=0)
    tool: ToolParam = {"name": "get_weather", "description": "Weather in a city",
                       "input_schema": WEATHER_TOOL["function"]["parameters"]}
    messages: list[MessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
    msg: Message
    try:
        if stream:
            async with client.messages.stream(model="gpt-test", max_tokens=50, tools=[tool],
                                              messages=messages) as events:
                msg = await events.get_final_message()
        else:
            msg = await client.messages.create(model="gpt-test", max_tokens=50, tools=[tool],
                                               messages=messages)
        assert msg.stop_reason == "tool_use"
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert [(b.name, b.input) for b in uses] == [("get_weather", {"city": "tok"})]
        assert msg.usage.output_tokens > 0
        assert mock_upstream.app[RECORDED][-1].path == "/v1/chat/completions"

        follow = await client.messages.create(model="gpt-test", max_tokens=50, tools=[tool],
                                              messages=[*messages,
                                                        {"role": "assistant",
                                                         "content": msg.content},
                                                        {"role": "user", "content": [{
                                                            "type": "tool_result",
                                                            "tool_use_id": uses[0].id,
                                                            "content": "18C"}]}])
        assert follow.stop_reason == "end_turn" and follow.content[0].type == "text"
        sent = mock_upstream.app[RECORDED][-1].body["messages"]
        assert sent[-1] == {"role": "tool", "tool_call_id": uses[0].id, "content": "18C"}
    finally:
        await client.close()
