"""The aiohttp runner the gateway serves on: requests aiohttp cannot parse get OpenAI's error shape.

aiohttp refuses a request its HTTP parser cannot read (a garbage request line, a header line
too long, too many headers, a bad Content-Length or chunk size, bytes not allowed in the path)
before any route or middleware runs, so the error boundary in ``server.py`` never sees it. Left
alone, aiohttp answers a ``text/plain`` 400 whose body quotes the offending line, and logs that
line at ERROR with a traceback: when the line is ``Authorization: Bearer sk-...`` with one bad
byte in it, the key lands in the log. Here the answer is ``{"error": {...}}`` like every other
4xx, it names only the kind of problem, and the log line carries no request bytes.

This hooks aiohttp's connection class (``RequestHandler.handle_error``), reached through
``AppRunner._make_server``: the one place aiohttp builds the protocol factory.
``tests/test_fuzz.py`` pins the wire format, so an aiohttp upgrade that moves either fails there.
"""

from __future__ import annotations

import logging

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .errors import GatewayError

log = logging.getLogger("gateway.server")

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
    """One client connection; only its answer to an unparseable request differs from aiohttp's."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionError) and request.writer.output_size > 0:
            # A client gone (or dropped for not reading, relay.py) mid-response: logged by the
            # access log as client_disconnected, not a bug of ours worth a traceback.
            raise ConnectionError("the client connection is gone") from exc
        if status >= 500:  # a bug of ours in a handler: keep aiohttp's traceback in the log
            self.log_exception("error handling request", exc_info=exc)
            error = GatewayError(status, "the gateway failed to handle this request",
                                 type="server_error", code="internal_error")
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
    def __call__(self) -> RequestHandler:
        return _OpenAIShapedErrors(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests in OpenAI's error shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, another protocol factory
        return server
