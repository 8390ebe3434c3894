"""The fleet count behind ``state.degraded.replicas: auto``, on every backend: memory, Redis and
the 3-node Cluster. During an outage each replica enforces ``limit / replicas``, so a replica
still counted after it stopped makes every other one stricter than it needs to be."""

from __future__ import annotations

import time

from gateway.config import Degraded
from gateway.limits.degraded import DegradedMode
from gateway.state import StateBackend


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
