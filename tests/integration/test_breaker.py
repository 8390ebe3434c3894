"""Circuit breakers as a user of the gateway would notice them: when a deployment is skipped,
for how long, how it comes back, and that replicas agree.

Time is a fake clock shared by the boards and the memory store; randomness is seeded.
Two ``BreakerBoard``s on one store stand for two gateway replicas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.breaker.board import BreakerBoard, Trial
from gateway.config.breaker import BreakerPolicy
from gateway.config.retry import RetryPolicy
from gateway.state import MemoryBackend, RedisBackend, StateBackend
from gateway.state.base import StateUnavailable
from gateway.upstream.retry import AttemptFailure, RetryBudget, decide_retry
from tests.gwtest import FakeClock
from tests.redis_server import RedisServer

DEP = "openai/gpt-x"
DEP2 = "azure/gpt-x"
POLICY = BreakerPolicy(
    window_s=30, min_calls=10, failure_rate=0.5, consecutive_failures=5,
    reset_timeout_s=10, max_reset_timeout_s=120, reset_jitter=0.2, half_open_probes=2,
)


class Transitions:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def breaker_transition(self, deployment: str, old: str, new: str) -> None:
        self.seen.append((deployment, old, new))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


def board(
    state: StateBackend, clock: FakeClock, *, seed: int = 1, policy: BreakerPolicy = POLICY,
    observer: Transitions | None = None,
) -> BreakerBoard:
    return BreakerBoard(policy, state, deployments=[DEP], clock=clock, rng=random.Random(seed),
                        observer=observer)


async def begin(b: BreakerBoard, dep: str = DEP) -> Trial:
    trial = await b.begin(dep)
    assert trial is not None, f"{dep} unexpectedly skipped"
    return trial


async def fail(b: BreakerBoard, n: int = 1, dep: str = DEP) -> None:
    for _ in range(n):
        (await begin(b, dep)).failure("server_error")


async def succeed(b: BreakerBoard, n: int = 1, dep: str = DEP) -> None:
    for _ in range(n):
        (await begin(b, dep)).success(0.2)


def state(b: BreakerBoard, dep: str = DEP) -> str:
    return b.snapshot()[dep].state


# --- what trips it, what never does -------------------------------------------------------


async def test_consecutive_failures_open_the_breaker(
    store: MemoryBackend, clock: FakeClock
) -> None:
    seen = Transitions()
    b = board(store, clock, observer=seen)
    await fail(b, 4)
    assert b.usable(DEP)
    await fail(b)
    assert not b.usable(DEP) and await b.begin(DEP) is None
    assert seen.seen == [(DEP, "closed", "open")]


async def test_failure_rate_over_the_window_trips_once_min_calls_is_reached(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    for _ in range(4):  # alternating: never 5 in a row, 4 of 8 failed (below min_calls)
        await fail(b)
        await succeed(b)
    await fail(b)  # 5 of 9: rate reached, calls not
    assert state(b) == "closed"
    await succeed(b)
    await fail(b)  # 6 of 11
    assert state(b) == "open"


async def test_failures_older_than_the_window_do_not_count(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    for _ in range(4):
        await fail(b)
        await succeed(b)
    clock.advance(31)
    for _ in range(3):
        await fail(b)
        await succeed(b)
    snap = b.snapshot()[DEP]
    assert snap.state == "closed" and snap.calls_in_window == 6 and snap.failure_rate == 0.5


async def test_client_errors_neither_count_nor_reset_the_failure_count(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    for _ in range(100):
        (await begin(b)).neutral()  # 400/401/404/422 ...
    assert state(b) == "closed" and b.snapshot()[DEP].calls_in_window == 0
    await fail(b, 4)
    for _ in range(10):
        (await begin(b)).neutral()
    assert b.snapshot()[DEP].consecutive_failures == 4
    await fail(b)
    assert state(b) == "open"


async def test_429_never_trips_but_cools_the_deployment_down(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    for _ in range(50):
        (await begin(b)).quota(0.5)
        clock.advance(0.5)
    assert state(b) == "closed" and b.snapshot()[DEP].consecutive_failures == 0
    (await begin(b)).quota(7)
    assert not b.usable(DEP) and await b.begin(DEP) is None
    assert b.retry_after_s([DEP]) == pytest.approx(7)
    clock.advance(6.9)
    assert not b.usable(DEP)
    clock.advance(0.2)
    assert b.usable(DEP)


async def test_429_cooldown_default_and_cap(store: MemoryBackend, clock: FakeClock) -> None:
    b = board(store, clock)
    (await begin(b)).quota(None)
    assert b.snapshot()[DEP].cooling_for_s == pytest.approx(POLICY.cooldown_default_s)
    (await begin(b, DEP2)).quota(86_400)  # a broken Retry-After cannot bench it for a day
    assert b.snapshot()[DEP2].cooling_for_s == pytest.approx(POLICY.max_reset_timeout_s)


async def test_cancelled_attempts_are_not_counted(store: MemoryBackend, clock: FakeClock) -> None:
    b = board(store, clock)
    await fail(b, 4)
    entered = 0

    async def attempt() -> None:
        nonlocal entered
        trial = await begin(b)
        try:
            entered += 1
            await asyncio.Event().wait()  # waiting for the upstream when the client leaves
        except asyncio.CancelledError:
            trial.cancelled()
            raise

    tasks = [asyncio.create_task(attempt()) for _ in range(20)]
    while entered < 20:
        await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert state(b) == "closed" and b.snapshot()[DEP].consecutive_failures == 4
    await fail(b)
    assert state(b) == "open"


async def test_slow_first_byte_counts_as_failure_but_only_when_configured(
    store: MemoryBackend, clock: FakeClock
) -> None:
    slow = board(store, clock, policy=POLICY.model_copy(update={"slow_first_token_s": 5.0}))
    for _ in range(5):
        (await begin(slow, DEP2)).success(first_byte_s=6.0)
    assert state(slow, DEP2) == "open"
    default = board(MemoryBackend(clock), clock)
    for _ in range(5):
        (await begin(default)).success(first_byte_s=60.0)
    assert state(default) == "closed"


# --- open period, half-open, recovery ------------------------------------------------------


async def test_open_period_escalates_on_repeated_trips_capped_and_jittered(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock, seed=7)
    await fail(b, 5)
    periods = []
    for _ in range(7):
        periods.append(b.snapshot()[DEP].open_for_s)
        clock.advance(periods[-1])
        probe = await begin(b)
        assert probe.probe
        probe.failure("connect_error")
        await b.sync_once()  # frees the probe slot in the store
    for period, full in zip(periods, [10, 20, 40, 80, 120, 120, 120]):
        assert 0.8 * full <= period <= full
    assert len(set(periods)) == len(periods)  # jittered, not a fixed schedule

    clock.advance(b.snapshot()[DEP].open_for_s)
    (await begin(b)).success(0.1)  # recovered
    clock.advance(60)
    await fail(b, 5)  # trips again soon after closing: still escalated
    assert b.snapshot()[DEP].open_for_s > 100
    clock.advance(120)
    (await begin(b)).success(0.1)
    clock.advance(120)  # closed for max_reset_timeout_s: earlier trips are forgiven
    await fail(b, 5)
    assert 8 <= b.snapshot()[DEP].open_for_s <= 10


async def test_half_open_probe_success_closes_and_failure_reopens(
    store: MemoryBackend, clock: FakeClock
) -> None:
    seen = Transitions()
    b = board(store, clock, observer=seen)
    await fail(b, 5)
    assert b.retry_after_s([DEP]) == pytest.approx(b.snapshot()[DEP].open_for_s)
    clock.advance(10)
    assert b.usable(DEP) and state(b) == "half-open"
    (await begin(b)).failure("timeout")
    assert state(b) == "open"
    await b.sync_once()
    clock.advance(20)
    (await begin(b)).success(0.3)
    assert state(b) == "closed"
    assert [t[1:] for t in seen.seen] == [
        ("closed", "open"), ("open", "half-open"), ("half-open", "open"),
        ("open", "half-open"), ("half-open", "closed")]


async def test_a_request_started_before_the_trip_cannot_close_it(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    slow = await begin(b)
    await fail(b, 5)
    clock.advance(10)
    slow.success(0.1)  # answered long after the trip: says nothing about now
    assert state(b) == "half-open"


async def test_cancelled_probe_frees_its_slot_without_a_verdict(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    await fail(b, 5)
    clock.advance(10)
    probes = [await begin(b), await begin(b)]
    assert await b.begin(DEP) is None  # K = 2 probes in flight
    probes[0].cancelled()
    probes[0].failure("timeout")  # a second outcome for a settled trial is ignored
    await b.sync_once()
    assert state(b) == "half-open"
    assert (await begin(b)).probe


async def test_no_usable_deployment_gives_a_fast_503_with_time_to_first_half_open(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    await fail(b, 5)
    first = b.snapshot()[DEP].open_for_s
    clock.advance(5)
    await fail(b, 5, dep=DEP2)
    wait = b.retry_after_s([DEP, DEP2])
    assert wait == pytest.approx(first - 5)
    err = b.unavailable_error([DEP, DEP2])
    assert (err.status, err.code) == (503, "upstream_unavailable")
    assert err.headers["Retry-After"] == str(math.ceil(wait))
    assert err.headers["retry-after-ms"] == str(round(wait * 1000))


async def test_begin_first_fails_over_before_retrying_the_same_deployment(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b = board(store, clock)
    both = [DEP, DEP2]
    first = await b.begin_first(both)
    assert first is not None and first.deployment == DEP
    first.failure("connect_error")
    second = await b.begin_first(both, tried=[DEP])
    assert second is not None and second.deployment == DEP2
    second.failure("timeout")
    third = await b.begin_first(both, tried=[DEP, DEP2])
    assert third is not None and third.deployment == DEP
    third.success(0.1)
    await fail(b, 5, dep=DEP)
    (await begin(b, DEP2)).quota(5)
    assert await b.begin_first(both) is None
    assert b.states() == {DEP: "open", DEP2: "closed"}  # cooling is not a breaker state


# --- the fleet ------------------------------------------------------------------------------


async def test_a_trip_on_one_replica_opens_the_breaker_on_the_others(
    store: MemoryBackend, clock: FakeClock
) -> None:
    seen_b = Transitions()
    a, b = board(store, clock, seed=1), board(store, clock, seed=2, observer=seen_b)
    await fail(a, 5)
    await a.sync_once()
    await b.sync_once()
    assert not b.usable(DEP) and await b.begin(DEP) is None
    assert seen_b.seen == [(DEP, "closed", "open")]
    assert b.snapshot()[DEP].open_for_s == pytest.approx(a.snapshot()[DEP].open_for_s, abs=0.002)
    await b.sync_once()  # the same trip again changes nothing
    assert seen_b.seen == [(DEP, "closed", "open")]


class FlakySetStore(MemoryBackend):
    """A memory store whose next ``set`` calls fail as an unreachable Redis would."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.failing_sets = 0

    async def set(self, key: str, value: bytes, ttl_ms: int, *,
                  only_if_absent: bool = False) -> bool:
        if self.failing_sets:
            self.failing_sets -= 1
            raise StateUnavailable("set refused")
        return await super().set(key, value, ttl_ms, only_if_absent=only_if_absent)


