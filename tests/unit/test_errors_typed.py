"""Decisions about the gateway's own errors are made on their classes (gateway/errors.py);
each class answers exactly what the status and code it replaced said."""

from __future__ import annotations

import orjson

from gateway.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    GatewayError,
    InternalError,
    Overloaded,
    RateLimited,
    TimedOut,
    Unavailable,
    UpstreamFailure,
    UpstreamTimeout,
    bad_request,
    upstream_failure,
)

# What a deferred run retried before the classes: a gateway error with one of these statuses.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})


def test_each_class_has_the_status_type_and_code_it_replaced() -> None:
    cases: list[tuple[GatewayError, int, str, str | None]] = [
        (UpstreamTimeout("t", "first_byte_timeout"), 504, "timeout_error", "first_byte_timeout"),
        (DeadlineExceeded("d"), 504, "timeout_error", "deadline_exceeded"),
        (Overloaded("o"), 503, "overloaded", "overloaded"),
        (Unavailable("u", "limits_unavailable"), 503, "server_error", "limits_unavailable"),
        (Unavailable("u", "upstream_unavailable", type="upstream_error"), 503,
         "upstream_error", "upstream_unavailable"),
        (RateLimited("r"), 429, "rate_limit_error", "rate_limit_exceeded"),
        (BudgetExceeded("b"), 429, "insufficient_quota", "insufficient_quota"),
        (BudgetExceeded("b", "run_budget_exceeded"), 429, "insufficient_quota",
         "run_budget_exceeded"),
        (upstream_failure(502, "f", "upstream_stream_cut"), 502, "upstream_error",
         "upstream_stream_cut"),
        (InternalError("i"), 500, "server_error", "internal_error"),
    ]
    for error, status, kind, code in cases:
        assert (error.status, error.type, error.code) == (status, kind, code), error
        assert orjson.loads(error.body())["error"] == {
            "message": str(error), "type": kind, "code": code, "param": None}
        assert error.transient == (status in RETRYABLE_STATUS)
        assert error.server_fault == (status >= 500)
    assert isinstance(upstream_failure(502, "f", "c"), UpstreamFailure)
    assert isinstance(UpstreamTimeout("t", "c"), TimedOut)


def test_refusals_of_the_request_itself_are_neither_transient_nor_faults() -> None:
    for error in (bad_request("no"), GatewayError(403, "gone", code="tenant_removed"),
                  GatewayError(404, "x"), GatewayError(409, "x")):
        assert not error.transient and not error.server_fault
