"""Step 11: hand the upstream's answer to the client — whole, or as a stream event by event."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from gateway.errors import GatewayError, retry_headers, upstream_failure
from gateway.request import ProxyCall, estimate_answer_tokens
from gateway.translate import Translation

from .pool import FORWARDED_RESPONSE_HEADERS, UpstreamAttempt
from .retry import RETRYABLE_4XX
from .sse import SseRelay, Usage
from .transport import UpstreamResponse

if TYPE_CHECKING:
    from gateway.request import RequestRecord


def is_event_stream(response: UpstreamResponse) -> bool:
    return response.content_type == "text/event-stream"


def upstream_answer(
    label: str, status: int, content_type: str, upstream_headers: Mapping[str, str],
    body: bytes, extra_headers: Mapping[str, str],
) -> web.Response:
    """The upstream's complete answer as the client's response, or a 502 when it is unusable."""
    if status in (401, 403):
        # Our provider credential was refused: the client's key is fine, so this is a 502,
        # and one no retry mends (an SDK retries a 502 twice, each sent to the provider).
        error = upstream_failure(502, f"The upstream {label} refused the gateway's "
                                 "credentials.", "upstream_auth_error")
        error.headers = {**error.headers, **retry_headers(None)}
        raise error
    if not (content_type.endswith("json") and body[:1] in (b"{", b"[")):
        if status == 413:  # a proxy in front of the provider refused the body's size: the
            # client can mend that (send less), so it hears so, in its own dialect
            raise GatewayError(413, f"The upstream {label} refused this request as too large "
                               "(413, with a non-JSON body); send a smaller request.",
                               code="request_too_large", headers=retry_headers(None))
        error = upstream_failure(502, f"The upstream {label} answered {status} with a non-JSON "
                                 "body.", "upstream_bad_response")
        if 400 <= status < 500 and status not in RETRYABLE_4XX:  # it refused this request
            error.headers = {**error.headers, **retry_headers(None)}
        raise error
    headers = {"Content-Type": "application/json", **extra_headers}
    for name in FORWARDED_RESPONSE_HEADERS:
        value = upstream_headers.get(name)
        if value is not None:
            headers[name] = value
    return web.Response(status=status, body=body, headers=headers)


async def relay_whole(
    attempt: UpstreamAttempt, record: RequestRecord, extra_headers: Mapping[str, str],
    answer_model: str | None = None, translation: Translation | None = None,
) -> web.Response:
    """``answer_model``: the public name the answer's ``model`` field says (None: unchanged);
    ``translation``: the deployment speaks the other dialect, the answer is translated back."""
    upstream = attempt.response
    body = raw = await attempt.read_body()
    if translation is not None and upstream.content_type.endswith("json") and raw[:1] == b"{":
        try:
            body = translation.answer(raw) if upstream.status < 400 else \
                translation.error(raw, upstream.status)
        except orjson.JSONDecodeError:
            raise upstream_failure(502, f"The upstream {attempt.target.label} answered "
                                   f"{upstream.status} with invalid JSON.",
                                   "upstream_bad_response") from None
    response = upstream_answer(attempt.target.label, upstream.status, upstream.content_type,
                               upstream.headers, body, extra_headers)
    if upstream.status < 400:
        usage = Usage()
        try:
            answer = orjson.loads(body)
            # accounted in the upstream's own dialect, as every other answer
            upstream_answer_json = orjson.loads(raw) if raw is not body else answer
        except orjson.JSONDecodeError:  # a 200 the client could not parse either
            raise upstream_failure(502, f"The upstream {attempt.target.label} answered "
                                   f"{upstream.status} with invalid JSON.",
                                   "upstream_bad_response") from None
        if answer_model is not None and isinstance(answer, dict) and "model" in answer:
            # Top-level only: a tool call's input object may have a "model" key of its own.
            try:
                response.body = orjson.dumps({**answer, "model": answer_model})
            except TypeError:  # nested past what orjson writes (254): renamed as bytes, the
                response.body = model_renamer(answer_model)(body)  # first "model" as streams
        usage.merge(upstream_answer_json)
        # Charge an estimate rather than nothing for a side the upstream did not report
        # (reported stays as it was: whether a usage object came at all).
        usage.fill_in(record.input_if_unreported,
                      0 if usage.output_seen else estimate_answer_tokens(upstream_answer_json))
        record.usage = usage
    record.status = upstream.status
    return response


async def relay_stream(
    request: web.Request, call: ProxyCall, attempt: UpstreamAttempt, record: RequestRecord,
    extra_headers: Mapping[str, str], write_idle_s: float = 30.0,
    translation: Translation | None = None,
) -> web.StreamResponse:
    """Relay an SSE stream event by event. A write that makes no progress for
    ``write_idle_s`` (the client stopped reading) ends the request like a disconnect does:
    the upstream call is cancelled and slots released by the callers' ``finally``; usage is
    what was produced until then.

    ``translation``: the deployment speaks the other dialect. The relay still reads the
    upstream's own events (usage, deltas, the terminal event); the translator reshapes each
    batch of complete events for the client as it arrives."""
    relay = SseRelay(
        call.route.dialect,
        strip_usage_chunk=call.route.injects_stream_usage and not call.client_wants_usage
        and translation is None,
    )
    translate = translation.stream().feed if translation is not None else _unchanged
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                 "X-Accel-Buffering": "no", **extra_headers},
    )
    await response.prepare(request)
    record.status = 200
    rename = model_renamer(call.answer_model)
    try:
        while chunk := await attempt.next_chunk():
            out = rename(translate(relay.feed(chunk)))
            if out:
                if record.ttft_s is None:
                    record.ttft_s = attempt.clock() - record.started
                    attempt.first_token()
                await _write(request, response, out, attempt.end, write_idle_s)
        out = rename(translate(relay.leftover()))
        if out:
            await _write(request, response, out, attempt.end, write_idle_s)
        if not relay.finished:
            raise upstream_failure(
                502, f"The upstream {attempt.target.label} ended the stream early.",
                "upstream_stream_cut",
            )
    except GatewayError as exc:
        # The status line is gone: end the stream with an error event the SDKs understand.
        record.outcome, record.error_code = "upstream_error", exc.code
        await _write_quietly(request, response, exc.sse_event(call.route.dialect))
    finally:
        record.usage = relay.final_usage()
        # A side not reported readably (none came, the stream was cut before it, or it was
        # missing or unreadable) is estimated, not free: the provider read the prompt and
        # sent these deltas.
        relayed = relay.relayed_output_tokens
        record.usage.fill_in(record.input_if_unreported, relayed)
        if not relay.usage_final:  # cut before the final usage: a start event's is partial
            record.usage.output_tokens = max(record.usage.output_tokens, relayed)
            calls = record.usage.tool_calls  # and the tools billed per call it saw run
            for tool, seen in relay.tool_calls_seen.items():
                calls[tool] = max(calls.get(tool, 0), seen)
    await _write_eof_quietly(request, response)
    return response


def model_renamer(answer_model: str | None) -> Callable[[bytes], bytes]:
    """Stream events with their ``model`` field saying ``answer_model`` (answer_model: alias):
    chat and completion chunks, Responses' ``response`` object, Anthropic's ``message_start``.

    Byte-level, because every chat chunk carries the field and parsing each would cost more
    than relaying it. In each event the first ``"model": "<string>"`` is the answer's model
    (whatever name the provider answered with, a dated snapshot included): it comes before
    the choices, output and metadata in every provider's events, and a quote inside a JSON
    string is escaped, so text the model wrote (streamed tool arguments are strings too)
    never matches."""
    if answer_model is None:
        return _unchanged
    pattern = re.compile(rb'("model"\s*:\s*)"(?:[^"\\]|\\.)*"')
    name = orjson.dumps(answer_model)

    def rename(data: bytes) -> bytes:
        if b'"model"' not in data:
            return data
        return b"\n\n".join(pattern.sub(lambda m: m.group(1) + name, event, count=1)
                             for event in data.split(b"\n\n"))

    return rename


def _unchanged(data: bytes) -> bytes:
    return data


async def _write(request: web.Request, response: web.StreamResponse, data: bytes,
                 until: float, idle_s: float | None = None) -> None:
    """Write within ``idle_s`` and by ``until`` at the latest: a client that stopped reading
    must not hold the upstream call, its slots and leases. ``write`` only
    waits when the socket's buffer is full, so this bounds a write that makes no progress."""
    loop = asyncio.get_running_loop()
    # The loop's own clock, not the gateway's: timeout_at runs on it (``until`` is
    # ``UpstreamAttempt.end``, on the same clock).
    deadline = until if idle_s is None else min(until, loop.time() + idle_s)
    try:
        async with asyncio.timeout_at(deadline):
            await response.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("the client stopped reading the stream") from None


async def _write_quietly(request: web.Request, response: web.StreamResponse,
                         data: bytes) -> None:
    try:
        await _write(request, response, data, asyncio.get_running_loop().time() + 1.0)
    except (ConnectionError, RuntimeError):
        pass  # the client is gone too; nothing left to tell it


async def _write_eof_quietly(request: web.Request, response: web.StreamResponse) -> None:
    try:
        async with asyncio.timeout(1.0):
            await response.write_eof()
    except (ConnectionError, RuntimeError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()
