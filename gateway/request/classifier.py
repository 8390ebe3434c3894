"""Step 3 of the pipeline: parse the body once and decide what kind of call this is.

Everything later steps need (model, streaming, priority, token estimate, agent session) is read
here, type-checked, and frozen into a ``ProxyCall``. Fields the gateway does not act on are left
for the upstream to judge: the gateway is a proxy, not a second copy of every provider's schema.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.config import GatewayConfig, Model, Priority
from gateway.errors import Dialect, GatewayError, bad_request, forbidden, not_found
from gateway.jsonbytes import CONTAINER, KEY, MAX_DEPTH, deeper_than, json_values
from gateway.translate import Translation
from gateway.usage import ANTHROPIC_CALLED, SERVER_TOOLS

from .auth import TenantPolicy


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
    # token counting: a request and a concurrency lease (no token reservation, budget, loop
    # guard or run cap; gateway/limits/limiter.py Limiter.admit, count_only), nothing billed
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
    # The most output tokens the upstream may generate per choice under this (forwarded) body:
    # the largest token-cap field it reads, after any clamp; None: the body sets no cap.
    max_tokens: int | None
    prompt_tokens_estimate: int
    # What makes the provider read input the body does not carry (``unseen_input``): budgets
    # then reserve up to the model's context window for it. None: the body is all of it.
    unseen_input: str | None = None
    # The stored answers and reasoning items a Responses request refers to by id, when they
    # are all the input it does not carry: sizes remembered for them are reserved instead
    # of the window (``stored_refs``). Empty: none, or input of unknown size besides.
    stored_refs: tuple[str, ...] = ()
    # Calls of tools the provider bills per call this request may make, by SERVER_TOOLS name,
    # as reserved of cost budgets (``reserved_tool_calls``).
    tool_calls: dict[str, int] = field(default_factory=dict)
    agent_session: str | None = None
    agent_step: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # How many generations the provider makes, each up to ``max_tokens``: chat ``n``; legacy
    # completions ``max(n, best_of)`` for each prompt of a batched ``prompt`` array.
    choices: int = 1
    # answer_model: alias -> the public name the answer's `model` field is rewritten to
    answer_model: str | None = None
    # The body translated for deployments of the other provider kind (gateway/translate),
    # by upstream kind; made once when the targets are resolved, reused by every attempt.
    translations: dict[str, Translation] = field(default_factory=dict)


def parse_json_body(raw: bytes, max_values: int) -> dict[str, Any]:
    """The body as a JSON object, or a 400: empty, not JSON, not an object, more than
    ``max_values`` values (counted before parsing, ``json_values``) or nested too deep."""
    if not raw:
        raise bad_request("The request body is empty; send a JSON object.")
    if (values := json_values(raw, max_values)) > max_values:
        raise bad_request(
            f"The request body holds more than {max_values} JSON values (about {values}, a "
            f"list or object counted as {CONTAINER}, a key as {KEY} more); the gateway reads "
            "no more (server.max_body_values).", code="too_many_json_values")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.")
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    # (No more brackets than the bound, no deeper nesting: bodies with few skip the walk.)
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and deeper_than(body):
        raise bad_request(f"The request body nests lists and objects more than {MAX_DEPTH} "
                          "levels deep; the gateway accepts no deeper.")
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

    model_config = config.models[model]
    max_tokens = _max_tokens(route, body, model, model_config)
    _check_input(route, body)
    choices = _choices(route, body)
    estimate, in_parts = prompt_estimate(body)
    unseen = unseen_input(route, body, in_parts)
    tenant_config = config.tenants.get(tenant.name)
    if max_tokens is None and tenant_config is not None and tenant_config.inject_max_tokens:
        max_tokens = _inject_max_tokens(
            route, body, min(tenant_config.default_max_tokens, model_config.output_limit))
    return ProxyCall(
        route=route,
        tenant=tenant,
        model=model,
        body=body,
        stream=stream,
        client_wants_usage=wants_usage,
        priority=_priority(headers, tenant),
        max_tokens=max_tokens,
        prompt_tokens_estimate=estimate,
        unseen_input=unseen,
        stored_refs=stored_refs(route, body, in_parts) if unseen else (),
        tool_calls=_tool_calls(route, body, tenant_config.max_tool_calls
                               if tenant_config is not None else None,
                               model_config.price.per_thousand_calls),
        agent_session=header_id(headers, "X-Agent-Session"),
        agent_step=header_id(headers, "X-Agent-Step"),
        choices=choices,
        answer_model=model if model_config.answer_model == "alias" else None,
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


# The output-token caps each API's providers read. A body may carry several: OpenAI's chat
# reads max_completion_tokens, many OpenAI-compatible servers read max_tokens, so the upstream
# may honour either and the gateway must assume the largest.
_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}
# The field an opted-in injection writes (inject_max_tokens): the one the provider documents.
_INJECTED_FIELD = {"/v1/chat/completions": "max_completion_tokens",
                   "/v1/completions": "max_tokens", "/v1/responses": "max_output_tokens"}
# Larger than any model's output: such a value is a malformed request, not a cap to clamp.
MAX_TOKEN_FIELD = 2**31 - 1
# OpenAI refuses n above 128; best_of (legacy completions) is bounded the same way here, so a
# body cannot multiply its reservation past what any provider serves.
MAX_CHOICES = 128


def _count(body: dict[str, Any], name: str, hi: int) -> int | None:
    """An integer field in [1, hi]: None when absent or null, a 400 naming it otherwise."""
    value = body.get(name)
    if value is None:
        return None
    # bool is a subclass of int: `"max_tokens": true` must not pass as 1
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise bad_request(f"'{name}' must be an integer between 1 and {hi}; got "
                          f"{_printable(orjson.dumps(value).decode())}.", param=name,
                          code="invalid_value")
    return value


def _max_tokens(route: ApiRoute, body: dict[str, Any], name: str, model: Model) -> int | None:
    """The largest output cap in the body; above the model's ``max_output_tokens`` it is refused
    (``over_max_tokens: refuse``) or every cap field is lowered to it in the forwarded body
    (``clamp``), so the upstream can never generate more than the gateway reserves."""
    caps = {f: v for f in _CAP_FIELDS.get(route.path, ())
            if (v := _count(body, f, MAX_TOKEN_FIELD)) is not None}
    if route.provider_kind == "anthropic" and not caps and not route.request_only:
        raise bad_request("max_tokens: Field required", param="max_tokens")
    if not caps:
        return None
    field_name, largest = max(caps.items(), key=lambda item: item[1])
    limit = model.output_limit
    if largest <= limit:
        return largest
    if model.over_max_tokens == "refuse":
        raise bad_request(
            f"{field_name} is too large: {largest}. The model '{name}' supports at most {limit} "
            f"output tokens; set {field_name} to {limit} or less.",
            param=field_name, code="integer_above_max_value",
        )
    for f, value in caps.items():
        if value > limit:
            body[f] = limit
    return limit


def _choices(route: ApiRoute, body: dict[str, Any]) -> int:
    """Generations the provider makes for this body, each up to the output cap."""
    if route.path == "/v1/chat/completions":
        return _count(body, "n", MAX_CHOICES) or 1
    if route.path != "/v1/completions":
        return 1  # Responses and Messages have no n: one answer
    per_prompt = max(_count(body, "n", MAX_CHOICES) or 1, _count(body, "best_of", MAX_CHOICES) or 1)
    prompt = body.get("prompt")
    # A batch: a list of strings or of token arrays is one completion set per prompt; a flat
    # list of token ids is one prompt.
    prompts = len(prompt) if isinstance(prompt, list) and prompt and \
        not isinstance(prompt[0], int) else 1
    return per_prompt * prompts


def _inject_max_tokens(route: ApiRoute, body: dict[str, Any], cap: int) -> int | None:
    """Opt-in (``inject_max_tokens``): write the reserved estimate into a body that has no cap."""
    name = _INJECTED_FIELD.get(route.path)
    if name is None:
        return None
    body[name] = cap
    return cap


def reserved_output_tokens(call: ProxyCall, default_max_tokens: int,
                           max_output_tokens: int) -> int:
    """Output tokens to reserve: per choice the body's cap (which the upstream cannot exceed),
    else the estimate ``default_max_tokens`` capped by the model's maximum (which it can:
    docs/architecture.md, "Reservations"); times the generations the provider makes."""
    if call.route.operation == "embeddings":
        return 0
    per_choice = call.max_tokens if call.max_tokens is not None else \
        min(default_max_tokens, max_output_tokens)
    return per_choice * call.choices


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
    if route.path == "/v1/responses" and body.get("background") is True:
        # The provider answers "queued" and generates afterwards, where the gateway cannot
        # see it: its usage would never be charged (16,000 output tokens for the prompt's
        # price, collected later through previous_response_id).
        raise bad_request(
            "background: true is not supported through this gateway: the response would be "
            "generated after the gateway's answer, where its usage cannot be accounted for. "
            "Send it without background (where the operator enabled deferred requests, the "
            "header 'Prefer: respond-async' has the gateway run it later).",
            param="background", code="unsupported_parameter")


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


def header_id(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if not _SAFE_ID.match(value):
        raise bad_request(f"{name} must be 1-128 characters of [A-Za-z0-9._:/@+=-].", param=name)
    return value


def _printable(text: str, limit: int = 64) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


# Top-level fields no provider tokenizes: routing, sampling knobs, ids and tags. Everything
# else in the body is walked (an unknown field counts: over-reserving is the safe side).
_NOT_PROMPT = frozenset((
    "model", "stream", "stream_options", "metadata", "user", "service_tier", "store",
    "previous_response_id", "prompt_cache_key", "safety_identifier", "reasoning_effort",
    "modalities", "n", "best_of", "logprobs", "top_logprobs", "seed", "temperature", "top_p",
    "top_k", "max_tokens", "max_completion_tokens", "max_output_tokens", "encoding_format",
    "dimensions", "parallel_tool_calls", "truncation", "background", "include",
))
# Content blocks whose payload is not text: base64 or URL images are billed by size tiers,
# not by the bytes of their encoding. Each counts _IMAGE_TOKENS: about what Claude bills for
# the largest image it keeps (1.15 megapixels / 750), above a high-detail gpt-4o image
# (765-1,105); 85, a low-detail image, let a request of a hundred small images reserve a
# twentieth of what it spent. (gpt-4o-mini counts several times more per image at the same
# price: for it the estimate stays under.) Only the payload of a block of such a type is
# skipped (OpenAI's and Responses' ``image_url``, Anthropic's ``source``, a ``file_id``): any
# other field of it counts, and a dict that merely has an ``image_url`` key (a message, a text
# part, a schema property of that name) is walked whole, or text beside it would go unreserved.
_IMAGE_TYPES = frozenset(("image", "image_url", "input_image"))
_IMAGE_TOKENS = 1600
_IMAGE_PAYLOAD_KEYS = frozenset(("image_url", "source", "file_id"))
# Keys of the message/part envelope: the provider renders them as its own markers (the 4 per
# list element covers those), not as text. Every other key counts: a schema's property names
# are tokenized like its values. Only keys are skipped, never values.
_ENVELOPE_KEYS = frozenset(("role", "content", "type", "text"))


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A cheap, slightly generous prompt size: UTF-8 bytes of every string the provider may
    tokenize / 4, plus 4 per list element (message, content part, tool) (``prompt_estimate``)."""
    return prompt_estimate(body)[0]


