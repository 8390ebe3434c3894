"""The mock upstream behaves like the providers it imitates, and every knob does what it says."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.mock.upstream import (
    RECORDED,
    create_mock_app,
    estimate_prompt_tokens,
    run_mock_upstream,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hello there, mock!"}]}


def core(usage: dict[str, Any]) -> dict[str, Any]:
    """The usage counts without the detail objects (tested in tests/integration/test_mock_usage.py)."""
    details = ("prompt_tokens_details", "completion_tokens_details", "input_tokens_details",
               "output_tokens_details", "cache_creation", "cache_creation_input_tokens",
               "cache_read_input_tokens", "service_tier")
    return {k: v for k, v in usage.items() if k not in details}


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_mock_app(seed=7))


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) for each SSE event in ``text``."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


def data_objects(text: str) -> list[Any]:
    """The JSON payloads of an OpenAI-style ``data:`` stream, stopping at ``[DONE]``."""
    out = []
    for _, data in sse_events(text):
        if data == "[DONE]":
            break
        out.append(json.loads(data))
    return out


# --- estimate -----------------------------------------------------------------------------


def test_estimate_counts_utf8_bytes_over_four_rounded_up() -> None:
    assert estimate_prompt_tokens({}) == 1
    assert estimate_prompt_tokens({"prompt": "abcd"}) == 1
    assert estimate_prompt_tokens({"prompt": "abcde"}) == 2
    # "é" is two UTF-8 bytes: 5 chars, 6 bytes -> 2 tokens; role names are not counted.
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "éabcd"}]}]}
    assert estimate_prompt_tokens(body) == 2
    anthropic = {"system": "x" * 8, "messages": [{"role": "user", "content": "y" * 8}]}
    assert estimate_prompt_tokens(anthropic) == 4


# --- non-streaming answers ----------------------------------------------------------------


async def test_chat_usage_model_echo_and_content(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-mock-chunks": "7"})
    assert resp.status == 200
    body = await resp.json()
    prompt = estimate_prompt_tokens(CHAT)
    assert body["model"] == "gpt-test"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "tok " * 7
    assert body["choices"][0]["finish_reason"] == "stop"
    assert core(body["usage"]) == {"prompt_tokens": prompt, "completion_tokens": 7,
                             "total_tokens": prompt + 7}


@pytest.mark.parametrize("limit_key", ["max_tokens", "max_completion_tokens"])
async def test_chat_max_tokens_caps_the_answer(client: Client, limit_key: str) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, limit_key: 3})
    body = await resp.json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"


async def test_completions_embeddings_models(client: Client) -> None:
    req = {"model": "text-test", "prompt": "x" * 10, "max_tokens": 2}
    body = await (await client.post("/v1/completions", json=req)).json()
    assert body["choices"][0]["text"] == "tok tok "
    assert core(body["usage"]) == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    req = {"model": "emb-test", "input": ["alpha", "beta", "alpha"]}
    body = await (await client.post("/v1/embeddings", json=req)).json()
    assert body["model"] == "emb-test"
    assert core(body["usage"]) == {"prompt_tokens": estimate_prompt_tokens(req),
                             "total_tokens": estimate_prompt_tokens(req)}
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(len(v) == 8 for v in vectors)
    assert vectors[0] == vectors[2]  # same text, same vector

    b64 = await (await client.post("/v1/embeddings",
                                   json={**req, "encoding_format": "base64"})).json()
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert list(decoded) == vectors[0]

    models = await (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "mock-model"


async def test_responses_and_anthropic_usage_shapes(client: Client) -> None:
    req = {"model": "resp-test", "input": "a" * 12, "max_output_tokens": 4}
    body = await (await client.post("/v1/responses", json=req)).json()
    assert body["model"] == "resp-test"
    assert body["output"][0]["content"][0]["text"] == "tok " * 4
    assert core(body["usage"]) == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}

    req = {"model": "claude-test", "max_tokens": 100, "system": "s" * 4,
           "messages": [{"role": "user", "content": "m" * 4}]}
    body = await (await client.post("/v1/messages", json=req)).json()
    assert body["type"] == "message" and body["model"] == "claude-test"
    assert body["content"] == [{"type": "text", "text": "tok " * 5}]
    assert body["stop_reason"] == "end_turn"
    assert core(body["usage"]) == {"input_tokens": 2, "output_tokens": 5}


# --- streams ------------------------------------------------------------------------------


async def test_chat_stream_without_include_usage(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers={"x-mock-chunks": "4"})
    assert resp.headers["Content-Type"] == "text/event-stream"
    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n")
    chunks = data_objects(text)
    assert all("usage" not in c for c in chunks)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert contents == ["tok "] * 4 + [None]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_include_usage_sends_final_usage_chunk(client: Client) -> None:
    req = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    text = await (await client.post("/v1/chat/completions", json=req)).text()
    chunks = data_objects(text)
    *content, usage_chunk = chunks
    assert all(c["usage"] is None for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    prompt = estimate_prompt_tokens(req)
    assert core(usage_chunk["usage"]) == {"prompt_tokens": prompt, "completion_tokens": 3,
                                    "total_tokens": prompt + 3}
    assert sum(1 for c in content if c["choices"][0]["delta"].get("content")) == 3
    assert text.endswith("data: [DONE]\n\n")


async def test_completions_stream_include_usage(client: Client) -> None:
    req = {"prompt": "abcdefgh", "stream": True, "stream_options": {"include_usage": True}}
    chunks = data_objects(await (await client.post("/v1/completions", json=req)).text())
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["tok "] * 5 + [""]
    assert core(chunks[-1]["usage"]) == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_responses_stream_event_order_and_usage(client: Client) -> None:
    req = {"model": "resp-test", "input": "abcd", "stream": True}
    resp = await client.post("/v1/responses", json=req, headers={"x-mock-chunks": "3"})
    text = await resp.text()
    events = sse_events(text)
    names = [name for name, _ in events]
    assert names[0] == "response.created"
    assert names.count("response.output_text.delta") == 3
    assert names[-1] == "response.completed"
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == names
    assert [p["sequence_number"] for p in payloads] == list(range(len(events)))
    final = payloads[-1]["response"]
    assert core(final["usage"]) == {"input_tokens": 1, "output_tokens": 3, "total_tokens": 4}
    assert final["model"] == "resp-test"


async def test_anthropic_stream_event_sequence(client: Client) -> None:
    req = {"model": "claude-test", "max_tokens": 2, "stream": True,
           "messages": [{"role": "user", "content": "q" * 9}]}
    events = sse_events(await (await client.post("/v1/messages", json=req)).text())
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert all(p["type"] == name for p, (name, _) in zip(payloads, events, strict=True))
    assert payloads[0]["message"]["usage"]["input_tokens"] == 3
    assert payloads[2]["delta"] == {"type": "text_delta", "text": "tok "}
    assert payloads[5]["usage"]["output_tokens"] == 2
    assert payloads[5]["delta"]["stop_reason"] == "max_tokens"


async def test_ttft_and_chunk_gap_chunks_arrive_as_generated(client: Client) -> None:
    start = time.monotonic()
    resp = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True},
        headers={"x-mock-ttft-ms": "200", "x-mock-chunks": "3", "x-mock-chunk-gap-ms": "150"},
    )
    assert resp.status == 200
    first = await resp.content.readuntil(b"\n\n")
    first_at = time.monotonic() - start
    rest = await resp.content.read()
    done_at = time.monotonic() - start
    assert b"tok " in first
    assert first_at >= 0.15
    assert done_at - first_at >= 0.2  # two gaps still to come when the first chunk arrived
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_latency_delays_the_answer(client: Client) -> None:
    start = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"x-mock-latency-ms": "150"})
    assert resp.status == 200
    assert time.monotonic() - start >= 0.12


# --- failure injection --------------------------------------------------------------------


async def test_injected_status_openai_shape_and_retry_headers(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={
        "x-mock-status": "429", "x-mock-retry-after": "2", "x-mock-retry-after-ms": "1500"})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    assert resp.headers["retry-after-ms"] == "1500"
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == "rate_limit_exceeded"


async def test_injected_529_anthropic_shape(client: Client) -> None:
    resp = await client.post("/v1/messages", json={"max_tokens": 5, "messages": []},
                             headers={"x-mock-status": "529"})
    assert resp.status == 529
    assert "Retry-After" not in resp.headers
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("header,value", [
    ("x-mock-chunks", "lots"), ("x-mock-chunks", "100001"), ("x-mock-status", "200"),
    ("x-mock-latency-ms", "-1"), ("x-mock-fail", "explode"), ("x-mock-fail-rate", "1.5"),
    ("x-mock-retry-after", "soon"),
])
async def test_invalid_knob_is_400_openai_error(client: Client, header: str, value: str) -> None:
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={header: value})
    assert resp.status == 400
    assert header in (await resp.json())["error"]["message"]


async def test_invalid_json_body_is_400(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", data=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    anthropic = await client.post("/v1/messages", data=b"[1]")
    assert anthropic.status == 400
    assert (await anthropic.json())["error"]["type"] == "invalid_request_error"


async def test_drop_closes_connection_without_response(client: Client) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-mock-fail": "drop"})


async def test_hang_sends_nothing_until_client_gives_up(client: Client) -> None:
    timeout = aiohttp.ClientTimeout(total=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.post("/v1/chat/completions", json=CHAT, headers={"x-mock-fail": "hang"},
                          timeout=timeout)
    assert time.monotonic() - start >= 0.25
    ok = await client.post("/v1/chat/completions", json=CHAT)  # the mock is still serving
    assert ok.status == 200


async def test_midstream_cut_aborts_after_n_chunks(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers={"x-mock-fail": "midstream-cut", "x-mock-fail-after": "3"})
    assert resp.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in resp.content.iter_any():
            received += piece
    chunks = data_objects(received.decode())
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["tok "] * 3
    assert b"[DONE]" not in received


async def test_midstream_cut_of_non_stream_answer(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"x-mock-fail": "midstream-cut"})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_midstream_error_openai_event_ends_stream(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers={"x-mock-fail": "midstream-error", "x-mock-fail-after": "2"})
    text = await resp.text()  # the stream ends cleanly, without [DONE]
    assert "[DONE]" not in text
    *chunks, last = data_objects(text)
    assert len(chunks) == 2
    assert last["error"]["type"] == "server_error"


async def test_midstream_error_anthropic_event(client: Client) -> None:
    resp = await client.post("/v1/messages", json={"stream": True, "max_tokens": 9},
                             headers={"x-mock-fail": "midstream-error", "x-mock-fail-after": "1"})
    events = sse_events(await resp.text())
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "error"]
    error = json.loads(events[-1][1])
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"


async def test_fail_rate_is_seeded_and_bounded(aiohttp_client: MakeClient) -> None:
    async def statuses(rate: str) -> list[int]:
        client = await aiohttp_client(create_mock_app(seed=42))
        out = []
        for _ in range(20):
            resp = await client.post("/v1/chat/completions", json=CHAT, headers={
                "x-mock-fail-rate": rate, "x-mock-status": "503"})
            out.append(resp.status)
            resp.release()
        return out

    assert set(await statuses("0")) == {200}
    assert set(await statuses("1")) == {503}
    half = await statuses("0.5")
    assert set(half) == {200, 503}
    assert await statuses("0.5") == half  # same seed, same sequence


# --- recording ----------------------------------------------------------------------------


async def test_requests_are_recorded_listed_and_cleared(aiohttp_client: MakeClient) -> None:
    app = create_mock_app(max_recorded=2)
    client = await aiohttp_client(app)
    for n in range(3):
        await client.post("/v1/chat/completions", json={**CHAT, "n": n},
                          headers={"Authorization": "Bearer sk-test", "X-Mock-Status": "500"})
    await client.post("/v1/messages", data=b"garbage", headers={"X-Api-Key": "ak"})

    recorded = app[RECORDED]
    assert len(recorded) == 2  # bounded
    assert recorded[0].headers["authorization"] == "Bearer sk-test"
    assert recorded[0].body == {**CHAT, "n": 2}
    assert recorded[1].path == "/v1/messages"
    assert recorded[1].headers["x-api-key"] == "ak"
    assert recorded[1].body is None

    listed = await (await client.get("/_mock/requests")).json()
    assert [r["path"] for r in listed] == ["/v1/chat/completions", "/v1/messages"]
    assert listed[0]["method"] == "POST" and listed[0]["headers"]["x-mock-status"] == "500"

    assert (await client.delete("/_mock/requests")).status == 204
    assert await (await client.get("/_mock/requests")).json() == []


async def test_unknown_v1_path_is_openai_404(client: Client) -> None:
    resp = await client.delete("/v1/files/abc")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_run_mock_upstream_serves_until_cancelled(unused_tcp_port: int) -> None:
    port = unused_tcp_port
    task = asyncio.create_task(run_mock_upstream("127.0.0.1", port))
    url = f"http://127.0.0.1:{port}/v1/models"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(url) as resp:
                    assert resp.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("mock upstream never started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):  # the port is released
            await session.get(url)


# --- SDK compatibility --------------------------------------------------------------------


async def test_official_openai_sdk_parses_the_mock(client: Client) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="sk-test",
                             max_retries=0)
    async with sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == "tok " * 5
        assert usage is not None and usage.completion_tokens == 5

        emb = await sdk.embeddings.create(model="emb", input=["a", "b"])  # base64 by default
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
        # The SDK's Responses stream helper also parses the mock's event sequence, but its
        # first use builds pydantic models for ~0.8 s, so it is not exercised here.
