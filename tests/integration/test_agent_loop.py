"""The loop detector that reads the conversation (issue 22 item 2)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from gateway.app.server import create_app
from gateway.jsonbytes import Exhausted, ParseAllowance
from gateway.request.agent_loop import find_loop, tool_steps
from tests.gwtest import ACME_KEY, auth, policy
from tests.plugin_gateway import GatewayClient, MakeGateway, gateway_client


def chat_history(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """A chat conversation where the assistant made ``calls``, one per step, each answered."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "wait for the report"}]
    for i, (name, args) in enumerate(calls):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": "not ready"})
    return messages


def responses_input(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"role": "user", "content": "wait for the report"}]
    for i, (name, args) in enumerate(calls):
        items.append({"type": "function_call", "call_id": f"c{i}", "name": name,
                      "arguments": json.dumps(args)})
        items.append({"type": "function_call_output", "call_id": f"c{i}",
                      "output": "not ready"})
    return items


def messages_history(calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "wait for the report"}]
    for i, (name, args) in enumerate(calls):
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": "checking"},
            {"type": "tool_use", "id": f"t{i}", "name": name, "input": args}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": "not ready"}]})
    return messages


POLL = ("get_report", {"job": 42, "verbose": False})


@pytest.mark.parametrize("shape", ["chat", "responses", "messages"])
def test_the_same_call_is_flagged_at_the_configured_count(shape: str) -> None:
    def body(n: int) -> dict[str, Any]:
        if shape == "chat":
            return {"messages": chat_history([POLL] * n)}
        if shape == "responses":
            return {"input": responses_input([POLL] * n)}
        return {"messages": messages_history([POLL] * n)}

    assert find_loop(body(4), max_repeats=5, cycle_steps=0) is None
    found = find_loop(body(5), max_repeats=5, cycle_steps=0)
    assert found is not None and found.kind == "repeat"
    assert (found.tool, found.count) == ("get_report", 5)
    assert find_loop(body(3), max_repeats=3, cycle_steps=0) is not None


@pytest.mark.parametrize("shape", ["chat", "responses", "messages"])
def test_one_tool_with_different_arguments_is_not_a_loop(shape: str) -> None:
    calls = [("get_report", {"job": i}) for i in range(20)]
    body = {"chat": {"messages": chat_history(calls)},
            "responses": {"input": responses_input(calls)},
            "messages": {"messages": messages_history(calls)}}[shape]
    assert len(tool_steps(body)) == 20
    assert find_loop(body, max_repeats=5, cycle_steps=8) is None


def test_arguments_are_compared_as_canonical_json() -> None:
    messages = chat_history([POLL] * 5)
    spellings = ['{"job": 42, "verbose": false}', '{"verbose":false,"job":42}',
                 '{ "job" : 42 ,\n "verbose": false }', '{"job":42,"verbose":false}',
                 '{"verbose": false, "job": 42}']
    for message, spelling in zip(messages[1::2], spellings):
        message["tool_calls"][0]["function"]["arguments"] = spelling
    assert find_loop({"messages": messages}, 5, 0) is not None
    messages[-2]["tool_calls"][0]["function"]["arguments"] = '{"job": 43, "verbose": false}'
    assert find_loop({"messages": messages}, 5, 0) is None


def test_argument_strings_are_parsed_only_up_to_what_one_request_may_cost() -> None:
    """A tool call's arguments is JSON inside a string, out of the body's own value count:
    one 3.9 MB string of empty lists took a second of the event loop to canonicalise. A
    request's argument strings together are parsed up to ``PARSED_VALUES``; past it they are
    compared as sent (the same call spelled the same way is still a repeat)."""
    numbers = ",".join(["1"] * 60_000)
    messages = chat_history([POLL] * 2)
    messages[1]["tool_calls"][0]["function"]["arguments"] = f'{{"a":[{numbers}],"b":1}}'
    messages[3]["tool_calls"][0]["function"]["arguments"] = f'{{"b":1,"a":[{numbers}]}}'
    first, second = tool_steps({"messages": messages})
    assert first != second  # the second would have cost past the allowance: as sent
    small = chat_history([POLL] * 2)
    small[3]["tool_calls"][0]["function"]["arguments"] = '{"verbose":false,"job":42}'
    first, second = tool_steps({"messages": small})
    assert first == second  # within it: canonical
    allowance = ParseAllowance(10)
    assert allowance.loads("[1,2,3]") == [1, 2, 3] and allowance.left == 2  # 2 + a list
    with pytest.raises(Exhausted):
        allowance.loads("[" + ",".join(["1"] * 20) + "]")
    assert allowance.left == 2  # nothing parsed, nothing spent


