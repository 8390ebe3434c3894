"""Wire bytes for the mock upstream (``gateway.mock.upstream``): response bodies and SSE streams.

Everything here is a pure function from a ``Generation`` (what one request asked for) to
bytes, so the HTTP side only decides *when* to send and *whether* to fail. Builders do the
JSON encoding once per request: every content chunk of a stream is the same word, so its
bytes are encoded once and written N times (the Responses API, whose deltas carry a
``sequence_number``, splices the number into a pre-encoded prefix/suffix instead).

Shapes follow the real providers closely enough for the official SDKs to parse them:
OpenAI chat completions, legacy completions, embeddings, models and the Responses API;
Anthropic Messages (including its SSE event sequence and error body).
"""

from __future__ import annotations

import base64
import dataclasses
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

#: The single word every content chunk carries; N chunks == N completion tokens.
TOKEN = "tok "
#: Length of every embedding vector (small on purpose: cheap to encode and to compare).
EMBEDDING_DIM = 8

Provider = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Generation:
    """The answer one request gets: identity, usage numbers and how it ended."""

    ident: str  # unique per request; prefixed per provider ("chatcmpl-", "msg_", ...)
    created: int  # unix seconds
    model: str  # echoed from the request
    prompt_tokens: int
    completion_tokens: int  # content chunks + reasoning tokens
    truncated: bool  # True when a max-tokens limit, not the chunk count, ended the answer
    include_usage: bool = False  # OpenAI stream_options.include_usage
    cached_tokens: int = 0  # of prompt_tokens, read from the prompt cache (gateway.mock.cache)
    cache_write_tokens: int = 0  # of prompt_tokens, written to it (Anthropic)
    cache_write_1h: bool = False  # the write has the 1-hour TTL
    reasoning_tokens: int = 0  # of completion_tokens, not sent as content (reasoning models)
    # Structured answers (tool calls, JSON, n > 1; gateway.mock.structured); empty: the plain
    # "tok tok ..." answer built by the fast builders below.
    choices: tuple[Any, ...] = ()

    @property
    def content_tokens(self) -> int:
        """Tokens sent as content: one per content chunk."""
        return self.completion_tokens - self.reasoning_tokens


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """A stream split at the points where the mock may wait or fail.

    ``preamble`` goes out right after the headers, then (after TTFT) ``chunk(i)`` for
    ``i in range(chunks)``, then ``trailer``. A mid-stream error replaces the rest of the
    stream with ``error(chunks_sent, status)``.
    """

    preamble: list[bytes]
    chunks: int
    chunk: Callable[[int], bytes]
    trailer: list[bytes]
    error: Callable[[int, int], bytes]


def _data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


# --- errors -------------------------------------------------------------------------------

# (type, code) as the real OpenAI API reports them for each status.
_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout_error", "timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
    529: ("server_error", "overloaded"),
}
_ANTHROPIC_ERRORS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def openai_error(status: int, message: str) -> dict[str, Any]:
    """The ``{"error": {...}}`` object OpenAI returns for ``status``."""
    default = "invalid_request_error" if status < 500 else "server_error"
    type_, code = _OPENAI_ERRORS.get(status, (default, None))
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """The ``{"type": "error", "error": {...}}`` object Anthropic returns for ``status``."""
    default = "invalid_request_error" if status < 500 else "api_error"
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_ERRORS.get(status, default), "message": message},
    }


def error_body(provider: Provider, status: int, message: str) -> bytes:
    """Encoded error body in ``provider``'s shape."""
    if provider == "anthropic":
        return orjson.dumps(anthropic_error(status, message))
    return orjson.dumps(openai_error(status, message))


def _midstream_message(sent: int) -> str:
    return f"mock upstream failed mid-stream after {sent} chunks"


def _openai_stream_error(sent: int, status: int) -> bytes:
    # OpenAI reports a failure inside an open stream as a bare error object, no [DONE].
    return _data(openai_error(status, _midstream_message(sent)))


# --- OpenAI chat completions and legacy completions ---------------------------------------


def _openai_usage(g: Generation) -> dict[str, Any]:
    # completion_tokens counts reasoning tokens too: the API bills them as output.
    return {
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": g.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": g.reasoning_tokens, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    }


def responses_usage(g: Generation) -> dict[str, Any]:
    return {
        "input_tokens": g.prompt_tokens,
        "input_tokens_details": {"cached_tokens": g.cached_tokens},
        "output_tokens": g.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": g.reasoning_tokens},
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    }