async def test_a_trip_whose_push_failed_reaches_the_fleet_at_the_next_sync(
    clock: FakeClock,
) -> None:
    store = FlakySetStore(clock)
    a, b = board(store, clock, seed=1), board(store, clock, seed=2)
    await fail(a, 5)
    (await begin(a, DEP2)).quota(30)
    store.failing_sets = 1
    assert await a.sync_once() is False
    await b.sync_once()
    assert b.usable(DEP) and b.usable(DEP2)  # nothing reached the fleet yet
    assert await a.sync_once() is True
    await b.sync_once()
    assert not b.usable(DEP) and not b.usable(DEP2)
    assert b.retry_after_s([DEP2]) == pytest.approx(30)


async def test_cooldown_is_shared_by_the_fleet(store: MemoryBackend, clock: FakeClock) -> None:
    a, b = board(store, clock, seed=1), board(store, clock, seed=2)
    (await begin(a)).quota(30)
    await a.sync_once()
    await b.sync_once()
    assert not b.usable(DEP)
    assert b.retry_after_s([DEP]) == pytest.approx(30)
    clock.advance(30)
    await b.sync_once()
    assert b.usable(DEP)


async def test_a_replicas_own_cooldown_read_back_from_the_fleet_ends_when_it_ends(
        store: MemoryBackend, clock: FakeClock) -> None:
    """The fleet's copy of a cool-down is written in whole ms, rounded up: read back, it
    moved this replica's own end up to a millisecond later, and a retry timed to the
    provider's Retry-After woke to a deployment still cooling down, and gave up."""
    a, b = board(store, clock, seed=1), board(store, clock, seed=2)
    (await begin(a)).quota(0.2004)
    await a.sync_once()
    await b.sync_once()
    assert not b.usable(DEP)  # the others learn it
    await a.sync_once()
    clock.advance(0.2005)
    assert a.usable(DEP)
    clock.advance(0.01)  # (the others' copy is the rounded one: up to 1 ms longer)
    (await begin(b)).quota(0.5)  # a cool-down genuinely longer, from another replica
    await b.sync_once()
    await a.sync_once()
    assert not a.usable(DEP)
    assert a.retry_after_s([DEP]) == pytest.approx(0.5, abs=0.002)


