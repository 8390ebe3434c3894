"""One contract for the limit scripts: Python (memory backend) and Lua (Redis, Redis Cluster).

Rates are slow (1 unit per second or slower) so the few milliseconds a Redis round trip
takes never refill a bucket mid-test; time-dependent behaviour of the Python side is tested
with a fake clock in test_limits_model.py.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

from gateway.state import StateBackend
from gateway.state.plan import AdmitPlan, Check, Counter, Gcra, Lease, Repeat, SettlePlan

T = "{t:acme}"  # every key of one tenant shares a hash tag: one Cluster slot


def plan(rid: str, *checks: Check) -> AdmitPlan:
    return AdmitPlan(rid, tuple(checks), f"rl:{T}:hold:{rid}", 60_000)


def settle(rid: str, *, gcra: tuple[tuple[str, Fraction, int, int], ...] = (),
           counters: tuple[tuple[str, int, int, int], ...] = (),
           leases: tuple[str, ...] = ()) -> SettlePlan:
    return SettlePlan(rid, f"rl:{T}:done:{rid}", f"rl:{T}:hold:{rid}", 60_000, gcra, counters,
                      leases)


REQ = Gcra(f"rl:{T}:req", interval_ms=Fraction(1000), burst=5, cost=1, name="requests")


async def test_gcra_allows_the_burst_then_refuses_with_retry_after(backend: StateBackend) -> None:
    remaining = []
    for i in range(5):
        result = await backend.admit(plan(f"r{i}", REQ))
        assert result.allowed
        remaining.append(result.results[0].remaining)
    assert remaining == [4, 3, 2, 1, 0]
    refused = await backend.admit(plan("r5", REQ))
    assert not refused.allowed and refused.failed == 0
    assert 800 <= refused.results[0].retry_after_ms <= 1000


async def test_concurrent_admissions_each_apply_atomically(backend: StateBackend) -> None:
    # Asked in one loop iteration (Redis sends them as one pipeline): exactly the burst passes,
    # in the order asked, and a request cancelled while waiting does not disturb the rest.
    tasks = [asyncio.ensure_future(backend.admit(plan(f"c{i}", REQ))) for i in range(12)]
    tasks[3].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    allowed = [i for i, r in enumerate(results)
               if not isinstance(r, BaseException) and r.allowed]
    assert isinstance(results[3], asyncio.CancelledError)
    assert len(allowed) == 5 and 3 not in allowed


async def test_a_failing_check_writes_nothing(backend: StateBackend) -> None:
    tokens = Gcra(f"rl:{T}:tok", interval_ms=Fraction(10), burst=100, cost=500, name="tokens")
    for i in range(3):
        result = await backend.admit(plan(f"x{i}", REQ, tokens))
        assert not result.allowed and result.failed == 1
    # The request bucket was not charged by the refused admissions.
    assert (await backend.admit(plan("y", REQ))).results[0].remaining == 4


async def test_leases_bound_concurrency_and_free_on_settle(backend: StateBackend) -> None:
    lease = Lease(f"rl:{T}:conc", max=2, ttl_ms=60_000)
    assert (await backend.admit(plan("a", lease))).allowed
    assert (await backend.admit(plan("b", lease))).allowed
    assert not (await backend.admit(plan("c", lease))).allowed
    assert await backend.settle(settle("a", leases=(lease.key,)))
    assert (await backend.admit(plan("c", lease))).allowed


async def test_concurrent_admissions_never_exceed_the_lease_limit(backend: StateBackend) -> None:
    lease = Lease(f"rl:{T}:conc", max=10, ttl_ms=60_000)
    results = await asyncio.gather(*(backend.admit(plan(f"c{i}", lease)) for i in range(100)))
    assert sum(r.allowed for r in results) == 10


async def test_budget_holds_then_reconciles_to_real_usage(backend: StateBackend) -> None:
    day = Counter(f"rl:{T}:b:d", limit=100, cost=60, ttl_ms=86_400_000, reset_ms=3_600_000)
    assert (await backend.admit(plan("a", day))).allowed
    refused = await backend.admit(plan("b", day))
    assert not refused.allowed
    assert refused.results[0].remaining == 40
    assert refused.results[0].retry_after_ms == 3_600_000
    # "a" really used 10 of its 60: the hold shrinks and "b" now fits.
    assert await backend.settle(settle("a", counters=((day.key, 60, 10, 86_400_000),)))
    ok = await backend.admit(plan("b", day))
    assert ok.allowed and ok.results[0].remaining == 30


async def test_settle_is_idempotent_per_request_id(backend: StateBackend) -> None:
    day = Counter(f"rl:{T}:b:d", limit=1000, cost=100, ttl_ms=86_400_000, reset_ms=1000)
    assert (await backend.admit(plan("a", day))).allowed
    done = settle("a", counters=((day.key, 100, 250, 86_400_000),))
    assert await backend.settle(done) is True
    assert await backend.settle(done) is False
    probe = await backend.admit(plan("p", Counter(day.key, 1000, 0, 86_400_000, 1000)))
    assert probe.results[0].remaining == 750


async def test_settle_many_applies_each_plan_once(backend: StateBackend) -> None:
    day = Counter(f"rl:{T}:m:d", limit=10_000, cost=100, ttl_ms=86_400_000, reset_ms=1000)
    for rid in ("m1", "m2", "m3"):
        assert (await backend.admit(plan(rid, day))).allowed
    plans = [settle(rid, counters=((day.key, 100, used, 86_400_000),))
             for rid, used in (("m1", 10), ("m2", 20), ("m3", 30))]
    assert await backend.settle_many(plans) == [True, True, True]
    assert await backend.settle_many([plans[1], settle("m4")]) == [False, True]  # m2 done
    probe = await backend.admit(plan("p", Counter(day.key, 10_000, 0, 86_400_000, 1000)))
    assert probe.results[0].remaining == 10_000 - 60


async def test_settle_without_a_hold_charges_the_whole_usage(backend: StateBackend) -> None:
    # A request admitted while this store was unreachable: its journaled usage is replayed.
    day = Counter(f"rl:{T}:b:d", limit=1000, cost=0, ttl_ms=86_400_000, reset_ms=1000)
    assert await backend.settle(settle("offline", counters=((day.key, 300, 120, 86_400_000),)))
    probe = await backend.admit(plan("p", day))
    assert probe.results[0].remaining == 880


async def test_token_refund_makes_room_at_once(backend: StateBackend) -> None:
    tokens = Gcra(f"rl:{T}:tok", interval_ms=Fraction(100), burst=1000, cost=1000, name="tokens")
    assert (await backend.admit(plan("a", tokens))).allowed
    smaller = Gcra(tokens.key, Fraction(100), 1000, 800, "tokens")
    assert not (await backend.admit(plan("b", smaller))).allowed
    assert await backend.settle(settle("a", gcra=((tokens.key, Fraction(100), 1000, 100),)))
    assert (await backend.admit(plan("b", smaller))).allowed


async def test_the_last_unit_of_a_burst_is_admitted(backend: StateBackend) -> None:
    # 7 per minute, burst 3: the interval (60000/7 ms) has no exact float; the third request
    # was refused at about half of all clock values while GCRA ran on float milliseconds.
    per_min = Gcra(f"rl:{T}:req7", interval_ms=Fraction(60_000, 7), burst=3, cost=1,
                   name="requests")
    results = [(await backend.admit(plan(f"u{i}", per_min))).results[0] for i in range(4)]
    assert [(r.allowed, r.remaining) for r in results] == [
        (True, 2), (True, 1), (True, 0), (False, 0)]
    assert 8000 <= results[3].retry_after_ms <= 8572  # ceil(60000/7) less the ms since


async def test_repeats_are_counted_per_window(backend: StateBackend) -> None:
    loop = Repeat(f"rl:{T}:loop:abc", max=3, window_ms=60_000)
    assert [(await backend.admit(plan(f"l{i}", loop))).allowed for i in range(4)] == [
        True, True, True, False]


async def test_shadow_checks_report_but_never_refuse(backend: StateBackend) -> None:
    shadow = Gcra(f"rl:{T}:sreq", interval_ms=Fraction(1000), burst=1, cost=1, name="requests",
                  shadow=True)
    assert (await backend.admit(plan("a", REQ, shadow))).shadow_failed == []
    result = await backend.admit(plan("b", REQ, shadow))
    assert result.allowed and result.shadow_failed == [1]
    assert result.results[0].remaining == 3  # the enforced check was applied
