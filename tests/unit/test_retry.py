"""Retry decisions and the retry budget: what gets retried, how long it waits, and how
much extra load retries can cause. Pure functions; randomness is a seeded Random."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from gateway.config.retry import RetryPolicy
from gateway.upstream.retry import (
    AttemptFailure,
    RetryBudget,
    backoff_s,
    decide_retry,
    error_hint,
    gave_up_headers,
    parse_retry_after,
)

POLICY = RetryPolicy()


def http(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> AttemptFailure:
    return AttemptFailure.from_response(status, headers or {}, body)


def decide(failure: AttemptFailure, *, attempt: int = 1, remaining_s: float = 60.0,
           failover: bool = False, seed: int = 0) -> tuple[bool, str]:
    d = decide_retry(POLICY, failure, attempt=attempt, remaining_s=remaining_s,
                     rng=random.Random(seed), failover_available=failover)
    return d.retry, d.reason


OPENAI_CONTEXT = (b'{"error": {"message": "This model\'s maximum context length is 8192 tokens",'
                  b' "type": "invalid_request_error", "code": "context_length_exceeded"}}')
ANTHROPIC_CONTEXT = (b'{"type": "error", "error": {"type": "invalid_request_error", '
                     b'"message": "prompt is too long: 210000 tokens > 200000 maximum"}}')
AZURE_FILTER = (b'{"error": {"code": "content_filter", "message": "The response was filtered",'
                b' "innererror": {"code": "ResponsibleAIPolicyViolation"}}}')


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (AttemptFailure.connect_error(), "connect_error"),
        (AttemptFailure.first_byte_timeout(), "first_byte_timeout"),
        (http(408), "http_408"),
        (http(409), "http_409"),
        (http(429), "http_429"),
        (http(500), "http_500"),
        (http(502), "http_502"),
        (http(503), "http_503"),
        (http(529, b'{"type":"error","error":{"type":"overloaded_error"}}'), "http_529"),
    ],
)
def test_retried(failure: AttemptFailure, reason: str) -> None:
    assert decide(failure) == (True, reason)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (http(400), "not_retryable"),
        (http(401), "not_retryable"),
        (http(403), "not_retryable"),
        (http(404), "not_retryable"),
        (http(422), "not_retryable"),
        (http(501), "not_retryable"),
        (http(400, OPENAI_CONTEXT), "context_length_exceeded"),
        (http(400, ANTHROPIC_CONTEXT), "context_length_exceeded"),
        (http(500, OPENAI_CONTEXT), "context_length_exceeded"),  # whatever the status says
        (http(400, AZURE_FILTER), "content_filter"),
        (http(503, AZURE_FILTER), "content_filter"),
        (AttemptFailure.stream_cut(), "stream_cut"),  # the client already has bytes
    ],
)
def test_not_retried(failure: AttemptFailure, reason: str) -> None:
    assert decide(failure) == (False, reason)
    assert decide(failure, failover=True) == (False, reason)


def test_at_most_max_attempts_failovers_included() -> None:
    assert decide(http(503), attempt=2, failover=True)[0]
    assert decide(http(503), attempt=3, failover=True) == (False, "max_attempts")
    one = RetryPolicy(max_attempts=1)
    assert not decide_retry(one, http(503), attempt=1, remaining_s=60, rng=random.Random()).retry
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=6)


def test_failover_goes_first_and_without_waiting() -> None:
    d = decide_retry(POLICY, http(503, headers={"retry-after": "5"}), attempt=1, remaining_s=60,
                     rng=random.Random(1), failover_available=True)
    assert (d.retry, d.failover, d.delay_s) == (True, True, 0.0)


def test_429_is_retried_only_when_its_retry_after_fits_the_deadline() -> None:
    assert decide(http(429, headers={"retry-after": "20"}), remaining_s=10) == (
        False, "retry_after_too_long")
    assert decide(http(429, headers={"retry-after-ms": "12000"}), remaining_s=10)[0] is False
    d = decide_retry(POLICY, http(429, headers={"retry-after": "2"}), attempt=1, remaining_s=10,
                     rng=random.Random(3))
    assert d.retry and not d.failover and d.delay_s == pytest.approx(2.0)
    # Another deployment is not bound by this one's Retry-After.
    assert decide(http(429, headers={"retry-after": "20"}), remaining_s=10, failover=True)[0]


def test_the_same_deployment_is_retried_only_once_it_is_usable_again() -> None:
    """A 429 without Retry-After still cools the deployment down; an open breaker too."""
    d = decide_retry(POLICY, http(429), attempt=1, remaining_s=30, rng=random.Random(2),
                     deployment_wait_s=1.0)
    assert d.retry and d.delay_s >= 1.0
    d = decide_retry(POLICY, http(503), attempt=1, remaining_s=5, rng=random.Random(2),
                     deployment_wait_s=9.0)  # this failure tripped its breaker
    assert (d.retry, d.reason, d.gave_up) == (False, "deadline", True)


def test_no_retry_once_the_deadline_is_gone() -> None:
    assert decide(http(503), remaining_s=0) == (False, "deadline")
    assert decide(http(503), remaining_s=0.001, seed=5) == (False, "deadline")


@pytest.mark.parametrize("retry", [0, 1, 2, 3, 4, 5, 8])
def test_backoff_is_full_jitter_under_the_cap(retry: int) -> None:
    rng = random.Random(retry)
    ceiling = min(POLICY.backoff_cap_s, POLICY.backoff_base_s * 2**retry)
    delays = [backoff_s(POLICY, retry, rng) for _ in range(500)]
    assert all(0 <= d <= ceiling for d in delays)
    assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling  # spread, not fixed


def test_backoff_never_undercuts_the_upstream_retry_after() -> None:
    rng = random.Random(9)
    for retry in range(6):
        assert all(backoff_s(POLICY, retry, rng, floor_s=2.5) >= 2.5 for _ in range(100))
    slow_down = http(503, headers={"retry-after-ms": "750"})
    d = decide_retry(POLICY, slow_down, attempt=2, remaining_s=30, rng=rng)
    assert d.retry and d.delay_s >= 0.75


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"Retry-After": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    date = format_datetime(datetime(2026, 1, 2, 3, 4, 35, tzinfo=UTC), usegmt=True)
    assert parse_retry_after({"retry-after": date}, now_epoch_s=now) == 30.0
    assert parse_retry_after({"retry-after": date}) is None  # a date needs the wall clock
    assert parse_retry_after({"retry-after": date}, now_epoch_s=now + 60) == 0.0


def test_error_hint_keeps_other_upstream_codes() -> None:
    assert error_hint(b'{"error": {"code": "rate_limit_exceeded", "message": "slow down"}}') == (
        "rate_limit_exceeded")
    assert error_hint(b"<html>bad gateway</html>") is None
    assert error_hint(b"") is None
    assert error_hint(b'["not", "an", "error"]') is None


def test_gave_up_only_when_a_retryable_failure_ran_out_of_attempts_or_time() -> None:
    def gave_up(failure: AttemptFailure, attempt: int, remaining_s: float) -> bool:
        rng = random.Random(0)
        return decide_retry(POLICY, failure, attempt=attempt, remaining_s=remaining_s,
                            rng=rng).gave_up

    assert gave_up(http(503), 3, 60)
    assert gave_up(AttemptFailure.connect_error(), 1, 0)
    assert gave_up(http(429, headers={"retry-after": "90"}), 1, 60)
    assert not gave_up(http(400), 1, 60)
    assert not gave_up(http(503), 1, 60)  # it is retried


def test_gave_up_headers() -> None:
    assert gave_up_headers(3) == {"x-should-retry": "false", "x-gateway-attempts": "3"}


# --- the budget ------------------------------------------------------------------------------


def run(fail_share: float, requests: int, seed: int, deployments: int = 1) -> tuple[int, int]:
    """Requests through the attempt loop the pipeline runs; -> (succeeded, attempts)."""
    rng, budget = random.Random(seed), RetryBudget(POLICY)
    names = [f"dep{i}" for i in range(deployments)]
    succeeded = attempts = 0
    for _ in range(requests):
        tried: list[str] = []
        dep = names[0]
        while True:
            attempts += 1
            tried.append(dep)
            if rng.random() >= fail_share:
                budget.record_success(dep)
                succeeded += 1
                break
            untried = [n for n in names if n not in tried]
            d = decide_retry(POLICY, http(503), attempt=len(tried), remaining_s=60, rng=rng,
                             failover_available=bool(untried))
            if not (d.retry and budget.try_spend(dep)):
                break
            dep = untried[0] if d.failover else dep
    return succeeded, attempts


@pytest.mark.parametrize("deployments", [1, 2])
def test_a_total_outage_adds_under_ten_percent_load(deployments: int) -> None:
    succeeded, attempts = run(1.0, 1000, seed=1, deployments=deployments)
    assert succeeded == 0
    assert attempts <= 1.1 * 1000


@pytest.mark.parametrize("seed", range(10))
def test_with_a_fifth_failing_retries_still_rescue_almost_everything(seed: int) -> None:
    succeeded, attempts = run(0.2, 1000, seed=seed)
    assert succeeded >= 950
    assert attempts <= 1.3 * 1000  # ~budget_ratio of successes, not 3x


def test_budget_starts_with_a_few_tokens_and_counts_exhaustion() -> None:
    refused: list[str] = []
    budget = RetryBudget(POLICY, on_exhausted=refused.append)
    assert [budget.try_spend("a") for _ in range(4)] == [True, True, True, False]
    for _ in range(4):
        budget.record_success("a")
    assert budget.try_spend("a") and not budget.try_spend("a")
    assert budget.try_spend("b")  # per deployment
    assert refused == ["a", "a"]
    assert budget.snapshot()["a"].exhausted == 2
    for _ in range(1000):
        budget.record_success("a")
    assert budget.tokens("a") == POLICY.budget_max_tokens
