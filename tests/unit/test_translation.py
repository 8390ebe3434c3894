"""The translation corpus (tests/data/translation/): each case is a client request and an
upstream answer (whole and as the provider's SSE transcript) with the expected translation
both ways. The expected client-side answers are also checked against the official SDKs' own
types and stream accumulators, so a wrong wire shape fails even if the corpus agreed with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from gateway import translate
from gateway.errors import GatewayError
from gateway.upstream.sse import SseRelay

DATA = Path(__file__).parent.parent / "data" / "translation"
CASES = sorted(p.stem for p in DATA.glob("*_client_*.json"))


def _case(name: str) -> dict[str, Any]:
    case: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return case


def _plan(case: dict[str, Any]) -> translate.Translation:
    return translate.plan(case["client"], case["upstream"], case["request"],
                          default_max_tokens=case["default_max_tokens"],
                          include_usage=case["include_usage"])


def _events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for event in raw.split(b"\n\n"):
        if not event.strip():
            continue
        name, data = None, None
        for line in event.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                payload = line[5:].strip()
                data = "[DONE]" if payload == b"[DONE]" else json.loads(payload)
        out.append({"event": name, "data": data})
    return out


def _no_created(value: Any) -> Any:
    """``created`` is the translation's clock (Anthropic answers carry no timestamp)."""
    if isinstance(value, dict):
        return {k: _no_created(v) for k, v in value.items() if k != "created"}
    if isinstance(value, list):
        return [_no_created(v) for v in value]
    return value


def _transcript(case: dict[str, Any]) -> bytes:
    return "".join(e + "\n\n" for e in case["stream"]).encode()


@pytest.mark.parametrize("name", CASES)
def test_request_translation(name: str) -> None:
    case = _case(name)
    assert _plan(case).request.body == case["expected_request"]


@pytest.mark.parametrize("name", CASES)
def test_whole_answer_translation(name: str) -> None:
    case = _case(name)
    got = json.loads(_plan(case).answer(json.dumps(case["answer"]).encode()))
    assert _no_created(got) == _no_created(case["expected_answer"])
    if case["client"] == "openai":
        ChatCompletion.model_validate(got)  # the SDK's own type, strictly
    else:
        Message.model_validate(got)


@pytest.mark.parametrize("name", [n for n in CASES if _case(n)["stream"]])
@pytest.mark.parametrize("split", [0, 1, 7])
def test_stream_translation_event_by_event(name: str, split: int) -> None:
    """Through the relay as the gateway runs it, with the upstream bytes cut into pieces of
    ``split`` bytes (0: one event per read). Each event is answered as soon as it is whole."""
    case = _case(name)
    raw = _transcript(case)
    relay = SseRelay(case["upstream"], strip_usage_chunk=False)
    translator = _plan(case).stream()
    pieces = [e.encode() + b"\n\n" for e in case["stream"]] if split == 0 else \
        [raw[i:i + split] for i in range(0, len(raw), split)]
    got = b"".join(translator.feed(relay.feed(piece)) for piece in pieces)
    assert relay.finished
    assert _no_created(_events(got)) == _no_created(case["expected_stream"])
    # no buffering: the upstream's first event alone already gives the client its first
    assert _plan(case).stream().feed(case["stream"][0].encode() + b"\n\n")


@pytest.mark.parametrize("name", [n for n in CASES if _case(n)["stream"]])
def test_stream_matches_whole_answer_through_the_sdk_accumulators(name: str) -> None:
    """The translated stream, accumulated the way each SDK does, gives the translated whole
    answer: same text, same tool calls and arguments, same stop reason, same usage."""
    case = _case(name)
    got = _plan(case).stream().feed(_transcript(case))
    whole = case["expected_answer"]
    if case["client"] == "openai":
        state = ChatCompletionStreamState()
        for event in _events(got):
            if event["data"] != "[DONE]":
                state.handle_chunk(ChatCompletionChunk.model_validate(event["data"]))
        final = state.get_final_completion()
        message, expected = final.choices[0].message, whole["choices"][0]["message"]
        if _plan(case).request.json_tool:  # the same JSON, spaced as the model wrote it
            assert json.loads(message.content or "") == json.loads(expected["content"])
        else:
            assert message.content == expected["content"]
        calls = [(c.id, c.function.name, json.loads(c.function.arguments))
                 for c in message.tool_calls or []]
        assert calls == [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                         for c in expected.get("tool_calls") or []]
        if case["include_usage"]:
            assert final.usage is not None
            assert final.usage.model_dump(exclude_none=True) == whole["usage"]
    else:
        adapter: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
        snapshot = None
        json_bufs: dict[int, bytes] = {}
        for event in _events(got):
            snapshot = accumulate_event(event=adapter.validate_python(event["data"]),
                                        current_snapshot=snapshot, json_bufs=json_bufs)
        assert snapshot is not None
        dumped = snapshot.model_dump(exclude_none=True)
        assert dumped["content"] == whole["content"]
        assert dumped["stop_reason"] == whole["stop_reason"]
        assert dumped["usage"] == whole["usage"]


