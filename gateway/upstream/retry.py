"""Retry decisions and retry budgets for upstream attempts (pipeline step 10).

- ``AttemptFailure`` describes how one attempt failed, built from what the upstream client
  saw (a connect error, a first-byte timeout, a status with headers and body).
- ``decide_retry`` is pure: failure, attempt number, remaining deadline, randomness in ->
  ``RetryDecision`` out. Retried: connect errors, first-byte timeouts, 408, 409, 5xx (but
  501), 529, and 429 when its Retry-After fits the deadline. Never: other 4xx,
  context-length or content-filter errors, anything after the response started. Failover
  to another deployment goes first and without delay; a retry of the same deployment waits
  a full-jitter backoff, floored at the upstream's Retry-After.
- ``RetryBudget`` caps retries per deployment with a token bucket, so a total outage adds
  almost no load: only successes refill it.
- ``gave_up_headers`` tells SDKs not to retry on top of the gateway.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import orjson

from gateway.config import RetryPolicy

FailureKind = Literal["connect_error", "first_byte_timeout", "http_status", "stream_cut"]

CONTEXT_LENGTH = "context_length_exceeded"
CONTENT_FILTER = "content_filter"
# Upstream error codes that mean the same request can never succeed, whatever its status.
_CONTEXT_CODES = frozenset({CONTEXT_LENGTH, "context_window_exceeded", "string_above_max_length"})
_FILTER_CODES = frozenset({CONTENT_FILTER, "content_policy_violation",
                           "responsibleaipolicyviolation", "content_filtered"})
GAVE_UP_REASONS = frozenset({"max_attempts", "deadline", "retry_after_too_long"})
_CONTEXT_PHRASES = ("maximum context length", "context length", "context window",
                    "prompt is too long", "input is too long")
_FILTER_PHRASES = ("content management policy", "content filter", "content_filter",
                   "content policy")


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """How one attempt failed. ``stream_cut``: after the first byte (never retried)."""

    kind: FailureKind
    status: int | None = None
    error_code: str | None = None  # context_length_exceeded, content_filter or upstream's
    retry_after_s: float | None = None  # upstream's retry-after-ms / retry-after

    @classmethod
    def connect_error(cls) -> AttemptFailure:
        """No response: connect refused/reset/TLS, or the connection closed before headers."""
        return cls("connect_error")

    @classmethod
    def first_byte_timeout(cls) -> AttemptFailure:
        """Connect or first-byte (response headers) timeout."""
        return cls("first_byte_timeout")

    @classmethod
    def stream_cut(cls) -> AttemptFailure:
        """Anything that fails after the upstream's first byte (idle/total timeout, cut)."""
        return cls("stream_cut")

    @classmethod
    def from_response(
        cls,
        status: int,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        now_epoch_s: float | None = None,
    ) -> AttemptFailure:
        """An error status with its headers and (error) body. ``now_epoch_s`` (wall clock)
        is needed only to read an HTTP-date Retry-After."""
        return cls("http_status", status, error_hint(body),
                   parse_retry_after(headers, now_epoch_s=now_epoch_s))

    @property
    def label(self) -> str:
        """Bounded outcome label: ``http_503``, ``connect_error``, ... (metrics, logs)."""
        return f"http_{self.status}" if self.kind == "http_status" else self.kind


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """``retry`` False: give up, ``reason`` says why. True: ``reason`` is the failure's
    label; with ``failover`` go to another deployment now, else wait ``delay_s`` and try
    the same one again."""

    retry: bool
    reason: str
    delay_s: float = 0.0
    failover: bool = False

    @property
    def gave_up(self) -> bool:
        """Not retried although the failure was retryable (attempts, deadline): answer
        with ``gave_up_headers`` so the client's SDK does not retry on top."""
        return not self.retry and self.reason in GAVE_UP_REASONS


def decide_retry(
    policy: RetryPolicy,
    failure: AttemptFailure,
    *,
    attempt: int,
    remaining_s: float,
    rng: random.Random,
    failover_available: bool = False,
    deployment_wait_s: float = 0.0,
) -> RetryDecision:
    """Whether and how to retry after ``attempt`` (1-based, the one that failed) failed.

    ``remaining_s``: time left until the request's deadline. ``failover_available``: a
    usable deployment of the model that this request has not tried yet exists.
    ``deployment_wait_s``: how long until the failed deployment is usable again (its
    cooldown or open breaker: ``BreakerBoard.retry_after_s([it])`` after recording the
    outcome), a floor for retrying it like Retry-After. The retry budget is checked by the
    caller (``RetryBudget.try_spend``) only when this says retry.
    """
    refusal = _refusal(failure)
    if refusal is not None:
        return RetryDecision(False, refusal)
    if attempt >= policy.max_attempts:
        return RetryDecision(False, "max_attempts")
    if remaining_s <= 0:
        return RetryDecision(False, "deadline")
    if failover_available:
        # Another deployment never asked us to wait, and backoff protects the one that
        # failed, so fail over at once; the budget bounds the extra load.
        return RetryDecision(True, failure.label, 0.0, failover=True)
    retry_after = failure.retry_after_s or 0.0
    delay = backoff_s(policy, attempt - 1, rng, floor_s=max(retry_after, deployment_wait_s))
    if delay >= remaining_s:
        return RetryDecision(
            False, "retry_after_too_long" if retry_after >= remaining_s else "deadline")
    return RetryDecision(True, failure.label, delay)


