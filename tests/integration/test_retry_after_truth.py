"""The Retry-After truth table (docs/architecture.md, "Errors and backpressure"), one test per
row: every refusal carries the earliest time a retry can succeed, computed here from the
injected clocks, or says plainly that no retry will succeed soon.

Time is fake throughout (monotonic and wall clock); nothing sleeps.
"""

from __future__ import annotations

import calendar
import math
import random
from fractions import Fraction
from typing import Any

import pytest

from gateway.admission.deadlines import request_deadline
from gateway.admission.shed import overloaded_error
from gateway.breaker.board import BreakerBoard
from gateway.config.base import Priority
from gateway.config.breaker import BreakerPolicy
from gateway.config.limits import Degraded
from gateway.config.model import GatewayConfig
from gateway.deferred.service import unavailable
from gateway.errors import GatewayError
from gateway.limits.degraded import DegradedMode
from gateway.limits.limiter import Hold, Limiter
from gateway.pipeline.attempts import _quota_spent
from gateway.request.auth import Authenticator
from gateway.request.classifier import ROUTES, classify
from gateway.state import MemoryBackend
from gateway.state.plan import AdmitPlan, Gcra
from gateway.upstream.sse import Usage
from tests.gwtest import FakeClock, auth, chat, policy
from tests.plugin_gateway import MakeGateway

# 2026-12-06T21:00:00Z: three hours before the daily budget resets.
EVENING = calendar.timegm((2026, 12, 6, 21, 0, 0))

class World:
    """A Limiter on the memory backend with a fake monotonic clock and a fake wall clock."""

    def __init__(self, tenant: dict[str, Any], wall: float = EVENING) -> None:
        self.config: GatewayConfig = policy("http://127.0.0.1:9", tenants={"acme": tenant})
        self.clock = FakeClock(1000.0)
        self.wall = FakeClock(wall)
        self.state = MemoryBackend(clock=self.clock)
        degraded = DegradedMode(self.config.state.degraded, self.state, self.clock, "r1")
        self.limiter = Limiter(self.config, self.state, degraded, self.wall, clock=self.clock)
        self.tenant = Authenticator(self.config).authenticate(auth())
        self.n = 0

    async def admit(self, **body: Any) -> Hold:
        headers = {k: v for k, v in body.pop("headers", {}).items()}
        call = classify(ROUTES["/v1/chat/completions"], self.tenant, chat(**body),
                        headers, self.config)
        self.n += 1
        return await self.limiter.admit(call, f"r{self.n}", client_retry=False)

    async def refused(self, **body: Any) -> GatewayError:
        with pytest.raises(GatewayError) as info:
            await self.admit(**body)
        assert info.value.status == 429
        return info.value

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.wall.now += seconds

def says_retry_in(error: GatewayError, ms: int) -> None:
    """Retry-After is ``ms`` in whole seconds rounded up, retry-after-ms is ``ms``, and an SDK
    is free to retry (a wait of at most a minute)."""
    assert error.headers["retry-after-ms"] == str(ms)
    assert error.headers["Retry-After"] == str(max(1, math.ceil(ms / 1000)))
    assert "x-should-retry" not in error.headers

def says_not_soon(error: GatewayError, ms: int | None) -> None:
    """No retry succeeds soon: x-should-retry false, and the real wait (``None``: never)."""
    assert error.headers["x-should-retry"] == "false"
    if ms is None:
        assert "Retry-After" not in error.headers and "retry-after-ms" not in error.headers
    else:
        assert error.headers["retry-after-ms"] == str(ms)
        assert error.headers["Retry-After"] == str(math.ceil(ms / 1000))

# --- tenant limits (limits/limiter.py) ------------------------------------------------------------

async def test_requests_per_minute_until_the_bucket_lets_one_through() -> None:
    w = World({"limits": {"requests_per_minute": 60, "request_burst": 1}})
    await w.admit()
    says_retry_in(await w.refused(), 1000)  # one request per second
    w.advance(0.4)
    # the bucket lets one through in 600 ms, but the caller refused first was promised that
    # one: this one comes a request's interval later (item 3: no thundering herd)
    says_retry_in(await w.refused(), 1600)
    w.advance(1.6)
    await w.admit()  # the promised times have passed: only the bucket counts again
    w.advance(0.4)
    says_retry_in(await w.refused(), 600)

