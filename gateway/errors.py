"""Errors the gateway itself produces, and how they look on the wire.

One exception, ``GatewayError``, carries everything a client needs: HTTP status, OpenAI error
``type`` and ``code``, the offending ``param`` and extra headers (Retry-After and friends). The
error boundary in ``server.py`` turns it into JSON in the caller's dialect:

- OpenAI routes:    ``{"error": {"message", "type", "code", "param"}}``
- Anthropic routes: ``{"type": "error", "error": {"type", "message"}}``

Once a stream has started the status line is gone; ``streaming.py`` then ends the stream with an
error event in the same dialect instead.
"""

from __future__ import annotations

import math
from typing import Literal

import orjson

Dialect = Literal["openai", "anthropic"]

# OpenAI error type -> Anthropic error type, for the same situation.
_ANTHROPIC_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "server_error": "api_error",
    "upstream_error": "api_error",
    "overloaded": "overloaded_error",
    "timeout_error": "api_error",
}


class GatewayError(Exception):
    """An error answered by the gateway rather than relayed from an upstream."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self, dialect: Dialect = "openai") -> bytes:
        if dialect == "anthropic":
            kind = _ANTHROPIC_TYPES.get(self.type, "api_error")
            return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "code": self.code,
                    "param": self.param,
                }
            }
        )

    def sse_event(self, dialect: Dialect = "openai") -> bytes:
        """The same error as one server-sent event, for a stream that already started."""
        if dialect == "anthropic":
            return b"event: error\ndata: " + self.body(dialect) + b"\n\n"
        return b"data: " + self.body(dialect) + b"\n\n"


class UpstreamTimeout(GatewayError):
    """504: a bound ran out while waiting for the upstream. ``client_deadline``: the bound was
    the client's own deadline, so the answer is what a client-side timeout would have been
    and the client may retry it (``x-should-retry`` is not set to false)."""

    def __init__(self, message: str, code: str, *, client_deadline: bool = False) -> None:
        super().__init__(504, message, type="timeout_error", code=code,
                         headers={"x-should-retry": "true"} if client_deadline else None)
        self.client_deadline = client_deadline


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(message: str, *, code: str = "model_not_allowed") -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code, param="model")


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, type="not_found_error", code=code, param=param)


def upstream_failure(status: int, message: str, code: str) -> GatewayError:
    """The upstream could not be reached or answered unusably (502/504)."""
    kind = "timeout_error" if status == 504 else "upstream_error"
    return GatewayError(status, message, type=kind, code=code)


# Longest wait an SDK is told to sleep through: the openai SDK ignores (and stops on) a
# Retry-After above 2 minutes, the anthropic SDK sleeps through any value. Beyond this the
# answer says ``x-should-retry: false`` and still carries the true Retry-After for the caller.
SDK_WAIT_MAX_MS = 60_000


def retry_headers(wait_ms: float | None) -> dict[str, str]:
    """The headers that tell a client when a retry can succeed.

    ``wait_ms``: the earliest time a retry can succeed, from now; ``Retry-After`` is it in
    whole seconds rounded up and ``retry-after-ms`` in milliseconds (which the SDKs prefer).
    Beyond ``SDK_WAIT_MAX_MS`` no SDK should sleep for it: ``x-should-retry: false`` as
    well. ``None``: no retry can ever succeed (the request alone is larger than a limit),
    so only ``x-should-retry: false``.
    """
    if wait_ms is None:
        return {"x-should-retry": "false"}
    ms = max(1, math.ceil(round(wait_ms, 3)))  # 700.0000000001 ms is 700 ms
    headers = {"Retry-After": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}
    if ms > SDK_WAIT_MAX_MS:
        headers["x-should-retry"] = "false"
    return headers