async def probes_across(a: BreakerBoard, b: BreakerBoard) -> list[tuple[BreakerBoard, Trial]]:
    boards = [a, b] * 4
    trials = await asyncio.gather(*(x.begin(DEP) for x in boards))
    return [(x, t) for x, t in zip(boards, trials) if t is not None]


async def check_fleet_half_open(a: BreakerBoard, b: BreakerBoard, clock: FakeClock) -> None:
    await fail(a, 5)
    await a.sync_once()
    await b.sync_once()
    clock.advance(10)
    admitted = await probes_across(a, b)
    assert len(admitted) == POLICY.half_open_probes and all(t.probe for _, t in admitted)
    assert await a.begin(DEP) is None and await b.begin(DEP) is None
    # One probe fails: the trip is renewed (escalated) and reaches the other replica.
    owner, probe = admitted[0]
    other = b if owner is a else a
    probe.failure("server_error")
    admitted[1][1].cancelled()
    await owner.sync_once()
    await other.sync_once()
    assert state(a) == state(b) == "open"
    assert b.snapshot()[DEP].open_for_s > 10
    # Next round: one probe succeeds and closes the breaker on every replica.
    clock.advance(20)
    admitted = await probes_across(a, b)
    assert len(admitted) == POLICY.half_open_probes
    owner, probe = admitted[0]
    other = b if owner is a else a
    probe.success(0.2)
    assert state(owner) == "closed"
    await owner.sync_once()
    await other.sync_once()
    assert state(other) == "closed" and other.usable(DEP)
    admitted[1][1].success(0.2)