def prompt_estimate(body: dict[str, Any]) -> tuple[int, str | None]:
    """A cheap, slightly generous prompt size: UTF-8 bytes of every string the provider may
    tokenize / 4, plus 4 per list element (message, content part, tool); and what in the body
    makes the provider read input the body does not carry, if anything (``unseen_input``).

    The whole body is walked, not a list of known fields: Responses ``instructions``, tool
    schemas (keys and values: ``tools[].function.parameters``, Anthropic ``input_schema``),
    ``response_format`` / ``text.format`` schemas, ``tool_choice`` and any field a provider
    adds later all count, since a field left out is prompt a tenant can send unreserved.
    Only the top-level fields in ``_NOT_PROMPT`` are skipped; images count ``_IMAGE_TOKENS``
    each instead of their base64 text. One pass, no re-serialisation. The upstream's usage settles
    the exact count."""
    total_bytes = 0
    parts = 0
    unseen: str | None = None
    stack: list[Any] = [v for k, v in body.items() if k not in _NOT_PROMPT]
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
            kind = item.get("type")  # a JSON schema's may be a list: ["string", "null"]
            image = False
            if isinstance(kind, str) and kind in _SPECIAL_KINDS:  # one lookup for most dicts
                image = kind in _IMAGE_TYPES
                if image:
                    total_bytes += _IMAGE_TOKENS * 4
                elif unseen is None:
                    unseen = _unseen_part(item, kind)
            for key, value in item.items():
                if image and key in _IMAGE_PAYLOAD_KEYS:
                    continue  # the image itself, billed by its size tier, not its encoding
                if key not in _ENVELOPE_KEYS:
                    total_bytes += len(key) if key.isascii() else len(key.encode(
                        "utf-8", "surrogatepass"))
                stack.append(value)
    return max(1, math.ceil(total_bytes / 4) + 4 * parts), unseen


