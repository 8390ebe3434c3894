"""Property tests of the limit algorithms against a simple reference model (fake clock)."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.state.plan import AdmitPlan, Counter, Gcra, LocalLimits, SettlePlan
from tests.gwtest import FakeClock

# Gaps in whole ms: the limiter's clock is whole milliseconds (GCRA runs in integers), so a
# window measured on a finer clock could hold up to rate x 1 ms more than rate x W + burst.
arrivals = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2000), st.integers(min_value=1, max_value=40)),
    min_size=1, max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(arrivals, st.integers(min_value=1, max_value=600), st.integers(min_value=1, max_value=80),
       st.floats(min_value=0.5, max_value=30))
def test_admitted_cost_in_any_window_is_within_rate_times_window_plus_burst(
    steps: list[tuple[int, int]], per_minute: int, burst: int, window_s: float
) -> None:
    clock = FakeClock(0.0)
    limits = LocalLimits(clock)
    interval_ms = Fraction(60_000, per_minute)
    admitted: list[tuple[float, int]] = []
    for i, (gap_ms, cost) in enumerate(steps):
        clock.now += gap_ms / 1000
        check = Gcra("k", interval_ms, burst, cost, "tokens")
        if limits.admit(AdmitPlan(f"r{i}", (check,), f"h{i}", 1000)).allowed:
            admitted.append((clock.now, cost))
    # Reference: in every window [t, t + W] the admitted cost is at most rate x W + burst.
    rate_per_s = per_minute / 60
    for start, _ in admitted:
        in_window = sum(c for t, c in admitted if start <= t <= start + window_s)
        assert in_window <= rate_per_s * window_s + burst + 1e-6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 50)), min_size=1, max_size=60))
def test_budget_counter_equals_the_sum_of_settled_usage(calls: list[tuple[int, int]]) -> None:
    """Reserve, then settle to actual, in any order: the counter ends at the sum of actuals
    and never let a reservation past the limit."""
    clock = FakeClock(0.0)
    limits = LocalLimits(clock)
    limit = 400
    open_holds: list[tuple[str, int, int]] = []
    settled_total = 0
    for i, (reserve, actual) in enumerate(calls):
        actual = min(actual, reserve)
        plan = AdmitPlan(f"r{i}", (Counter("b", limit, reserve, 86_400_000, 1000),), f"h:{i}",
                         60_000)
        if limits.admit(plan).allowed:
            open_holds.append((f"r{i}", reserve, actual))
        if i % 3 == 2 and open_holds:  # settle the oldest now and then
            rid, res, act = open_holds.pop(0)
            assert limits.settle(_settle(rid, res, act))
            settled_total += act
        outstanding = sum(r for _, r, _ in open_holds)
        remaining = limits.admit(AdmitPlan("probe", (Counter("b", limit, 0, 86_400_000, 1000),),
                                      "probe", 1)).results[0].remaining
        assert limit - remaining == settled_total + outstanding <= limit
    for rid, res, act in open_holds:
        assert limits.settle(_settle(rid, res, act))
        assert not limits.settle(_settle(rid, res, act))  # replays change nothing
        settled_total += act
    final = limits.admit(AdmitPlan("end", (Counter("b", limit, 0, 86_400_000, 1000),), "e", 1))
    assert limit - final.results[0].remaining == settled_total


def _settle(rid: str, reserved: int, actual: int) -> SettlePlan:
    i = rid[1:]
    return SettlePlan(rid, f"d:{i}", f"h:{i}", 60_000, (), (("b", reserved, actual, 86_400_000),),
                      ())


def test_lease_expiry_frees_a_crashed_replicas_slot() -> None:
    from gateway.state.plan import Lease

    clock = FakeClock(0.0)
    limits = LocalLimits(clock)
    lease = Lease("c", max=1, ttl_ms=60_000)
    assert limits.admit(AdmitPlan("a", (lease,), "ha", 1000)).allowed
    assert not limits.admit(AdmitPlan("b", (lease,), "hb", 1000)).allowed
    clock.now += 59.9
    limits.renew([("c", "a")], 60_000)  # a live stream renews its slot
    clock.now += 30
    assert not limits.admit(AdmitPlan("b", (lease,), "hb", 1000)).allowed
    clock.now += 31  # "a" stopped renewing (its replica died): the slot frees itself
    assert limits.admit(AdmitPlan("b", (lease,), "hb", 1000)).allowed


def test_memory_stays_bounded_under_churn() -> None:
    clock = FakeClock(0.0)
    limits = LocalLimits(clock)
    for i in range(20_000):
        clock.now += 0.01
        limits.admit(AdmitPlan(f"r{i}", (Gcra(f"k{i % 5000}", Fraction(10), 5, 1, "requests"),),
                               f"h{i}", 1000))
    assert limits.size() < 2_000
