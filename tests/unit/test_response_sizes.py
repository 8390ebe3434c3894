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
    assert whole.stored[0] == ("resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
                               whole.input_tokens + whole.output_tokens)
    streamed = Usage()
    for line in (CORPUS / "openai_responses_stream.sse").read_bytes().splitlines():
        if line.startswith(b"data: {"):
            streamed.merge(orjson.loads(line[6:]))
    assert streamed.stored == (("resp_68a1", streamed.input_tokens + streamed.output_tokens),
                               ("rs_68a1", streamed.reasoning_tokens))


def test_the_size_is_what_the_provider_reported_not_what_other_attempts_add() -> None:
    """An attempt that reached the provider and left no usage is charged an estimate, added
    to the request's input after the answer's usage was read: not to what it stored."""
    usage = Usage()
    usage.merge({"id": "resp_1", "object": "response",
                 "usage": {"input_tokens": 500, "output_tokens": 20}})
    usage.input_tokens += 128_000
    assert usage.stored == (("resp_1", 520),)


@pytest.mark.parametrize("answer", [
    {"id": "resp_1", "object": "response", "store": False,
     "usage": {"input_tokens": 5, "output_tokens": 1}},
    {"id": "chatcmpl_1", "object": "chat.completion",
     "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
    {"id": "r" * 257, "object": "response", "usage": {"input_tokens": 5, "output_tokens": 1}},
    {"id": 7, "object": "response", "usage": {"input_tokens": 5, "output_tokens": 1}},
    {"id": "resp_1", "object": "response", "usage": {"input_tokens": 5}},  # output unknown
    {"id": "resp_1", "object": "response", "usage": {"input_tokens": 5, "output_tokens": 1},
     "output": [{"type": "image_generation_call", "id": "ig_1", "result": "iVBOR"}]},
])
def test_nothing_is_kept_of_an_answer_nothing_can_refer_to_or_of_unknown_size(
        answer: dict[str, Any]) -> None:
    usage = Usage()
    assert usage.merge(answer)
    assert usage.stored == ()


def test_an_entry_lives_its_ttl_and_the_least_recently_used_go_first() -> None:
    clock = FakeClock()
    sizes = ResponseSizes(clock, entries=2)
    sizes.remember("t", "a", 100, ttl_s=10)
    sizes.remember("t", "b", 200, ttl_s=20)
    clock.advance(9.9)
    assert sizes.size("t", "a") == 100  # and now more recently used than b
    sizes.remember("t", "c", 300, ttl_s=20)
    assert (sizes.size("t", "b"), sizes.size("t", "a"), sizes.size("t", "c")) == (
        None, 100, 300)
    clock.advance(0.1)
    assert sizes.size("t", "a") is None and len(sizes) == 1
    clock.advance(20)
    assert sizes.size("t", "c") is None and len(sizes) == 0


def test_all_tenants_together_are_bounded_and_the_largest_gives_way() -> None:
    clock = FakeClock()
    sizes = ResponseSizes(clock, entries=10, all_entries=12)
    for n in range(10):
        sizes.remember("big", f"b{n}", n, ttl_s=60)
    for n in range(4):
        sizes.remember(f"t{n}", "k", n, ttl_s=60)
    assert len(sizes) == 12 and sizes.size("big", "b0") is None and sizes.size("t0", "k") == 0
    clock.advance(61)
    sizes.remember("big", "new", 1, ttl_s=60)  # the expired go as new ones come
    assert len(sizes) == 5 and sizes.size("big", "new") == 1


def test_one_tenants_answers_do_not_push_out_anothers() -> None:
    sizes = ResponseSizes(FakeClock(), entries=2)
    sizes.remember("quiet", "q", 100, ttl_s=60)
    for n in range(50):
        sizes.remember("busy", f"b{n}", n, ttl_s=60)
    assert sizes.size("quiet", "q") == 100 and len(sizes) == 3


def test_a_key_names_the_tenant_the_model_and_the_answer() -> None:
    key = response_key("acme", "gpt", "resp_1")
    assert key == response_key("acme", "gpt", "resp_1")
    assert key != response_key("umbrella", "gpt", "resp_1")
    assert key != response_key("acme", "gpt-mini", "resp_1")
    assert response_key("a", "m", "bc") != response_key("ab", "m", "c")
    assert response_key("a", "mb", "c") != response_key("a", "m", "bc")


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
    assert usage.stored == (("resp_1", 905), ("rs_1", 800), ("rs_2", 800))
    unstored = Usage()
    unstored.merge({"id": "resp_2", "object": "response", "store": False,
                    "output": [{"type": "reasoning", "id": "rs_3", "summary": []}],
                    "usage": {"input_tokens": 5, "output_tokens": 9}})
    assert unstored.stored == ()
