"""Label values of the gateway's metrics, bounded by construction.

Kept apart from observability/metrics.py because both halves use it: the push side labels its counters and
histograms with these, the pull side filters the gauges its sources return through them. This
module is the one place to check that nothing taken from a request can become a label value.
"""

from __future__ import annotations

from gateway.config import GatewayConfig, Priority

NONE = "none"  # the value was missing (e.g. the tenant of an unauthenticated request)
OTHER = "other"  # a value outside the configured or fixed set

PRIORITIES = frozenset(p.name for p in Priority)
OUTCOMES = frozenset({"ok", "rejected", "shed", "error", "upstream_error", "upstream_rejected",
                      "client_disconnected"})
REJECTION_REASONS = frozenset({
    "rate_limited", "budget_exhausted", "loop_detected", "overloaded", "deadline_exceeded",
    "upstream_unavailable", "limits_unavailable", "invalid_request", "unauthenticated",
    "forbidden", "not_found", "too_large", "auth_failures", "run_budget_exceeded",
    "agent_loop_detected",
})
SHED_REASONS = frozenset({"queue_full", "cohort", "retry", "loop_lag", "open_streams", "memory"})
ATTEMPT_OUTCOMES = frozenset({"success", "http_429", "http_4xx", "http_5xx", "connect_error",
                              "timeout", "stream_cut", "breaker_open", "cancelled"})
BREAKER_STATES = ("closed", "half_open", "open")
RUN_CAPS = frozenset({"tokens", "cost", "steps", "age"})  # gateway/limits/runs.py
LOOP_ACTIONS = frozenset({"warn", "refuse", "shadow"})  # gateway/request/agent_loop.py
BUDGET_KINDS = frozenset({"daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"})
# Deferred requests (gateway/deferred/service.py)
DEFERRED_VIA = frozenset({"prefer", "shed"})
DIALECTS = frozenset({"openai", "anthropic"})
DEFERRED_OUTCOMES = frozenset({"succeeded", "failed", "expired", "cancelled"})
DEFERRED_RUN_RESULTS = frozenset({"answered", "retried", "lost", "interrupted", "no_slot"})
# The gateway's own error codes, so the error boundary can pass ``exc.code`` straight through.
_REASON_BY_CODE = {
    "rate_limit_exceeded": "rate_limited", "insufficient_quota": "budget_exhausted",
    "invalid_api_key": "unauthenticated", "invalid_admin_key": "unauthenticated",
    "too_many_auth_failures": "auth_failures", "model_not_allowed": "forbidden",
    "model_not_found": "not_found", "unknown_url": "not_found", "request_too_large": "too_large",
    "model_not_supported_on_route": "invalid_request", "unsupported_media_type": "invalid_request",
}
# Refusals whose code is not above (most 400s of a body that does not parse or validate carry
# none, the rest codes of their own): by their status.
_REASON_BY_STATUS = {400: "invalid_request", 401: "unauthenticated", 403: "forbidden",
                     404: "not_found", 405: "invalid_request", 413: "too_large",
                     415: "invalid_request", 422: "invalid_request"}


def bounded(value: str | None, allowed: frozenset[str]) -> str:
    if value is None:
        return NONE
    return value if value in allowed else OTHER


def rejection_reason(reason_or_code: str | None, status: int | None = None) -> str:
    """A bounded rejection reason from a reason name or one of the gateway's error codes, else
    from the answer's status."""
    if reason_or_code in REJECTION_REASONS:
        return reason_or_code
    reason = _REASON_BY_CODE.get(reason_or_code or "")
    if reason is None and status is not None:
        reason = _REASON_BY_STATUS.get(status)
    return reason or OTHER


def attempt_outcome(outcome: str | None) -> str:
    """``AttemptRecord.outcome`` (``http_503``, ``first_byte_timeout``, ...) to a fixed set."""
    if not outcome or outcome in ATTEMPT_OUTCOMES:
        return outcome or OTHER
    if outcome.startswith("http_") and outcome[5:].isdigit():
        status = int(outcome[5:])
        return "http_5xx" if status >= 500 else "http_4xx" if status >= 400 else "success"
    if outcome in ("server_error", "slow_first_byte"):  # breaker/board.py's failure kinds
        return "http_5xx" if outcome == "server_error" else "timeout"
    return "timeout" if "timeout" in outcome else OTHER


def breaker_state(state: str | None) -> str:
    """pybreaker's ``closed`` / ``open`` / ``half-open`` (or ``half_open``) to a label value."""
    value = (state or "").replace("-", "_").lower()
    return value if value in BREAKER_STATES else OTHER


class LabelBounds:
    """The label values one policy file allows."""

    def __init__(self, config: GatewayConfig) -> None:
        self.tenants = frozenset(config.tenants)
        self.models = frozenset(config.models)
        self.deployments = frozenset(
            d.label for m in config.models.values() for d in m.deployments)