async def test_concurrent_refusals_of_one_bucket_are_promised_successive_times() -> None:
    # 30 requests/min with a burst of 3: every refusal at one instant sees the same bucket,
    # yet only one retry passes every 2 s; each is promised its own turn.
    w = World({"limits": {"requests_per_minute": 30}})
    for _ in range(3):
        await w.admit()
    for k in range(3):
        says_retry_in(await w.refused(), 2000 * (k + 1))
    # each turn is real: at the first promise exactly one retry passes
    w.advance(2.0)
    await w.admit()
    says_retry_in(await w.refused(), 2000 * 3)  # behind the two still promised
    # a client ignoring Retry-After piles up promises; they never push an answer past the
    # minute an SDK sits out (promises are estimates, not reservations)
    for _ in range(40):
        error = await w.refused()
    says_retry_in(error, 60_000)

async def test_tokens_per_minute_until_enough_tokens_are_back() -> None:
    # 6,000 tokens/min = 10 ms per token; a burst of 100 tokens.
    w = World({"limits": {"tokens_per_minute": 6000, "token_burst": 100},
               "default_max_tokens": 60})
    first = await w.admit()
    cost = first.reserved_tokens
    assert 2 * cost > 100 >= cost
    says_retry_in(await w.refused(), (2 * cost - 100) * 10)
    # a second refusal at the same instant queues behind the first: its reservation later
    says_retry_in(await w.refused(), (3 * cost - 100) * 10)

async def test_a_request_larger_than_the_token_burst_never_succeeds() -> None:
    w = World({"limits": {"tokens_per_minute": 6000, "token_burst": 100}})
    says_not_soon(await w.refused(max_tokens=500), None)

async def test_concurrency_from_the_running_durations_of_the_scopes_requests() -> None:
    w = World({"limits": {"max_concurrent": 1, "concurrency_wait_s": 0}})
    first = await w.admit()
    w.advance(0.3)
    # Nothing finished yet: a request is first expected to take 1 s; this one ran 0.3 s.
    says_retry_in(await w.refused(), 700)
    w.advance(1.7)
    await w.limiter.settle(first, Usage(), 0)  # it took 2 s: the scope's typical duration
    await w.admit()
    w.advance(0.5)
    says_retry_in(await w.refused(), 1500)
    w.advance(10)  # overdue: expected any moment, never 0 (an SDK would spin)
    says_retry_in(await w.refused(), 200)

async def test_concurrency_refusals_in_rounds_of_the_slots() -> None:
    w = World({"limits": {"max_concurrent": 2, "concurrency_wait_s": 0}})
    await w.admit()
    await w.admit()
    w.advance(2.0)
    # nothing finished: each holder, 2 s old, is expected to run about 2 s more; the k-th
    # caller in line gets a slot in round ceil(k / 2)
    for k in range(1, 6):
        says_retry_in(await w.refused(), 2000 * math.ceil(k / 2))

async def test_daily_budget_until_midnight_utc() -> None:
    w = World({"budget": {"daily_tokens": 100}, "default_max_tokens": 60})
    await w.admit()
    error = await w.refused()
    says_not_soon(error, 3 * 3600 * 1000)
    assert "resets at 2026-12-07T00:00:00Z" in error.message
    # 100 - the first's ~66 reserved: not spent, and the message says so (and what fits)
    assert "is spent" not in error.message and "tokens left" in error.message
    assert "Set max_tokens to" in error.message

async def test_daily_budget_a_few_seconds_before_midnight_is_worth_waiting_for() -> None:
    w = World({"budget": {"daily_tokens": 100}, "default_max_tokens": 60},
              wall=calendar.timegm((2026, 12, 6, 23, 59, 30)))
    await w.admit()
    says_retry_in(await w.refused(), 30_000)

async def test_monthly_budget_until_the_first_of_next_month_even_when_the_day_is_spent_too(
) -> None:
    w = World({"budget": {"daily_tokens": 100, "monthly_tokens": 100},
               "default_max_tokens": 60})
    await w.admit()
    error = await w.refused()
    to_january = calendar.timegm((2027, 1, 1, 0, 0, 0)) - EVENING
    says_not_soon(error, to_january * 1000)  # the later of the two resets
    assert "monthly tokens budget" in error.message and "2027-01-01T00:00:00Z" in error.message

async def test_cost_budget_smaller_than_one_request_never_succeeds() -> None:
    w = World({"budget": {"daily_cost": 0.000001}})
    error = await w.refused(max_tokens=1000)
    says_not_soon(error, None)
    assert error.code == "insufficient_quota"

