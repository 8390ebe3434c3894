"""A fast, scriptable mock LLM provider for tests, the demo and benchmarks.

Routes (OpenAI-compatible unless noted; bodies and SSE shapes live in ``gateway.mock.sse``):

- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses`` (stream or not)
- ``POST /v1/embeddings`` (8-dim unit vectors, ``encoding_format: "base64"`` supported)
- ``GET /v1/models``
- ``POST /v1/messages``: Anthropic Messages, stream or not
- any other ``/v1/...`` path: 404 with an OpenAI error body
- ``GET /_mock/requests`` lists the recorded requests; ``DELETE /_mock/requests`` clears them

The answer is N copies of the word ``"tok "``, one per stream chunk, so N is both the
number of content deltas and ``completion_tokens``. N is ``x-mock-chunks`` (default 5)
capped by the request's max-tokens field (``max_completion_tokens`` then ``max_tokens`` for
chat, ``max_output_tokens`` for responses, ``max_tokens`` elsewhere); a cap that bites
gives ``finish_reason: "length"`` / ``stop_reason: "max_tokens"``. Prompt tokens come from
``estimate_prompt_tokens``. The request's ``model`` is echoed (``"mock-model"`` if absent).

Per-request knobs are request headers (invalid values -> 400 in the route's error shape):

- ``x-mock-latency-ms``: wait before the response headers (the only delay a non-stream
  answer gets).
- ``x-mock-ttft-ms``: streams: wait between the preamble events and the first content chunk.
- ``x-mock-chunks``: content chunks / completion tokens, 0..100000 (default 5).
- ``x-mock-chunk-gap-ms``: wait between content chunks (default 0).
- ``x-mock-status``: 400..599; answer with that status and an error body in the route's
  provider shape. ``x-mock-retry-after`` (seconds -> ``Retry-After``) and
  ``x-mock-retry-after-ms`` (-> ``retry-after-ms``) are added to injected error answers.
- ``x-mock-fail``: ``drop`` (close the connection, no response), ``hang`` (send nothing
  until the client leaves, at most 600 s), ``midstream-cut`` (send ``x-mock-fail-after``
  content chunks, default 2, then abort the TCP connection; a non-stream answer is cut
  halfway through its body), ``midstream-error`` (after that many chunks send the
  provider's error event and end the stream; a non-stream request gets an error status).
  ``x-mock-fail`` wins over ``x-mock-status``, which then only picks the error type of a
  mid-stream error (default 500 for OpenAI routes, 529 overloaded for Anthropic).
- ``x-mock-fail-rate``: 0..1; the injected failure (``x-mock-fail`` if given, else
  ``x-mock-status``, default 500) happens with this probability, drawn from the app's
  seedable ``random.Random``; otherwise the request is answered normally.

- ``x-mock-cached-share``: 0..1; on a request that repeats a prompt prefix the mock has
  seen, report ``floor(share * prompt_tokens)`` as read from cache instead of the repeated
  prefix's own size (``gateway.mock.cache``: OpenAI caches automatically, Anthropic only up to
  a ``cache_control`` breakpoint and reports the cache writes, 5-minute or 1-hour).
- ``x-mock-reasoning-tokens``: reasoning tokens of a reasoning model's answer (models in
  ``create_mock_app(reasoning_models=...)``, default ``mock-reasoning``; default 2 x chunks);
  they count in ``completion_tokens`` / ``output_tokens`` but are not sent as content.

``tools``, ``response_format`` / ``text.format`` JSON and ``n`` > 1 get answers of that shape
(tool calls, schema-valid JSON, n choices), whole and streamed: ``gateway.mock.structured``.

Every ``/v1`` request is recorded (method, path, lower-cased headers, parsed JSON body or
None) before any knob applies. Auth is never checked: tests read the recorded headers.

Capacity (optional, set at startup: ``create_mock_app(capacity=Capacity(...))``, or
``gateway mock-upstream --slots N``): concurrent generation slots, a FIFO queue whose length
adds to time to first token, and 429s with Retry-After beyond a queue bound or a
requests-per-minute quota; see ``gateway.mock.capacity``. ``GET /_mock/capacity`` reports its
counters. Without it capacity is unlimited.

Knob parsing lives in ``gateway.mock.knobs``, writing answers and the transport-level failures
in ``gateway.mock.delivery``, body and SSE bytes in ``gateway.mock.sse``; this module is the
app: its state, the request pipeline every route shares, and the routes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import sse
from . import structured as mock_structured
from .cache import PromptCache
from .capacity import Capacity, CapacityModel, Lease, Rejected
from .delivery import JSON_HEADERS, Call, drop, error_response, hang, reply, stream
from .knobs import BadRequest, Knobs, parse_knobs
from .sse import Provider

__all__ = [
    "CAPACITY",
    "RECORDED",
    "RecordedRequest",
    "create_mock_app",
    "estimate_prompt_tokens",
    "run_mock_upstream",
]


@dataclass(slots=True)
class RecordedRequest:
    """One request as the mock received it (``body`` is the parsed JSON, or None)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