@pytest.mark.parametrize("name", [n for n in CASES if _case(n)["stream"]])
def test_stream_usage_matches_the_upstreams_usage(name: str) -> None:
    """What the gateway accounts (the upstream's own events) and what the client is told
    (translated) are the same tokens: prompt = input + cache reads + cache writes."""
    case = _case(name)
    relay = SseRelay(case["upstream"], strip_usage_chunk=False)
    relay.feed(_transcript(case))
    usage = relay.final_usage()
    whole = case["expected_answer"]["usage"]
    if case["client"] == "openai":
        assert (usage.input_tokens, usage.output_tokens) == (whole["prompt_tokens"],
                                                             whole["completion_tokens"])
    else:
        assert usage.input_tokens == whole["input_tokens"] + whole["cache_read_input_tokens"] \
            + whole["cache_creation_input_tokens"]
        assert usage.output_tokens == whole["output_tokens"]


def test_error_bodies_in_the_clients_dialect() -> None:
    errors = json.loads((DATA / "errors.json").read_text())
    for status, body in errors["openai_to_anthropic"]:
        got = json.loads(translate.error_body(json.dumps(body).encode(), status, to="anthropic"))
        assert got["type"] == "error" and got["error"]["message"] == body["error"]["message"]
        expected = {429: "rate_limit_error", 400: "invalid_request_error", 500: "api_error"}
        assert got["error"]["type"] == expected[status]
    for status, body in errors["anthropic_to_openai"]:
        got = json.loads(translate.error_body(json.dumps(body).encode(), status, to="openai"))
        assert got["error"]["message"] == body["error"]["message"]
        expected = {529: "server_error", 429: "rate_limit_error", 400: "invalid_request_error"}
        assert got["error"]["type"] == expected[status]


def test_upstream_error_event_mid_stream_becomes_the_clients_error_event() -> None:
    to_openai = translate.AnthropicToOpenAIStream(include_usage=False).feed(
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n')
    assert json.loads(to_openai[6:])["error"]["message"] == "Overloaded"
    to_anthropic = translate.OpenAIToAnthropicStream().feed(
        b'data: {"error":{"message":"boom","type":"server_error"}}\n\n')
    assert to_anthropic.startswith(b"event: error\n")
    assert json.loads(to_anthropic.split(b"data: ", 1)[1])["error"] == {
        "type": "api_error", "message": "boom"}


@pytest.mark.parametrize("client,request_body,param",
                         json.loads((DATA / "refused.json").read_text()))
def test_fields_without_counterpart_are_refused_by_name(client: str, request_body: dict[str, Any],
                                                         param: str) -> None:
    upstream = "anthropic" if client == "openai" else "openai"
    with pytest.raises(translate.TranslationRefused) as caught:
        translate.plan(client, upstream, request_body, default_max_tokens=100,  # type: ignore[arg-type]
                       include_usage=False)
    assert caught.value.status == 400 and caught.value.param == param


def test_neutral_values_pass_and_anthropic_gets_the_reserved_cap() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "seed": 3,
            "store": False}
    sent = translate.plan("openai", "anthropic", body, default_max_tokens=777,
                          include_usage=False).request.body
    assert sent["max_tokens"] == 777
    assert set(sent) == {"messages", "max_tokens"}



