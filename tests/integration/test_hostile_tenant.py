"""A tenant crafting bodies and connections to take what is everyone's: the deployment's slots
and the process's memory for request bodies.

Found by attacking the gateway as a tenant (2026-12-07): a body nested 300 deep read fine,
failed as it was written for the upstream (orjson writes 254 levels at most), answered a 500
and kept its admission slot, so five of them took a deployment from every tenant until a
restart; and 26 connections that declared 10 MiB bodies and sent one byte held the process's
whole body budget, so every other tenant got 503s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.app.server import GATEWAY
from gateway.jsonbytes import MAX_DEPTH, PARSED_VALUES, dumps_kept
from gateway.upstream import pool
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, chat
from tests.plugin_gateway import GatewayClient, MakeGateway, settled, token_budget_spent

TWO_SLOTS = {"concurrency": {"min_limit": 2, "initial_limit": 2, "max_limit": 2}}


DEEP = "deep-here"


def nested(depth: int) -> str:
    """A placeholder for lists ``depth`` deep, put in by ``encoded`` (orjson writes no more
    than 254 levels: the tests' own bodies are written as text)."""
    return f"{DEEP}{depth}"


def encoded(body: dict[str, Any]) -> bytes:
    text = orjson.dumps(body)
    for depth in range(1, 1025):
        text = text.replace(f'"{DEEP}{depth}"'.encode(), b"[" * depth + b"]" * depth)
    return text


async def served(gw: GatewayClient, key: str = UMBRELLA_KEY) -> None:
    """Another tenant's plain request is answered at once, not queued behind lost slots."""
    resp = await asyncio.wait_for(
        gw.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth(key)), 10)
    assert resp.status == 200, await resp.text()
    await resp.read()


def deep_bodies(depth: int) -> list[tuple[str, dict[str, str], dict[str, Any], str]]:
    """(route, extra headers, body, dialect) with a field nested ``depth`` deep, on every
    kind of path a body takes: proxied, translated, counted, fingerprinted for a run."""
    msg = [{"role": "user", "content": "hi", "x": nested(depth)}]
    return [
        ("/v1/chat/completions", {}, {"model": "gpt-test", "messages": msg}, "openai"),
        ("/v1/chat/completions", {}, {"model": "claude-test", "messages": msg,
                                      "max_tokens": 5}, "openai"),  # translated
        ("/v1/chat/completions", {"X-Agent-Session": "run-1"},
         {"model": "gpt-test", "messages": msg}, "openai"),
        ("/v1/chat/completions", {}, {"model": "gpt-test", "max_tokens": nested(depth),
                                      "messages": [{"role": "user", "content": "hi"}]},
         "openai"),  # quoted back in the error message
        ("/v1/completions", {}, {"model": "gpt-test", "prompt": "hi", "x": nested(depth)},
         "openai"),
        ("/v1/embeddings", {}, {"model": "embed-test", "input": "hi", "x": nested(depth)},
         "openai"),
        ("/v1/responses", {}, {"model": "gpt-test", "input": "hi", "x": nested(depth)},
         "openai"),
        ("/v1/messages", {}, {"model": "claude-test", "max_tokens": 5, "messages": msg},
         "anthropic"),
        ("/v1/messages", {}, {"model": "gpt-test", "max_tokens": 5, "messages": msg},
         "anthropic"),  # translated
        ("/v1/messages/count_tokens", {}, {"model": "claude-test", "messages": msg},
         "anthropic"),
    ]


@pytest.mark.parametrize("depth", [MAX_DEPTH, 300, 1000])
async def test_a_body_nested_too_deep_is_a_400_and_takes_no_slot(
        make_gateway: MakeGateway, depth: int) -> None:
    gw = await make_gateway(admission=TWO_SLOTS)
    for route, headers, body, dialect in deep_bodies(depth):
        for _ in range(3):  # more than the deployment's two slots
            resp = await asyncio.wait_for(
                gw.post(route, data=encoded(body),
                        headers=auth(ACME_KEY, **headers, **{"Content-Type":
                                                             "application/json"})), 10)
            answer = await resp.json()
            assert resp.status == 400, (route, answer)
            error = answer["error"]
            if dialect == "anthropic":
                assert answer["type"] == "error" and error["type"] == "invalid_request_error"
            else:
                assert error["type"] == "invalid_request_error"
            assert f"more than {MAX_DEPTH} levels" in error["message"], (route, answer)
        await served(gw)


