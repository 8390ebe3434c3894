"""Request bodies from one chat dialect to the other: OpenAI chat completions <-> Anthropic
Messages.

Every field is either translated, dropped because dropping it cannot change what the model
writes (a cache hint, a store flag), or refused with a 400 naming it, because the other
provider would answer a different question (docs/architecture.md, "Dialect translation",
has the table). Unknown fields are refused too: silently losing one is how a drop-in proxy
ends up changing what the model does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import GatewayError
from ..jsonbytes import MAX_DEPTH, PARSED_VALUES, Exhausted, ParseAllowance, deeper_than

# OpenAI's response_format becomes one forced tool whose input is the JSON answer; the answer
# translators turn that tool call back into message content.
JSON_TOOL = "json_answer"


class TranslationRefused(GatewayError):
    """A request the other dialect cannot carry without changing the answer (400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(400, message, code="unsupported_for_provider", param=param)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """A translated body and what the answer translators must know about it."""

    body: dict[str, Any]
    # The name of the forced tool standing in for response_format (Anthropic upstream only).
    json_tool: str | None = None


def _refuse(field: str, why: str) -> TranslationRefused:
    return TranslationRefused(f"'{field}' {why}", param=field)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _refuse(where, "must be a string.")
    return value


def _is_default(value: Any, *defaults: Any) -> bool:
    return value is None or any(value == d and type(value) is type(d) for d in defaults)


# --- OpenAI chat completions -> Anthropic Messages ---------------------------------------

# Fields dropped: none of them changes the text the model writes.
_OPENAI_DROPPED = frozenset({
    "model", "stream_options", "store", "metadata", "service_tier", "seed", "prediction",
    "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "verbosity",
})
# Fields that pass only at their no-op value (a penalty of 0, n of 1, no logprobs, ...).
_OPENAI_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},),
    "modalities": (["text"],),
}
_OPENAI_HANDLED = frozenset({
    "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "stop", "tools", "tool_choice", "response_format", "parallel_tool_calls",
})
_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+);base64,(.*)$", re.DOTALL)


def to_anthropic_request(body: dict[str, Any], *, max_tokens: int) -> UpstreamRequest:
    """An OpenAI chat-completions body as an Anthropic Messages body.

    ``max_tokens``: what to send when the body sets no cap (Anthropic requires one): the
    gateway's reserved per-answer output, so the reservation covers what can be generated.
    """
    for key, value in body.items():
        if key in _OPENAI_DROPPED or key in _OPENAI_HANDLED:
            continue
        neutral = _OPENAI_NEUTRAL.get(key)
        if neutral is None:
            raise _refuse(key, "has no counterpart in the Anthropic Messages API, which serves "
                          "this model; remove it or use a model served by an OpenAI-compatible "
                          "provider.")
        if not _is_default(value, *neutral):
            raise _refuse(key, f"= {_short(value)} is not supported by the Anthropic Messages "
                          "API, which serves this model.")
    out: dict[str, Any] = {}
    system, messages = _anthropic_messages(body["messages"], ParseAllowance())
    if system:
        out["system"] = system
    out["messages"] = messages
    caps = [v for k in ("max_completion_tokens", "max_tokens")
            if isinstance(v := body.get(k), int)]
    out["max_tokens"] = max(caps) if caps else max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
                or not 0 <= temperature <= 1:
            # OpenAI's range is 0-2; Anthropic's 0-1. Rescaling would change the sampling.
            raise _refuse("temperature", "must be between 0 and 1 for this model (served by "
                          "the Anthropic Messages API).")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop_sequences"] = stop
    elif stop is not None:
        raise _refuse("stop", "must be a string or an array of strings.")
    if body.get("stream") is True:
        out["stream"] = True
    json_tool = _anthropic_tools(body, out)
    return UpstreamRequest(out, json_tool)


