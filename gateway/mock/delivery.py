"""How the mock upstream puts an answer on the wire, and how it breaks it on request.

Route handlers in ``gateway.mock.upstream`` decide *what* to answer (bytes or a
``StreamPlan`` from ``gateway.mock.sse``); this module decides *how* it reaches the client:
a whole body, or a stream paced by the TTFT and chunk-gap knobs, and the injected failures
that only make sense at the transport level (drop, hang, cutting the connection or ending
the stream with an error part-way). It is separate because this is the timing- and
socket-sensitive code the fault tests exercise, and it needs no app state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import sse
from .knobs import Knobs
from .sse import Provider

HANG_LIMIT_S = 600.0
JSON_HEADERS = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class Call:
    """What a route handler needs once the common checks have passed."""

    provider: Provider
    body: dict[str, Any]
    knobs: Knobs
    failure: str | None  # "midstream-cut" / "midstream-error" when injected, else None
    # Capacity mode: a non-streaming answer also waits its generation time (TTFT + chunk gaps)
    # so it holds its slot as long as the same answer streamed would.
    in_slot: bool = False


def error_response(provider: Provider, status: int, message: str,
                   knobs: Knobs | None = None) -> web.Response:
    """An error answer in ``provider``'s body shape."""
    headers = dict(JSON_HEADERS)
    if knobs is not None:  # only injected errors carry the retry hints
        if knobs.retry_after is not None:
            headers["Retry-After"] = knobs.retry_after
        if knobs.retry_after_ms is not None:
            headers["retry-after-ms"] = knobs.retry_after_ms
    return web.Response(status=status, body=sse.error_body(provider, status, message),
                        headers=headers)


def drop(request: web.Request) -> web.Response:
    """``x-mock-fail: drop``: close the connection without an answer."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp fails to write this to the closed transport and treats it as a client
    # disconnect: nothing reaches the wire and nothing is logged as an error.
    return web.Response()


async def hang(request: web.Request, stopping: asyncio.Event) -> web.Response:
    """``x-mock-fail: hang``: send nothing until the client leaves, ``stopping`` is set (app
    shutdown) or ``HANG_LIMIT_S`` passes, then drop the connection."""
    # Polling beats relying on handler cancellation, which aiohttp turns off by default.
    deadline = asyncio.get_running_loop().time() + HANG_LIMIT_S
    while asyncio.get_running_loop().time() < deadline and not stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        await asyncio.sleep(0.05)
    return drop(request)


async def _abort(request: web.Request) -> None:
    """Reset the connection once what was written has left (abort discards the buffer)."""
    transport = request.transport
    if transport is None:
        return
    for _ in range(1000):  # bounded: ~1 s for a client that stopped reading
        if not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.001)
    transport.abort()


async def reply(request: web.Request, call: Call, body: bytes) -> web.StreamResponse:
    """A non-streaming answer, or its injected mid-answer failure."""
    if call.failure == "midstream-cut":
        resp = web.StreamResponse(headers=JSON_HEADERS)
        resp.content_length = len(body)  # promise the full body, deliver half
        try:
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
        except ConnectionError:
            return resp  # the client left first
        await _abort(request)
        return resp
    if call.failure == "midstream-error":
        status = _midstream_status(call)
        return error_response(call.provider, status, f"mock upstream injected status {status}",
                              call.knobs)
    return web.Response(body=body, headers=JSON_HEADERS)


def _midstream_status(call: Call) -> int:
    # Anthropic's typical mid-stream failure is overload; OpenAI's is a plain server error.
    return call.knobs.status or (529 if call.provider == "anthropic" else 500)


async def stream(request: web.Request, call: Call, plan: sse.StreamPlan) -> web.StreamResponse:
    """Write ``plan`` chunk by chunk (each ``write`` goes straight to the socket)."""
    knobs = call.knobs
    resp = web.StreamResponse(headers=_SSE)
    try:
        await resp.prepare(request)  # sends the headers now, before TTFT
        for part in plan.preamble:
            await resp.write(part)
        if knobs.ttft_s:
            await asyncio.sleep(knobs.ttft_s)
        stop_at = knobs.fail_after if call.failure else plan.chunks
        sent = 0
        while sent < plan.chunks:
            if sent and knobs.gap_s:
                await asyncio.sleep(knobs.gap_s)
            elif sent and not sent % 256:
                await asyncio.sleep(0)  # long gap-less streams must not starve other requests
            if sent == stop_at:
                break
            await resp.write(plan.chunk(sent))
            sent += 1
        if call.failure == "midstream-cut":
            await _abort(request)
            return resp
        if call.failure == "midstream-error":
            await resp.write(plan.error(sent, _midstream_status(call)))
        else:
            for part in plan.trailer:
                await resp.write(part)
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left; aiohttp's own write_eof then sees it and logs nothing
    return resp
