"""Step 3 of the pipeline: parse the body once and decide what kind of call this is.

Everything later steps need (model, streaming, priority, token estimate, agent session) is read
here, type-checked, and frozen into a ``ProxyCall``. Fields the gateway does not act on are left
for the upstream to judge: the gateway is a proxy, not a second copy of every provider's schema.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .auth import TenantPolicy
from .config import GatewayConfig, Priority
from .errors import Dialect, GatewayError, bad_request, forbidden, not_found


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """One client-facing endpoint and how it maps onto a provider's API."""

    path: str
    provider_kind: Literal["openai", "anthropic"]
    upstream_path: str  # appended to the provider's base_url
    operation: str  # OpenTelemetry gen_ai.operation.name
    can_stream: bool
    # chat and legacy completions report streamed usage only when asked (stream_options)
    injects_stream_usage: bool = False
    # token counting: charged as one request only (no token reservation, budget, loop guard
    # or concurrency lease; gateway/limits.py Limiter.admit_request), nothing billed
    request_only: bool = False

    @property
    def dialect(self) -> Dialect:
        return "anthropic" if self.provider_kind == "anthropic" else "openai"


ROUTES: dict[str, ApiRoute] = {
    r.path: r
    for r in (
        ApiRoute("/v1/chat/completions", "openai", "/chat/completions", "chat", True, True),
        ApiRoute("/v1/completions", "openai", "/completions", "text_completion", True, True),
        ApiRoute("/v1/embeddings", "openai", "/embeddings", "embeddings", False),
        ApiRoute("/v1/responses", "openai", "/responses", "responses", True),
        ApiRoute("/v1/messages", "anthropic", "/v1/messages", "chat", True),
        # What the official SDKs call to count a prompt's tokens: anthropic
        # client.messages.count_tokens, openai client.responses.input_tokens.count.
        ApiRoute("/v1/messages/count_tokens", "anthropic", "/v1/messages/count_tokens",
                 "count_tokens", False, request_only=True),
        ApiRoute("/v1/responses/input_tokens", "openai", "/responses/input_tokens",
                 "count_tokens", False, request_only=True),
    )
}

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")


