"""Dialect translation between OpenAI chat completions and Anthropic Messages.

A client speaks the dialect of its route (``/v1/chat/completions``: OpenAI, ``/v1/messages``:
Anthropic); a deployment speaks its provider's ``kind``. When they differ, the request body is
translated once per upstream dialect (``plan``), and each attempt's answer on the way back:
whole (``Translation.answer``), streamed event by event (``Translation.stream``), or an error
body (``Translation.error``), keeping the status and the backpressure headers.

Only the two chat routes translate; completions, embeddings and responses stay same-kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import orjson

from ..errors import GatewayError, upstream_failure
from .answers import (
    answer_to_anthropic,
    answer_to_openai,
    error_body,
    error_event,
    usage_to_anthropic,
    usage_to_openai,
)
from .requests import (
    JSON_TOOL,
    TranslationRefused,
    UpstreamRequest,
    to_anthropic_request,
    to_openai_request,
)
from .streams import AnthropicToOpenAIStream, OpenAIToAnthropicStream

__all__ = [
    "JSON_TOOL", "AnthropicToOpenAIStream", "OpenAIToAnthropicStream", "StreamTranslator",
    "Translation", "TranslationRefused", "UpstreamRequest", "answer_to_anthropic",
    "answer_to_openai", "error_body", "error_event", "plan", "to_anthropic_request",
    "to_openai_request", "translates", "upstream_path", "usage_to_anthropic", "usage_to_openai",
]

Kind = Literal["openai", "anthropic"]

# The chat route of each dialect: where a translated request goes, per provider kind.
_CHAT_ROUTES = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}
_UPSTREAM_PATHS: dict[str, str] = {"openai": "/chat/completions", "anthropic": "/v1/messages"}


def translates(route_path: str) -> bool:
    """Whether requests on this route may go to a deployment of the other kind."""
    return route_path in _CHAT_ROUTES


def upstream_path(kind: str) -> str:
    """The chat path under a provider's base_url for a translated request."""
    return _UPSTREAM_PATHS[kind]


class StreamTranslator(Protocol):
    def feed(self, data: bytes) -> bytes:
        """Complete upstream events in; the client dialect's events for them out."""


@dataclass(frozen=True, slots=True)
class Translation:
    """One client request as it goes to a deployment of the other kind, and the way back."""

    client: Kind
    upstream: Kind
    request: UpstreamRequest
    include_usage: bool = False  # an OpenAI client asked for stream usage

    def answer(self, body: bytes) -> bytes:
        """A successful whole answer in the client's dialect (the upstream's JSON parsed);
        ``orjson.JSONDecodeError`` for invalid JSON, a 502 ``GatewayError`` for an answer
        whose shape is not the provider's."""
        answer = orjson.loads(body)
        try:
            if not isinstance(answer, dict):
                raise TypeError("not an object")
            if self.client == "openai":
                return orjson.dumps(answer_to_openai(answer, self.request.json_tool))
            return orjson.dumps(answer_to_anthropic(answer))
        except _MALFORMED:
            raise _malformed() from None

    def stream(self) -> StreamTranslator:
        if self.client == "openai":
            return _Guarded(AnthropicToOpenAIStream(include_usage=self.include_usage,
                                                    json_tool=self.request.json_tool))
        return _Guarded(OpenAIToAnthropicStream())

    def error(self, body: bytes, status: int) -> bytes:
        """The upstream's error body in the client's dialect (same status, same headers)."""
        return error_body(body, status, to=self.client)


# What reading a provider-shaped answer of the wrong shape raises (a field of another type).
_MALFORMED = (AttributeError, KeyError, TypeError, ValueError)


def _malformed() -> GatewayError:
    return upstream_failure(502, "The upstream's answer is not in its API's shape and could "
                            "not be translated.", "upstream_bad_response")


class _Guarded:
    """A stream translator whose malformed input ends the stream as a 502 error event (the
    relay writes it in the client's dialect) instead of breaking the connection."""

    def __init__(self, inner: StreamTranslator) -> None:
        self._inner = inner

    def feed(self, data: bytes) -> bytes:
        try:
            return self._inner.feed(data)
        except _MALFORMED:
            raise _malformed() from None


def plan(client: Kind, upstream: Kind, body: dict[str, object], *, default_max_tokens: int,
         include_usage: bool) -> Translation:
    """Translate a client body for the other dialect; ``TranslationRefused`` (400) when it
    cannot be carried without changing the answer. ``default_max_tokens``: Anthropic's
    required cap when the OpenAI body has none, the same figure the gateway reserves."""
    if upstream == "anthropic":
        request = to_anthropic_request(body, max_tokens=default_max_tokens)
    else:
        request = to_openai_request(body)
    return Translation(client, upstream, request, include_usage)
