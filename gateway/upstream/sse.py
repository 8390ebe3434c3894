"""Step 11: relay a server-sent-event stream to the client event by event, as it arrives.

The relay understands just enough of each dialect to account for the call:
- usage: OpenAI chat/completions report it in a last chunk with ``"choices": []`` (which the
  gateway requested itself and strips when the client did not ask); the Responses API in
  ``response.completed``; Anthropic in ``message_start`` and ``message_delta``;
- streamed deltas are counted, so a stream cut before its usage arrives is still charged;
- a stream that ends without its terminal event was cut, and the client is told so with an
  error event instead of a silent clean end (SDKs never retry after a 200, so honesty matters).

Events are forwarded the moment their terminating blank line arrives; several events from one
network read go out in one write.
"""

from __future__ import annotations

import math
import re

import orjson

from gateway.errors import Dialect, upstream_failure
from gateway.usage import ANTHROPIC_CALLED, RESPONSES_CALLS, Usage

__all__ = ["MAX_EVENT_BYTES", "SseRelay", "Usage", "usage_from_body"]

# One event larger than this is an upstream fault: cut the stream rather than buffer it all.
MAX_EVENT_BYTES = 8 * 1024 * 1024
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_DELTA = re.compile(rb'"delta"|output_text\.delta')
# A legacy /v1/completions chunk carries its text in choices[].text, with no "delta": counted
# as a delta when its choices are not empty (the usage chunk's are), or a stream cut before
# its usage would bill no output at all.
_LEGACY_CHUNK = re.compile(rb'"object"\s*:\s*"text_completion"')
# The generated output an event carries, in every dialect, still JSON-escaped, for a cut
# stream's output estimate (text / 4, as for a whole answer): chat content, tool names and
# arguments, refusal, reasoning, audio transcript; Anthropic text, thinking, signature,
# partial_json; the Responses API's delta strings. Any event, not only deltas: a stream whose
# output came in events the count missed was charged a token each. Not base64 (audio data,
# partial images: bytes, not tokens), except a redacted-thinking block's data, which stands
# for thinking tokens billed as output.
_OUTPUT_TEXT = re.compile(
    rb'"(?:content|text|arguments|name|refusal|reasoning|reasoning_content|thinking|'
    rb'signature|partial_json|delta|transcript)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_REDACTED_DATA = re.compile(rb'"data"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
# Events that repeat output already counted (the Responses API's *.done events and whole
# response objects) or carry input, not output (the results of tools the provider ran: web
# search and fetch, code execution, MCP): not counted.
_NOT_OUTPUT = re.compile(rb'"type"\s*:\s*"(?:response\.(?:[a-z_.]*\.done|created|in_progress|'
                         rb'completed|incomplete|failed|queued)|[a-z_]*tool_result)"')
# A call of a tool the provider bills per call (usage.SERVER_TOOLS), for a stream cut before
# the usage that counts them, from its first event on (a call cut while it runs may be billed,
# and an image cut after its partial images was delivered): each distinct item of the
# Responses ``response.<tool>_call.*`` events (in_progress, searching, generating,
# partial_image, completed...); an Anthropic ``server_tool_use`` block's start, whose name
# says which tool (parsed: rare).
_TOOL_CALL_EVENT = re.compile(rb'"type"\s*:\s*"response\.('
                              + "|".join(RESPONSES_CALLS).encode() + rb')\.[a-z_]+"')
_ITEM_ID = re.compile(rb'"item_id"\s*:\s*"([^"\\]*)"')
_TERMINAL = (b"data: [DONE]", b"event: response.completed", b"event: response.failed",
             b"event: response.incomplete", b"event: message_stop", b'"type":"message_stop"',
             b'"type": "message_stop"',
             # an upstream's own error event ends the stream too; relay it, add nothing
             b'data: {"error"', b"event: error")


def usage_from_body(body: bytes) -> Usage:
    """Usage from a complete JSON response body; zero counts when absent or unparsable."""
    usage = Usage()
    try:
        usage.merge(orjson.loads(body))
    except orjson.JSONDecodeError:
        pass
    return usage


class SseRelay:
    """Splits upstream bytes into events, accounts for them and decides what to forward."""

    def __init__(self, dialect: Dialect, strip_usage_chunk: bool) -> None:
        self.dialect = dialect
        self.strip_usage_chunk = strip_usage_chunk
        self.usage = Usage()
        self.deltas = 0
        self.output_text_bytes = 0  # the generated output the events carried (escaped)
        self.events = 0
        self.finished = False  # the terminal event was seen
        # The event with the final usage was seen (every usage event but Anthropic's
        # message_start, whose output count is only the first token's): a stream cut after it
        # is charged exactly what it reported.
        self.usage_final = False
        # Calls of tools billed per call, as the events showed them (``_TOOL_CALL_EVENT``).
        self.tool_calls_seen: dict[str, int] = {}
        self._tool_items: set[bytes] = set()
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take a network read; return the complete events to forward now (maybe b"")."""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        data = self._buffer + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            if len(data) > MAX_EVENT_BYTES:
                raise upstream_failure(502, f"The upstream sent a stream event larger than "
                                       f"{MAX_EVENT_BYTES} bytes.", "upstream_event_too_large")
            self._buffer = data
            return b""
        self._buffer = data[end + 2:]
        out = []
        for event in data[: end + 2].split(b"\n\n"):
            if event and self._keep(event):
                out.append(event + b"\n\n")
        return b"".join(out)

    def leftover(self) -> bytes:
        """An incomplete last event (no blank line after it) once the upstream ended."""
        rest, self._buffer = self._buffer, b""
        if rest.strip() and self._keep(rest.rstrip(b"\n")):
            return rest.rstrip(b"\n") + b"\n\n"
        return b""

    def _keep(self, event: bytes) -> bool:
        self.events += 1
        if _DELTA.search(event) or (_LEGACY_CHUNK.search(event)
                                     and not _EMPTY_CHOICES.search(event)):
            self.deltas += 1
        if not _NOT_OUTPUT.search(event):
            self.output_text_bytes += sum(map(len, _OUTPUT_TEXT.findall(event)))
            if b'"redacted_thinking"' in event:
                self.output_text_bytes += sum(map(len, _REDACTED_DATA.findall(event)))
        if any(marker in event for marker in _TERMINAL):
            self.finished = True
        if b"_call." in event or b'"server_tool_use"' in event:
            self._count_tool_call(event)
        if not _USAGE_OBJECT.search(event):
            return True
        payload = _data_of(event)
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if self.usage.merge(parsed) and parsed.get("type") != "message_start":
            self.usage_final = True
        # Drop only the extra usage chunk the gateway asked for on the client's behalf.
        return not (self.strip_usage_chunk and _EMPTY_CHOICES.search(event))

    def _count_tool_call(self, event: bytes) -> None:
        found = _TOOL_CALL_EVENT.search(event)
        tool: str | None = None
        if found:
            item = _ITEM_ID.search(event)
            key = found.group(1) + b"/" + (item.group(1) if item else b"")
            if key in self._tool_items:
                return  # a later event of a call already counted
            self._tool_items.add(key)
            tool = RESPONSES_CALLS[found.group(1).decode()]
        elif b"content_block_start" in event:
            try:
                block = orjson.loads(_data_of(event)).get("content_block")
            except (orjson.JSONDecodeError, AttributeError):
                return
            name = block.get("name") if isinstance(block, dict) \
                and block.get("type") == "server_tool_use" else None
            tool = name if name in ANTHROPIC_CALLED else None
        if tool is not None:
            self.tool_calls_seen[tool] = self.tool_calls_seen.get(tool, 0) + 1

    @property
    def relayed_output_tokens(self) -> int:
        """Output tokens the relayed events carried, as estimated: a token a delta at least,
        and the output text of every event / 4 as for a whole answer (a provider sends several
        tokens a delta: a client that closed before Anthropic's message_delta was charged 10
        tokens for the 2,000 it received)."""
        return max(self.deltas, math.ceil(self.output_text_bytes / 4))

    def final_usage(self) -> Usage:
        """Reported usage, or the relayed output where the upstream reported none."""
        if not self.usage.output_seen:
            self.usage.output_tokens = max(self.usage.output_tokens,
                                           self.relayed_output_tokens)
        return self.usage


def _data_of(event: bytes) -> bytes:
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines)