def anthropic_usage(g: Generation, output_tokens: int) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` excludes what was read from or written to cache."""
    write_1h = g.cache_write_tokens if g.cache_write_1h else 0
    return {
        "input_tokens": g.prompt_tokens - g.cached_tokens - g.cache_write_tokens,
        "cache_creation_input_tokens": g.cache_write_tokens,
        "cache_read_input_tokens": g.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": g.cache_write_tokens - write_1h,
                           "ephemeral_1h_input_tokens": write_1h},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _finish(g: Generation) -> str:
    return "length" if g.truncated else "stop"


def chat_body(g: Generation) -> bytes:
    """A non-streaming ``chat.completion`` object."""
    message = {"role": "assistant", "content": TOKEN * g.content_tokens, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(g)}
    return orjson.dumps(
        {
            "id": f"chatcmpl-{g.ident}",
            "object": "chat.completion",
            "created": g.created,
            "model": g.model,
            "choices": [choice],
            "usage": _openai_usage(g),
        }
    )


def _openai_stream(g: Generation, obj: str, first: dict[str, Any], rest: dict[str, Any],
                   empty: dict[str, Any], last: dict[str, Any]) -> StreamPlan:
    """Shared chat/completions stream: choice dicts differ, framing and usage do not."""
    base: dict[str, Any] = {"id": g.ident, "object": obj, "created": g.created, "model": g.model}

    def frame(choice: dict[str, Any]) -> bytes:
        chunk = {**base, "choices": [choice]}
        if g.include_usage:
            chunk["usage"] = None  # the real API marks every non-final chunk this way
        return _data(chunk)

    first_b, rest_b = frame(first), frame(rest)
    trailer = [frame(last)]
    if g.include_usage:
        trailer.append(_data({**base, "choices": [], "usage": _openai_usage(g)}))
    trailer.append(b"data: [DONE]\n\n")
    return StreamPlan(
        # With zero tokens there is no content chunk to carry the role, so send it alone.
        preamble=[] if g.content_tokens else [frame(empty)],
        chunks=g.content_tokens,
        chunk=lambda i: rest_b if i else first_b,
        trailer=trailer,
        error=_openai_stream_error,
    )


def chat_stream(g: Generation) -> StreamPlan:
    """``chat.completion.chunk`` events; the role rides on the first content delta."""
    g = _prefixed(g, "chatcmpl-")

    def choice(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return _openai_stream(
        g,
        "chat.completion.chunk",
        choice({"role": "assistant", "content": TOKEN}, None),
        choice({"content": TOKEN}, None),
        choice({"role": "assistant", "content": ""}, None),
        choice({}, _finish(g)),
    )


def completion_body(g: Generation) -> bytes:
    """A non-streaming legacy ``text_completion`` object."""
    choice = {"text": TOKEN * g.content_tokens, "index": 0, "logprobs": None,
              "finish_reason": _finish(g)}
    return orjson.dumps(
        {
            "id": f"cmpl-{g.ident}",
            "object": "text_completion",
            "created": g.created,
            "model": g.model,
            "choices": [choice],
            "usage": _openai_usage(g),
        }
    )


def completion_stream(g: Generation) -> StreamPlan:
    """Legacy completions stream: same framing as chat, ``text`` instead of ``delta``."""
    g = _prefixed(g, "cmpl-")

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    tok = choice(TOKEN, None)
    return _openai_stream(g, "text_completion", tok, tok, choice("", None), choice("", _finish(g)))


def _prefixed(g: Generation, prefix: str) -> Generation:
    return dataclasses.replace(g, ident=prefix + g.ident)


# --- OpenAI Responses API -----------------------------------------------------------------


def _response(g: Generation, status: str, text: str | None) -> dict[str, Any]:
    usage = None
    output: list[dict[str, Any]] = []
    if text is not None:
        output.append(_message_item(g, "completed", text))
        usage = responses_usage(g)
    return {"id": f"resp_{g.ident}", "object": "response", "created_at": g.created,
            "status": status, "model": g.model, "output": output, "usage": usage}


def _message_item(g: Generation, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"id": f"msg_{g.ident}", "type": "message", "status": status, "role": "assistant",
            "content": content}


def responses_body(g: Generation) -> bytes:
    """A non-streaming ``response`` object (always ``status: completed``)."""
    return orjson.dumps(_response(g, "completed", TOKEN * g.content_tokens))


def responses_stream(g: Generation) -> StreamPlan:
    """The Responses API event sequence, ``sequence_number`` counting from 0.

    created, in_progress, output_item.added, content_part.added, N x output_text.delta,
    output_text.done, content_part.done, output_item.done, completed (carries usage).
    """
    text = TOKEN * g.content_tokens
    item_id = f"msg_{g.ident}"
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    head: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": _response(g, "in_progress", None)}),
        ("response.in_progress", {"response": _response(g, "in_progress", None)}),
        ("response.output_item.added",
         {"output_index": 0, "item": _message_item(g, "in_progress", None)}),
        ("response.content_part.added", {**where, "part": part}),
    ]
    tail: list[tuple[str, dict[str, Any]]] = [
        ("response.output_text.done", {**where, "text": text}),
        ("response.content_part.done", {**where, "part": {**part, "text": text}}),
        ("response.output_item.done",
         {"output_index": 0, "item": _message_item(g, "completed", text)}),
        ("response.completed", {"response": _response(g, "completed", text)}),
    ]
    first_delta = len(head)
    after = first_delta + g.content_tokens

    def encode(seq: int, name: str, fields: dict[str, Any]) -> bytes:
        return _event(name, {"type": name, "sequence_number": seq, **fields})

    # Deltas differ only in sequence_number: encode once without it, splice the number in.
    delta = orjson.dumps({"type": "response.output_text.delta", **where, "delta": TOKEN,
                          "logprobs": []})
    prefix = b"event: response.output_text.delta\ndata: " + delta[:-1] + b',"sequence_number":'

    def error(sent: int, status: int) -> bytes:
        err = openai_error(status, _midstream_message(sent))["error"]
        return _event("error", {"type": "error", "code": err["code"] or err["type"],
                                "message": err["message"], "param": None,
                                "sequence_number": first_delta + sent})

    return StreamPlan(
        preamble=[encode(i, name, f) for i, (name, f) in enumerate(head)],
        chunks=g.content_tokens,
        chunk=lambda i: prefix + str(first_delta + i).encode() + b"}\n\n",
        trailer=[encode(after + i, name, f) for i, (name, f) in enumerate(tail)],
        error=error,
    )


# --- Anthropic Messages -------------------------------------------------------------------


def _stop_reason(g: Generation) -> str:
    return "max_tokens" if g.truncated else "end_turn"


def messages_body(g: Generation) -> bytes:
    """A non-streaming Anthropic ``message`` object."""
    return orjson.dumps(
        {
            "id": f"msg_{g.ident}",
            "type": "message",
            "role": "assistant",
            "model": g.model,
            "content": [{"type": "text", "text": TOKEN * g.content_tokens}],
            "stop_reason": _stop_reason(g),
            "stop_sequence": None,
            "usage": anthropic_usage(g, g.completion_tokens),
        }
    )


_ANTHROPIC_DELTA = _event(
    "content_block_delta",
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TOKEN}},
)
_ANTHROPIC_BLOCK_START = _event(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)
_ANTHROPIC_BLOCK_STOP = _event("content_block_stop", {"type": "content_block_stop", "index": 0})
_ANTHROPIC_STOP = _event("message_stop", {"type": "message_stop"})


def _anthropic_stream_error(sent: int, status: int) -> bytes:
    return _event("error", anthropic_error(status, _midstream_message(sent)))


def messages_stream(g: Generation) -> StreamPlan:
    """Anthropic's SSE sequence (no ``ping`` events).

    message_start (usage.input_tokens, output_tokens 0), content_block_start, N x
    content_block_delta (text_delta), content_block_stop, message_delta (cumulative
    usage.output_tokens, stop_reason), message_stop.
    """
    start = {
        "type": "message_start",
        "message": {
            "id": f"msg_{g.ident}", "type": "message", "role": "assistant", "model": g.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": anthropic_usage(g, 0),
        },
    }
    # message_delta's usage is cumulative; current API versions repeat the input side in it.
    final = anthropic_usage(g, g.completion_tokens)
    final.pop("cache_creation")
    final.pop("service_tier")
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(g), "stop_sequence": None},
        "usage": final,
    }
    return StreamPlan(
        preamble=[_event("message_start", start), _ANTHROPIC_BLOCK_START],
        chunks=g.content_tokens,
        chunk=lambda i: _ANTHROPIC_DELTA,
        trailer=[_ANTHROPIC_BLOCK_STOP, _event("message_delta", delta), _ANTHROPIC_STOP],
        error=_anthropic_stream_error,
    )


# --- embeddings and models ----------------------------------------------------------------


def _make_vectors(count: int) -> tuple[list[list[float]], list[str]]:
    rng = random.Random(1234)  # fixed: the same text embeds the same way in every run
    floats: list[list[float]] = []
    b64: list[str] = []
    for _ in range(count):
        raw = [rng.uniform(-1.0, 1.0) for _ in range(EMBEDDING_DIM)]
        norm = sum(x * x for x in raw) ** 0.5
        packed = struct.pack(f"<{EMBEDDING_DIM}f", *(x / norm for x in raw))
        # Round-trip through float32 so the float and base64 encodings agree exactly.
        floats.append(list(struct.unpack(f"<{EMBEDDING_DIM}f", packed)))
        b64.append(base64.b64encode(packed).decode())
    return floats, b64


_VECTORS, _VECTORS_B64 = _make_vectors(16)


def embeddings_body(model: str, inputs: list[str | list[int]], prompt_tokens: int,
                    as_base64: bool) -> bytes:
    """One unit vector per input, picked by a CRC of the input so equal inputs match."""
    table: list[list[float]] | list[str] = _VECTORS_B64 if as_base64 else _VECTORS
    data = []
    for index, item in enumerate(inputs):
        key = item.encode("utf-8", "surrogatepass") if isinstance(item, str) else orjson.dumps(item)
        vector = table[zlib.crc32(key) % len(table)]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return orjson.dumps({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})


#: Models ``GET /v1/models`` lists; any other name is accepted and echoed too.
MODEL_IDS = ("mock-model", "mock-model-large", "mock-embedding")
MODELS_BODY = orjson.dumps(
    {"object": "list",
     "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in MODEL_IDS]}
)