# Input the provider reads that the body does not carry, so no estimate of the body can
# reserve it: a stored conversation or prompt, a file by id or URL, an item by reference, the
# results of a tool the provider runs itself (web search and fetch, file search, code
# execution, MCP servers: billed as input). The model's context window bounds it, and that is
# what budgets reserve for such a request (docs/architecture.md, "Reservations"); rate limits
# reserve the estimate and settle the rest. Tools the client runs (functions, computer use,
# shells) come back in the next body and are counted there.
_UNSEEN_FIELDS = ("previous_response_id", "conversation", "mcp_servers", "web_search_options")
_SERVER_TOOLS = ("web_search", "web_fetch", "file_search", "code_interpreter",
                 "code_execution", "mcp")


def unseen_input(route: ApiRoute, body: dict[str, Any], in_parts: str | None) -> str | None:
    """What in ``body`` makes the provider read input the body does not carry, named for a
    refusal's message; None when everything it reads is in the body. ``in_parts``: what
    ``prompt_estimate`` found in the body's content parts."""
    for name in _UNSEEN_FIELDS:
        if body.get(name) is not None:
            return name
    if route.path == "/v1/responses" and isinstance(body.get("prompt"), dict):
        return "prompt"  # a stored prompt template, by id
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith(_SERVER_TOOLS):
            return f"its {kind} tool"
    # An input item of only an id is an item_reference (its type may be left out), and a
    # reasoning item without its encrypted_content is read back from the provider's store by
    # its id; a chat assistant message may stand for an earlier audio answer by its id.
    if route.path == "/v1/responses":
        items = body.get("input")
        for item in items if items.__class__ is list else ():
            if item.__class__ is dict and "id" in item:
                if "type" not in item and "role" not in item and "content" not in item:
                    return "an item_reference"
                if _stored_reasoning(item):
                    return "a reasoning item by id"
    elif route.operation == "chat":
        for item in body.get("messages") or ():
            if item.__class__ is dict and "audio" in item:
                audio = item["audio"]
                if isinstance(audio, dict) and "id" in audio:
                    return "an earlier audio answer by id"
    return in_parts


