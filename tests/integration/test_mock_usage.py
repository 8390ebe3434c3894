"""The mock upstream answers like a provider, through the gateway, parsed by the official SDKs:
tool calls, structured JSON output and n > 1, whole and streamed; and its usage reports cache
reads/writes and reasoning tokens the way the providers do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import ToolParam
from openai.types.chat import ChatCompletionFunctionToolParam
from openai.types.responses import FunctionToolParam
from pydantic import BaseModel

from tests.gwtest import ACME_KEY
from tests.plugin_gateway import GatewayClient, MakeGateway

WEATHER: ChatCompletionFunctionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "days", "unit"], "additionalProperties": False}}}
ANTHROPIC_WEATHER: ToolParam = {"name": "get_weather", "description": "weather in a city",
                     "input_schema": WEATHER["function"]["parameters"]}
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


class Answer(BaseModel):
    title: str
    score: int
    tags: list[str]
    ok: bool


def _base(gw: GatewayClient) -> str:
    return str(gw.make_url("")).rstrip("/")


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> GatewayClient:
    client: GatewayClient = await make_gateway()
    return client


@pytest.fixture
async def oai(gw: GatewayClient) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY)
    yield client
    await client.close()


@pytest.fixture
async def ant(gw: GatewayClient) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY)
    yield client
    await client.close()


async def test_openai_tool_call_whole_and_streamed(oai: Any) -> None:
    reply = await oai.chat.completions.create(model="gpt-test", messages=MESSAGES,
                                              tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "tok", "days": 0, "unit": "celsius"}
    async with oai.chat.completions.stream(model="gpt-test", messages=MESSAGES,
                                           tools=[WEATHER]) as stream:
        final = await stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert streamed.function.name == "get_weather"
    assert streamed.function.arguments == call.function.arguments
    # with the tool's result the model answers in text, so an agent loop ends
    after = [*MESSAGES, choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    text = await oai.chat.completions.create(model="gpt-test", messages=after, tools=[WEATHER])
    assert text.choices[0].finish_reason == "stop" and text.choices[0].message.content


async def test_openai_structured_output_parses_whole_and_streamed(oai: Any) -> None:
    parsed = await oai.chat.completions.parse(model="gpt-test", messages=MESSAGES,
                                              response_format=Answer)
    assert parsed.choices[0].message.parsed == Answer(title="tok", score=0, tags=["tok"],
                                                      ok=True)
    async with oai.chat.completions.stream(model="gpt-test", messages=MESSAGES,
                                           response_format=Answer) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed.choices[0].message.parsed
    obj = await oai.chat.completions.create(model="gpt-test", messages=MESSAGES,
                                            response_format={"type": "json_object"})
    assert json.loads(obj.choices[0].message.content) == {"answer": "tok"}


async def test_openai_n_choices_whole_and_streamed(oai: Any) -> None:
    reply = await oai.chat.completions.create(model="gpt-test", messages=MESSAGES, n=3,
                                              extra_headers={"x-mock-chunks": "4"})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content == "tok " * 4 for c in reply.choices)
    assert reply.usage.completion_tokens == 3 * 4  # the SDK reads it; billed for every choice
    stream = await oai.chat.completions.create(model="gpt-test", messages=MESSAGES, n=2,
                                               stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        usage = chunk.usage or usage
    assert texts == {0: "tok " * 5, 1: "tok " * 5}
    assert usage is not None and usage.completion_tokens == 10


async def test_responses_tool_call_and_json_whole_and_streamed(oai: Any) -> None:
    tool: FunctionToolParam = {"type": "function", "name": "get_weather",
                               "parameters": WEATHER["function"]["parameters"], "strict": True}
    resp = await oai.responses.create(model="gpt-test", input="weather?", tools=[tool])
    call = resp.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["unit"] == "celsius"
    async with oai.responses.stream(model="gpt-test", input="weather?", tools=[tool]) as stream:
        final = await stream.get_final_response()
    assert final.output[0].arguments == call.arguments
    parsed = await oai.responses.parse(model="gpt-test", input="rate it", text_format=Answer)
    assert parsed.output_parsed == Answer(title="tok", score=0, tags=["tok"], ok=True)
    async with oai.responses.stream(model="gpt-test", input="rate it",
                                    text_format=Answer) as stream:
        streamed = await stream.get_final_response()
    assert streamed.output_parsed == parsed.output_parsed


async def test_legacy_completions_n_choices_whole_and_streamed(oai: Any) -> None:
    reply = await oai.completions.create(model="gpt-test", prompt="say", n=2, max_tokens=3)
    assert [(c.index, c.text, c.finish_reason) for c in reply.choices] == \
        [(0, "tok " * 3, "length"), (1, "tok " * 3, "length")]
    assert reply.usage.completion_tokens == 6
    stream = await oai.completions.create(model="gpt-test", prompt="say", n=2, stream=True)
    texts: dict[int, str] = {}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: "tok " * 5, 1: "tok " * 5}


async def test_anthropic_tool_use_whole_and_streamed(ant: Any) -> None:
    msg = await ant.messages.create(model="claude-test", max_tokens=200, messages=MESSAGES,
                                    tools=[ANTHROPIC_WEATHER])
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "tok", "days": 0, "unit": "celsius"}
    async with ant.messages.stream(model="claude-test", max_tokens=200, messages=MESSAGES,
                                   tools=[ANTHROPIC_WEATHER]) as stream:
        final = await stream.get_final_message()
    assert final.content[0].input == block.input and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == msg.usage.output_tokens > 0


async def test_anthropic_structured_output_parses_whole_and_streamed(ant: Any) -> None:
    msg = await ant.messages.parse(model="claude-test", max_tokens=200, messages=MESSAGES,
                                   output_format=Answer)
    assert msg.parsed_output == Answer(title="tok", score=0, tags=["tok"], ok=True)
    async with ant.messages.stream(model="claude-test", max_tokens=200, messages=MESSAGES,
                                   output_format=Answer) as stream:
        final = await stream.get_final_message()
    assert final.parsed_output == msg.parsed_output


async def test_openai_usage_reports_cached_prefix_and_share_knob(oai: Any) -> None:
    history = [{"role": "system", "content": "You are a careful agent. " * 40},
               {"role": "user", "content": "step one " * 10}]
    first = await oai.chat.completions.create(model="gpt-test", messages=history)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "next"}]
    second = await oai.chat.completions.create(model="gpt-test", messages=history)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the repeated system + first user message (bytes / 4), not the new turns
    assert cached == (len("You are a careful agent. " * 40) + len("step one " * 10)) // 4
    assert cached < second.usage.prompt_tokens
    third = await oai.chat.completions.create(model="gpt-test", messages=history,
                                              extra_headers={"x-mock-cached-share": "0.9"})
    assert third.usage.prompt_tokens_details.cached_tokens == int(0.9 * third.usage.prompt_tokens)


async def test_reasoning_model_reports_reasoning_tokens(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(models={"reasoner": {
        "deployments": [{"provider": "main", "model": "mock-reasoning"}]}})
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY)
    try:
        reply = await client.chat.completions.create(
            model="reasoner", messages=MESSAGES, extra_headers={"x-mock-reasoning-tokens": "30"})
        assert reply.usage is not None and reply.usage.completion_tokens_details is not None
        assert reply.usage.completion_tokens_details.reasoning_tokens == 30
        assert reply.usage.completion_tokens == 30 + 5
        assert reply.choices[0].message.content == "tok " * 5
        resp = await client.responses.create(model="reasoner", input="think",
                                             extra_headers={"x-mock-chunks": "2"})
        assert resp.usage is not None
        assert resp.usage.output_tokens_details.reasoning_tokens == 4  # default: 2 x chunks
        assert resp.usage.output_tokens == 6
    finally:
        await client.close()


async def test_anthropic_cache_fields_follow_cache_control(ant: Any) -> None:
    system = [{"type": "text", "text": "Long instructions. " * 50,
               "cache_control": {"type": "ephemeral"}}]
    first = await ant.messages.create(model="claude-test", max_tokens=20, system=system,
                                      messages=MESSAGES)
    written = len("Long instructions. " * 50) // 4
    assert first.usage.cache_creation_input_tokens == written
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == written
    async with ant.messages.stream(model="claude-test", max_tokens=20, system=system,
                                   messages=MESSAGES) as stream:
        second = await stream.get_final_message()
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == first.usage.input_tokens  # the uncached tail
    hour = [{**system[0], "text": "Other. " * 60, "cache_control": {"type": "ephemeral",
                                                                     "ttl": "1h"}}]
    third = await ant.messages.create(model="claude-test", max_tokens=20, system=hour,
                                      messages=MESSAGES)
    assert third.usage.cache_creation.ephemeral_1h_input_tokens == len("Other. " * 60) // 4
    plain = await ant.messages.create(model="claude-test", max_tokens=20, messages=MESSAGES)
    assert plain.usage.cache_read_input_tokens == 0  # nothing marked: nothing cached