RECORDED: web.AppKey[collections.deque[RecordedRequest]] = web.AppKey("mock_recorded")
_RNG: web.AppKey[random.Random] = web.AppKey("mock_rng")
_IDS: web.AppKey[itertools.count[int]] = web.AppKey("mock_ids")
_STOPPING: web.AppKey[asyncio.Event] = web.AppKey("mock_stopping")
# Request key: the dialect in which this answer reports the quota (set on generating routes).
_QUOTA_DIALECT: web.RequestKey[str] = web.RequestKey("mock_quota_dialect", str)
#: The app's capacity model, or None for unlimited capacity.
CAPACITY: web.AppKey[CapacityModel | None] = web.AppKey("mock_capacity")
#: Prompt prefixes seen, for cache reads and writes in usage (gateway.mock.cache).
PROMPT_CACHE: web.AppKey[PromptCache] = web.AppKey("mock_prompt_cache")
REASONING_MODELS: web.AppKey[frozenset[str]] = web.AppKey("mock_reasoning_models")
DEFAULT_REASONING_MODELS = frozenset({"mock-reasoning"})


# --- prompt token estimate ----------------------------------------------------------------

# Fields whose text counts as prompt: chat/anthropic messages, completions prompt,
# responses/embeddings input, anthropic system, responses instructions.
_PROMPT_FIELDS = ("messages", "prompt", "input", "system", "instructions")


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        # Messages, content parts and input items keep their text under these two keys;
        # roles, ids, image URLs and tool schemas are not counted.
        return _text_bytes(value.get("content")) + _text_bytes(value.get("text"))
    return 0  # token-id arrays, numbers, None


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Deterministic prompt-token estimate: ``max(1, ceil(utf8_bytes / 4))``.

    ``utf8_bytes`` is the UTF-8 length of every string found in the body's ``messages``,
    ``prompt``, ``input``, ``system`` and ``instructions`` fields, descending through lists
    and through the ``content`` / ``text`` keys of objects. Token-id arrays count 0.
    """
    total = sum(_text_bytes(body.get(field)) for field in _PROMPT_FIELDS)
    return max(1, -(-total // 4))


# --- request plumbing ---------------------------------------------------------------------


_Serve = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


async def _read_json(request: web.Request) -> tuple[Any, str | None]:
    """(parsed body or None, error message or None); GET has no body and no error."""
    if request.method == "GET":
        return None, None
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, f"request body is not valid JSON: {exc}"
    if not isinstance(body, dict):
        return body, "request body must be a JSON object"
    return body, None


def _draw_failure(app: web.Application, knobs: Knobs) -> str | None:
    """The failure to inject now: a ``x-mock-fail`` mode, ``"status"``, or None."""
    if knobs.fail is None and knobs.status is None and knobs.fail_rate is None:
        return None
    if knobs.fail_rate is not None and app[_RNG].random() >= knobs.fail_rate:
        return None
    return knobs.fail or "status"


def _endpoint(provider: Provider, serve: _Serve, *, needs_body: bool = True,
              generates: bool = False,
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a route: record, parse knobs, take capacity (``generates``), wait, inject
    failures, validate, then serve."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body, body_error = await _read_json(request)
        request.app[RECORDED].append(RecordedRequest(
            request.method, request.path,
            {name.lower(): value for name, value in request.headers.items()}, body))
        try:
            knobs = parse_knobs(request.headers)
        except BadRequest as exc:
            return error_response(provider, 400, str(exc))
        capacity = request.app[CAPACITY] if generates else None
        if capacity is None:
            return await answer(request, body, body_error, knobs, False)
        request[_QUOTA_DIALECT] = provider  # the answer reports the quota (_report_quota)
        try:
            capacity.take_quota()
            lease = await capacity.acquire()
        except Rejected as exc:
            return _capacity_error(provider, capacity, exc)
        try:
            transport = request.transport
            if transport is None or transport.is_closing():
                return web.Response()  # the client left while queued: free the slot now
            return await answer(request, body, body_error, _with_queue_delay(knobs, lease), True)
        finally:
            lease.release()

    async def answer(request: web.Request, body: Any, body_error: str | None,
                     knobs: Knobs, in_slot: bool) -> web.StreamResponse:
        if knobs.latency_s:
            await asyncio.sleep(knobs.latency_s)
        failure = _draw_failure(request.app, knobs)
        if failure == "drop":
            return drop(request)
        if failure == "hang":
            return await hang(request, request.app[_STOPPING])
        if failure == "status":
            status = knobs.status or 500
            return error_response(provider, status, f"mock upstream injected status {status}",
                                  knobs)
        if needs_body and body_error is not None:
            return error_response(provider, 400, body_error)
        try:
            body = body if isinstance(body, dict) else {}
            return await serve(request, Call(provider, body, knobs, failure, in_slot))
        except BadRequest as exc:
            return error_response(provider, 400, str(exc))

    return handler


def _with_queue_delay(knobs: Knobs, lease: Lease) -> Knobs:
    """Add the lease's prefill-contention delay to time to first token (both kinds of answer
    wait ``ttft_s`` in capacity mode, see ``_generating_route``)."""
    if not lease.extra_ttft_s:
        return knobs
    return dataclasses.replace(knobs, ttft_s=knobs.ttft_s + lease.extra_ttft_s)


def _capacity_error(provider: Provider, capacity: CapacityModel, exc: Rejected) -> web.Response:
    wait = exc.retry_after_s
    if exc.reason == "quota":
        message = (f"mock upstream: rate limit of {capacity.capacity.quota_rpm} requests per "
                   f"minute reached; retry after {wait:.3f} s")
    else:
        message = (f"mock upstream: all {capacity.capacity.slots} slots busy and "
                   f"{capacity.capacity.max_queue} requests queued; retry after {wait:.3f} s")
    resp = error_response(provider, 429, message)
    resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
    resp.headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    resp.headers["x-mock-rejected"] = exc.reason
    return resp


# --- routes -------------------------------------------------------------------------------


def _generation(request: web.Request, call: Call, operation: str,
                *limit_keys: str) -> sse.Generation:
    body = call.body
    chunks = call.knobs.chunks
    limit: int | None = None
    for key in limit_keys:  # the first limit present wins, like the real APIs
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"{key} must be a non-negative integer")
        limit = value
        break
    model = body.get("model")
    model = model if isinstance(model, str) else "mock-model"
    reasoning = 0
    if model in request.app[REASONING_MODELS] and operation in ("chat", "responses"):
        wanted = call.knobs.reasoning_tokens
        reasoning = 2 * chunks if wanted is None else wanted
    truncated = False
    if limit is not None and reasoning > limit:  # reasoning comes first and counts as output
        reasoning, truncated = limit, True
    room = None if limit is None else limit - reasoning
    choices = mock_structured.limit(mock_structured.plan_choices(body, operation, chunks), room)
    if choices:
        content = mock_structured.tokens(choices)
        truncated = truncated or any(c.truncated for c in choices)
    else:
        content = chunks if room is None else min(chunks, room)
        truncated = truncated or content < chunks
    prompt_tokens = estimate_prompt_tokens(body)
    cache = request.app[PROMPT_CACHE].use(body, prompt_tokens, call.provider == "anthropic",
                                          call.knobs.cached_share, _text_bytes)
    options = body.get("stream_options")
    ids = request.app[_IDS]  # a local: mypy cannot infer next() over a generic AppKey lookup
    return sse.Generation(
        ident=f"mock{next(ids)}",
        created=int(time.time()),
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=content + reasoning,
        truncated=truncated,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        cached_tokens=cache.read,
        cache_write_tokens=cache.write,
        cache_write_1h=cache.write_1h,
        reasoning_tokens=reasoning,
        choices=choices,
    )


_Builders = tuple[Callable[[sse.Generation], bytes], Callable[[sse.Generation], sse.StreamPlan]]
_STRUCTURED: dict[str, _Builders] = {
    "chat": (mock_structured.chat_body, mock_structured.chat_stream),
    "completions": (mock_structured.completion_body, mock_structured.completion_stream),
    "responses": (mock_structured.responses_body, mock_structured.responses_stream),
    "messages": (mock_structured.messages_body, mock_structured.messages_stream),
}


def _generating_route(
    operation: str,
    limit_keys: tuple[str, ...],
    body_fn: Callable[[sse.Generation], bytes],
    stream_fn: Callable[[sse.Generation], sse.StreamPlan],
) -> _Serve:
    async def serve(request: web.Request, call: Call) -> web.StreamResponse:
        gen = _generation(request, call, operation, *limit_keys)
        make_body, make_stream = _STRUCTURED[operation] if gen.choices else (body_fn, stream_fn)
        if call.body.get("stream") is True:
            return await stream(request, call, make_stream(gen))
        if call.in_slot:
            generating = call.knobs.ttft_s + gen.completion_tokens * call.knobs.gap_s
            if generating:
                await asyncio.sleep(generating)
        return await reply(request, call, make_body(gen))

    return serve


async def _embeddings(request: web.Request, call: Call) -> web.StreamResponse:
    raw = call.body.get("input")
    inputs: list[str | list[int]]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs = [raw]  # one string, or one token-id array
    elif isinstance(raw, list) and raw and all(isinstance(x, (str, list)) for x in raw):
        inputs = raw
    else:
        raise BadRequest("input must be a non-empty string or array")
    model = call.body.get("model")
    body = sse.embeddings_body(
        model if isinstance(model, str) else "mock-embedding",
        inputs,
        estimate_prompt_tokens(call.body),
        call.body.get("encoding_format") == "base64",
    )
    return await reply(request, call, body)


async def _models(request: web.Request, call: Call) -> web.StreamResponse:
    return await reply(request, call, sse.MODELS_BODY)


def _count_tokens(provider: Provider) -> _Serve:
    """Anthropic ``POST /v1/messages/count_tokens`` ({"input_tokens": N}) and OpenAI
    ``POST /v1/responses/input_tokens`` ({"object": "response.input_tokens", ...}), counted
    with the same estimate the generating routes report as usage."""
    async def serve(request: web.Request, call: Call) -> web.StreamResponse:
        if not isinstance(call.body.get("model"), str):
            raise BadRequest("model: Field required")
        tokens = estimate_prompt_tokens(call.body)
        body: dict[str, Any] = {"input_tokens": tokens} if provider == "anthropic" else {
            "object": "response.input_tokens", "input_tokens": tokens}
        return await reply(request, call, orjson.dumps(body))

    return serve


async def _unknown(request: web.Request, call: Call) -> web.StreamResponse:
    return error_response("openai", 404, f"mock upstream has no route {request.method} {request.path}")


async def _list_recorded(request: web.Request) -> web.Response:
    recorded = request.app[RECORDED]
    return web.Response(body=orjson.dumps(list(recorded)), headers=JSON_HEADERS)


async def _clear_recorded(request: web.Request) -> web.Response:
    request.app[RECORDED].clear()
    return web.Response(status=204)


async def _on_shutdown(app: web.Application) -> None:
    app[_STOPPING].set()  # release hanging requests so shutdown does not wait for them


def create_mock_app(*, max_recorded: int = 200, seed: int | None = None,
                    capacity: Capacity | None = None,
                    reasoning_models: frozenset[str] = DEFAULT_REASONING_MODELS,
                    ) -> web.Application:
    """The mock provider app; ``RECORDED`` holds the last ``max_recorded`` ``/v1`` requests.

    ``seed`` seeds the ``random.Random`` behind ``x-mock-fail-rate`` (None: OS entropy).
    ``capacity``: slots, queue and quota of the generating routes (None: unlimited).
    ``reasoning_models``: model names whose chat / Responses answers report reasoning tokens.
    """
    if max_recorded < 0:
        raise ValueError("max_recorded must be >= 0")
    app = web.Application()
    app[RECORDED] = collections.deque(maxlen=max_recorded)
    app[CAPACITY] = None if capacity is None else CapacityModel(capacity)
    app[_RNG] = random.Random(seed)
    app[_IDS] = itertools.count(1)
    app[PROMPT_CACHE] = PromptCache()
    app[REASONING_MODELS] = reasoning_models
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_report_quota)
    add = app.router.add_route
    add("POST", "/v1/chat/completions", _endpoint("openai", _generating_route(
        "chat", ("max_completion_tokens", "max_tokens"), sse.chat_body, sse.chat_stream),
        generates=True))
    add("POST", "/v1/completions", _endpoint("openai", _generating_route(
        "completions", ("max_tokens",), sse.completion_body, sse.completion_stream),
        generates=True))
    add("POST", "/v1/responses", _endpoint("openai", _generating_route(
        "responses", ("max_output_tokens",), sse.responses_body, sse.responses_stream),
        generates=True))
    add("POST", "/v1/messages", _endpoint("anthropic", _generating_route(
        "messages", ("max_tokens",), sse.messages_body, sse.messages_stream), generates=True))
    add("POST", "/v1/embeddings", _endpoint("openai", _embeddings, generates=True))
    add("POST", "/v1/messages/count_tokens", _endpoint("anthropic", _count_tokens("anthropic")))
    add("POST", "/v1/responses/input_tokens", _endpoint("openai", _count_tokens("openai")))
    add("GET", "/v1/models", _endpoint("openai", _models, needs_body=False))
    add("*", "/v1/{tail:.*}", _endpoint("openai", _unknown, needs_body=False))
    add("GET", "/_mock/requests", _list_recorded)
    add("DELETE", "/_mock/requests", _clear_recorded)
    add("GET", "/_mock/capacity", _capacity_stats)
    return app


async def _report_quota(request: web.Request, response: web.StreamResponse) -> None:
    """Rate-limit headers on every answer of a generating route, 429s included, counted when
    the headers go out (a streamed answer's at its first byte), as the providers send them."""
    provider = request.get(_QUOTA_DIALECT)
    model = request.app[CAPACITY]
    if provider is not None and model is not None:
        response.headers.update(model.quota_headers(provider))


async def _capacity_stats(request: web.Request) -> web.Response:
    model = request.app[CAPACITY]
    stats: dict[str, Any] = {"enabled": False} if model is None else {"enabled": True,
                                                                      **model.stats()}
    return web.Response(body=orjson.dumps(stats), headers=JSON_HEADERS)


async def run_mock_upstream(host: str, port: int, capacity: Capacity | None = None) -> None:
    """Serve ``create_mock_app()`` on ``host:port`` until cancelled, then shut down cleanly."""
    # No access log: formatting a line per request would cost more than answering it.
    runner = web.AppRunner(create_mock_app(capacity=capacity), access_log=None,
                           shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()  # forever; cancellation is the only way out
    finally:
        await runner.cleanup()
