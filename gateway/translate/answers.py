"""Whole answers, usage, stop reasons and error bodies from one chat dialect to the other."""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..errors import GatewayError, upstream_failure

# Anthropic stop_reason -> OpenAI finish_reason
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
           "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop",
           "model_context_window_exceeded": "length"}
# OpenAI finish_reason -> Anthropic stop_reason. OpenAI does not say whether a stop sequence
# or the end of the turn stopped it: both are "stop", read as end_turn.
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "function_call": "tool_use", "content_filter": "refusal"}


def finish_reason(stop_reason: Any, json_tool: str | None = None) -> str | None:
    """An Anthropic stop_reason as OpenAI's finish_reason (the forced JSON tool ends as stop)."""
    if stop_reason is None:
        return None
    if json_tool is not None and stop_reason == "tool_use":
        return "stop"
    return _FINISH.get(stop_reason, "stop")


def stop_reason(finish: Any) -> str | None:
    if finish is None:
        return None
    return _STOP.get(finish, "end_turn")


def _int(data: Any, *path: str) -> int:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, int) and not isinstance(data, bool) else 0


def usage_to_openai(usage: Any) -> dict[str, Any]:
    """Anthropic usage as OpenAI's: prompt_tokens counts cache reads and writes too (OpenAI's
    prompt_tokens includes its cached tokens)."""
    cache_read = _int(usage, "cache_read_input_tokens")
    cache_write = _int(usage, "cache_creation_input_tokens")
    prompt = _int(usage, "input_tokens") + cache_read + cache_write
    completion = _int(usage, "output_tokens")
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion,
                           "prompt_tokens_details": {"cached_tokens": cache_read}}
    if cache_write:
        out["prompt_tokens_details"]["cache_write_tokens"] = cache_write
    thinking = _int(usage, "output_tokens_details", "thinking_tokens")
    if thinking:
        out["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return out


def usage_to_anthropic(usage: Any) -> dict[str, Any]:
    """OpenAI usage as Anthropic's: input_tokens excludes the cached part, as Anthropic's does."""
    cached = _int(usage, "prompt_tokens_details", "cached_tokens")
    written = _int(usage, "prompt_tokens_details", "cache_write_tokens")
    out: dict[str, Any] = {
        "input_tokens": max(0, _int(usage, "prompt_tokens") - cached - written),
        "output_tokens": _int(usage, "completion_tokens"),
        "cache_creation_input_tokens": written, "cache_read_input_tokens": cached,
    }
    reasoning = _int(usage, "completion_tokens_details", "reasoning_tokens")
    if reasoning:
        out["output_tokens_details"] = {"thinking_tokens": reasoning}
    return out


def answer_to_openai(answer: dict[str, Any], json_tool: str | None = None,
                     now: float | None = None) -> dict[str, Any]:
    """An Anthropic message as an OpenAI chat completion."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in answer.get("content") or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use" and json_tool is not None and block.get("name") == json_tool:
            texts.append(orjson.dumps(block.get("input", {})).decode())
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input", {})).decode()}})
        # thinking blocks: chat completions has no field for them
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": answer.get("id"), "object": "chat.completion",
        "created": int(time.time() if now is None else now), "model": answer.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(answer.get("stop_reason"), json_tool)}],
        "usage": usage_to_openai(answer.get("usage")),
    }


def answer_to_anthropic(answer: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion (one choice) as an Anthropic message."""
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    refusal = message.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        raw = fn.get("arguments") or "{}"
        try:
            arguments = orjson.loads(raw)
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            # Anthropic's tool_use input is an object; a client cannot parse anything else.
            raise upstream_failure(502, "The upstream answered a tool call whose arguments are "
                                   "not a JSON object.", "upstream_bad_response")
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                        "input": arguments})
    return {
        "id": answer.get("id"), "type": "message", "role": "assistant",
        "model": answer.get("model"), "content": content,
        "stop_reason": "refusal" if refusal else stop_reason(choice.get("finish_reason")),
        "stop_sequence": None, "usage": usage_to_anthropic(answer.get("usage")),
    }


# OpenAI error type -> Anthropic; Anthropic error type -> OpenAI.
_TO_ANTHROPIC_ERROR = {"invalid_request_error": "invalid_request_error",
                       "authentication_error": "authentication_error",
                       "permission_error": "permission_error", "not_found_error": "not_found_error",
                       "rate_limit_error": "rate_limit_error", "tokens": "rate_limit_error",
                       "requests": "rate_limit_error", "insufficient_quota": "rate_limit_error",
                       "server_error": "api_error"}
_TO_OPENAI_ERROR = {"invalid_request_error": "invalid_request_error",
                    "authentication_error": "authentication_error",
                    "permission_error": "permission_error", "not_found_error": "not_found_error",
                    "request_too_large": "invalid_request_error",
                    "rate_limit_error": "rate_limit_error", "api_error": "server_error",
                    "overloaded_error": "server_error", "timeout_error": "server_error"}


def error_body(body: bytes, status: int, *, to: str) -> bytes:
    """An upstream's error body in the other dialect's shape (``to``: the client's dialect);
    the message is kept, the status and headers are the caller's to keep."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = {}
    message = error.get("message") if isinstance(error.get("message"), str) else \
        f"The upstream answered {status}."
    kind: str = error["type"] if isinstance(error.get("type"), str) else ""
    if to == "anthropic":
        mapped = _TO_ANTHROPIC_ERROR.get(kind, "overloaded_error" if status == 529 else
                                         "api_error" if status >= 500 else
                                         "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": mapped, "message": message}})
    mapped = _TO_OPENAI_ERROR.get(kind, "server_error" if status >= 500 else
                                  "invalid_request_error")
    code = error.get("code") if isinstance(error.get("code"), str) else \
        (kind or None)
    return orjson.dumps({"error": {"message": message, "type": mapped, "code": code,
                                   "param": error.get("param")}})


def error_event(error: GatewayError | bytes, *, to: str) -> bytes:
    """An error as the client dialect's own stream event: a GatewayError, or the payload of an
    upstream's error event in the other dialect."""
    if isinstance(error, GatewayError):
        return error.sse_event("anthropic" if to == "anthropic" else "openai")
    body = error_body(error, 500, to=to)
    if to == "anthropic":
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"