def _gist(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What the model reads of an OpenAI conversation: roles, text, tool calls and results."""
    out: list[tuple[Any, ...]] = []
    system = [m for m in messages if m["role"] in ("system", "developer")]
    if system:
        out.append(("system", "\n\n".join(_text(m["content"]) for m in system)))
    for m in messages:
        if m["role"] in ("system", "developer"):
            continue
        calls = tuple((c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                      for c in m.get("tool_calls") or [])
        out.append((m["role"], _text(m.get("content")), calls, m.get("tool_call_id")))
    return out


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p["text"] if p["type"] == "text" else f"<{p['image_url']['url']}>"
                   for p in content)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("openai")])
def test_a_conversation_survives_the_round_trip(name: str) -> None:
    """OpenAI -> Anthropic -> OpenAI: the model reads the same conversation and tools."""
    request = _case(name)["request"]
    there = translate.to_anthropic_request(request, max_tokens=99).body
    back = translate.to_openai_request(there).body
    assert _gist(back["messages"]) == _gist(request["messages"])
    if "tools" in request:
        assert [t["function"]["name"] for t in back["tools"]] == \
            [t["function"]["name"] for t in request["tools"]]
        assert [t["function"]["parameters"] for t in back["tools"]] == \
            [t["function"]["parameters"] for t in request["tools"]]


def test_two_whole_tool_calls_in_one_openai_chunk_become_two_blocks() -> None:
    """Some OpenAI-compatible servers (vLLM, proxies of other providers) send each call whole,
    several in one chunk."""
    chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": None, "delta": {
        "tool_calls": [
            {"index": 0, "id": "a", "type": "function",
             "function": {"name": "f", "arguments": "{\"x\":1}"}},
            {"index": 1, "id": "b", "type": "function",
             "function": {"name": "g", "arguments": "{\"y\":2}"}}]}}]}
    stream = translate.OpenAIToAnthropicStream()
    raw = stream.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    raw += stream.feed(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}'
                       b"\n\ndata: [DONE]\n\n")
    adapter: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in _events(raw):
        snapshot = accumulate_event(event=adapter.validate_python(event["data"]),
                                    current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None and snapshot.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in snapshot.content] == [
        ("tool_use", {"x": 1}), ("tool_use", {"y": 2})]



_leaf = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(
    ["", "x", "text", "image_url", "image", "tool_use", "tool_result", "function", "user",
     "assistant", "tool", "system", "auto", "any", "none", "required", "json_schema", "base64",
     "url", "data:image/png;base64,AA", "https://e/x", "refusal", "{}", '{"a":1}'])
_json = st.recursive(
    _leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["type", "role", "content", "text", "image_url", "url", "source", "tool_calls", "id",
         "function", "name", "arguments", "input", "tool_call_id", "tool_use_id", "schema",
         "json_schema", "parameters", "input_schema", "media_type", "data", "refusal",
         "delta", "index", "choices", "message", "usage", "partial_json", "content_block"]),
        inner, max_size=5),
    max_leaves=16)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system"])},
    optional={"content": _json, "tool_calls": _json, "tool_call_id": _json})


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(_message, min_size=1, max_size=3), extra=st.dictionaries(
    st.sampled_from(["tools", "tool_choice", "response_format", "system", "stop",
                     "stop_sequences", "parallel_tool_calls"]), _json, max_size=3))
def test_any_body_translates_or_is_refused_with_a_400(messages: list[Any],
                                                       extra: dict[str, Any]) -> None:
    """A crafted body never crashes the translation: it is carried or refused (400)."""
    for client in ("openai", "anthropic"):
        body = {"model": "m", "messages": messages, "max_tokens": 5, **extra}
        upstream = "anthropic" if client == "openai" else "openai"
        try:
            plan = translate.plan(client, upstream, body,  # type: ignore[arg-type]
                                  default_max_tokens=5, include_usage=False)
        except translate.TranslationRefused as exc:
            assert exc.status == 400
        else:
            json.dumps(plan.request.body)  # what goes upstream is JSON


@pytest.mark.parametrize(("client", "body", "param"), [
    ("anthropic", {"messages": [{"role": "assistant", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
    ("anthropic", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
    ("anthropic", {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": 5, "content": "x"}]}]},
     "messages.0.content.0.tool_use_id"),
    ("anthropic", {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "f", "input": "x"}]}]},
     "messages.0.content.0.input"),
    ("openai", {"messages": [{"role": "assistant", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
])
def test_fields_of_the_wrong_type_are_refused(client: str, body: dict[str, Any],
                                               param: str) -> None:
    upstream = "anthropic" if client == "openai" else "openai"
    with pytest.raises(translate.TranslationRefused) as caught:
        translate.plan(client, upstream, {"max_tokens": 5, **body},  # type: ignore[arg-type]
                       default_max_tokens=5, include_usage=False)
    assert caught.value.param == param


@settings(max_examples=300, deadline=None)
@given(answer=_json, events=st.lists(_json, max_size=6))
def test_a_malformed_upstream_answer_is_a_502_never_a_crash(answer: Any,
                                                            events: list[Any]) -> None:
    for client, upstream in (("openai", "anthropic"), ("anthropic", "openai")):
        plan = translate.Translation(client, upstream,  # type: ignore[arg-type]
                                     translate.UpstreamRequest({}))
        try:
            json.loads(plan.answer(json.dumps(answer).encode()))
        except GatewayError as exc:
            assert exc.status == 502
        stream = plan.stream()
        for event in events:
            payload = json.dumps(event).encode()
            for raw in (b"data: " + payload + b"\n\n",
                        b"event: message_start\ndata: " + payload + b"\n\n"):
                try:
                    stream.feed(raw)
                except GatewayError as exc:
                    assert exc.status == 502
