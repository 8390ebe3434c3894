"""The prompt estimate counts every string the provider tokenizes (red team, HIGH).

A 200 KB Responses ``instructions`` estimated 1 token: one request spent 50,006 tokens against a
20,000-token budget and token rate, and the context-window pre-check did not fire. The same
held for tool schemas and structured-output schemas. The estimate now walks the whole body.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.mock.upstream import RECORDED
from gateway.request.classifier import (
    ROUTES,
    estimate_prompt_tokens,
    prompt_estimate,
    unseen_input,
)
from gateway.state import StateBackend
from tests.gwtest import auth
from tests.plugin_gateway import MakeGateway, settled

BIG = "word " * 40_000  # 200,000 bytes: about 50,000 tokens


def test_instructions_count() -> None:
    small = estimate_prompt_tokens({"model": "m", "input": "hi"})
    assert estimate_prompt_tokens({"model": "m", "input": "hi", "instructions": BIG}) \
        >= small + 50_000


def _schema(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {
        f"field_{i}": {"type": "string", "description": "a long description " * 4}
        for i in range(n)}}


def test_tool_and_output_schemas_count_keys_and_values() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    floor = estimate_prompt_tokens(base)
    schema = _schema(200)  # about 18 KB of JSON: well over 4,000 tokens
    bodies: list[dict[str, Any]] = [
        {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
        {**base, "tools": [{"name": "f", "input_schema": schema}]},  # Anthropic
        {**base, "response_format": {"type": "json_schema",
                                     "json_schema": {"name": "s", "schema": schema}}},
        {"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "s",
                                                          "schema": schema}}},
    ]
    for body in bodies:
        assert estimate_prompt_tokens(body) >= floor + 4_000, body.keys()
    # property names are tokenized like values: a schema made of keys alone still counts
    keys_only = {"type": "object", "properties": {f"k{'x' * 40}{i}": {} for i in range(400)}}
    assert estimate_prompt_tokens({**base, "tools": [{"name": "f", "input_schema": keys_only}]}) \
        >= floor + 4_000


def test_images_are_not_counted_as_their_base64_text() -> None:
    image = base64.b64encode(b"\x00" * 300_000).decode()  # 400 KB of base64
    anthropic = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": image}}]}]}
    openai = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
    responses = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": f"data:image/png;base64,{image}"}]}]}
    for body in (anthropic, openai, responses):
        assert 1600 <= estimate_prompt_tokens(body) < 1700


def test_a_schema_with_a_list_type_is_estimated_not_a_500() -> None:
    """A nullable field of a strict JSON schema has "type": ["string", "null"]: the image check
    once hashed that list and raised (a 500 for any such tool or response_format)."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    schema = {"type": "object", "properties": {"note": {"type": ["string", "null"],
                                                        "description": "d" * 400}}}
    body = {**base, "tools": [{"type": "function", "function": {"name": "f",
                                                                "parameters": schema}}]}
    assert estimate_prompt_tokens(body) >= estimate_prompt_tokens(base) + 100


async def test_a_nullable_tool_field_is_served(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    schema = {"type": "object", "properties": {"note": {"type": ["string", "null"]}},
              "required": ["note"], "additionalProperties": False}
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "strict": True,
                                                        "parameters": schema}}]}
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200, await resp.text()


def test_text_beside_an_image_key_counts() -> None:
    """Only an image block's own payload is skipped: an ``image_url`` key on a message, on a
    text part or as a schema property once hid everything beside it (a 48 KB message with
    ``"image_url": "x"`` reserved 99 tokens and spent 12,005; red team)."""
    floor = len(BIG) // 4
    bodies: list[dict[str, Any]] = [
        {"model": "m", "messages": [{"role": "user", "content": BIG, "image_url": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": BIG, "image_url": {"url": "x"}}]}]},
        {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}, "text": BIG}]}]},
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "x"}, "title": BIG}]}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"image_url": {"type": "string",
                                                               "description": BIG}}}}}]},
    ]
    for body in bodies:
        assert estimate_prompt_tokens(body) >= floor, body