def stored_refs(route: ApiRoute, body: dict[str, Any], in_parts: str | None
                ) -> tuple[str, ...]:
    """The ids of the stored answer (``previous_response_id``) and reasoning items (by id,
    without their ``encrypted_content``: the provider reads them back from its store) a
    Responses request refers to, when they are all the input it does not carry; else ().

    Both are immutable and the gateway saw what they cost as they passed (limits/responses.py).
    A ``conversation`` is not (every call made in it adds items, concurrent ones included),
    nor are files, prompts or a server tool's results: any of them keeps the window."""
    if route.path != "/v1/responses":
        return ()
    previous = body.get("previous_response_id")
    items = body.get("input")
    reasoning = [item["id"] for item in (items if items.__class__ is list else ())
                 if item.__class__ is dict and "id" in item and _stored_reasoning(item)]
    if (previous is not None and not isinstance(previous, str)) \
            or any(not isinstance(ident, str) for ident in reasoning):
        return ()
    refs = ([previous] if previous is not None else []) + reasoning
    if not refs or len(refs) > MAX_STORED_REFS:
        return ()
    rest = {k: v for k, v in body.items() if k not in ("previous_response_id", "input")}
    if items.__class__ is list:
        rest["input"] = [item for item in items
                         if not (item.__class__ is dict and _stored_reasoning(item))]
    elif items is not None:
        rest["input"] = items
    return tuple(refs) if unseen_input(route, rest, in_parts) is None else ()


def _tool_calls(route: ApiRoute, body: dict[str, Any], bound: int | None,
                priced: Collection[str]) -> dict[str, int]:
    """The calls of tools billed per call to reserve, after writing the tenant's opted-in
    ``bound`` (``Tenant.max_tool_calls``) into a body whose tools have none or a larger one.
    ``priced``: the tools the model's price table prices, which a stored prompt may bring."""
    # A stored prompt template (Responses ``prompt``) may bring tools of its own, unseen
    prompted = route.path == "/v1/responses" and isinstance(body.get("prompt"), dict)
    if "tools" not in body and not prompted:
        return {}
    unnamed = priced if prompted else ()
    calls = _reserved(body, unnamed)
    if bound is None or not calls:
        return calls
    if route.path == "/v1/responses":
        body["max_tool_calls"] = min(_positive(body.get("max_tool_calls")) or bound, bound)
    elif route.dialect == "anthropic":
        for tool in body["tools"]:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind.startswith(ANTHROPIC_CALLED):
                tool["max_uses"] = min(_positive(tool.get("max_uses")) or bound, bound)
    return _reserved(body, unnamed)


