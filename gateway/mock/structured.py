"""Structured answers of the mock upstream: tool calls, JSON output and ``n`` > 1.

``plan_choices`` reads a request and decides what a real model would answer in shape:

- ``tools`` (and ``tool_choice`` not ``none``), unless the last message is a tool result: a
  call of the tool ``tool_choice`` names, else the first, with arguments generated from its
  JSON schema (required properties; strings "tok", numbers 0, booleans true, enums their
  first value);
- ``response_format`` ``json_schema`` / ``json_object`` (chat), ``text.format`` (Responses),
  ``output_config.format`` (Anthropic structured outputs):
  content that is JSON valid against the schema, so ``client.chat.completions.parse`` and
  friends parse it;
- ``n`` > 1 (chat and legacy completions; ignored elsewhere): that many choices, each the
  same answer.

Content is streamed in pieces of 4 characters, one token each, so ``completion_tokens`` is the
number of pieces over all choices (plus reasoning tokens). A max-tokens limit cuts each
choice's pieces (``finish_reason: length``; the JSON is then incomplete, as upstream). The
plain "tok tok ..." answer stays on the fast builders of ``gateway.mock.sse``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson

from .sse import (
    TOKEN,
    Generation,
    StreamPlan,
    _anthropic_stream_error,
    _data,
    _event,
    _openai_stream_error,
    _openai_usage,
    anthropic_usage,
    openai_error,
    responses_usage,
)

PIECE = 4  # characters per streamed piece (= one completion token)


@dataclass(frozen=True, slots=True)
class Choice:
    """One answer: content text, or a tool call whose arguments are ``text``."""

    text: str
    tool: str | None = None  # the called tool's name
    truncated: bool = False

    @property
    def pieces(self) -> list[str]:
        return [self.text[i:i + PIECE] for i in range(0, len(self.text), PIECE)]


def plan_choices(body: dict[str, Any], operation: str, chunks: int) -> tuple[Choice, ...]:
    """The structured answer ``body`` asks for, or () for the plain text answer."""
    # n is honoured where the API has it; elsewhere, or out of range, it is ignored (the
    # gateway's own validation is what tests exercise, so the mock does not refuse it).
    n = body.get("n", 1)
    if (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128
            or operation not in ("chat", "completions")):
        n = 1
    tool = _tool_call(body, operation)
    if tool is not None:
        name, schema = tool
        return (Choice(orjson.dumps(sample(schema, schema)).decode(), name),) * n
    json_schema = _json_format(body, operation)
    if json_schema is not None:
        return (Choice(orjson.dumps(sample(json_schema, json_schema)).decode()),) * n
    if n > 1:
        return (Choice(TOKEN * chunks),) * n
    return ()


def _tool_call(body: dict[str, Any], operation: str) -> tuple[str, dict[str, Any]] | None:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or operation == "completions":
        return None
    choice = body.get("tool_choice")
    if choice == "none" or (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    if _answers_tool_result(body):
        return None  # the model has its tool result: it answers in text now
    found: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        inner = tool.get("function")
        spec: dict[str, Any] = inner if isinstance(inner, dict) else tool
        name = spec.get("name")
        schema = spec.get("parameters", spec.get("input_schema"))
        if isinstance(name, str):
            found[name] = schema if isinstance(schema, dict) else {}
    if not found:
        return None
    wanted = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        wanted = fn.get("name") if isinstance(fn, dict) else choice.get("name")
    name = wanted if wanted in found else next(iter(found))
    return str(name), found[name]


def _answers_tool_result(body: dict[str, Any]) -> bool:
    items = body.get("messages", body.get("input"))
    if not isinstance(items, list) or not items or not isinstance(items[-1], dict):
        return False
    last = items[-1]
    if last.get("role") == "tool" or last.get("type") == "function_call_output":
        return True
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(c, dict) and c.get("type") == "tool_result" for c in content)


def _json_format(body: dict[str, Any], operation: str) -> dict[str, Any] | None:
    fmt = body.get("response_format") if operation == "chat" else None
    if operation == "responses":
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    if operation == "messages":  # structured outputs: output_config.format (or the beta's
        config = body.get("output_config")  # top-level output_format)
        fmt = config.get("format") if isinstance(config, dict) else body.get("output_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}},
                "required": ["answer"]}
    if fmt.get("type") == "json_schema":
        holder = fmt.get("json_schema") if operation == "chat" else fmt
        schema = holder.get("schema") if isinstance(holder, dict) else None
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


def sample(schema: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """A small value valid against ``schema`` (the subset structured outputs allow)."""
    if not isinstance(schema, dict) or depth > 12:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return sample(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return sample(options[0], root, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(props)
        return {name: sample(props.get(name, {"type": "string"}), root, depth + 1)
                for name in names if isinstance(name, str)}
    if kind == "array":
        least = schema.get("minItems", 0)
        count = least if isinstance(least, int) and 0 < least <= 8 else 1
        return [sample(schema.get("items", {"type": "string"}), root, depth + 1)] * count
    return {"string": "tok", "integer": 0, "number": 0, "boolean": True}.get(str(kind))


def limit(choices: tuple[Choice, ...], max_tokens: int | None) -> tuple[Choice, ...]:
    """Each choice cut to ``max_tokens`` pieces (the limit applies per choice)."""
    if max_tokens is None:
        return choices
    out = []
    for c in choices:
        if len(c.pieces) > max_tokens:
            c = dataclasses.replace(c, text="".join(c.pieces[:max_tokens]), truncated=True)
        out.append(c)
    return tuple(out)


def tokens(choices: tuple[Choice, ...]) -> int:
    return sum(len(c.pieces) for c in choices)


def _call_id(g: Generation, i: int) -> str:
    return f"call_{g.ident}_{i}"


# --- OpenAI chat completions and legacy completions ---------------------------------------


def _chat_finish(c: Choice) -> str:
    return "length" if c.truncated else "tool_calls" if c.tool else "stop"


def chat_body(g: Generation) -> bytes:
    choices = []
    for i, c in enumerate(g.choices):
        message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
        if c.tool:
            message["content"] = None
            message["tool_calls"] = [{"id": _call_id(g, i), "type": "function",
                                      "function": {"name": c.tool, "arguments": c.text}}]
        choices.append({"index": i, "message": message, "logprobs": None,
                        "finish_reason": _chat_finish(c)})
    return orjson.dumps({"id": f"chatcmpl-{g.ident}", "object": "chat.completion",
                         "created": g.created, "model": g.model, "choices": choices,
                         "usage": _openai_usage(g)})


def completion_body(g: Generation) -> bytes:
    choices = [{"text": c.text, "index": i, "logprobs": None,
                "finish_reason": "length" if c.truncated else "stop"}
               for i, c in enumerate(g.choices)]
    return orjson.dumps({"id": f"cmpl-{g.ident}", "object": "text_completion",
                         "created": g.created, "model": g.model, "choices": choices,
                         "usage": _openai_usage(g)})


def _openai_plan(g: Generation, obj: str, events: list[dict[str, Any]],
                 finishes: list[dict[str, Any]]) -> StreamPlan:
    base = {"id": g.ident, "object": obj, "created": g.created, "model": g.model}
    tail: dict[str, Any] = {"usage": None} if g.include_usage else {}
    chunks = [_data({**base, "choices": [e], **tail}) for e in events]
    trailer = [_data({**base, "choices": [f], **tail}) for f in finishes]
    if g.include_usage:
        trailer.append(_data({**base, "choices": [], "usage": _openai_usage(g)}))
    trailer.append(b"data: [DONE]\n\n")
    return StreamPlan([], len(chunks), chunks.__getitem__, trailer, _openai_stream_error)


def chat_stream(g: Generation) -> StreamPlan:
    g = dataclasses.replace(g, ident="chatcmpl-" + g.ident)
    events: list[dict[str, Any]] = []
    finishes = []

    def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    for i, c in enumerate(g.choices):
        if c.tool:
            events.append(choice(i, {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": _call_id(g, i), "type": "function",
                 "function": {"name": c.tool, "arguments": ""}}]}))
            events += [choice(i, {"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
                       for p in c.pieces]
        else:
            events.append(choice(i, {"role": "assistant", "content": "", "refusal": None}))
            events += [choice(i, {"content": p}) for p in c.pieces]
        finishes.append(choice(i, {}, _chat_finish(c)))
    return _openai_plan(g, "chat.completion.chunk", events, finishes)


def completion_stream(g: Generation) -> StreamPlan:
    g = dataclasses.replace(g, ident="cmpl-" + g.ident)
    events = [{"text": p, "index": i, "logprobs": None, "finish_reason": None}
              for i, c in enumerate(g.choices) for p in c.pieces]
    finishes = [{"text": "", "index": i, "logprobs": None,
                 "finish_reason": "length" if c.truncated else "stop"}
                for i, c in enumerate(g.choices)]
    return _openai_plan(g, "text_completion", events, finishes)


# --- Anthropic Messages -------------------------------------------------------------------


def _anthropic_block(g: Generation, c: Choice, final: bool) -> dict[str, Any]:
    if c.tool:
        tool_input = orjson.loads(c.text) if final and not c.truncated else {}
        return {"type": "tool_use", "id": f"toolu_{g.ident}", "name": c.tool,
                "input": tool_input}
    return {"type": "text", "text": c.text if final else ""}


def _anthropic_stop(c: Choice) -> str:
    return "max_tokens" if c.truncated else "tool_use" if c.tool else "end_turn"


def messages_body(g: Generation) -> bytes:
    c = g.choices[0]
    return orjson.dumps({"id": f"msg_{g.ident}", "type": "message", "role": "assistant",
                         "model": g.model, "content": [_anthropic_block(g, c, True)],
                         "stop_reason": _anthropic_stop(c), "stop_sequence": None,
                         "usage": anthropic_usage(g, g.completion_tokens)})


def messages_stream(g: Generation) -> StreamPlan:
    c = g.choices[0]
    start = {"type": "message_start", "message": {
        "id": f"msg_{g.ident}", "type": "message", "role": "assistant", "model": g.model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": anthropic_usage(g, 0)}}
    kind = ({"type": "input_json_delta", "partial_json": ""} if c.tool
            else {"type": "text_delta", "text": ""})
    field = "partial_json" if c.tool else "text"
    chunks = [_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {**kind, field: p}}) for p in c.pieces]
    final = anthropic_usage(g, g.completion_tokens)
    final.pop("cache_creation")
    final.pop("service_tier")
    delta = {"type": "message_delta",
             "delta": {"stop_reason": _anthropic_stop(c), "stop_sequence": None},
             "usage": final}
    return StreamPlan(
        preamble=[_event("message_start", start),
                  _event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": _anthropic_block(g, c, False)})],
        chunks=len(chunks), chunk=chunks.__getitem__,
        trailer=[_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                 _event("message_delta", delta), _event("message_stop", {"type": "message_stop"})],
        error=_anthropic_stream_error)


# --- OpenAI Responses ---------------------------------------------------------------------


def _item(g: Generation, c: Choice, final: bool) -> dict[str, Any]:
    status = "completed" if final else "in_progress"
    if c.tool:
        return {"id": f"fc_{g.ident}", "type": "function_call", "status": status,
                "call_id": _call_id(g, 0), "name": c.tool,
                "arguments": c.text if final else ""}
    content = [{"type": "output_text", "text": c.text, "annotations": []}] if final else []
    return {"id": f"msg_{g.ident}", "type": "message", "status": status, "role": "assistant",
            "content": content}


def _response(g: Generation, final: bool) -> dict[str, Any]:
    c = g.choices[0]
    status = "in_progress" if not final else "incomplete" if c.truncated else "completed"
    return {"id": f"resp_{g.ident}", "object": "response", "created_at": g.created,
            "status": status, "model": g.model,
            "output": [_item(g, c, True)] if final else [],
            "usage": responses_usage(g) if final else None}


def responses_body(g: Generation) -> bytes:
    return orjson.dumps(_response(g, True))


def responses_stream(g: Generation) -> StreamPlan:
    c = g.choices[0]
    seq = iter(range(1 << 30))

    def ev(name: str, **fields: Any) -> bytes:
        return _event(name, {"type": name, "sequence_number": next(seq), **fields})

    where: dict[str, Any] = {"item_id": _item(g, c, False)["id"], "output_index": 0}
    preamble = [ev("response.created", response=_response(g, False)),
                ev("response.in_progress", response=_response(g, False)),
                ev("response.output_item.added", output_index=0, item=_item(g, c, False))]
    if c.tool:
        chunks = [ev("response.function_call_arguments.delta", **where, delta=p)
                  for p in c.pieces]
        tail = [ev("response.function_call_arguments.done", **where, arguments=c.text)]
    else:
        where["content_index"] = 0
        part = {"type": "output_text", "text": "", "annotations": []}
        preamble.append(ev("response.content_part.added", **where, part=part))
        chunks = [ev("response.output_text.delta", **where, delta=p, logprobs=[])
                  for p in c.pieces]
        tail = [ev("response.output_text.done", **where, text=c.text),
                ev("response.content_part.done", **where, part={**part, "text": c.text})]
    tail.append(ev("response.output_item.done", output_index=0, item=_item(g, c, True)))
    final = _response(g, True)
    tail.append(ev(f"response.{final['status']}", response=final))

    def error(sent: int, status: int) -> bytes:
        err = openai_error(status, f"mock upstream failed mid-stream after {sent} chunks")
        return _event("error", {"type": "error", "code": err["error"]["code"] or "server_error",
                                "message": err["error"]["message"], "param": None,
                                "sequence_number": 0})

    return StreamPlan(preamble, len(chunks), chunks.__getitem__, tail, error)