@dataclass(slots=True)
class ProxyCall:
    """A validated request, ready for limits, admission and the upstream."""

    route: ApiRoute
    tenant: TenantPolicy
    model: str
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    priority: Priority
    max_tokens: int | None
    prompt_tokens_estimate: int
    agent_session: str | None = None
    agent_step: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.")
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def classify(
    route: ApiRoute,
    tenant: TenantPolicy,
    body: dict[str, Any],
    headers: Mapping[str, str],
    config: GatewayConfig,
) -> ProxyCall:
    """Validate what the gateway relies on; raise 400/403/404 GatewayErrors otherwise."""
    model = body.get("model")
    if model is None:
        raise bad_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' must be a non-empty string.", param="model")
    if model not in config.models:
        raise not_found(
            f"The model '{_printable(model)}' does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    if not tenant.may_use(model):
        raise forbidden(f"Your key is not allowed to use the model '{model}'.")

    stream = _optional(body, "stream", bool, False)
    if stream and not route.can_stream:
        raise bad_request(f"{route.path} does not support streaming.", param="stream")
    stream_options = _optional(body, "stream_options", dict, None)
    wants_usage = bool(stream_options and stream_options.get("include_usage") is True)

    max_tokens = _max_tokens(route, body)
    _check_input(route, body)
    return ProxyCall(
        route=route,
        tenant=tenant,
        model=model,
        body=body,
        stream=stream,
        client_wants_usage=wants_usage,
        priority=_priority(headers, tenant),
        max_tokens=max_tokens,
        prompt_tokens_estimate=estimate_prompt_tokens(body),
        agent_session=_header_id(headers, "X-Agent-Session"),
        agent_step=_header_id(headers, "X-Agent-Step"),
    )


def _optional(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    # bool is a subclass of int: `"max_tokens": true` must not pass as 1
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"'{key}' must be {_TYPE_NAMES[kind]}.", param=key)
    return value


_TYPE_NAMES = {bool: "a boolean", dict: "an object", int: "an integer", list: "an array"}


def _max_tokens(route: ApiRoute, body: dict[str, Any]) -> int | None:
    names = {
        "chat": ("max_completion_tokens", "max_tokens"),
        "responses": ("max_output_tokens",),
        "text_completion": ("max_tokens",),
        "embeddings": (),
        "count_tokens": (),
    }[route.operation] if route.provider_kind == "openai" else ("max_tokens",)
    found: int | None = None
    for name in names:
        value = _optional(body, name, int, None)
        if value is not None:
            if value < 1:
                raise bad_request(f"'{name}' must be at least 1.", param=name)
            found = value if found is None else min(found, value)
    if route.provider_kind == "anthropic" and found is None and not route.request_only:
        raise bad_request("max_tokens: Field required", param="max_tokens")
    return found


def _check_input(route: ApiRoute, body: dict[str, Any]) -> None:
    if route.operation == "chat" or route.dialect == "anthropic":  # messages, count_tokens
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array.", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise bad_request(f"'messages.{i}' must be an object.", param=f"messages.{i}")
    elif route.operation == "text_completion":
        if not isinstance(body.get("prompt"), (str, list)):
            raise bad_request("'prompt' must be a string or an array.", param="prompt")
    elif route.operation in ("embeddings", "responses") and not isinstance(body.get("input"),
                                                                           (str, list)):
        raise bad_request("'input' must be a string or an array.", param="input")


def _priority(headers: Mapping[str, str], tenant: TenantPolicy) -> Priority:
    raw = headers.get("X-Priority")
    if raw is None:
        return tenant.default_priority
    asked = Priority.parse(raw)
    if asked is None:
        raise bad_request(
            "X-Priority must be critical, high, normal, low or 0-3.", param="X-Priority"
        )
    # A request may lower its class, never raise it above what its key allows.
    return Priority(max(asked, tenant.max_priority))


def _header_id(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if not _SAFE_ID.match(value):
        raise bad_request(f"{name} must be 1-128 characters of [A-Za-z0-9._:/@+=-].", param=name)
    return value


def _printable(text: str, limit: int = 64) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap, slightly generous prompt size: UTF-8 bytes of the text / 4, plus 4 per message.

    Good enough to reserve tokens before the call; the upstream's usage settles the exact count.
    """
    total_bytes = 0
    parts = 0
    stack: list[Any] = [body.get(k) for k in ("messages", "prompt", "input", "system", "tools")]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            # isascii() is O(1) in CPython: most prompts skip the encode copy
            total_bytes += len(item) if item.isascii() else len(item.encode("utf-8",
                                                                           "surrogatepass"))
        elif isinstance(item, list):
            parts += len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            for key in ("content", "text", "input", "arguments", "name", "description"):
                if key in item:
                    stack.append(item[key])
            if "image_url" in item or item.get("type") == "image":
                total_bytes += 85 * 4  # a low-detail image costs about 85 tokens
    return max(1, math.ceil(total_bytes / 4) + 4 * parts)


def estimate_answer_tokens(answer: Any) -> int:
    """Output tokens of a whole answer that came without ``usage``: its text / 4, the same
    generous rule as the prompt estimate. Walks the answer text of every dialect: OpenAI
    ``choices[].message.content``/``text``/tool-call ``arguments``, Responses ``output[]``,
    Anthropic ``content[]`` (embeddings have no output tokens)."""
    total_chars = 0
    stack: list[Any] = [answer.get(k) for k in ("choices", "output", "content")] \
        if isinstance(answer, dict) else []
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total_chars += len(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key in ("message", "text", "content", "tool_calls", "function", "arguments",
                        "input"):
                if key in item:
                    stack.append(item[key])
    return math.ceil(total_chars / 4)


def error_dialect(path: str) -> Dialect:
    route = ROUTES.get(path)
    return route.dialect if route else "openai"


def raise_if_json_content_type_wrong(content_type: str | None) -> None:
    """415 for a declared non-JSON body; an absent Content-Type is read as JSON."""
    if not content_type:
        return
    main = content_type.split(";", 1)[0].strip().lower()
    if main == "application/json" or (main.startswith("application/") and main.endswith("+json")):
        return
    raise GatewayError(
        415,
        f"Unsupported Content-Type '{_printable(main)}': send application/json.",
        code="unsupported_media_type",
    )
