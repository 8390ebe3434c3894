"""The AIMD concurrency limit, driven by a fake clock and a simulated upstream."""

from __future__ import annotations

import heapq
import statistics
from typing import Any

from gateway.admission_policy import ConcurrencySettings
from gateway.concurrency import AIMDLimit, Outcome


def settings(**overrides: Any) -> ConcurrencySettings:
    values: dict[str, Any] = {"min_limit": 2, "initial_limit": 20, "max_limit": 200}
    return ConcurrencySettings.model_validate(values | overrides)


def simulate(limiter: AIMDLimit, capacity: int, seconds: float) -> list[tuple[float, int]]:
    """A saturated upstream that serves ``capacity`` calls at once (1 s each) and answers 429
    at once (after 50 ms) to any call beyond that. Returns (time, limit) every 100 ms."""
    now, dt = 0.0, 0.01
    running: list[tuple[float, Outcome]] = []  # (finishes at, outcome)
    serving = 0
    trace: list[tuple[float, int]] = []
    step = 0
    while now < seconds:
        while running and running[0][0] <= now:
            _, outcome = heapq.heappop(running)
            if outcome == "success":
                serving -= 1
            # demand: everything in flight plus a backlog that never empties
            limiter.on_sample(now, outcome, len(running) + 1 + 100)
        while len(running) < limiter.limit:  # the gateway fills the limit
            if serving < capacity:
                serving += 1
                heapq.heappush(running, (now + 1.0, "success"))
            else:
                heapq.heappush(running, (now + 0.05, "overload"))
        if step % 10 == 0:
            trace.append((now, limiter.limit))
        now += dt
        step += 1
    return trace


def test_converges_to_capacity_from_below_and_above() -> None:
    for initial in (4, 150):
        limiter = AIMDLimit(settings(initial_limit=initial), now=0.0)
        trace = simulate(limiter, capacity=40, seconds=240.0)
        settled = [limit for t, limit in trace if t >= 120.0]
        assert min(settled) >= 0.85 * 40, (initial, min(settled))
        assert max(settled) <= 1.1 * 40, (initial, max(settled))
        assert abs(statistics.mean(settled) - 40) <= 4


def test_one_decrease_per_window_on_a_correlated_burst() -> None:
    limiter = AIMDLimit(settings(initial_limit=100, decision_window_s=1.0), now=0.0)
    for i in range(50):  # fifty calls failing within 0.5 s: one signal
        limiter.on_sample(10.0 + i * 0.01, "overload", in_flight=100)
    assert limiter.limit == 90
    limiter.on_sample(10.99, "overload", in_flight=100)
    assert limiter.limit == 90
    limiter.on_sample(11.0, "overload", in_flight=100)  # a new window
    assert limiter.limit == 81


def test_no_increase_in_the_window_after_a_decrease() -> None:
    limiter = AIMDLimit(settings(initial_limit=50), now=0.0)
    limiter.on_sample(5.0, "overload", in_flight=50)
    assert limiter.limit == 45
    limiter.on_sample(5.5, "success", in_flight=45)
    assert limiter.limit == 45
    limiter.on_sample(6.0, "success", in_flight=45)
    assert limiter.limit == 46


def test_no_growth_while_under_used() -> None:
    limiter = AIMDLimit(settings(initial_limit=20, min_utilization=0.5), now=0.0)
    for second in range(1, 300):
        limiter.on_sample(float(second), "success", in_flight=9)  # 45% of the limit
    assert limiter.limit == 20
    limiter.on_sample(301.0, "success", in_flight=10)  # used: grows, one step per window
    limiter.on_sample(301.5, "success", in_flight=10)
    assert limiter.limit == 21


def test_growth_is_additive_per_window_and_bounded() -> None:
    limiter = AIMDLimit(settings(initial_limit=20, max_limit=25, increase_step=2.0), now=0.0)
    for i in range(100):  # 100 successes within one window: one step
        limiter.on_sample(1.0 + i * 0.001, "success", in_flight=20)
    assert limiter.limit == 22
    for second in range(2, 20):
        limiter.on_sample(float(second), "success", in_flight=limiter.limit)
    assert limiter.limit == 25


def test_decrease_stops_at_min_and_ignore_changes_nothing() -> None:
    limiter = AIMDLimit(settings(min_limit=3, initial_limit=4), now=0.0)
    for second in range(1, 30):
        limiter.on_sample(float(second), "overload", in_flight=4)
    assert limiter.limit == 3
    limiter.on_sample(100.0, "ignore", in_flight=3)
    assert limiter.limit == 3


def test_restart_low_and_reconfigure() -> None:
    limiter = AIMDLimit(settings(min_limit=2, initial_limit=60), now=0.0)
    limiter.restart_low(now=1.0)
    assert limiter.limit == 2
    limiter.on_sample(1.5, "success", in_flight=2)  # same window as the restart: no growth
    assert limiter.limit == 2
    limiter.on_sample(2.0, "success", in_flight=2)
    assert limiter.limit == 3
    limiter.reconfigure(settings(min_limit=10, initial_limit=10, max_limit=20))
    assert limiter.limit == 10


def test_latency_brake_lowers_the_limit_when_ttft_per_prompt_size_rises() -> None:
    limiter = AIMDLimit(settings(initial_limit=50, latency_brake=2.0), now=0.0)
    t = 0.0
    for i in range(50):  # baseline: 0.5 s per (1k + 1k) tokens, whatever the prompt size
        t += 0.1
        prompt = 1000 if i % 2 else 9000
        limiter.on_sample(t, "success", in_flight=10, ttft_s=0.5 * (prompt + 1000) / 2000,
                          prompt_tokens=prompt)
    assert limiter.limit == 50  # under-used, steady latency: no change either way
    for _ in range(30):  # the same prompts now take four times as long
        t += 0.1
        limiter.on_sample(t, "success", in_flight=10, ttft_s=2.0, prompt_tokens=1000)
    assert limiter.limit < 50
    assert limiter.limit >= 50 * 0.9 ** 4  # still at most one decrease per window


def test_latency_brake_ignores_big_prompts_that_are_slow_for_their_size() -> None:
    limiter = AIMDLimit(settings(initial_limit=50, latency_brake=2.0), now=0.0)
    t = 0.0
    for i in range(200):
        t += 0.1
        prompt = 100_000 if i % 10 == 0 else 500
        ttft = 0.3 * (prompt + 1000) / 1000  # prefill time grows with the prompt
        limiter.on_sample(t, "success", in_flight=10, ttft_s=ttft, prompt_tokens=prompt)
    assert limiter.limit == 50