async def test_half_open_admits_at_most_k_probes_across_replicas(
    store: MemoryBackend, clock: FakeClock
) -> None:
    await check_fleet_half_open(board(store, clock, seed=1), board(store, clock, seed=2), clock)


@pytest.fixture
async def redis_pair(clean_redis: RedisServer) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    stores = (RedisBackend(clean_redis.url), RedisBackend(clean_redis.url))
    try:
        for s in stores:
            await s.start()
        yield stores
    finally:
        for s in stores:
            await s.close()


@pytest.mark.redis
async def test_half_open_admits_at_most_k_probes_across_replicas_on_redis(
    redis_pair: tuple[RedisBackend, RedisBackend], clock: FakeClock
) -> None:
    # Real Redis keeps real time: trip ids, not clocks, tell replicas which trip is which.
    a, b = board(redis_pair[0], clock, seed=1), board(redis_pair[1], clock, seed=2)
    await check_fleet_half_open(a, b, clock)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.redis
async def test_with_redis_down_breakers_keep_working_locally(
    own_redis: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisBackend(own_redis.url)
    await store.start()
    try:
        b = board(store, clock)
        own_redis.stop()
        with caplog.at_level(logging.INFO, logger="gateway.breaker"):
            assert await b.sync_once() is False
            assert await b.sync_once() is False
            assert b.degraded
            await fail(b, 5)  # trips locally while the fleet store is gone
            assert not b.usable(DEP)
            own_redis.start()
            assert await b.sync_once() is True
        messages = [r.getMessage() for r in caplog.records]
        assert sum("unavailable" in m for m in messages) == 1  # once per outage
        assert any("reachable again" in m for m in messages)
        pttl = own_redis.command("PTTL", "gw:cb:{openai/gpt-x}:open")
        assert isinstance(pttl, int) and 0 < pttl <= 10_000  # the trip reached the fleet late
        own_redis.stop()
        clock.advance(10)
        probe = await begin(b)  # no store to reserve in: one probe per replica
        assert probe.probe and await b.begin(DEP) is None
        probe.success(0.1)
        assert state(b) == "closed" and b.usable(DEP)
    finally:
        await store.close()


async def test_run_sync_spreads_a_trip_within_an_interval() -> None:
    policy = POLICY.model_copy(update={"sync_interval_s": 0.02})
    store = MemoryBackend()
    a = BreakerBoard(policy, store, deployments=[DEP], rng=random.Random(1))
    b = BreakerBoard(policy, store, deployments=[DEP], rng=random.Random(2))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(x.run_sync(stop)) for x in (a, b)]
    try:
        await fail(a, 5)
        async with asyncio.timeout(2):
            while b.usable(DEP):
                await asyncio.sleep(0.005)
    finally:
        stop.set()
        async with asyncio.timeout(2):
            await asyncio.gather(*tasks)
    assert state(b) == "open"


