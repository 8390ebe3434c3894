"""Remembering stored Responses answers' sizes (gateway/limits/responses.py): the id is read
from the answers providers send, an entry lives as long as it is told and no longer, and this
replica's part of the memory stays bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.limits.responses import ResponseSizes, response_key
from gateway.request.classifier import ROUTES, prompt_estimate, stored_refs, unseen_input
from gateway.usage import Usage
from tests.gwtest import FakeClock

CORPUS = Path(__file__).parent.parent / "data" / "usage"


def test_the_id_comes_from_a_whole_answer_and_from_the_streams_last_event() -> None:
    whole = Usage()
    assert whole.merge(orjson.loads((CORPUS / "openai_responses_cached_reasoning.json")
                                    .read_bytes()))
    assert whole.response_id == "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
    streamed = Usage()
    for line in (CORPUS / "openai_responses_stream.sse").read_bytes().splitlines():
        if line.startswith(b"data: {"):
            streamed.merge(orjson.loads(line[6:]))
    assert streamed.response_id == "resp_68a1" and streamed.input_seen


@pytest.mark.parametrize("answer", [
    {"id": "resp_1", "object": "response", "store": False, "usage": {"input_tokens": 5}},
    {"id": "chatcmpl_1", "object": "chat.completion", "usage": {"prompt_tokens": 5}},
    {"id": "r" * 257, "object": "response", "usage": {"input_tokens": 5}},
    {"id": 7, "object": "response", "usage": {"input_tokens": 5}},
])
def test_no_id_is_kept_for_an_answer_nothing_can_refer_to(answer: dict[str, Any]) -> None:
    usage = Usage()
    assert usage.merge(answer)
    assert usage.response_id is None


def test_an_entry_lives_its_ttl_and_the_least_recently_used_go_first() -> None:
    clock = FakeClock()
    sizes = ResponseSizes(clock, entries=2)
    sizes.remember("a", 100, ttl_s=10)
    sizes.remember("b", 200, ttl_s=20)
    clock.advance(9.9)
    assert sizes.size("a") == 100  # and now more recently used than b
    sizes.remember("c", 300, ttl_s=20)
    assert (sizes.size("b"), sizes.size("a"), sizes.size("c")) == (None, 100, 300)
    clock.advance(0.1)
    assert sizes.size("a") is None and len(sizes) == 1
    clock.advance(20)
    assert sizes.size("c") is None and len(sizes) == 0


def test_a_key_names_the_tenant_and_the_answer() -> None:
    assert response_key("acme", "resp_1") == response_key("acme", "resp_1")
    assert response_key("acme", "resp_1") != response_key("umbrella", "resp_1")
    assert response_key("a", "bc") != response_key("ab", "c")


REASONING = {"type": "reasoning", "id": "rs_1", "summary": []}
CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
RESULT = {"type": "function_call_output", "call_id": "c1", "output": "ok"}


@pytest.mark.parametrize("body, found", [
    ({"previous_response_id": "resp_1", "input": "go"}, ("resp_1",)),
    # An agent that keeps its own history passes reasoning items back by id.
    ({"input": [{"role": "user", "content": "go"}, REASONING, CALL, RESULT]}, ("rs_1",)),
    ({"previous_response_id": "resp_1", "input": [REASONING, RESULT]}, ("resp_1", "rs_1")),
    ({"input": [{**REASONING, "encrypted_content": "gAAA"}, CALL, RESULT]}, ()),  # carried
    ({"input": [{**REASONING, "content": [{"type": "reasoning_text", "text": "hm"}]}]}, ()),
    ({"input": [{"role": "user", "content": "go"}]}, ()),
    ({"previous_response_id": "resp_1", "input": "go", "tools": [{"type": "web_search"}]},
     ()),  # the search results are input of unknown size as well
    ({"input": [REASONING, {"type": "item_reference", "id": "msg_1"}]}, ()),
    ({"previous_response_id": "resp_1", "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-1"}]}]}, ()),
    ({"previous_response_id": "resp_1", "conversation": "conv_1", "input": "go"}, ()),
    ({"previous_response_id": 5, "input": "go"}, ()),
    ({"input": [{**REASONING, "id": 5}]}, ()),
    ({"input": [{**REASONING, "id": f"rs_{i}"} for i in range(65)]}, ()),  # too many to look up
])
def test_a_request_is_sized_by_memory_only_when_stored_items_are_all_it_refers_to(
        body: dict[str, Any], found: tuple[str, ...]) -> None:
    body = {"model": "m", **body}
    _, in_parts = prompt_estimate(body)
    assert stored_refs(ROUTES["/v1/responses"], body, in_parts) == found
    if found:
        assert unseen_input(ROUTES["/v1/responses"], body, in_parts) is not None


def test_an_answers_reasoning_items_are_kept_with_its_id() -> None:
    usage = Usage()
    usage.merge({"id": "resp_1", "object": "response", "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "id": "msg_1", "role": "assistant", "content": []},
        {"type": "reasoning", "id": "rs_2", "summary": []}],
        "usage": {"input_tokens": 5, "output_tokens": 900,
                  "output_tokens_details": {"reasoning_tokens": 800}}})
    assert usage.reasoning_ids == ("rs_1", "rs_2") and usage.reasoning_tokens == 800
    unstored = Usage()
    unstored.merge({"id": "resp_2", "object": "response", "store": False,
                    "output": [{"type": "reasoning", "id": "rs_3", "summary": []}],
                    "usage": {"input_tokens": 5, "output_tokens": 9}})
    assert unstored.reasoning_ids == ()