async def test_a_body_as_deep_as_allowed_is_served_and_translated(
        make_gateway: MakeGateway) -> None:
    """The bound leaves room: the deepest body accepted is written again, translated too
    (a tool's parameters are carried over as its input schema, a few levels deeper)."""
    gw = await make_gateway(admission=TWO_SLOTS)
    openai_tools: dict[str, Any] = {  # translated for Anthropic
        "model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "x": nested(MAX_DEPTH - 5)}}}]}
    anthropic_tools = {"model": "gpt-test", "max_tokens": 5,  # translated for OpenAI
                       "messages": [{"role": "user", "content": "hi"}],
                       "tools": [{"name": "f", "input_schema": {"type": "object",
                                                                "x": nested(MAX_DEPTH - 4)}}]}
    cases: list[tuple[str, dict[str, str], dict[str, Any]]] = [
        ("/v1/chat/completions", {}, openai_tools),
        ("/v1/messages", {}, anthropic_tools)]
    cases += [(route, headers, body) for route, headers, body, _ in deep_bodies(MAX_DEPTH - 3)
              if not isinstance(body.get("max_tokens"), str)]  # a wrong type at any depth
    for route, headers, body in cases:
        resp = await gw.post(route, data=encoded(body),
                             headers=auth(ACME_KEY, **headers,
                                          **{"Content-Type": "application/json"}))
        assert resp.status == 200, (route, await resp.text())
        await resp.read()
    # one level more is refused
    openai_tools["tools"][0]["function"]["parameters"]["x"] = nested(MAX_DEPTH - 4)
    resp = await gw.post("/v1/chat/completions", data=encoded(openai_tools),
                         headers=auth(ACME_KEY, **{"Content-Type": "application/json"}))
    assert resp.status == 400


@pytest.mark.parametrize("depth", [300, 1000, 1024])
async def test_tool_arguments_nested_deep_never_get_a_5xx(
        make_gateway: MakeGateway, depth: int) -> None:
    """A tool call's arguments are a string that the body's bound never looks inside. Read by
    the conversation loop detector (on by default) on every route, they are compared as sent;
    translated for Anthropic they would become an object in the body written upstream, so
    there they are refused. 1,000 deep once answered a 500 from the loop detector."""
    gw = await make_gateway(admission=TWO_SLOTS)
    arguments = encoded({"a": nested(depth - 1)}).decode()
    call = {"id": "call_1", "type": "function", "function": {"name": "f",
                                                             "arguments": arguments}}
    chat_messages = [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    cases = [
        ("/v1/chat/completions", {"model": "gpt-test", "messages": chat_messages}, 200),
        ("/v1/responses", {"model": "gpt-test", "input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "call_1", "name": "f",
             "arguments": arguments},
            {"type": "function_call_output", "call_id": "call_1", "output": "ok"}]}, 200),
        ("/v1/chat/completions", {"model": "claude-test", "max_tokens": 5,
                                  "messages": chat_messages}, 400),
    ]
    for route, body, status in cases:
        for _ in range(3):
            resp = await gw.post(route, json=body, headers=auth(ACME_KEY))
            answer = await resp.json()
            assert resp.status == status, (route, answer)
            if status == 400:
                assert answer["error"]["param"] == "messages.1.tool_calls.0.function.arguments"
    await served(gw)


async def test_an_answer_nested_deeper_than_can_be_written_keeps_its_alias(
        make_gateway: MakeGateway, aiohttp_server: Any) -> None:
    """With ``answer_model: alias`` the answer's model field is rewritten; an answer nested
    past what orjson writes (a model's tool input, say) once made that a 500."""
    from aiohttp import web

    deep = "[" * 300 + "]" * 300

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        body = ('{"id": "chatcmpl-1", "object": "chat.completion", "created": 1, '
                '"model": "upstream-gpt-2025", "choices": [{"index": 0, "finish_reason": '
                '"stop", "message": {"role": "assistant", "content": "hi", "x": ' + deep
                + '}}], "usage": {"prompt_tokens": 5, "completion_tokens": 1, '
                '"total_tokens": 6}}')
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = await aiohttp_server(app)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"),
                            models={"gpt-test": {"answer_model": "alias"}})
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(ACME_KEY))
    text = await resp.text()
    assert resp.status == 200, text
    assert '"model":"gpt-test"' in text.replace(" ", "") and deep in text


