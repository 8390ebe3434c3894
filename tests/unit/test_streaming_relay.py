"""The SSE relay on its own: event splitting, usage accounting, the stripped usage chunk."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.upstream.sse import SseRelay, usage_from_body


def _chunk(content: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"delta": {"content": content}}],
                                     "usage": None}) + b"\n\n"


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3}}\n\n'
STREAM = _chunk("a") + _chunk("b") + _chunk("c") + USAGE + b"data: [DONE]\n\n"


def _run(relay: SseRelay, pieces: list[bytes]) -> bytes:
    return b"".join(relay.feed(p) for p in pieces) + relay.leftover()


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_split_of_the_network_reads_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(STREAM)]
    pieces = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    relay = SseRelay("openai", strip_usage_chunk=True)
    out = _run(relay, pieces)
    assert out == _chunk("a") + _chunk("b") + _chunk("c") + b"data: [DONE]\n\n"
    usage = relay.final_usage()
    assert (usage.input_tokens, usage.output_tokens, usage.reported) == (11, 3, True)
    assert relay.finished


def test_usage_chunk_is_kept_when_the_client_asked() -> None:
    relay = SseRelay("openai", strip_usage_chunk=False)
    assert _run(relay, [STREAM]) == STREAM


def test_crlf_streams_are_split_too() -> None:
    relay = SseRelay("openai", strip_usage_chunk=True)
    out = _run(relay, [STREAM.replace(b"\n", b"\r\n")])
    assert out.count(b"\n\n") == 4 and relay.finished


def test_a_cut_stream_is_charged_for_its_counted_deltas() -> None:
    relay = SseRelay("openai", strip_usage_chunk=True)
    _run(relay, [_chunk("a") + _chunk("b")])
    usage = relay.final_usage()
    assert (usage.output_tokens, usage.reported, relay.finished) == (2, False, False)


def test_a_cut_legacy_completion_stream_is_charged_for_its_text_chunks() -> None:
    """/v1/completions chunks carry choices[].text, no "delta": a tenant who drops the stream
    before its usage chunk still pays for the text it read."""
    def text(piece: str) -> bytes:
        return b"data: " + orjson.dumps({"object": "text_completion", "choices": [
            {"text": piece, "index": 0, "finish_reason": None}]}) + b"\n\n"
    usage = b'data: {"object":"text_completion","choices":[],"usage":null}\n\n'
    relay = SseRelay("openai", strip_usage_chunk=True)
    _run(relay, [text("a") + text("b") + text("c") + usage])
    assert (relay.final_usage().output_tokens, relay.finished) == (3, False)


def _anthropic_text(text: str) -> bytes:
    return b"event: content_block_delta\ndata: " + orjson.dumps({
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": text}}) + b"\n\n"


def test_a_stream_cut_before_its_usage_is_charged_the_text_its_deltas_carried() -> None:
    """A provider sends several tokens a delta (Anthropic, often): a client that closed
    before the final usage was charged a token per delta, 10 for the 2,000 it received. Now
    the relayed text / 4, as a whole answer without usage; a token per delta at least."""
    text = "word " * 160  # 800 characters: about 200 tokens by the estimate
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
             b'{"input_tokens":25,"output_tokens":1}}}\n\n')
    tool = (b'data: ' + orjson.dumps({"choices": [{"delta": {"tool_calls": [{"index": 0,
            "function": {"arguments": '{"q": "' + "x" * 796 + '"}'}}]}}]}) + b"\n\n")
    for dialect, events in (("anthropic", start + _anthropic_text(text) * 10),
                            ("openai", _chunk(text) * 5 + tool * 5)):
        relay = SseRelay(dialect, strip_usage_chunk=False)  # type: ignore[arg-type]
        _run(relay, [events])
        # (text as sent, JSON escapes and all: tool arguments' quotes count twice)
        assert relay.deltas == 10 and 2000 <= relay.relayed_output_tokens < 2020, dialect
        assert not relay.usage_final
    relay = SseRelay("openai", strip_usage_chunk=True)
    _run(relay, [_chunk("") * 3])
    assert relay.relayed_output_tokens == 3  # a token a delta, however little text


def _event(data: dict[str, Any], name: str | None = None) -> bytes:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def test_output_in_any_event_of_a_cut_stream_is_charged_once() -> None:
    """Output travels in more than text deltas: an audio transcript, a tool's name, a thinking
    signature, a redacted-thinking block that starts whole. A stream of those cut before its
    usage was charged a token an event (21 for 20,000). The Responses API's *.done events
    repeat the deltas' text and are not counted again."""
    text = "word " * 800  # 4,000 characters: about 1,000 tokens
    audio = _event({"choices": [{"delta": {"audio": {"transcript": text}}}]})
    tool = _event({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
        "name": "x" * 4000, "arguments": ""}}]}}]})
    signature = _event({"type": "content_block_delta", "delta": {
        "type": "signature_delta", "signature": "s" * 4000}}, "content_block_delta")
    redacted = _event({"type": "content_block_start", "index": 0, "content_block": {
        "type": "redacted_thinking", "data": "d" * 4000}}, "content_block_start")
    for dialect, event in (("openai", audio), ("openai", tool), ("anthropic", signature),
                           ("anthropic", redacted)):
        relay = SseRelay(dialect, strip_usage_chunk=False)  # type: ignore[arg-type]
        _run(relay, [event * 5])
        assert relay.relayed_output_tokens == 5000, (dialect, event[:80])
    delta = _event({"type": "response.output_text.delta", "delta": text},
                   "response.output_text.delta")
    done = _event({"type": "response.output_text.done", "text": text * 5},
                  "response.output_text.done")
    item = _event({"type": "response.output_item.done", "item": {"type": "message", "content": [
        {"type": "output_text", "text": text * 5}]}}, "response.output_item.done")
    relay = SseRelay("openai", strip_usage_chunk=False)
    _run(relay, [delta * 5 + done + item])
    assert relay.relayed_output_tokens == 5000
    # Base64 is bytes, not tokens (a second of audio would have been 16,000), and a tool the
    # provider ran brings input, not output.
    audio_data = _event({"choices": [{"delta": {"audio": {"data": "A" * 64_000}}}]})
    fetched = _event({"type": "content_block_start", "index": 1, "content_block": {
        "type": "web_fetch_tool_result", "content": {"text": text * 5}}}, "content_block_start")
    relay = SseRelay("anthropic", strip_usage_chunk=False)
    _run(relay, [audio_data + fetched])
    assert relay.relayed_output_tokens == 1  # the audio delta, a token


def test_anthropic_usage_comes_from_start_and_delta_events() -> None:
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":25,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":'
        b'{"type":"text_delta","text":"hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":'
        b'{"output_tokens":7}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    relay = SseRelay("anthropic", strip_usage_chunk=False)
    assert _run(relay, [events]) == events
    usage = relay.final_usage()
    assert (usage.input_tokens, usage.output_tokens, relay.finished) == (25, 7, True)


def test_responses_api_usage_comes_from_the_completed_event() -> None:
    events = (
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"delta":"x"}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"usage":{"input_tokens":9,"output_tokens":4}}}\n\n'
    )
    relay = SseRelay("openai", strip_usage_chunk=False)
    _run(relay, [events])
    usage = relay.final_usage()
    assert (usage.input_tokens, usage.output_tokens, relay.finished) == (9, 4, True)


def test_usage_from_body_tolerates_garbage() -> None:
    assert usage_from_body(b"not json").reported is False
    assert usage_from_body(b'{"usage": {"prompt_tokens": "x"}}').input_tokens == 0
    body = usage_from_body(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2}}')
    assert (body.input_tokens, body.output_tokens) == (5, 2)