def _anthropic_messages(messages: list[Any], allowance: ParseAllowance,
                        ) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]]]:
    """System blocks and the conversation; consecutive same-role turns are merged (Anthropic
    wants tool results together in the user turn right after the tool calls)."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        where = f"messages.{i}"
        if role in ("system", "developer"):
            # Anthropic has one system prompt, before the conversation: every system message
            # goes there, in order.
            system.extend(_text_blocks(message.get("content"), where))
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where, allowance)
            if not blocks:
                continue  # an empty assistant turn (no text, no calls) says nothing
        elif role == "tool":
            blocks = [_tool_result(message, where)]
            role = "user"
        else:
            raise _refuse(f"{where}.role", f"'{_short(role)}' cannot be sent to the Anthropic "
                          "Messages API (use user, assistant, system, developer or tool).")
        if out and out[-1]["role"] == role:
            previous = out[-1]["content"]
            # tool_result blocks must come first in their user turn
            if role == "user" and blocks and blocks[0].get("type") == "tool_result":
                results = [b for b in previous if b.get("type") == "tool_result"]
                rest = [b for b in previous if b.get("type") != "tool_result"]
                out[-1]["content"] = results + blocks + rest
            else:
                previous.extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return system, out


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        blocks = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise _refuse(f"{where}.content.{j}", "must be a text part here.")
            blocks.append({"type": "text", "text": part["text"]})
        return blocks
    if content is None:
        return []
    raise _refuse(f"{where}.content", "must be a string or an array of parts.")


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_blocks(content, where)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise _refuse(f"{where}.content.{j}.image_url.url", "must be a string.")
            blocks.append({"type": "image", "source": _image_source(url, f"{where}.content.{j}")})
        else:
            raise _refuse(f"{where}.content.{j}", f"of type '{_short(kind)}' cannot be sent to "
                          "the Anthropic Messages API (text and image_url parts can).")
    return blocks


def _image_source(url: str, where: str) -> dict[str, Any]:
    match = _DATA_URL.match(url)
    if match:
        return {"type": "base64", "media_type": match.group(1), "data": match.group(2)}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise _refuse(f"{where}.image_url.url", "must be an http(s) URL or a base64 data: URL.")


def _assistant_blocks(message: dict[str, Any], where: str,
                      allowance: ParseAllowance) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                blocks.append({"type": "text", "text": _str(part.get("text"),
                                                            f"{where}.content.{j}.text")})
            elif kind == "refusal":
                blocks.append({"type": "text", "text": _str(part.get("refusal"),
                                                            f"{where}.content.{j}.refusal")})
            else:
                raise _refuse(f"{where}.content.{j}", "must be a text or refusal part.")
    else:
        blocks.extend(_text_blocks(content, where))
    if message.get("function_call") is not None:
        raise _refuse(f"{where}.function_call", "(the legacy functions API) cannot be sent to "
                      "the Anthropic Messages API; use tool_calls.")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _refuse(f"{where}.tool_calls", "must be an array.")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str) \
                or not isinstance(fn.get("name"), str):
            raise _refuse(f"{where}.tool_calls.{j}", "must have an id and a function name.")
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"],
                       "input": _arguments(fn.get("arguments"), f"{where}.tool_calls.{j}",
                                           allowance)})
    return blocks


def _arguments(raw: Any, where: str, allowance: ParseAllowance) -> Any:
    """A tool call's arguments string as the object Anthropic takes; parsed within what the
    request's argument strings may cost together (``ParseAllowance``)."""
    if raw in (None, ""):
        return {}
    try:
        value = allowance.loads(raw) if isinstance(raw, str) else None
    except orjson.JSONDecodeError:
        value = None
    except Exhausted:
        raise _refuse(f"{where}.function.arguments", "holds more JSON values than the gateway "
                      f"translates in one request's tool calls ({PARSED_VALUES}).") from None
    if not isinstance(value, dict):
        raise _refuse(f"{where}.function.arguments", "must be a JSON object (Anthropic tool "
                      "calls carry their input as an object).")
    if deeper_than(value):  # a string until now: the body's own bound never saw inside it
        raise _refuse(f"{where}.function.arguments", f"nests more than {MAX_DEPTH} levels.")
    return value


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise _refuse(f"{where}.tool_call_id", "must be a string.")
    content = message.get("content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if isinstance(content, str):
        result["content"] = content
    else:
        result["content"] = _text_blocks(content, where)
    return result


def _anthropic_tools(body: dict[str, Any], out: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _refuse("tools", "must be an array.")
    if tools:
        out["tools"] = [_anthropic_tool(t, f"tools.{i}") for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    translated: dict[str, Any] | None = None
    if choice == "auto":
        translated = {"type": "auto"}
    elif choice == "required":
        translated = {"type": "any"}
    elif choice == "none":
        translated = {"type": "none"}
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise _refuse("tool_choice", "must be auto, required, none or a function choice.")
        translated = {"type": "tool", "name": fn["name"]}
    elif choice is not None:
        raise _refuse("tool_choice", "must be auto, required, none or a function choice.")
    if body.get("parallel_tool_calls") is False and tools:
        translated = translated or {"type": "auto"}
        if translated["type"] != "none":
            translated["disable_parallel_tool_use"] = True
    if translated is not None and tools:  # a choice among no tools says nothing
        out["tool_choice"] = translated
    return _json_answer(body.get("response_format"), out)


def _anthropic_tool(tool: Any, where: str) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise _refuse(where, "must be a function tool ({type: function, function: {name, ...}}).")
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = _str(fn["description"], f"{where}.function.description")
    # strict: Anthropic validates tool input against the schema anyway; it changes nothing here
    out["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def _json_answer(response_format: Any, out: dict[str, Any]) -> str | None:
    """response_format as one forced tool: the model's answer is that tool's input."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise _refuse("response_format", "must be text, json_object or json_schema.")
    if out.get("tools"):
        raise _refuse("response_format", "cannot be combined with tools for this model "
                      "(served by the Anthropic Messages API).")
    schema: Any = {"type": "object"}
    description = "Respond with the answer as this tool's input."
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _refuse("response_format.json_schema.schema", "must be an object.")
        schema = spec["schema"]
        if spec.get("description"):
            description = _str(spec["description"], "response_format.json_schema.description")
    if schema.get("type") != "object":
        raise _refuse("response_format", "must describe a JSON object for this model.")
    out["tools"] = [{"name": JSON_TOOL, "description": description, "input_schema": schema}]
    out["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
    return JSON_TOOL


# --- Anthropic Messages -> OpenAI chat completions ---------------------------------------

_ANTHROPIC_DROPPED = frozenset({"model", "service_tier", "anthropic_version"})
_ANTHROPIC_HANDLED = frozenset({
    "messages", "system", "max_tokens", "stream", "temperature", "top_p", "stop_sequences",
    "tools", "tool_choice", "metadata", "thinking", "top_k",
})


def to_openai_request(body: dict[str, Any]) -> UpstreamRequest:
    """An Anthropic Messages body as an OpenAI chat-completions body."""
    for key in body:
        if key not in _ANTHROPIC_DROPPED and key not in _ANTHROPIC_HANDLED:
            raise _refuse(key, "has no counterpart in the OpenAI chat completions API, which "
                          "serves this model.")
    if body.get("top_k") is not None:
        raise _refuse("top_k", "is not supported by the OpenAI chat completions API, which "
                      "serves this model.")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict)
                                     and thinking.get("type") == "disabled"):
        raise _refuse("thinking", "(extended thinking) is not supported by the OpenAI chat "
                      "completions API, which serves this model.")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else "\n\n".join(
            b["text"] for b in _anthropic_text_only(system, "system"))
        messages.append({"role": "system", "content": text})
    for i, message in enumerate(body["messages"]):
        messages.extend(_openai_messages(message, f"messages.{i}"))
    out: dict[str, Any] = {"messages": messages, "max_completion_tokens": body["max_tokens"]}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # usage is always counted
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    _openai_tools(body, out)
    return UpstreamRequest(out)


def _anthropic_text_only(blocks: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(blocks, list):
        raise _refuse(where, "must be a string or an array of text blocks.")
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" \
                or not isinstance(block.get("text"), str):
            raise _refuse(f"{where}.{j}", "must be a text block here.")
    return blocks


def _openai_messages(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise _refuse(f"{where}.role", "must be user or assistant.")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _refuse(f"{where}.content", "must be a string or an array of blocks.")
    if role == "assistant":
        return [_openai_assistant(content, where)]
    # Tool results become tool messages, which must directly follow the assistant's calls.
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "tool_result":
            out.append(_openai_tool_message(block, at))
        elif kind == "text":
            parts.append({"type": "text", "text": _str(block.get("text"), f"{at}.text")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        else:
            raise _refuse(at, f"of type '{_short(kind)}' cannot be sent to the OpenAI chat "
                          "completions API (text, image and tool_result blocks can).")
    if parts:
        simple = all(p["type"] == "text" for p in parts) and len(parts) == 1
        out.append({"role": "user", "content": parts[0]["text"] if simple else parts})
    return out


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media_type = _str(source.get("media_type"), f"{where}.source.media_type")
        return f"data:{media_type};base64,{_str(source.get('data'), f'{where}.source.data')}"
    if isinstance(source, dict) and source.get("type") == "url" \
            and isinstance(source.get("url"), str):
        return str(source["url"])
    raise _refuse(f"{where}.source", "must be a base64 or url image source.")


def _openai_assistant(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text":
            texts.append(_str(block.get("text"), f"{at}.text"))
        elif kind == "tool_use":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise _refuse(f"{at}.input", "must be an object.")
            calls.append({"id": _str(block.get("id"), f"{at}.id"), "type": "function",
                          "function": {"name": _str(block.get("name"), f"{at}.name"),
                                       "arguments": orjson.dumps(arguments).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's earlier reasoning: OpenAI's API has no place for it
        else:
            raise _refuse(f"{where}.content.{j}", f"of type '{_short(kind)}' cannot be sent "
                          "to the OpenAI chat completions API.")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _openai_tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    if isinstance(content, list):
        content = "".join(b["text"] for b in _anthropic_text_only(content, f"{where}.content"))
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise _refuse(f"{where}.content", "must be a string or text blocks.")
    # is_error has no field in OpenAI's tool message; the error text itself still reaches the
    # model, which is what it acts on.
    return {"role": "tool", "tool_call_id": _str(block.get("tool_use_id"), f"{where}.tool_use_id"),
            "content": content}


def _openai_tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _refuse("tools", "must be an array.")
    if tools:
        translated = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") \
                    or not isinstance(tool.get("name"), str):
                raise _refuse(f"tools.{i}", "(a server tool) cannot be sent to the OpenAI chat "
                              "completions API; only client tools with an input_schema can.")
            fn: dict[str, Any] = {"name": tool["name"]}
            if tool.get("description"):
                fn["description"] = _str(tool["description"], f"tools.{i}.description")
            fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
            translated.append({"type": "function", "function": fn})
        out["tools"] = translated
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _refuse("tool_choice", "must be auto, any, tool or none.")
    if choice.get("disable_parallel_tool_use") is True and tools:
        out["parallel_tool_calls"] = False


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return "".join(c if c.isprintable() else "?" for c in text[:40])