def _reserved(body: dict[str, Any], unnamed: Collection[str]) -> dict[str, int]:
    """``reserved_tool_calls``, and of the ``unnamed`` tools a stored prompt may bring
    though the body does not name them, each: as many calls as ``max_tool_calls`` allows,
    else one."""
    calls = reserved_tool_calls(body)
    each = min(_positive(body.get("max_tool_calls")) or 1, MAX_CALLS)
    for tool in unnamed:
        calls[tool] = max(calls.get(tool, 0), each)
    return calls


def reserved_tool_calls(body: dict[str, Any]) -> dict[str, int]:
    """Calls of the tools the provider runs and bills per call (usage.SERVER_TOOLS) that a
    request may make, to reserve their price: the smaller of the Responses
    ``max_tool_calls`` (a bound on all of them, reserved for each: over, never under) and a
    tool's Anthropic ``max_uses``, at most ``MAX_CALLS``; else one per tool. Settlement
    charges the calls the answer reports."""
    tools = body.get("tools")
    limit = body.get("max_tool_calls")
    calls: dict[str, int] = {}
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        name = next((n for n in SERVER_TOOLS if isinstance(kind, str) and kind.startswith(n)),
                    None)
        if name is None:
            continue
        bounds = [b for b in (_positive(limit), _positive(tool.get("max_uses"))) if b]
        calls[name] = max(calls.get(name, 0), min([*bounds, MAX_CALLS]) if bounds else 1)
    return calls


def _positive(value: Any) -> int:
    """``value`` when it is a positive integer, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else 0


# A request's reservation counts at most this many calls of one tool (a larger bound in the
# body is a bound, not a plan: settlement charges what was made).
MAX_CALLS = 1000


# More references than this in one request keep the window: each is a lookup (a 200 KB body
# could name thousands).
MAX_STORED_REFS = 64


def _stored_reasoning(item: dict[str, Any]) -> bool:
    """A Responses input item that is a reasoning item the provider reads back by its id:
    neither its encrypted content nor its text (``content``, where a provider returns it)
    is in the body."""
    return item.get("type") == "reasoning" and "id" in item \
        and not item.get("encrypted_content") and not item.get("content")


def _unseen_part(part: dict[str, Any], kind: Any) -> str | None:
    """A content part or item that stands for input by reference, by its ``type`` (a key
    alone could be a tool schema's property name; an image by reference counts as an
    image): Responses ``input_file`` by id or URL and ``item_reference``, chat ``file`` by id,
    Anthropic ``document`` by URL or file and ``container_upload``."""
    if kind == "input_file":
        return "an input_file by id or URL" if "file_id" in part or "file_url" in part \
            else None
    if kind == "file":
        inner = part.get("file")
        return "a file by id" if isinstance(inner, dict) and "file_id" in inner else None
    if kind == "document":
        source = part.get("source")
        if isinstance(source, dict) and source.get("type") in ("url", "file"):
            return "a document by URL or file id"
        return None
    return _BY_REFERENCE.get(kind) if isinstance(kind, str) else None


_BY_REFERENCE = {"item_reference": "an item_reference", "container_upload": "a container_upload"}
_SPECIAL_KINDS = frozenset(("input_file", "file", "document", *_BY_REFERENCE, *_IMAGE_TYPES))


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
    """The dialect of an error answered on ``path``: its route's, and Anthropic's anywhere
    under ``/v1/messages`` (an endpoint the gateway does not serve, such as the Batches API,
    is still asked by an Anthropic client)."""
    route = ROUTES.get(path)
    if route is not None:
        return route.dialect
    return "anthropic" if path.startswith("/v1/messages/") else "openai"


def raise_if_content_encoded(content_encoding: str | None) -> None:
    """415 for a compressed request body, before a byte of it is read.

    Inflating would let a small body become a large one after every size check saw the
    compressed length (``max_body_bytes``, the in-flight body-bytes bound): a 204 KB gzip
    body inflates to 200 MiB. The official OpenAI and Anthropic SDKs never compress
    requests, so refusing costs honest clients nothing; the server does not inflate either
    (``auto_decompress`` off in app/server.py)."""
    if content_encoding is None:
        return
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if all(c == "identity" for c in codings):
        return
    raise GatewayError(
        415,
        f"Unsupported Content-Encoding '{_printable(content_encoding.strip())}': the gateway "
        "accepts uncompressed request bodies only; send the JSON body without compression.",
        code="unsupported_content_encoding", headers={"Connection": "close"},
    )


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
