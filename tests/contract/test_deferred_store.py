"""DeferredStore conformance: the Redis Streams store (standalone and Cluster) and the in-memory
store behave the same, step by step (gateway/deferred/store.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.deferred.service import create_store
from gateway.deferred.store import Claim, DeferredStore, QueueFull, Result
from gateway.deferred.store_memory import MemoryDeferredStore
from gateway.deferred.store_redis import RedisDeferredStore
from gateway.state import MemoryBackend, StateBackend

TTL_MS, GRACE_MS = 60_000, 60_000
VIS_MS = 150  # visibility timeout used by these tests


@pytest.fixture
async def store(backend: StateBackend) -> AsyncIterator[DeferredStore]:
    made = create_store(backend)
    assert isinstance(made, MemoryDeferredStore if isinstance(backend, MemoryBackend)
                      else RedisDeferredStore)
    yield made


def fields(n: int = 0) -> dict[str, bytes]:
    return {"hold": b'{"h": %d}' % n, "route": b"/v1/chat/completions", "model": b"gpt-test",
            "body": b'{"model": "gpt-test"}', "headers": b"{}"}


async def submit(store: DeferredStore, entry_id: str, tenant: str = "acme", *,
                 ttl_ms: int = TTL_MS, max_queued: int = 100, max_bytes: int = 1 << 30,
                 body: bytes | None = None) -> None:
    entry = fields() if body is None else {**fields(), "body": body}
    await store.submit(tenant, entry_id, entry, ttl_ms=ttl_ms, grace_ms=GRACE_MS,
                       max_queued=max_queued, max_bytes=max_bytes)


async def claim_started(store: DeferredStore, consumer: str = "c1",
                        tenant: str = "acme") -> tuple[Claim, int]:
    claim = await store.claim(tenant, consumer, reclaim_idle_ms=None)
    assert claim is not None
    started = await store.start(claim, consumer)
    assert started.kind == "run", started
    return claim, started.run


OK = Result("succeeded", 200, {"content-type": "application/json"}, b'{"answer": 42}')


async def test_submit_claim_start_finish(store: DeferredStore) -> None:
    sub = await store.submit("acme", "e1", fields(), ttl_ms=TTL_MS, grace_ms=GRACE_MS,
                             max_queued=10, max_bytes=1 << 20)
    assert sub.position == 1 and sub.expires_ms - sub.created_ms == TTL_MS
    await submit(store, "e2")
    record = await store.get("acme", "e1")
    assert record is not None and record["status"] == b"queued" and record["runs"] == b"0"
    claim = await store.claim("acme", "c1", reclaim_idle_ms=VIS_MS)
    assert claim is not None and (claim.id, claim.reclaimed) == ("e1", False)  # FIFO
    started = await store.start(claim, "c1")
    assert (started.kind, started.run, started.lost) == ("run", 1, ())
    assert started.fields["model"] == b"gpt-test" and started.fields["hold"] == b'{"h": 0}'
    assert (await store.get("acme", "e1") or {})["status"] == b"running"
    assert await store.heartbeat(claim, "c1")
    done = await store.finish(claim, "c1", 1, "done", "actual", {"outcome": "success"},
                              result=OK, grace_ms=GRACE_MS)
    assert (done.won, done.charge) == (True, True)
    record = await store.get("acme", "e1")
    assert record is not None
    assert (record["status"], record["code"], record["rbody"]) == (b"succeeded", b"200",
                                                                   b'{"answer": 42}')
    assert record["charged:1"] == b"actual" and b"success" in record["run:1"]
    assert "body" not in record and "headers" not in record  # the answer is kept, not the ask
    scan = await store.scan("acme", 10)
    assert scan.depth == 1 and [row[1] for row in scan.head] == ["e2"]  # e1 left the stream
    # a second finish of the same run (a duplicate) neither wins nor charges again
    again = await store.finish(claim, "c1", 1, "done", "actual", {}, result=OK)
    assert (again.won, again.charge) == (False, False)


async def test_queue_is_bounded_per_tenant(store: DeferredStore) -> None:
    await submit(store, "e1", max_queued=2)
    await submit(store, "e2", max_queued=2)
    with pytest.raises(QueueFull) as err:
        await submit(store, "e3", max_queued=2)
    assert err.value.depth == 2
    await submit(store, "u1", tenant="umbrella", max_queued=2)  # another tenant's own queue
    claim, run = await claim_started(store)
    await store.finish(claim, "c1", run, "done", "actual", {}, result=OK)
    await submit(store, "e3", max_queued=2)  # a finished entry frees its place


async def test_queued_request_bytes_are_bounded_per_tenant(store: DeferredStore) -> None:
    """A tenant's unfinished entries hold their request bodies in the store: bounded in
    bytes as well as in count; every final state gives its bytes back."""
    kib = b"x" * 1000
    size = len(kib) + len(fields()["headers"])
    cap = 3 * size
    for name in ("e1", "e2", "e3"):
        await submit(store, name, max_bytes=cap, body=kib)
    with pytest.raises(QueueFull) as err:
        await submit(store, "e4", max_bytes=cap, body=kib)
    assert (err.value.depth, err.value.held_bytes) == (3, cap)
    await submit(store, "u1", tenant="umbrella", max_bytes=cap, body=kib)  # its own count
    assert (await store.cancel("acme", "e1"))[0] == "cancelled"  # cancelled: bytes back
    await submit(store, "e4", max_bytes=cap, body=kib)
    claim, run = await claim_started(store)  # e2
    await store.finish(claim, "c1", run, "done", "actual", {}, result=OK)  # finished: back
    await submit(store, "e5", max_bytes=cap, body=kib)
    with pytest.raises(QueueFull):
        await submit(store, "e6", max_bytes=cap, body=b"y")
    # One entry bigger than the whole cap still goes in when nothing else is held.
    await submit(store, "big", tenant="solo", max_bytes=cap, body=kib * 5)


async def test_a_record_gone_before_it_ended_does_not_hold_its_bytes_for_ever(
        store: DeferredStore) -> None:
    """A record that expires away before its entry ends (a sweeper far behind) takes its size
    with it; once nothing is queued the count starts again from nothing."""
    body = b"x" * 1000
    await submit(store, "e0")  # keeps the stream and its count alive past e1's record
    await store.submit("acme", "e1", {**fields(), "body": body}, ttl_ms=100, grace_ms=1,
                       max_queued=10, max_bytes=2000)
    await asyncio.sleep(0.2)  # e1's record is gone; its stream entry is not
    first, run = await claim_started(store)  # e0 first: it ends and gives its bytes back
    assert first.id == "e0"
    await store.finish(first, "c1", run, "done", "actual", {}, result=OK)
    claim = await store.claim("acme", "c1", reclaim_idle_ms=None)
    assert claim is not None and claim.id == "e1"
    assert (await store.start(claim, "c1")).kind == "gone"  # dropped without its size
    await store.submit("acme", "e2", {**fields(), "body": body * 2}, ttl_ms=TTL_MS,
                       grace_ms=GRACE_MS, max_queued=10, max_bytes=2000)


async def test_a_lost_run_is_reclaimed_and_charged_once(store: DeferredStore) -> None:
    await submit(store, "e1")
    first, run = await claim_started(store, "dead")
    assert run == 1
    assert await store.claim("acme", "alive", reclaim_idle_ms=VIS_MS) is None  # still fresh
    await asyncio.sleep(VIS_MS / 1000 + 0.05)  # "dead" stopped renewing its claim
    claim = await store.claim("acme", "alive", reclaim_idle_ms=VIS_MS)
    assert claim is not None and claim.reclaimed and claim.id == "e1"
    started = await store.start(claim, "alive")
    assert (started.kind, started.run, started.lost) == ("run", 2, (1,))
    assert not await store.heartbeat(first, "dead")  # the claim is not taken back
    assert await store.heartbeat(claim, "alive")
    record = await store.get("acme", "e1")
    assert record is not None and record["charged:1"] == b"reserved"
    # the "dead" replica was only slow: its answer still counts, but its run was charged
    zombie = await store.finish(first, "dead", 1, "done", "actual", {"outcome": "success"},
                                result=OK)
    assert (zombie.won, zombie.charge) == (True, False)
    late = await store.finish(claim, "alive", 2, "done", "actual", {"outcome": "success"},
                              result=OK)
    assert (late.won, late.charge) == (False, True)
    record = await store.get("acme", "e1")
    assert record is not None and record["runs"] == b"2" and record["status"] == b"succeeded"


async def test_retry_waits_then_any_replica_runs_it_again(store: DeferredStore) -> None:
    await submit(store, "e1")
    claim, run = await claim_started(store)
    fin = await store.finish(claim, "c1", run, "retry", "actual", {"outcome": "http_503"},
                             delay_ms=100, visibility_ms=VIS_MS)
    assert (fin.won, fin.charge) == (False, True)
    assert (await store.get("acme", "e1") or {})["status"] == b"queued"
    assert await store.claim("acme", "c2", reclaim_idle_ms=VIS_MS) is None  # backoff not over
    await asyncio.sleep(0.15)
    again = await store.claim("acme", "c2", reclaim_idle_ms=VIS_MS)
    assert again is not None and again.reclaimed
    started = await store.start(again, "c2")
    assert (started.kind, started.run, started.lost) == ("run", 2, ())


async def test_a_run_that_never_called_does_not_count(store: DeferredStore) -> None:
    await submit(store, "e1")
    claim, run = await claim_started(store)
    fin = await store.finish(claim, "c1", run, "nocall", "none", {}, delay_ms=0,
                             visibility_ms=VIS_MS)
    assert (fin.won, fin.charge) == (False, False)
    record = await store.get("acme", "e1")
    assert record is not None and (record["status"], record["runs"]) == (b"queued", b"0")
    again = await store.claim("acme", "c2", reclaim_idle_ms=VIS_MS)
    assert again is not None
    started = await store.start(again, "c2")
    assert (started.kind, started.run, started.lost) == ("run", 1, ())


async def test_a_backoff_longer_than_the_visibility_timeout_is_kept(store: DeferredStore) -> None:
    await submit(store, "e1")
    claim, run = await claim_started(store)
    await store.finish(claim, "c1", run, "retry", "actual", {}, delay_ms=5_000,
                       visibility_ms=VIS_MS)
    again = await store.claim("acme", "c2", reclaim_idle_ms=0)
    assert again is not None
    later = await store.start(again, "c2")
    assert later.kind == "later" and 4_000 < later.wait_ms <= 5_000
    await store.release(again, "c2", delay_ms=later.wait_ms, visibility_ms=VIS_MS)
    assert await store.claim("acme", "c3", reclaim_idle_ms=VIS_MS) is None


async def test_cancel_only_while_queued(store: DeferredStore) -> None:
    await submit(store, "e1")
    await submit(store, "e2")
    status, hold = await store.cancel("acme", "e1")
    assert (status, hold) == ("cancelled", fields()["hold"])
    record = await store.get("acme", "e1")
    assert record is not None and "body" not in record and "headers" not in record
    assert await store.cancel("acme", "e1") == ("cancelled", None)  # no second refund
    assert await store.cancel("umbrella", "e2") == ("missing", None)  # another tenant's id
    assert await store.cancel("acme", "nope") == ("missing", None)
    claim = await store.claim("acme", "c1", reclaim_idle_ms=None)
    assert claim is not None and claim.id == "e2"  # the cancelled entry left the queue
    assert (await store.start(claim, "c1")).kind == "run"
    assert await store.cancel("acme", "e2") == ("running", None)
    assert (await store.scan("acme", 10)).depth == 1


async def test_a_cancelled_entry_claimed_before_the_cancel_is_dropped(
        store: DeferredStore) -> None:
    await submit(store, "e1")
    claim = await store.claim("acme", "c1", reclaim_idle_ms=None)
    assert claim is not None
    assert (await store.cancel("acme", "e1"))[0] == "cancelled"
    started = await store.start(claim, "c1")
    assert (started.kind, started.status) == ("done", "cancelled")
    assert (await store.scan("acme", 10)).depth == 0


async def test_expiry(store: DeferredStore) -> None:
    await submit(store, "old", ttl_ms=100)
    await submit(store, "new")
    await asyncio.sleep(0.15)
    scan = await store.scan("acme", 10)
    assert scan.depth == 2 and scan.oldest_age_s >= 0.1
    (sid, entry_id, expires_ms), young = scan.head
    assert entry_id == "old" and expires_ms <= scan.now_ms < young[2]
    assert await store.expire("acme", "new", young[0]) == ("queued", None)  # not yet
    status, hold = await store.expire("acme", "old", sid)
    assert (status, hold) == ("expired", fields()["hold"])
    assert await store.expire("acme", "old", sid) == ("expired", None)
    record = await store.get("acme", "old")
    assert record is not None and record["status"] == b"expired"  # readable for the grace
    assert "body" not in record and "headers" not in record
    assert (await store.scan("acme", 10)).depth == 1


async def test_an_expired_entry_is_not_run_and_its_lost_runs_are_charged(
        store: DeferredStore) -> None:
    await submit(store, "e1", ttl_ms=300)
    await claim_started(store, "dead")
    await asyncio.sleep(0.35)
    claim = await store.claim("acme", "alive", reclaim_idle_ms=VIS_MS)
    assert claim is not None
    started = await store.start(claim, "alive")
    assert (started.kind, started.lost, started.fields["hold"]) == ("expired", (1,),
                                                                    fields()["hold"])
    record = await store.get("acme", "e1")
    assert record is not None and record["status"] == b"expired" and "body" not in record
    assert (await store.scan("acme", 10)).depth == 0


async def test_tenants_are_isolated(store: DeferredStore) -> None:
    await submit(store, "e1", tenant="acme")
    assert await store.get("umbrella", "e1") is None
    assert await store.claim("umbrella", "c1", reclaim_idle_ms=0) is None
    assert (await store.scan("umbrella", 10)).depth == 0
    assert (await store.scan("acme", 10)).depth == 1
