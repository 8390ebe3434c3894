"""Streamed answers from one chat dialect to the other, event by event.

A translator takes the complete upstream events the relay split off a network read (bytes,
each event ending in a blank line) and returns the client dialect's events for them at once:
nothing waits for the end of the answer. Accounting, cut detection and the idle/total timers
stay in the relay, which reads the upstream's own events; a translator only reshapes them.

OpenAI chunks -> Anthropic events: the first chunk opens ``message_start``; text deltas go to a
text block, each new ``tool_calls[].index`` opens a ``tool_use`` block whose argument fragments
become ``input_json_delta``s; ``[DONE]`` closes the open block and sends ``message_delta``
(stop reason, usage) and ``message_stop``.

Anthropic events -> OpenAI chunks: ``message_start`` is the role chunk, text deltas are content
deltas, each ``tool_use`` block a new tool-call index with its ``partial_json`` as argument
fragments, ``message_delta`` the finish_reason chunk, ``message_stop`` the usage chunk (when
the client asked for usage) and ``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .answers import error_event, finish_reason, stop_reason, usage_to_anthropic, usage_to_openai


def _events(data: bytes) -> list[tuple[bytes, bytes]]:
    """(event name, data payload) of each complete event."""
    out = []
    for raw in data.split(b"\n\n"):
        if not raw.strip():
            continue
        name = b""
        lines = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                lines.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if lines:
            out.append((name, b"\n".join(lines)))
    return out


def _load(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


class AnthropicToOpenAIStream:
    """Anthropic Messages events in, OpenAI chat-completion chunks out."""

    def __init__(self, *, include_usage: bool, json_tool: str | None = None,
                 now: float | None = None) -> None:
        self.include_usage = include_usage
        self.json_tool = json_tool
        self.created = int(time.time() if now is None else now)
        self.id: Any = None
        self.model: Any = None
        self.usage: dict[str, Any] = {}
        self._blocks: dict[int, tuple[str, int]] = {}  # block index -> (kind, tool index)
        self._tools = 0

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for name, payload in _events(data):
            event = _load(payload)
            if not isinstance(event, dict):
                continue
            kind = event.get("type") or name.decode("ascii", "replace")
            if kind == "error":
                out.append(error_event(payload, to="openai"))
            else:
                self._event(kind, event, out)
        return b"".join(out)

    def _event(self, kind: str, event: dict[str, Any], out: list[bytes]) -> None:
        if kind == "message_start":
            message = event.get("message") or {}
            self.id, self.model = message.get("id"), message.get("model")
            self.usage = dict(message.get("usage") or {})
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "content_block_start":
            self._start(event, out)
        elif kind == "content_block_delta":
            self._delta(event, out)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                # cumulative counts: the latest of each wins
                self.usage.update({k: v for k, v in usage.items() if v is not None})
            delta = event.get("delta") or {}
            out.append(self._chunk({}, finish_reason(delta.get("stop_reason"), self.json_tool)
                                   or "stop"))
        elif kind == "message_stop":
            if self.include_usage:
                out.append(self._data({"id": self.id, "object": "chat.completion.chunk",
                                       "created": self.created, "model": self.model,
                                       "choices": [], "usage": usage_to_openai(self.usage)}))
            out.append(b"data: [DONE]\n\n")
        # ping, content_block_stop: nothing to say in chat chunks

    def _start(self, event: dict[str, Any], out: list[bytes]) -> None:
        index, block = event.get("index"), event.get("content_block") or {}
        if not isinstance(index, int) or not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "text":
            self._blocks[index] = ("text", 0)
            if block.get("text"):
                out.append(self._chunk({"content": block["text"]}))
        elif kind == "tool_use" and self.json_tool is not None \
                and block.get("name") == self.json_tool:
            self._blocks[index] = ("json", 0)
        elif kind == "tool_use":
            self._blocks[index] = ("tool", self._tools)
            out.append(self._chunk({"tool_calls": [{
                "index": self._tools, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": ""}}]}))
            self._tools += 1
        # thinking and server-tool blocks have no place in chat chunks

    def _delta(self, event: dict[str, Any], out: list[bytes]) -> None:
        block = self._blocks.get(event.get("index"))  # type: ignore[arg-type]
        delta = event.get("delta") or {}
        if block is None or not isinstance(delta, dict):
            return
        kind, tool = block
        if kind == "text" and delta.get("type") == "text_delta":
            out.append(self._chunk({"content": delta.get("text", "")}))
        elif kind == "json" and delta.get("type") == "input_json_delta":
            if delta.get("partial_json"):
                out.append(self._chunk({"content": delta["partial_json"]}))
        elif kind == "tool" and delta.get("type") == "input_json_delta" \
                and delta.get("partial_json"):
            out.append(self._chunk({"tool_calls": [{
                "index": tool, "function": {"arguments": delta["partial_json"]}}]}))

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._data({"id": self.id, "object": "chat.completion.chunk",
                           "created": self.created, "model": self.model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish}]})

    @staticmethod
    def _data(chunk: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


class OpenAIToAnthropicStream:
    """OpenAI chat-completion chunks in, Anthropic Messages events out."""

    def __init__(self) -> None:
        self.started = False
        self.usage: dict[str, Any] = {}
        self.stop: str | None = None
        self._open: int | None = None  # the content block index now open
        self._next = 0
        self._text: int | None = None  # the open text block's index
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> block index
        self._done = False

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for _, payload in _events(data):
            if self._done:
                break
            if payload.strip() == b"[DONE]":
                self._finish(out)
                continue
            chunk = _load(payload)
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error") is not None:
                out.append(error_event(payload, to="anthropic"))
                self._done = True
                continue
            self._chunk(chunk, out)
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if not self.started:
            self.started = True
            out.append(_event("message_start", {"type": "message_start", "message": {
                "id": chunk.get("id"), "type": "message", "role": "assistant",
                "model": chunk.get("model"), "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self._text_delta(text, out)
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    self._tool_delta(call, out)
            if delta.get("refusal"):
                self.stop = "refusal"
            if choice.get("finish_reason") is not None and self.stop != "refusal":
                self.stop = stop_reason(choice["finish_reason"])

    def _text_delta(self, text: str, out: list[bytes]) -> None:
        if self._text is None or self._open != self._text:
            self._text = self._begin({"type": "text", "text": ""}, out)
        out.append(_event("content_block_delta", {
            "type": "content_block_delta", "index": self._text,
            "delta": {"type": "text_delta", "text": text}}))

    def _tool_delta(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        fn = call.get("function") or {}
        block = self._tools.get(index)
        if block is None:
            block = self._tools[index] = self._begin({
                "type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}},
                out)
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(_event("content_block_delta", {
                "type": "content_block_delta", "index": block,
                "delta": {"type": "input_json_delta", "partial_json": arguments}}))

    def _begin(self, block: dict[str, Any], out: list[bytes]) -> int:
        self._close(out)
        index = self._open = self._next
        self._next += 1
        out.append(_event("content_block_start", {"type": "content_block_start",
                                                  "index": index, "content_block": block}))
        return index

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                     "index": self._open}))
            self._open = None

    def _finish(self, out: list[bytes]) -> None:
        self._done = True
        if not self.started:  # [DONE] with no chunk before it: still a well-formed message
            self._chunk({}, out)
        self._close(out)
        out.append(_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop or "end_turn", "stop_sequence": None},
            "usage": usage_to_anthropic(self.usage)}))
        out.append(_event("message_stop", {"type": "message_stop"}))


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