async def test_an_image_key_cannot_hide_a_prompt_from_a_budget(
    make_gateway: MakeGateway, backend: StateBackend, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway(state=backend, tenants={"acme": {"budget": {"daily_tokens": 20_000}}})
    body = {"model": "gpt-test", "max_tokens": 10,
            "messages": [{"role": "user", "content": BIG, "image_url": "x"}]}
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "insufficient_quota"
    await settled(gw)
    assert not [r for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")]


def test_fields_that_are_not_prompt_are_not_counted() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    knobs = {**base, "model": "x" * 4000, "user": "u" * 4000, "metadata": {"k": "v" * 4000},
             "temperature": 0.5, "max_tokens": 10, "stream": True,
             "stream_options": {"include_usage": True}}
    assert estimate_prompt_tokens(knobs) == estimate_prompt_tokens(base)


async def test_huge_instructions_cannot_overspend_a_budget(
    make_gateway: MakeGateway, backend: StateBackend, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway(state=backend, tenants={"acme": {"budget": {"daily_tokens": 20_000}}})
    body = {"model": "gpt-test", "input": "hi", "instructions": BIG, "max_output_tokens": 100}
    resp = await gw.post("/v1/responses", json=body, headers=auth())
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "insufficient_quota"
    await settled(gw)
    assert not [r for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")]


async def test_huge_instructions_meet_the_context_window_check(
    make_gateway: MakeGateway, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway(models={"gpt-test": {"context_window": 20_000}})
    body = {"model": "gpt-test", "input": "hi", "instructions": BIG, "max_output_tokens": 100}
    resp = await gw.post("/v1/responses", json=body, headers=auth())
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "context_length_exceeded"
    assert not [r for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")]


async def test_huge_instructions_cannot_pass_a_token_rate_limit(
    make_gateway: MakeGateway, backend: StateBackend, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway(state=backend, tenants={"acme": {"limits": {
        "tokens_per_minute": 20_000, "token_burst": 20_000}}})
    body = {"model": "gpt-test", "input": "hi", "instructions": BIG, "max_output_tokens": 100}
    resp = await gw.post("/v1/responses", json=body, headers=auth())
    assert resp.status == 429
    assert not [r for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")]


UNSEEN_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("/v1/responses", {"previous_response_id": "resp_1", "input": "go"}, "previous_response_id"),
    ("/v1/responses", {"conversation": "conv_1", "input": "go"}, "conversation"),
    ("/v1/responses", {"prompt": {"id": "pmpt_1"}, "input": "go"}, "prompt"),
    ("/v1/responses", {"input": "go", "tools": [{"type": "web_search"}]}, "its web_search tool"),
    ("/v1/responses", {"input": [{"type": "item_reference", "id": "msg_1"}]},
     "an item_reference"),
    ("/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_file", "file_url": "https://x/doc.pdf"}]}]}, "an input_file by id or URL"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-1"}}]}]}, "a file by id"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}]}]},
     "a document by URL or file id"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]},
     "its web_fetch_20250910 tool"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}],
                      "mcp_servers": [{"type": "url", "url": "https://x"}]}, "mcp_servers"),
    ("/v1/responses", {"input": [{"id": "msg_1"}, {"role": "user", "content": "go"}]},
     "an item_reference"),  # its type may be left out
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "audio": {"id": "audio_1"}}, {"role": "user", "content": "and?"}]},
     "an earlier audio answer by id"),
    # All the input is in the body: a schema property named file_id, an image by id (counted
    # as an image), a base64 file, tools the client runs, a legacy prompt string.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                          "properties": {"file_id": {"type": "string"}}}}}]},
     None),
    ("/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}],
      "tools": [{"type": "computer_use_preview"}, {"type": "function", "name": "f"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA"}}]}]}, None),
    ("/v1/completions", {"prompt": "hello"}, None),
    ("/v1/responses", {"input": [{"type": "message", "id": "msg_1", "role": "assistant",
                                  "content": [{"type": "output_text", "text": "hi"}]}]}, None),
]


@pytest.mark.parametrize("path, body, unseen", UNSEEN_CASES)
def test_input_the_body_only_refers_to_is_found(
        path: str, body: dict[str, Any], unseen: str | None) -> None:
    """What makes the provider read input the body does not carry: budgets reserve up to the
    context window for it (a stored conversation of 120,000 tokens reserved 20)."""
    body = {"model": "m", **body}
    estimate, in_parts = prompt_estimate(body)
    assert unseen_input(ROUTES[path], body, in_parts) == unseen
    assert estimate == estimate_prompt_tokens(body)