def _refusal(failure: AttemptFailure) -> str | None:
    """Why this failure must not be retried at all, or None when it may be."""
    if failure.kind == "stream_cut":
        return "stream_cut"
    if failure.error_code in (CONTEXT_LENGTH, CONTENT_FILTER):
        return failure.error_code
    if failure.kind != "http_status":
        return None
    status = failure.status or 0
    if status in RETRYABLE_4XX or (status >= 500 and status != 501):
        return None  # 501 Not Implemented fails the same way every time
    return "not_retryable"


# Below 500, what the official SDKs retry, and so does the gateway.
RETRYABLE_4XX = frozenset({408, 409, 429})


def backoff_s(policy: RetryPolicy, retry: int, rng: random.Random, floor_s: float = 0.0) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**retry)), at least ``floor_s``.
    ``retry`` is 0 for the first retry."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0 ** min(retry, 30))
    return max(rng.uniform(0.0, ceiling), floor_s)


def parse_retry_after(
    headers: Mapping[str, str], *, now_epoch_s: float | None = None
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred: finer) or ``retry-after``
    (delay-seconds or an HTTP-date, which needs ``now_epoch_s``). None when absent or
    unreadable; never negative."""
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        value = _number(ms)
        if value is not None:
            return value / 1000
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    value = _number(raw)
    if value is not None:
        return value
    if now_epoch_s is None:
        return None
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; a zoneless one is not a valid HTTP-date
    return max(0.0, when.timestamp() - now_epoch_s)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; aiohttp's CIMultiDict is not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if value is not None else None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None


def error_hint(body: bytes) -> str | None:
    """The upstream's error code from an OpenAI- or Anthropic-style error body, normalised
    to ``context_length_exceeded`` / ``content_filter`` where it means one of those."""
    try:
        data: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    inner = error.get("innererror")  # Azure OpenAI
    fields = (error.get("code"), error.get("type"), error.get("message"),
              inner.get("code") if isinstance(inner, dict) else None)
    code, kind, message, inner_code = (f.lower() if isinstance(f, str) else "" for f in fields)
    codes = {code, kind, inner_code}
    if codes & _CONTEXT_CODES or any(p in message for p in _CONTEXT_PHRASES):
        return CONTEXT_LENGTH
    if codes & _FILTER_CODES or any(p in message for p in _FILTER_PHRASES):
        return CONTENT_FILTER
    # Anthropic's errors have a type and no code (overloaded_error); logs keep at most 64 chars
    return (code or kind)[:64] or None


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    tokens: float
    exhausted: int  # retries refused since startup


class RetryBudget:
    """Token bucket per deployment: ``budget_ratio`` per success, 1 per retry.

    A retry (failover or not) is charged to the deployment whose failure caused it, so a
    healthy deployment banks up to ``budget_max_tokens`` for the moment it dies, until its
    breaker opens. Starts at ``budget_min_tokens``. In a total outage nothing refills it:
    after the banked tokens, extra load -> 0. With a failing share f, retries are funded up
    to about ``ratio * (1 - f)`` per request. Per process, not shared: no I/O on the hot path.
    """

    def __init__(
        self, policy: RetryPolicy, *, on_exhausted: Callable[[str], None] | None = None
    ) -> None:
        self._policy = policy
        self._on_exhausted = on_exhausted
        self._tokens: dict[str, float] = {}
        self._exhausted: dict[str, int] = {}

    def try_spend(self, deployment: str) -> bool:
        """Take one token for a retry caused by ``deployment`` failing; False (counted as
        exhaustion) when it has less than one."""
        tokens = self._tokens.get(deployment, self._policy.budget_min_tokens)
        if tokens >= 1.0:
            self._tokens[deployment] = tokens - 1.0
            return True
        self._exhausted[deployment] = self._exhausted.get(deployment, 0) + 1
        if self._on_exhausted is not None:
            self._on_exhausted(deployment)
        return False

    def record_success(self, deployment: str) -> None:
        """An attempt on ``deployment`` succeeded (any attempt, first or retry)."""
        tokens = self._tokens.get(deployment, self._policy.budget_min_tokens)
        self._tokens[deployment] = min(self._policy.budget_max_tokens,
                                       tokens + self._policy.budget_ratio)

    def tokens(self, deployment: str) -> float:
        return self._tokens.get(deployment, self._policy.budget_min_tokens)

    def snapshot(self) -> dict[str, BudgetStatus]:
        names = self._tokens.keys() | self._exhausted.keys()
        return {n: BudgetStatus(self.tokens(n), self._exhausted.get(n, 0)) for n in names}


def gave_up_headers(attempts: int) -> dict[str, str]:
    """Headers for an upstream error the gateway answers after its own retries ended:
    the SDKs must not retry on top (they honour ``x-should-retry``)."""
    return {"x-should-retry": "false", "x-gateway-attempts": str(attempts)}