def test_a_cycle_of_steps_is_flagged_and_a_progressing_run_is_not() -> None:
    a, b = ("search", {"q": "report"}), ("open", {"url": "https://x/report"})
    cycle = chat_history([a, b] * 4)  # each call only 4 times: below max_repeats 5
    found = find_loop({"messages": cycle}, max_repeats=5, cycle_steps=8)
    assert found is not None and (found.kind, found.period) == ("cycle", 2)
    assert find_loop({"messages": cycle}, max_repeats=5, cycle_steps=0) is None
    progressing = chat_history([a, b] * 3 + [("summarize", {}), ("send", {"to": "me"})])
    assert find_loop({"messages": progressing}, max_repeats=5, cycle_steps=8) is None


def test_hostile_shapes_are_ignored_without_errors() -> None:
    body: dict[str, Any] = {"messages": [
        None, 3, "x", {"role": "assistant", "tool_calls": "nope"},
        {"role": "assistant", "tool_calls": [None, {"function": "x"}, {"function": {}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "name": 5, "input": None}]},
    ], "input": "just text"}
    assert find_loop(body, 2, 4) is None
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    weird = [("x\r\nSet-Cookie: a", {"d": deep})] * 3
    found = find_loop({"messages": chat_history(weird)}, 3, 0)
    assert found is not None and found.tool == "x__Set-Cookie__a"


# --- through a gateway -----------------------------------------------------------------------



def _loop_policy(action: str) -> dict[str, Any]:
    return {"tenants": {"acme": {"agent_loop": {"action": action, "max_repeats": 5}}}}


def _body(n: int, *, different: bool = False) -> dict[str, Any]:
    calls = [("get_report", {"job": i if different else 42}) for i in range(n)]
    return {"model": "gpt-test", "max_tokens": 20, "messages": chat_history(calls)}


async def test_warn_adds_a_header_and_the_request_runs(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**_loop_policy("warn"))
    ok = await gw.post("/v1/chat/completions", json=_body(5),
                       headers=auth(**{"X-Agent-Session": "r1"}))
    assert ok.status == 200
    assert ok.headers["x-gateway-agent-loop"] == "repeat; tool=get_report; count=5"
    fine = await gw.post("/v1/chat/completions", json=_body(12, different=True),
                         headers=auth(**{"X-Agent-Session": "r1"}))
    assert fine.status == 200 and "x-gateway-agent-loop" not in fine.headers
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_agent_loops_total{action="warn",tenant="acme"} 1.0' in metrics


async def test_shadow_only_counts(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**_loop_policy("shadow"))
    ok = await gw.post("/v1/chat/completions", json=_body(6), headers=auth())
    assert ok.status == 200 and "x-gateway-agent-loop" not in ok.headers
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_agent_loops_total{action="shadow",tenant="acme"} 1.0' in metrics


async def test_sdks_refuse_a_looping_conversation_once_and_keep_a_progressing_one(
    aiohttp_client: AiohttpClient, upstream_url: str
) -> None:
    app = create_app(policy(upstream_url, **_loop_policy("refuse")))
    answers: list[int] = []

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/v1/"):
            answers.append(response.status)

    app.on_response_prepare.append(count)
    gw: GatewayClient = await gateway_client(aiohttp_client, app)
    async with openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY) as oa:
        with pytest.raises(openai.RateLimitError) as info:
            await oa.chat.completions.create(**_body(5))
        assert info.value.code == "agent_loop_detected"
        assert "get_report called 5 times" in info.value.message
        assert answers == [429]  # x-should-retry: false: no SDK retry
        answer = await oa.chat.completions.create(**_body(12, different=True))
        assert answer.choices[0].message.content and answers == [429, 200]
        # Below the count: not a loop yet.
        await oa.chat.completions.create(**_body(4))
    async with anthropic.AsyncAnthropic(base_url=str(gw.make_url("")).rstrip("/"),
                                        api_key=ACME_KEY) as an:
        with pytest.raises(anthropic.RateLimitError) as refused:
            await an.messages.create(model="claude-test", max_tokens=20,
                                     messages=messages_history([POLL] * 5))  # type: ignore[arg-type]
        assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert answers[-1] == 429 and answers.count(429) == 2