def test_policy_rejects_a_cap_below_the_base_and_documents_its_fields() -> None:
    with pytest.raises(ValueError, match="max_reset_timeout_s"):
        BreakerPolicy(reset_timeout_s=30, max_reset_timeout_s=10)
    props = BreakerPolicy.model_json_schema()["properties"]
    assert all(p.get("description") for p in props.values())


# --- the attempt loop as the pipeline runs it (breakers + retry decisions + budget) ----------


async def serve(
    b: BreakerBoard, budget: RetryBudget, clock: FakeClock, upstream: dict[str, int]
) -> tuple[int, int]:
    """One request through pipeline step 10; ``upstream`` is each deployment's status.
    -> (status answered, upstream attempts)."""
    deps, tried, status = list(upstream), [], 503
    deadline = clock() + 30
    trial = await b.begin_first(deps)
    while trial is not None:  # None at once: the fast 503 upstream_unavailable
        tried.append(trial.deployment)
        status = upstream[trial.deployment]
        if status < 400:
            trial.success(0.2)
            budget.record_success(trial.deployment)
            return status, len(tried)
        failure = AttemptFailure.from_response(status, {})
        if status == 429:
            trial.quota(failure.retry_after_s)
        elif status >= 500:
            trial.failure("server_error")
        else:
            trial.neutral()
        d = decide_retry(
            RetryPolicy(), failure, attempt=len(tried), remaining_s=deadline - clock(),
            rng=random.Random(len(tried)),
            failover_available=any(b.usable(x) for x in deps if x not in tried),
            deployment_wait_s=b.retry_after_s([trial.deployment]),
        )
        # A failed half-open probe is the breaker's experiment: its failover is free.
        if not (d.retry and (trial.probe or budget.try_spend(trial.deployment))):
            break
        clock.advance(d.delay_s)
        trial = await b.begin_first(deps, tried)
    return status, len(tried)


async def test_a_deployment_that_dies_is_failed_over_then_skipped(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b, budget = board(store, clock), RetryBudget(RetryPolicy())
    for _ in range(100):  # healthy traffic earns the primary its retry budget
        assert await serve(b, budget, clock, {DEP: 200, DEP2: 200}) == (200, 1)
        clock.advance(1)
    results = [await serve(b, budget, clock, {DEP: 503, DEP2: 200}) for _ in range(20)]
    assert [n for _, n in results] == [2] * 5 + [1] * 15  # failover, then DEP is open
    for _ in range(8):  # a long outage: every half-open probe fails, its request still works
        clock.advance(b.retry_after_s([DEP]))
        assert await serve(b, budget, clock, {DEP: 503, DEP2: 200}) == (200, 2)
        await b.sync_once()
        assert await serve(b, budget, clock, {DEP: 503, DEP2: 200}) == (200, 1)


async def test_total_outage_ends_in_fast_503s_without_upstream_calls(
    store: MemoryBackend, clock: FakeClock
) -> None:
    b, budget = board(store, clock), RetryBudget(RetryPolicy())
    results = [await serve(b, budget, clock, {DEP: 503, DEP2: 502}) for _ in range(100)]
    assert sum(n for _, n in results) <= 13  # 5 + 5 trips, plus the few budgeted retries
    assert results[-1] == (503, 0)
    assert not b.usable(DEP) and not b.usable(DEP2)
