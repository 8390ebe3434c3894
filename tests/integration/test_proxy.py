"""The gateway core, end to end: a real gateway in front of the real mock upstream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.mock.upstream import RECORDED, estimate_prompt_tokens
from gateway.request import classifier as classify
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, chat, log_fields
from tests.plugin_gateway import GatewayClient, MakeGateway

Client = GatewayClient


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def _data(event: bytes) -> Any:
    line = next(li for li in event.split(b"\n") if li.startswith(b"data:"))
    payload = line[5:].strip()
    return payload if payload == b"[DONE]" else orjson.loads(payload)


async def test_chat_completion_is_proxied_with_model_rewritten(gw: Client,
                                                               mock_upstream: TestServer) -> None:
    body = chat(text="what is the capital of France?")
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    data = await resp.json()
    assert data["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens"] == estimate_prompt_tokens(body)
    seen = mock_upstream.app[RECORDED][-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "upstream-gpt"
    assert seen.body["messages"] == body["messages"]


async def test_request_id_is_echoed_or_generated(gw: Client, mock_upstream: TestServer) -> None:
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(**{"X-Request-Id": "req-42"}))
    assert resp.headers["X-Request-Id"] == "req-42"
    assert mock_upstream.app[RECORDED][-1].headers["x-client-request-id"] == "req-42"
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert len(resp.headers["X-Request-Id"]) >= 16
    bad = await gw.post("/v1/chat/completions", json=chat(),
                        headers=auth(**{"X-Request-Id": "x" * 500}))
    assert bad.headers["X-Request-Id"] != "x" * 500


async def test_only_allow_listed_headers_reach_the_upstream(
    make_gateway: MakeGateway, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PROVIDER_KEY", "sk-provider-secret")
    gw = await make_gateway(providers={"main": {"api_key_env": "TEST_PROVIDER_KEY"}})
    headers = auth(**{
        "Cookie": "session=abc", "X-Forwarded-For": "10.0.0.1", "traceparent":
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "OpenAI-Organization": "org-x",
        "X-Api-Key": "client-other-key", "Host-Override": "evil.example",
    })
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=headers)
    assert resp.status == 200
    seen = mock_upstream.app[RECORDED][-1].headers
    assert seen["authorization"] == "Bearer sk-provider-secret"
    assert seen["traceparent"].startswith("00-4bf92f3577b34da6")
    for dropped in ("cookie", "x-forwarded-for", "openai-organization", "x-api-key", "host-override"):
        assert dropped not in seen
    assert ACME_KEY not in json.dumps(seen)


async def test_anthropic_messages_use_the_provider_key_and_anthropic_shapes(
    make_gateway: MakeGateway, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-provider")
    gw = await make_gateway(providers={"claude": {"api_key_env": "TEST_ANTHROPIC_KEY"}})
    body = {"model": "claude-test", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}]}
    resp = await gw.post("/v1/messages", json=body, headers={"x-api-key": ACME_KEY})
    assert resp.status == 200
    data = await resp.json()
    assert data["usage"]["input_tokens"] == estimate_prompt_tokens(body)
    seen = mock_upstream.app[RECORDED][-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-ant-provider"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen.headers
    # Errors on Anthropic routes come in Anthropic's shape.
    resp = await gw.post("/v1/messages", json={"model": "claude-test", "messages": []},
                         headers={"x-api-key": ACME_KEY})
    assert resp.status == 400
    err = await resp.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"


async def test_every_openai_route_is_proxied(gw: Client, mock_upstream: TestServer) -> None:
    cases = [
        ("/v1/completions", {"model": "gpt-test", "prompt": "say hi", "max_tokens": 3}),
        ("/v1/embeddings", {"model": "embed-test", "input": ["a", "b"]}),
        ("/v1/responses", {"model": "gpt-test", "input": "hello"}),
    ]
    for path, body in cases:
        resp = await gw.post(path, json=body, headers=auth())
        assert resp.status == 200, (path, await resp.text())
        assert mock_upstream.app[RECORDED][-1].path == path
        assert "usage" in await resp.json()


async def test_streamed_chunks_reach_the_client_before_the_upstream_finishes(gw: Client) -> None:
    headers = auth(**{"x-mock-chunks": "4", "x-mock-chunk-gap-ms": "300"})
    started = time.monotonic()
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    first = await resp.content.readuntil(b"\n\n")
    first_at = time.monotonic() - started
    await resp.read()
    total = time.monotonic() - started
    assert first.startswith(b"data: ")
    # The upstream needs >= 0.9 s for its gaps; the first event must not wait for them.
    assert total >= 0.9
    assert first_at < total - 0.6


async def test_a_whole_answer_without_usage_is_charged_an_estimate(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    async def upstream(request: web.Request) -> web.Response:
        return web.json_response({"choices": [{"message": {"role": "assistant",
                                                           "content": "x" * 400}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    server = await aiohttp_server(app)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"))
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = chat()
    assert (await gw.post("/v1/chat/completions", json=body, headers=auth())).status == 200
    line = _access_lines(caplog)[-1]
    assert line["usage_reported"] is False  # and the log says it is an estimate
    assert line["tokens_in"] == classify.estimate_prompt_tokens(body)
    assert line["tokens_out"] == 100  # 400 characters of answer / 4


async def test_stream_usage_is_requested_upstream_and_stripped_for_the_client(
    gw: Client, mock_upstream: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = chat(stream=True)
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**{"x-mock-chunks": "6"}))
    events = _events(await resp.read())
    assert events[-1] == b"data: [DONE]"
    assert all(_data(e) == b"[DONE]" or _data(e)["choices"] for e in events)
    upstream_body = mock_upstream.app[RECORDED][-1].body
    assert upstream_body["stream_options"] == {"include_usage": True}
    line = _access_lines(caplog)[-1]
    assert line["tokens_out"] == 6 and line["usage_reported"] is True
    assert line["tokens_in"] == estimate_prompt_tokens(body)


async def test_stream_usage_is_kept_when_the_client_asked_for_it(gw: Client) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**{"x-mock-chunks": "3"}))
    events = _events(await resp.read())
    usage_chunks = [_data(e) for e in events[:-1] if _data(e)["choices"] == []]
    assert len(usage_chunks) == 1 and usage_chunks[0]["usage"]["completion_tokens"] == 3


async def test_anthropic_stream_is_relayed_with_usage(
    gw: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = {"model": "claude-test", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "stream please"}]}
    resp = await gw.post("/v1/messages", json=body,
                         headers={"x-api-key": ACME_KEY, "x-mock-chunks": "4"})
    raw = await resp.read()
    assert b"event: message_start" in raw and raw.rstrip().endswith(b'{"type":"message_stop"}')
    line = _access_lines(caplog)[-1]
    assert (line["tokens_in"], line["tokens_out"]) == (estimate_prompt_tokens(body), 4)


async def test_midstream_cut_ends_the_client_stream_with_an_error_event(
    gw: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    headers = auth(**{"x-mock-fail": "midstream-cut", "x-mock-fail-after": "2",
                      "x-mock-chunks": "10"})
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    assert resp.status == 200
    events = _events(await resp.read())
    last = _data(events[-1])
    assert last["error"]["code"] == "upstream_stream_cut"
    assert b"[DONE]" not in b"".join(events)
    line = _access_lines(caplog)[-1]
    assert line["outcome"] == "upstream_error" and line["usage_reported"] is False
    assert line["tokens_out"] >= 2  # counted from the deltas that did arrive


async def test_upstream_error_event_midstream_is_relayed_once(gw: Client) -> None:
    headers = auth(**{"x-mock-fail": "midstream-error", "x-mock-fail-after": "1"})
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    events = _events(await resp.read())
    errors = [e for e in events if b'"error"' in e]
    assert len(errors) == 1


async def test_client_disconnect_cancels_the_upstream_call_at_once(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway
) -> None:
    cancelled = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(100):
                await resp.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
                await asyncio.sleep(0.2)
        except (asyncio.CancelledError, ConnectionError):
            cancelled.set()
            raise
        return resp

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", slow_stream)
    server = await aiohttp_server(upstream)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"))
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=auth())
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(cancelled.wait(), timeout=2.0)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code"),
    [
        ("/v1/chat/completions", chat(), {}, 401, "invalid_api_key"),
        ("/v1/chat/completions", chat(), auth("sk-wrong"), 401, "invalid_api_key"),
        ("/v1/embeddings", {"model": "embed-test", "input": "x"}, auth(UMBRELLA_KEY), 403,
         "model_not_allowed"),
        ("/v1/chat/completions", chat(model="gpt-nope"), auth(), 404, "model_not_found"),
        ("/v1/chat/completions", {"messages": []}, auth(), 400, None),
        ("/v1/chat/completions", chat(stream="yes"), auth(), 400, None),
        ("/v1/chat/completions", chat(max_tokens="10"), auth(), 400, None),
        ("/v1/chat/completions", chat(max_tokens=True), auth(), 400, None),
        ("/v1/chat/completions", chat(max_tokens=0), auth(), 400, None),
        ("/v1/chat/completions", {"model": "gpt-test", "messages": "hi"}, auth(), 400, None),
        ("/v1/chat/completions", {"model": 42, "messages": []}, auth(), 400, None),
        ("/v1/embeddings", {"model": "embed-test", "input": "x", "stream": True}, auth(), 400,
         None),
        # chat routes translate between dialects (gateway/translate); other routes do not
        ("/v1/completions", {"model": "claude-test", "prompt": "x"}, auth(), 400,
         "model_not_supported_on_route"),
        ("/v1/nothing-here", chat(), auth(), 404, "unknown_url"),
    ],
)
async def test_bad_requests_get_openai_shaped_4xx(
    gw: Client, path: str, body: dict[str, Any], headers: dict[str, str], status: int,
    code: str | None,
) -> None:
    resp = await gw.post(path, json=body, headers=headers)
    assert resp.status == status
    err = await resp.json()
    if path == "/v1/messages":
        assert err["type"] == "error" and err["error"]["message"]
    else:
        assert set(err["error"]) == {"message", "type", "code", "param"}
        assert err["error"]["message"]
        if code:
            assert err["error"]["code"] == code


async def test_an_unserved_anthropic_endpoint_answers_in_the_anthropic_dialect(
    gw: Client,
) -> None:
    """/v1/messages/batches is not served: a 404 in Anthropic's shape, even from a client that
    sends no anthropic-version header."""
    resp = await gw.post("/v1/messages/batches", json={"requests": []}, headers=auth())
    assert resp.status == 404
    err = await resp.json()
    assert err["type"] == "error" and err["error"]["type"] == "not_found_error", err


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"", "application/json", 400),
        (b"\xff\xfe\x00garbage", "application/json", 400),
        (b'{"model": "gpt-test"}', "text/plain", 415),
        (b"model=gpt-test", "application/x-www-form-urlencoded", 415),
    ],
)
async def test_malformed_bodies_get_4xx(gw: Client, data: bytes, content_type: str,
                                        status: int) -> None:
    resp = await gw.post("/v1/chat/completions", data=data,
                         headers=auth(**{"Content-Type": content_type}))
    assert resp.status == status
    assert (await resp.json())["error"]["message"]


async def test_oversized_body_gets_413(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"max_body_bytes": 2048})
    resp = await gw.post("/v1/chat/completions", json=chat(text="x" * 5000), headers=auth())
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must still hold
        for _ in range(10):
            yield b"x" * 1000

    resp = await gw.post("/v1/chat/completions", data=chunked(),
                         headers=auth(**{"Content-Type": "application/json"}))
    assert resp.status == 413


async def test_upstream_statuses_are_relayed_with_retry_after(gw: Client) -> None:
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(**{"x-mock-status": "400"}))
    assert resp.status == 400 and "x-gateway-attempts" not in resp.headers
    # A provider 429 whose Retry-After does not fit the request's deadline is not retried:
    # the client gets it as it came, Retry-After included.
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(**{
        "x-mock-status": "429", "x-mock-retry-after": "3", "x-mock-retry-after-ms": "2500",
        "X-Request-Timeout": "2"}))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3" and resp.headers["retry-after-ms"] == "2500"
    assert (await resp.json())["error"]["message"]
    # ...and it cools the deployment down: the next request fails fast, told when to return.
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert 1 <= int(resp.headers["Retry-After"]) <= 3


async def test_unreachable_upstream_gives_502(make_gateway: MakeGateway, unused_tcp_port: int) -> None:
    gw = await make_gateway(upstream=f"http://127.0.0.1:{unused_tcp_port}")
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_connect_error"


async def test_dropped_connection_gives_502(gw: Client) -> None:
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(**{"x-mock-fail": "drop"}))
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_disconnected"


async def test_hung_upstream_is_cut_at_the_first_byte_timeout(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(providers={"main": {"timeouts": {"first_byte_s": 0.3}}})
    started = time.monotonic()
    resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth(**{"x-mock-fail": "hang"}))
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_first_byte_timeout"
    assert time.monotonic() - started < 2.0


async def test_stalled_stream_is_cut_at_the_idle_timeout(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(providers={"main": {"timeouts": {"idle_s": 0.3}}})
    headers = auth(**{"x-mock-chunks": "3", "x-mock-chunk-gap-ms": "2000"})
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=headers)
    events = _events(await resp.read())
    assert _data(events[-1])["error"]["code"] == "upstream_idle_timeout"


async def test_models_lists_only_what_the_tenant_may_use(gw: Client) -> None:
    resp = await gw.get("/v1/models", headers=auth(UMBRELLA_KEY))
    data = await resp.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["gpt-test"]
    resp = await gw.get("/v1/models", headers=auth())
    assert {m["id"] for m in (await resp.json())["data"]} == {"gpt-test", "embed-test", "claude-test"}
    assert (await gw.get("/v1/models/gpt-test", headers=auth())).status == 200
    assert (await gw.get("/v1/models/embed-test", headers=auth(UMBRELLA_KEY))).status == 404
    assert (await gw.get("/v1/models")).status == 401


async def test_health_endpoints_need_no_key(gw: Client) -> None:
    assert (await gw.get("/healthz")).status == 200
    resp = await gw.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["state_backend"] == "memory"


async def test_access_log_has_one_json_line_without_prompt_or_key(
    gw: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secret_prompt = "the launch code is swordfish-7"
    await gw.post("/v1/chat/completions", json=chat(text=secret_prompt),
                  headers=auth(**{"X-Agent-Session": "run-1", "X-Agent-Step": "3",
                                  "X-Priority": "critical"}))
    await gw.post("/v1/chat/completions", json=chat(text=secret_prompt), headers=auth("sk-bad-key"))
    lines = _access_lines(caplog)
    assert len(lines) == 2
    ok, bad = lines
    assert ok["tenant"] == "acme" and ok["status"] == 200 and ok["deployment"] == "main/upstream-gpt"
    assert ok["priority"] == "high"  # critical asked, clamped to the tenant's maximum
    assert (ok["agent_session"], ok["agent_step"]) == ("run-1", "3")
    assert bad["status"] == 401 and bad["tenant"] is None
    everything = caplog.text + json.dumps(lines)
    for secret in (secret_prompt, "swordfish", ACME_KEY, "sk-bad-key"):
        assert secret not in everything


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(log_fields(r)) for r in caplog.records if r.name == "gateway.access"]