async def test_an_attempt_that_fails_before_it_is_sent_gives_its_slot_back(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever breaks while a call is made ready, the slot it was admitted to is freed: the
    next tenant is served, not queued behind slots nobody holds."""
    gw = await make_gateway(admission=TWO_SLOTS)
    def breaks(body: Any) -> bytes:
        if body.get("user") == "breaks":
            raise TypeError("Recursion limit reached")
        return dumps_kept(body)

    monkeypatch.setattr(pool, "dumps_kept", breaks)
    for _ in range(5):
        resp = await gw.post("/v1/chat/completions", json=chat(user="breaks"),
                             headers=auth(ACME_KEY))
        assert resp.status == 500
        await resp.read()
    for _ in range(3):
        await served(gw)


async def test_one_tenant_cannot_hold_every_request_body_byte_of_the_process(
        make_gateway: MakeGateway) -> None:
    """Connections that declare big bodies and send one byte hold their declared bytes from
    before the body is read, so before any of the tenant's limits. One key may hold half of
    the process's budget: past that it is refused (429, for its own bytes), and every other
    tenant is still served."""
    mib = 1024 * 1024
    gw = await make_gateway(server={"max_body_bytes": mib, "max_body_bytes_in_flight": 4 * mib})
    host, port = gw.make_url("").host, gw.make_url("").port
    assert host is not None and port is not None
    held = []
    try:
        for _ in range(5):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + ACME_KEY.encode() + b"\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(mib).encode() + b"\r\n\r\n{")
            await writer.drain()
            held.append((reader, writer))
        await asyncio.sleep(0.3)
        answered = []
        for reader, _ in held:
            try:
                answered.append(await asyncio.wait_for(reader.read(4096), 0.2))
            except TimeoutError:
                answered.append(b"")  # still reading the body: its bytes held
        assert sum(1 for a in answered if a == b"") == 2, answered
        refused = [a for a in answered if a]
        assert all(a.startswith(b"HTTP/1.1 429") and b"retry-after-ms" in a.lower()
                   for a in refused), refused
        for _ in range(3):
            await served(gw)  # umbrella, another tenant
    finally:
        for _, writer in held:
            writer.close()


@pytest.mark.parametrize("deadline", ["0.1", "0.35"], ids=["impatient", "waited"])
async def test_a_tenants_own_short_deadline_cannot_open_the_shared_breaker(
        make_gateway: MakeGateway, deadline: str) -> None:
    """Timeouts of the client's own deadline (X-Request-Timeout, the SDKs'
    x-stainless-read-timeout) shorter than half the deployment's first-byte timeout are the
    client's impatience. Counted as the deployment's failures, ten calls with a 0.1 s deadline
    to a model whose first token takes 0.4 s opened the breaker every tenant shares, and the
    next tenant got 503 upstream_unavailable. A client that waited longer (0.35 s of a 0.6 s
    first-byte timeout here) saw the deployment slow: that still counts, so a deployment that
    hangs is caught though every client sets a deadline."""
    gw = await make_gateway(
        providers={"main": {"timeouts": {"first_byte_s": 0.6}}},
        breaker={"consecutive_failures": 3},
        # aimd: no first tokens to tell a queue by, where an error lowers the limit
        admission={"concurrency": {"algorithm": "aimd", "initial_limit": 20}})
    for _ in range(3):  # the deployment's first tokens are learned: 0.1 s looks feasible
        resp = await gw.post("/v1/chat/completions", json=chat(stream=True),
                             headers=auth(ACME_KEY))
        assert resp.status == 200
        await resp.read()
    admission = gw.app[GATEWAY].services.admission
    limit = admission.snapshot()["deployments"]["main/upstream-gpt"]["limit"]
    codes = []
    for header in ("X-Request-Timeout", "x-stainless-read-timeout") * 3:
        resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(
            ACME_KEY, **{header: deadline, "x-mock-latency-ms": "2000"}))
        codes.append((resp.status, (await resp.json())["error"]["code"]))
    breaker = gw.app[GATEWAY].services.breakers.snapshot()["main/upstream-gpt"]
    if deadline == "0.1":
        assert codes == [(504, "upstream_first_byte_timeout")] * 6, codes
        assert breaker.state == "closed"
        # nor the limit every tenant shares: nothing showed a queue
        assert admission.snapshot()["deployments"]["main/upstream-gpt"]["limit"] >= limit
        await served(gw)
    else:
        assert codes[:3] == [(504, "upstream_first_byte_timeout")] * 3, codes
        assert breaker.state == "open"


def tools_of(elements: bytes, count: int, model: str = "gpt-test") -> bytes:
    """A chat body whose ``tools`` field is a list of ``count`` copies of ``elements``."""
    return (b'{"model":"' + model.encode() + b'","max_tokens":5,"messages":[{"role":"user",'
            b'"content":"hi"}],"tools":[' + b",".join([elements] * count) + b"]}")


@pytest.mark.parametrize("route, model, dialect", [
    ("/v1/chat/completions", "gpt-test", "openai"),
    ("/v1/messages", "claude-test", "anthropic"),
])
async def test_a_body_of_too_many_values_is_refused_before_it_is_read(
        make_gateway: MakeGateway, route: str, model: str, dialect: str) -> None:
    """10 MB of nested empty lists took 3.6 s of the event loop to parse, check and count
    before the tenant's 400: the loop every tenant shares. Values are counted before parsing;
    punctuation inside strings is not a value, so prose, code and JSON pasted as text pass."""
    gw = await make_gateway(server={"max_body_values": 10_000})
    headers = auth(ACME_KEY, **{"Content-Type": "application/json"})
    keys = b"{" + b",".join(b'"k%d":1' % i for i in range(2500)) + b"}"  # 10,000: a key is
    many_keys = tools_of(b"[]", 1, model)[:-1] + b',"metadata":' + keys + b"}"  # 3 more
    for body in (tools_of(b"[]", 2000, model), tools_of(b"1", 10_001, model),
                 tools_of(b'"a"', 10_001, model), many_keys):
        resp = await gw.post(route, data=body, headers=headers)
        answer = await resp.json()
        assert resp.status == 400, answer
        if dialect == "anthropic":
            assert answer["type"] == "error"
        assert answer["error"]["type"] == "invalid_request_error"
        assert "more than 10000 JSON values" in answer["error"]["message"], answer
        assert "server.max_body_values" in answer["error"]["message"]
    text = 'a, b, [c] {d}, "quoted \\" [x]" \\\\' * 3000  # 30,000 commas and brackets
    prose = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": text}]}
    resp = await gw.post(route, json=prose, headers=auth(ACME_KEY))
    assert resp.status == 200, await resp.text()
    await resp.read()
    resp = await gw.post(route, data=tools_of(b"[]", 1200, model), headers=headers)
    assert resp.status == 200, await resp.text()  # 1,200 lists: about 8,450 of the 10,000
    await resp.read()


async def test_a_tenant_whose_bodies_take_the_loop_is_refused_and_others_are_served(
        make_gateway: MakeGateway) -> None:
    """A body refused as bad input counts against none of the tenant's limits, yet reading it
    took the shared loop: such reading is charged to the tenant (tenant_work_share), and past
    its burst the tenant is refused before its next body is read; another tenant is not."""
    gw = await make_gateway(admission={"self_protection": {
        "tenant_work_share": 0.1, "tenant_work_burst_s": 0.001}})
    heavy = tools_of(b"[]", 70_000)  # 490,000 of the default 500,000 values: a 400 for size
    headers = auth(ACME_KEY, **{"Content-Type": "application/json"})
    first = await gw.post("/v1/chat/completions", data=heavy, headers=headers)
    assert first.status == 400 and (await first.json())["error"]["code"] == \
        "context_length_exceeded"
    again = await gw.post("/v1/chat/completions", data=heavy, headers=headers)
    answer = await again.json()
    assert again.status == 429 and answer["error"]["code"] == "too_much_request_work", answer
    assert float(again.headers["retry-after-ms"]) >= 100  # >= 10 ms of work at 10 %
    assert again.headers.get("x-should-retry") != "false"  # the SDKs retry it
    await served(gw)  # umbrella, another tenant


async def test_input_the_body_refers_to_is_reserved_of_budgets_up_to_the_context_window(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """``previous_response_id`` makes the provider read a stored conversation the body does
    not carry: 120,000 tokens reserved 20 and were charged 120,010, twice in a row, past a
    200,000-token budget. Budgets now reserve up to the context window for such a request,
    so the second is refused while the budget has room for what a plain request reserves."""
    async def responses(request: web.Request) -> web.Response:
        body = await request.json()
        stored = 120_000 if body.get("previous_response_id") else 0
        return web.json_response({
            "id": "resp_1", "object": "response", "status": "completed", "model": "m",
            "output": [{"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "ok"}]}],
            "usage": {"input_tokens": stored + 10, "output_tokens": 10,
                      "total_tokens": stored + 20}})

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    server = await aiohttp_server(app)
    gw = await make_gateway(str(server.make_url("")).rstrip("/"), tenants={
        "acme": {"budget": {"daily_tokens": 200_000}}})
    follow_up = {"model": "gpt-test", "input": "continue", "previous_response_id": "resp_0",
                 "max_output_tokens": 10}
    first = await gw.post("/v1/responses", json=follow_up, headers=auth())
    assert first.status == 200, await first.text()
    await settled(gw)
    second = await gw.post("/v1/responses", json=follow_up, headers=auth())
    refusal = (await second.json())["error"]
    assert second.status == 429 and refusal["code"] == "insufficient_quota", refusal
    assert "previous_response_id" in refusal["message"]
    assert "context window of 128,000 tokens" in refusal["message"]
    plain = {"model": "gpt-test", "input": "hello", "max_output_tokens": 10}
    resp = await gw.post("/v1/responses", json=plain, headers=auth())
    assert resp.status == 200, await resp.text()  # 79,970 left: room for what it carries


async def test_a_background_response_is_refused_as_it_could_not_be_accounted_for(
        make_gateway: MakeGateway) -> None:
    """``background: true`` has the provider answer "queued" and generate afterwards, out of
    the gateway's sight: it was charged the prompt, and up to max_output_tokens were
    generated for free."""
    gw = await make_gateway()
    resp = await gw.post("/v1/responses", json={
        "model": "gpt-test", "input": "hi", "background": True, "max_output_tokens": 16_000},
        headers=auth())
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "background", error
    resp = await gw.post("/v1/responses", json={
        "model": "gpt-test", "input": "hi", "background": False}, headers=auth())
    assert resp.status == 200, await resp.text()


async def test_tool_arguments_too_costly_to_translate_are_a_400(
        make_gateway: MakeGateway) -> None:
    """An assistant tool call's arguments string is parsed to become Anthropic's input
    object: JSON inside a string, which the body's value count does not look into. Parsed
    within what one request's argument strings may cost together; past it a 400 naming the
    field, in the client's dialect."""
    gw = await make_gateway()
    numbers = ",".join(["1"] * (PARSED_VALUES + 10))
    body = {"model": "claude-test", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": f'{{"rows":[{numbers}]}}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(ACME_KEY))
    error = (await resp.json())["error"]
    assert resp.status == 400, error
    assert error["param"] == "messages.1.tool_calls.0.function.arguments", error
    assert "JSON values" in error["message"]


async def test_a_body_that_arrives_after_the_tenants_work_is_spent_is_not_read(
        make_gateway: MakeGateway) -> None:
    """The work budget is checked before a body is read, so many connections holding back
    their last byte all passed it, and were parsed together once released. It is checked
    again once the body has arrived."""
    gw = await make_gateway(admission={"self_protection": {
        "tenant_work_share": 0.1, "tenant_work_burst_s": 0.001}})
    host, port = gw.make_url("").host, gw.make_url("").port
    assert host is not None and port is not None
    heavy = tools_of(b"[]", 70_000)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + ACME_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(heavy)).encode() + b"\r\n\r\n" + heavy[:-1])
        await writer.drain()
        await asyncio.sleep(0.2)  # past the first check, its body not yet complete
        first = await gw.post("/v1/chat/completions", data=heavy, headers=auth(
            ACME_KEY, **{"Content-Type": "application/json"}))
        assert first.status == 400  # read, parsed and charged: past the tenant's burst
        writer.write(heavy[-1:])
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 429"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = orjson.loads(await reader.readexactly(length))
        assert body["error"]["code"] == "too_much_request_work", body
    finally:
        writer.close()


async def test_input_it_referred_to_is_charged_when_the_upstream_reports_none(
        make_gateway: MakeGateway, aiohttp_server: AiohttpServer) -> None:
    """A call that refers to input it does not carry and ends without a usage report (a
    stream cut before it, a cancelled call, an answer without one) was charged the body's
    estimate: 20 tokens for a stored conversation the provider read whole. It is charged the
    input the budgets reserved for it."""
    async def responses(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "resp_1", "object": "response", "status": "completed",
                                  "output": [{"type": "message", "role": "assistant",
                                              "content": [{"type": "output_text",
                                                           "text": "ok"}]}]})

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    server = await aiohttp_server(app)
    gw = await make_gateway(str(server.make_url("")).rstrip("/"), tenants={
        "acme": {"budget": {"daily_tokens": 1_000_000}}})
    before = token_budget_spent(gw)
    resp = await gw.post("/v1/responses", json={
        "model": "gpt-test", "input": "go", "previous_response_id": "resp_0",
        "max_output_tokens": 10}, headers=auth())
    assert resp.status == 200, await resp.text()
    await settled(gw)
    assert token_budget_spent(gw) - before >= 128_000 - 10 - 10  # the window less the answer
