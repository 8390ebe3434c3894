"""Tools the provider runs and bills per call (web search, file search, code interpreter,
image generation, web fetch) are charged by the calls its answer reports, and reserved of
cost budgets by the calls a request may make: they were charged nothing, so a tenant could
search on a cheap model past any cost budget."""

from __future__ import annotations

from typing import Any, get_args

import orjson
import pytest

from gateway.config.model import Price, ServerTool
from gateway.request.classifier import reserved_tool_calls
from gateway.upstream.sse import SseRelay
from gateway.usage import SERVER_TOOLS, Usage, cost_micros, reservation_cost_micros


def test_the_config_names_the_tools_usage_counts() -> None:
    assert set(get_args(ServerTool)) == set(SERVER_TOOLS)


def test_responses_output_items_are_counted_once_per_report() -> None:
    answer = {"id": "resp_1", "object": "response", "output": [
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "web_search_call", "id": "ws_2", "status": "completed"},
        {"type": "file_search_call", "id": "fs_1", "status": "completed"},
        {"type": "function_call", "id": "fc_1", "name": "f", "arguments": "{}"},
        {"type": "message", "id": "msg_1", "role": "assistant", "content": []}],
        "usage": {"input_tokens": 100, "output_tokens": 10}}
    usage = Usage()
    usage.merge({"type": "response.completed", "response": answer})
    usage.merge({"type": "response.completed", "response": answer})  # a repeat adds nothing
    assert usage.tool_calls == {"web_search": 2, "file_search": 1}


def test_anthropic_server_tool_use_is_read_from_the_message_and_its_last_delta() -> None:
    usage = Usage()
    usage.merge({"type": "message_start", "message": {"type": "message", "usage": {
        "input_tokens": 50, "output_tokens": 1}}})
    usage.merge({"type": "message_delta", "usage": {
        "output_tokens": 90, "server_tool_use": {"web_search_requests": 3,
                                                 "web_fetch_requests": 1}}})
    usage.merge({"type": "message_delta", "usage": {
        "output_tokens": 95, "server_tool_use": {"web_search_requests": 3}}})  # cumulative
    assert usage.tool_calls == {"web_search": 3, "web_fetch": 1}


def test_calls_are_priced_per_thousand_in_exact_micro_units() -> None:
    rates = Price.model_validate({"input_per_million": 1.0, "output_per_million": 2.0,
                                  "per_thousand_calls": {"web_search": 10.0}}).rates
    usage = Usage(input_tokens=1_000, output_tokens=500, tool_calls={"web_search": 3,
                                                                     "file_search": 2})
    # 1,000 x 1 + 500 x 2 = 2,000 micro-units of tokens; 3 searches x 0.01 = 30,000
    assert cost_micros(usage, rates) == 32_000
    assert reservation_cost_micros(1_000, 500, rates, {"web_search": 5}) == 52_000


@pytest.mark.parametrize("body, calls", [
    ({"tools": [{"type": "web_search_preview"}, {"type": "function", "name": "f"}]},
     {"web_search": 1}),
    ({"tools": [{"type": "web_search"}, {"type": "file_search"}], "max_tool_calls": 8},
     {"web_search": 8, "file_search": 8}),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                {"type": "web_fetch_20250910", "name": "web_fetch"}]},
     {"web_search": 5, "web_fetch": 1}),
    ({"tools": [{"type": "image_generation"}], "max_tool_calls": 10**9},
     {"image_generation": 1000}),
    ({"tools": [{"type": "code_interpreter"}], "max_tool_calls": True}, {"code_interpreter": 1}),
    ({"tools": [{"type": "web_search", "max_uses": 3}], "max_tool_calls": 7},
     {"web_search": 3}),
    ({"tools": "nonsense"}, {}),
])
def test_a_request_reserves_the_calls_it_may_make(body: dict[str, Any],
                                                  calls: dict[str, int]) -> None:
    assert reserved_tool_calls(body) == calls


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def test_a_stream_cut_before_its_usage_still_shows_the_calls_it_made() -> None:
    """A client leaving, or a provider cutting, after the searches ran and before the usage
    that counts them: the calls are counted from the events, one a call."""
    responses = SseRelay("openai", strip_usage_chunk=False)
    for n in range(2):
        for step in ("in_progress", "searching", "completed"):
            kind = f"response.web_search_call.{step}"
            responses.feed(_sse(kind, {"type": kind, "item_id": f"ws_{n}", "output_index": n}))
    responses.feed(_sse("response.output_item.done", {
        "type": "response.output_item.done", "item": {"type": "web_search_call", "id": "ws_1",
                                                       "status": "completed"}}))
    assert responses.tool_calls_seen == {"web_search": 2} and not responses.usage_final
    anthropic = SseRelay("anthropic", strip_usage_chunk=False)
    anthropic.feed(_sse("content_block_start", {
        "type": "content_block_start", "index": 1, "content_block": {
            "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}))
    anthropic.feed(_sse("content_block_start", {
        "type": "content_block_start", "index": 2, "content_block": {
            "type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}}))
    assert anthropic.tool_calls_seen == {"web_search": 1}


def test_an_image_cut_after_its_partial_images_is_one_call() -> None:
    """The client has a usable partial image; the provider may bill the call: it counts from
    its first event, once, whatever events follow."""
    relay = SseRelay("openai", strip_usage_chunk=False)
    for step in ("in_progress", "generating", "partial_image", "partial_image"):
        kind = f"response.image_generation_call.{step}"
        relay.feed(_sse(kind, {"type": kind, "item_id": "ig_1", "output_index": 0,
                               "partial_image_b64": "iVBOR"}))
    assert relay.tool_calls_seen == {"image_generation": 1}
