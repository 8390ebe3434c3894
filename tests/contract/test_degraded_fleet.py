"""What degraded mode knows of the fleet and the store, on every backend: memory, Redis and the
3-node Cluster. The fleet count behind ``state.degraded.replicas: auto``: during an outage each
replica enforces ``limit / replicas``, so a replica still counted after it stopped makes every
other one stricter than it needs to be, and one not yet counted lets the fleet over its limits.
The store's latency figure: none while no round trip completes."""

from __future__ import annotations

import time

from gateway.config import Degraded
from gateway.limits.degraded import DegradedMode
from gateway.state import StateBackend, keys


async def test_a_cleanly_stopped_replica_leaves_the_count_at_once(
        backend: StateBackend) -> None:
    policy = Degraded()  # replicas: auto
    first, second = (DegradedMode(policy, backend, time.monotonic, name)
                     for name in ("first", "second"))
    await first.heartbeat()
    await second.heartbeat()
    await first.heartbeat()
    assert (first.replicas, second.replicas) == (2, 2)

    await second.leave()  # a clean stop; its lease would otherwise live 30 s more
    await first.heartbeat()
    assert first.replicas == 1
    await second.leave()  # a second stop (drain, then shutdown) changes nothing
    await first.heartbeat()
    assert first.replicas == 1


async def test_a_replica_with_a_fixed_count_neither_beats_nor_leaves(
        backend: StateBackend) -> None:
    fixed = DegradedMode(Degraded(replicas=3), backend, time.monotonic, "fixed")
    counted = DegradedMode(Degraded(), backend, time.monotonic, "counted")
    await fixed.heartbeat()
    await counted.heartbeat()
    await fixed.leave()
    assert (fixed.replicas, counted.replicas) == (3, 1)


async def test_the_latency_figure_is_absent_while_degraded_and_back_with_the_store(
        backend: StateBackend) -> None:
    """The last admission's round trip stood on the dashboard (2 ms) through a whole outage."""
    mode = DegradedMode(Degraded(), backend, time.monotonic, "one")
    mode.last_latency_s = 0.002  # the last admission before the outage
    mode.enter("connection refused")
    assert mode.last_latency_s is None
    assert await mode.recover_once()  # the store answers again
    assert mode.last_latency_s is not None and not mode.active


async def test_a_replica_counts_one_that_joined_after_it_within_a_second(
        backend: StateBackend) -> None:
    """A replica reads the count when it beats: one that beat before the others of a rollout
    joined kept counting itself alone for 10 s, and enforced a whole limit when Redis failed
    then (the fleet let 6 calls in at max_concurrent: 4)."""
    import asyncio

    from tests.gwtest import FakeClock
    clock = FakeClock()
    policy = Degraded(probe_interval_s=0.001)
    first = DegradedMode(policy, backend, clock, "first")
    stop = asyncio.Event()
    running = asyncio.create_task(first.run(stop))
    try:
        for _ in range(500):  # its first beat, at once
            if await backend.ttl_ms(keys.fleet_heartbeat("first")) is not None:
                break
            await asyncio.sleep(0.002)
        await DegradedMode(policy, backend, clock, "joined").heartbeat()
        await asyncio.sleep(0.02)  # the loop turns; its clock has not moved
        assert first.replicas == 1
        clock.advance(1.0)
        for _ in range(500):
            if first.replicas == 2:
                break
            await asyncio.sleep(0.002)
        assert first.replicas == 2
    finally:
        stop.set()
        await running
