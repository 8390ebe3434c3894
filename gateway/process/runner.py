"""The aiohttp runner the gateway serves on: requests aiohttp cannot parse get OpenAI's error shape.

aiohttp refuses a request its HTTP parser cannot read (a garbage request line, a header line
too long, too many headers, a bad Content-Length or chunk size, bytes not allowed in the path)
before any route or middleware runs, so the error boundary in ``app/server.py`` never sees it. Left
alone, aiohttp answers a ``text/plain`` 400 whose body quotes the offending line, and logs that
line at ERROR with a traceback: when the line is ``Authorization: Bearer sk-...`` with one bad
byte in it, the key lands in the log. Here the answer is ``{"error": {...}}`` like every other
4xx, it names only the kind of problem, and the log line carries no request bytes.

This hooks aiohttp's connection class (``RequestHandler.handle_error``), reached through
``AppRunner._make_server``: the one place aiohttp builds the protocol factory.
``tests/integration/test_fuzz.py`` pins the wire format, so an aiohttp upgrade that moves either fails there.

The same class enforces the connection caps (process/connections.py) in ``connection_made``, before
aiohttp reads a byte, and closes a connection that delivers no complete request head within
``server.header_read_timeout_s`` (aiohttp only has keepalive_timeout, which also bounds idle
keep-alive between requests and so must stay long). ``tests/integration/test_connections.py`` pins both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import GatewayError, InternalError

from .connections import ConnectionGuard

log = logging.getLogger("gateway.server")

# Without a policy (a bare app under this runner): the same bound as server.header_read_timeout_s.
DEFAULT_HEADER_READ_TIMEOUT_S = 15.0
# aiohttp's C parser formats its errors as "<llhttp's reason>:\n\n  <the line>\n  <pointer>";
# the reason is a fixed text ("Invalid header value char"), the line is the client's bytes.
_QUOTE_MARK = ":\n\n"
# Messages of aiohttp's own exceptions may quote the client's bytes too: a fixed text per kind.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "the request line or a header is too long"),
    (http_exceptions.BadHttpMethod, "the request line is not HTTP"),
    (http_exceptions.BadStatusLine, "the request line is not HTTP"),
    (http_exceptions.InvalidURLError, "the request path is not a valid URL path"),
    (http_exceptions.InvalidHeader, "a header name or value is invalid"),
    (http_exceptions.ContentLengthError, "the body does not match its Content-Length"),
    (http_exceptions.TransferEncodingError, "the chunked body is malformed"),
)


def parse_error_reason(exc: BaseException | None) -> str:
    """What was wrong with a request the parser refused, without quoting any of its bytes."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, http_exceptions.HttpProcessingError) and _QUOTE_MARK in exc.message:
        return exc.message.split(_QUOTE_MARK, 1)[0][:100]
    return "the request is not valid HTTP/1.1"


class _OpenAIShapedErrors(RequestHandler):
    """One client connection: counted against the connection caps, its request heads timed,
    and its answer to an unparseable request in OpenAI's shape."""

    __slots__ = ("_guard", "_head_timer", "_heads_at_arming", "_peer", "_refused", "_slot")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._peer: str | None = None
        self._slot: str | None = None  # the guard's key while this connection is counted
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_at_arming = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard is not None:
            peer = transport.get_extra_info("peername")
            self._peer = peer[0] if isinstance(peer, tuple) and peer else None
            self._slot, refused = guard.admit(self._peer)
            if refused is not None:
                self._refused = True
                # Closed before aiohttp sees it: no byte read, no task, no timer; the fd is
                # freed now rather than when the client gives up.
                cast(asyncio.Transport, transport).abort()
                return
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._slot is not None and self._guard is not None:
            self._guard.release(self._slot)
            self._slot = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._refused:
            return  # closed in connection_made: aiohttp never tracked it
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a complete head arrived: its timer is done
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif data and self._head_timer is None and self._current_request is None \
                and not self._messages:
            # The first bytes of a next request on an idle keep-alive connection.
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        timeout = (self._guard.header_read_timeout_s if self._guard is not None
                   else DEFAULT_HEADER_READ_TIMEOUT_S)
        self._heads_at_arming = self._request_count
        self._head_timer = self._loop.call_later(timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if (self._force_close or self.transport is None
                or self._request_count != self._heads_at_arming
                or self._current_request is not None or self._messages):
            return  # a head arrived (or the connection is closing anyway)
        if self._guard is not None:
            self._guard.refused("header_timeout", self._peer)
        self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError) and request.writer.output_size > 0:
            # A client gone (or dropped for not reading, upstream/relay.py) mid-response: logged by the
            # access log as client_disconnected, not a bug of ours worth a traceback.
            raise ConnectionError("the client connection is gone") from exc
        if status >= 500:  # a bug of ours in a handler: keep aiohttp's traceback in the log
            self.log_exception("error handling request", exc_info=exc)
            error: GatewayError = InternalError("the gateway failed to handle this request",
                                                status=status)
        else:
            reason = parse_error_reason(exc)
            log.info("unparseable request refused", extra={"fields": {
                "status": status, "reason": reason, "error": type(exc).__name__}})
            error = GatewayError(status, f"malformed HTTP request: {reason}",
                                 code="malformed_request")
        if request.writer.output_size > 0:  # aiohttp's contract: the connection is broken
            raise ConnectionError("the response started already; cannot send an error")
        resp = web.Response(status=status, body=error.body(), content_type="application/json")
        resp.force_close()  # the parser's position in the byte stream is lost
        return resp


class _Server(web.Server):
    guard: ConnectionGuard | None

    def __call__(self) -> RequestHandler:
        return _OpenAIShapedErrors(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are capped, must send their request heads in time,
    and answer unparseable requests in OpenAI's error shape."""

    async def _make_server(self) -> web.Server:
        from gateway.app import GATEWAY  # app/server.py builds the app this runner serves

        server = await super()._make_server()
        server.__class__ = _Server  # same state, another protocol factory
        assert isinstance(server, _Server)
        gateway = self.app.get(GATEWAY)
        server.guard = None if gateway is None else ConnectionGuard(
            lambda: gateway.policy.config, gateway.metrics, clock=gateway.clock)
        return server
