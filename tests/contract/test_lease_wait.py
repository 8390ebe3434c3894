"""A request over a max_concurrent waits briefly for a slot before its 429 (issue 16 item 2),
on every backend: memory, Redis and the 3-node Cluster.

Two Limiters sharing one store (each with its own in-flight board) stand for two replicas:
a release on this replica wakes its waiters at once; one on another replica is found by
asking the store again on a short schedule. Real time, generous bounds; store calls counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.config.model import GatewayConfig
from gateway.errors import GatewayError
from gateway.limits.degraded import DegradedMode
from gateway.limits.leases import LeaseBoard
from gateway.limits.limiter import Hold, InFlight, Limiter
from gateway.request.auth import Authenticator
from gateway.request.classifier import ROUTES, classify
from gateway.state import StateBackend
from gateway.state.plan import AdmitPlan, AdmitResult, SettlePlan
from gateway.upstream.sse import Usage
from tests.gwtest import FakeClock, auth, chat, policy


class Counting:
    """The store, with its admit calls counted (the uncontended path makes exactly one)."""

    def __init__(self, inner: StateBackend) -> None:
        self.inner = inner
        self.admits = 0

    async def admit(self, plan: AdmitPlan) -> AdmitResult:
        self.admits += 1
        return await self.inner.admit(plan)

    async def settle_many(self, plans: Sequence[SettlePlan]) -> list[bool]:
        return await self.inner.settle_many(plans)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def replica(store: Counting, config: GatewayConfig) -> Limiter:
    degraded = DegradedMode(config.state.degraded, store, time.monotonic, "r")
    return Limiter(config, store, degraded, time.time, InFlight())


def config_with(**limits: Any) -> GatewayConfig:
    return policy("http://127.0.0.1:9", tenants={"acme": {"limits": limits}})


async def admit(limiter: Limiter, config: GatewayConfig, rid: str, **kw: Any) -> Hold:
    tenant = Authenticator(config).authenticate(auth())
    call = classify(ROUTES["/v1/chat/completions"], tenant, chat(text=rid), {}, config)
    return await limiter.admit(call, rid, **kw)


async def test_uncontended_admission_is_one_store_call(backend: StateBackend) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=2)
    limiter = replica(store, config)
    hold = await admit(limiter, config, "a")
    assert store.admits == 1
    await limiter.settle(hold, Usage(), 0)


async def test_a_waiter_gets_the_slot_as_soon_as_it_is_released_here(
    backend: StateBackend,
) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=1, concurrency_wait_s=10)
    limiter = replica(store, config)
    first = await admit(limiter, config, "a")
    began = time.monotonic()
    waiter = asyncio.create_task(admit(limiter, config, "b"))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await limiter.settle(first, Usage(), 0)
    second = await asyncio.wait_for(waiter, 5)
    assert second.request_id == "b" and time.monotonic() - began < 5
    # the wait re-asked a handful of times (schedule + the release), not in a busy loop
    assert store.admits < 15
    await limiter.settle(second, Usage(), 0)


async def test_a_release_on_another_replica_is_found_on_the_retry_schedule(
    backend: StateBackend,
) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=1, concurrency_wait_s=10)
    one, two = replica(store, config), replica(store, config)
    first = await admit(one, config, "a")
    waiter = asyncio.create_task(admit(two, config, "b"))
    await asyncio.sleep(0.5)
    assert not waiter.done()
    await one.settle(first, Usage(), 0)
    released = time.monotonic()
    second = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - released < 2  # the schedule re-asks at least every 250 ms
    await two.settle(second, Usage(), 0)


async def test_the_wait_is_bounded_by_the_setting_and_by_the_deadline(
    backend: StateBackend,
) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=1, concurrency_wait_s=0.4)
    limiter = replica(store, config)
    first = await admit(limiter, config, "a")
    began = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await admit(limiter, config, "b")
    assert info.value.status == 429 and 0.35 <= time.monotonic() - began < 5
    began = time.monotonic()
    with pytest.raises(GatewayError):
        await admit(limiter, config, "c", deadline=time.monotonic() + 0.05)
    assert time.monotonic() - began < 0.35  # the deadline comes first
    await limiter.settle(first, Usage(), 0)


async def test_no_wait_when_something_else_refuses_too(backend: StateBackend) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=1, concurrency_wait_s=10, requests_per_minute=1,
                         request_burst=1)
    limiter = replica(store, config)
    first = await admit(limiter, config, "a")
    began = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await admit(limiter, config, "b")
    assert time.monotonic() - began < 1 and store.admits == 2
    # the answer waits for the longest of the two: the request rate (a minute), not the slot
    assert int(info.value.headers["retry-after-ms"]) > 50_000
    await limiter.settle(first, Usage(), 0)


async def test_no_more_waiters_per_scope_than_four_per_slot(backend: StateBackend) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=1, concurrency_wait_s=10)
    limiter = replica(store, config)
    first = await admit(limiter, config, "a")
    waiters = [asyncio.create_task(admit(limiter, config, f"w{i}")) for i in range(4)]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiters)  # four per slot wait
    began = time.monotonic()
    with pytest.raises(GatewayError) as info:  # the fifth is refused at once...
        await admit(limiter, config, "c")
    assert time.monotonic() - began < 1
    # ...told it is fifth in line for one slot: five rounds of the holder's expected 0.8 s
    # (1 s in all, the first guess, and it ran 0.2 s)
    assert 3_000 <= int(info.value.headers["retry-after-ms"]) <= 5_000
    await limiter.settle(first, Usage(), 0)
    pending = set(waiters)
    while pending:  # each waiter gets the slot in turn, as the one before settles
        done, pending = await asyncio.wait(pending, timeout=5,
                                           return_when=asyncio.FIRST_COMPLETED)
        assert done
        for w in done:
            await limiter.settle(w.result(), Usage(), 0)


def test_with_no_history_a_holder_is_expected_to_run_as_long_again() -> None:
    clock = FakeClock(100.0)
    board = LeaseBoard(clock)
    board.started("a", ("k",))
    clock.now += 0.3
    assert board.expected_wait_s("k") == pytest.approx(0.7)  # 1 s in all, the first guess
    clock.now += 2.2
    # 2.5 s old with nothing finished yet: about 2.5 s more, not "due now" (200 ms)
    assert board.expected_wait_s("k") == pytest.approx(2.5)
    board.started("b", ("k",))
    clock.now += 0.2
    # the soonest expected end: the young one's first guess (1 s in all) before the old one's
    assert board.expected_wait_s("k") == pytest.approx(0.8)
    clock.now += 0.3
    board.finished("a")  # a took 3 s: now the scope has a typical duration
    assert board.expected_wait_s("k") == pytest.approx(2.5)


async def test_successive_refusals_queue_in_rounds_of_the_slots(backend: StateBackend) -> None:
    store = Counting(backend)
    config = config_with(max_concurrent=2, concurrency_wait_s=0)
    limiter = replica(store, config)
    holds = [await admit(limiter, config, f"h{i}") for i in range(2)]
    told = []
    for i in range(5):
        with pytest.raises(GatewayError) as info:
            await admit(limiter, config, f"r{i}")
        told.append(int(info.value.headers["retry-after-ms"]))
    # the k-th refused caller is told ceil(k / 2) x the expected holder time (1 s first guess)
    rounds = [round(ms / 1000) for ms in told]
    assert rounds == [1, 1, 2, 2, 3], told
    for hold in holds:
        await limiter.settle(hold, Usage(), 0)
