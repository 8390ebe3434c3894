"""Errors the gateway itself produces, and how they look on the wire.

One exception, ``GatewayError``, carries everything a client needs: HTTP status, OpenAI error
``type`` and ``code``, the offending ``param`` and extra headers (Retry-After and friends). The
error boundary in ``app/server.py`` turns it into JSON in the caller's dialect:

- OpenAI routes:    ``{"error": {"message", "type", "code", "param"}}``
- Anthropic routes: ``{"type": "error", "error": {"type", "message"}}``

Once a stream has started the status line is gone; ``upstream/sse.py`` then ends the stream with an
error event in the same dialect instead.

Code that decides something from an error decides by its class, never by comparing its status,
code or message: ``TimedOut`` (504: ``UpstreamTimeout``, ``DeadlineExceeded``), ``Overloaded``
(503 shed), ``Unavailable`` (503: a dependency of the gateway is down, or it is draining),
``RateLimited`` and ``BudgetExceeded`` (429), ``UpstreamFailure`` (502), ``InternalError``
(500). Plain ``GatewayError`` is a refusal of the request itself (4xx). ``transient`` says
whether the same request can succeed later; ``server_fault`` whether the answer is a failure of
the service (5xx) rather than a refusal.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

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

    # Refused for now, not for what the request is: a deferred run that met it before any
    # upstream call is put back and tried again later (gateway/deferred/run.py). The 429 and
    # 5xx classes; a plain GatewayError (4xx) would fail the same way every time.
    transient: ClassVar[bool] = False

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

    @property
    def server_fault(self) -> bool:
        """A failure of the service (HTTP's 5xx class), not a refusal of this request (4xx):
        the access log's ``error`` vs ``rejected``, a span's error status."""
        return self.status >= 500

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


class TimedOut(GatewayError):
    """504: a time bound ran out (or cannot be met)."""

    transient = True


class UpstreamTimeout(TimedOut):
    """504: a bound ran out while waiting for the upstream. ``client_deadline``: the bound was
    the client's own deadline, so the answer is what a client-side timeout would have been
    and the client may retry it (``x-should-retry`` is not set to false)."""

    def __init__(self, message: str, code: str, *, client_deadline: bool = False) -> None:
        super().__init__(504, message, type="timeout_error", code=code,
                         headers={"x-should-retry": "true"} if client_deadline else None)
        self.client_deadline = client_deadline


class DeadlineExceeded(TimedOut):
    """504 ``deadline_exceeded``: the request's deadline cannot be met (gateway/admission/deadlines.py)."""

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(504, message, type="timeout_error", code="deadline_exceeded",
                         headers=headers)


class Overloaded(GatewayError):
    """503 ``overloaded``: the gateway sheds this request to protect itself or an upstream
    (admission, self-protection). The one error an ``on_shed`` deferral turns into a 202."""

    transient = True

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(503, message, type="overloaded", code="overloaded", headers=headers)


class Unavailable(GatewayError):
    """503: something the request needs is unavailable for now (the shared state, the deferred
    queue, every deployment of the model) or the gateway is draining."""

    transient = True

    def __init__(self, message: str, code: str, *, type: str = "server_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(503, message, type=type, code=code, headers=headers)


class RateLimited(GatewayError):
    """429 ``rate_limit_error``: a rate limit, the loop guard, a provider quota, a queue bound."""

    transient = True

    def __init__(self, message: str, code: str = "rate_limit_exceeded", *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(429, message, type="rate_limit_error", code=code, headers=headers)


class BudgetExceeded(GatewayError):
    """429 ``insufficient_quota``: a tenant budget or an agent run's cap."""

    transient = True

    def __init__(self, message: str, code: str = "insufficient_quota", *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(429, message, type="insufficient_quota", code=code, headers=headers)


class UpstreamFailure(GatewayError):
    """502 ``upstream_error``: the upstream could not be reached or answered unusably."""

    transient = True

    def __init__(self, message: str, code: str) -> None:
        super().__init__(502, message, type="upstream_error", code=code)


class InternalError(GatewayError):
    """500 ``internal_error``: a bug of the gateway's."""

    transient = True

    def __init__(self, message: str, *, status: int = 500) -> None:
        super().__init__(status, message, type="server_error", code="internal_error")


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def forbidden(message: str, *, code: str = "model_not_allowed") -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code, param="model")


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> GatewayError:
    return GatewayError(404, message, type="not_found_error", code=code, param=param)


def upstream_failure(status: Literal[502], message: str, code: str) -> UpstreamFailure:
    """The upstream could not be reached or answered unusably: 502 (its timeouts are
    ``UpstreamTimeout``)."""
    return UpstreamFailure(message, code)


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