async def test_loop_guard_until_the_fingerprints_window_lets_one_through() -> None:
    w = World({"loop_guard": {"max_repeats": 2, "window_s": 60}})
    run = {"X-Agent-Session": "run-1"}
    await w.admit(text="same", headers=run)
    w.advance(10)
    await w.admit(text="same", headers=run)
    w.advance(10)
    error = await w.refused(text="same", headers=run)
    assert error.code == "loop_detected"
    says_retry_in(error, 40_000)  # the window began with the first, 20 s ago

# --- the other refusals ---------------------------------------------------------------------

def test_overload_shed_gives_its_drain_estimate_in_both_headers() -> None:
    error = overloaded_error(Priority.high, 2.3451, "shed")
    assert error.status == 503
    assert error.headers["retry-after-ms"] == "2345" and error.headers["Retry-After"] == "3"
    # below high the shed is final for SDK clients (x-should-retry false; the wait is real)
    assert overloaded_error(Priority.low, 2.0, "shed").headers["x-should-retry"] == "false"

def test_deadline_that_cannot_be_met_names_it_and_is_not_retried() -> None:
    config = policy("http://127.0.0.1:9")
    deadline = request_deadline({"x-stainless-read-timeout": "3"}, Priority.normal, "acme",
                                100.0, config.admission)
    with pytest.raises(GatewayError) as info:
        deadline.check(100.0, 5.0)
    error = info.value
    assert error.status == 504 and error.headers == {"x-should-retry": "false"}
    assert "x-stainless-read-timeout: 3 s" in error.message

BREAKER = BreakerPolicy(window_s=30, min_calls=10, failure_rate=0.5, consecutive_failures=5,
                        reset_timeout_s=10, max_reset_timeout_s=120, reset_jitter=0.2,
                        half_open_probes=2)

async def test_provider_cooldown_until_the_deployment_is_usable_again() -> None:
    clock = FakeClock()
    board = BreakerBoard(BREAKER, MemoryBackend(clock=clock), deployments=["p/m"], clock=clock,
                         rng=random.Random(1))
    board.cool_down("p/m", 7.25)
    clock.now += 2
    error = board.unavailable_error(["p/m"])
    assert error.status == 503
    says_retry_in(error, 5250)

async def test_breaker_open_until_its_first_half_open() -> None:
    clock = FakeClock()
    board = BreakerBoard(BREAKER, MemoryBackend(clock=clock), deployments=["p/m"], clock=clock,
                         rng=random.Random(1))
    for _ in range(5):
        trial = await board.begin("p/m")
        assert trial is not None
        trial.failure("server_error")
    open_for = board.snapshot()["p/m"].open_for_s
    assert open_for > 0
    clock.now += 1
    says_retry_in(board.unavailable_error(["p/m"]), math.ceil((open_for - 1) * 1000))

def test_provider_quota_until_the_fleet_bucket_has_room() -> None:
    failed = _quota_spent("p/m", 2.5)
    assert failed.error is not None
    says_retry_in(failed.error, 2500)
    long = _quota_spent("p/m", 90.0)  # a minute and a half: an SDK should not sit it out
    assert long.error is not None
    says_not_soon(long.error, 90_000)

def test_limits_unavailable_until_the_store_is_probed_again() -> None:
    clock = FakeClock()
    mode = DegradedMode(Degraded(action="fail_closed", probe_interval_s=0.5),
                        MemoryBackend(clock=clock), clock, "r1")
    plan = AdmitPlan("r", (Gcra("k", Fraction(1000), 1, 1, "requests"),), "h", 1000)
    with pytest.raises(GatewayError) as info:
        mode.admit(plan, "normal")
    assert info.value.status == 503
    says_retry_in(info.value, 500)

def test_deferred_queue_unreachable_until_the_store_is_probed_again() -> None:
    says_retry_in(unavailable(0.5), 500)

async def test_deferred_queue_full_has_no_invented_wait(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(deferred={"enabled": True, "defaults": {"max_queued": 1}})
    prefer = auth(Prefer="respond-async")
    first = await gw.post("/v1/chat/completions", json=chat(text="a"), headers=prefer)
    assert first.status == 202
    full = await gw.post("/v1/chat/completions", json=chat(text="b"), headers=prefer)
    assert full.status == 429 and (await full.json())["error"]["code"] == "deferred_queue_full"
    assert full.headers["x-should-retry"] == "false"
    assert "Retry-After" not in full.headers and "retry-after-ms" not in full.headers
