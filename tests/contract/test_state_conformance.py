"""One contract for every ``StateBackend``: memory, standalone Redis and Redis Cluster.

The shared suite runs against all three; below it come the tests only one side can run:
exact expiry and bounded memory on the memory backend (fake clock), prefixes, failure
bounds and recovery on real Redis servers. Redis TTLs are checked through PTTL values,
never by sleeping until expiry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.state import (
    MemoryBackend,
    RedisBackend,
    StateBackend,
    StateUnavailable,
    create_backend,
)
from gateway.state.plan import SettlePlan
from tests.gwtest import FakeClock
from tests.redis_server import RedisCluster3, RedisServer, pick_port

HOUR_MS = 3_600_000


async def test_set_get_round_trip(backend: StateBackend) -> None:
    value = bytes(range(256))  # binary-safe, NUL included
    assert await backend.set("rt", value, HOUR_MS) is True
    assert await backend.get("rt") == value


async def test_get_missing_is_none(backend: StateBackend) -> None:
    assert await backend.get("never-written") is None
    assert await backend.ttl_ms("never-written") is None


async def test_plain_set_overwrites_value_and_ttl(backend: StateBackend) -> None:
    await backend.set("ow", b"one", HOUR_MS)
    assert await backend.set("ow", b"two", 10_000) is True
    assert await backend.get("ow") == b"two"
    ttl = await backend.ttl_ms("ow")
    assert ttl is not None and 0 < ttl <= 10_000


async def test_only_if_absent(backend: StateBackend) -> None:
    assert await backend.set("nx", b"first", HOUR_MS, only_if_absent=True) is True
    assert await backend.set("nx", b"second", HOUR_MS, only_if_absent=True) is False
    assert await backend.get("nx") == b"first"


async def test_delete_returns_whether_key_existed(backend: StateBackend) -> None:
    await backend.set("del", b"x", HOUR_MS)
    assert await backend.delete("del") is True
    assert await backend.get("del") is None
    assert await backend.delete("del") is False


async def test_ttl_ms_within_bounds(backend: StateBackend) -> None:
    await backend.set("ttl", b"x", 5_000)
    ttl = await backend.ttl_ms("ttl")
    assert ttl is not None and 4_000 <= ttl <= 5_000


async def test_non_positive_ttl_is_a_caller_error(backend: StateBackend) -> None:
    with pytest.raises(ValueError):
        await backend.set("bad", b"x", 0)
    with pytest.raises(ValueError):
        await backend.set("bad", b"x", -5)
    assert await backend.get("bad") is None


async def test_ping_and_idempotent_close(backend: StateBackend) -> None:
    assert await backend.ping() is True
    await backend.close()
    await backend.close()


# --- memory only: exact time, bounded memory -----------------------------------------


async def test_memory_expiry_is_exact() -> None:
    clock = FakeClock(1000.0)
    store = MemoryBackend(clock)
    await store.set("k", b"v", 100)
    await store.set("c", b"1", 100)

    clock.now = 1000.0 + 0.099  # ttl - 1 ms: still there
    assert await store.get("k") == b"v"
    assert await store.ttl_ms("k") == 1
    assert await store.set("c", b"2", 100, only_if_absent=True) is False

    clock.now = 1000.0 + 0.100  # exactly ttl: gone, everywhere
    assert await store.get("k") is None
    assert await store.ttl_ms("k") is None
    assert await store.delete("c") is False
    assert await store.set("k", b"new", 50, only_if_absent=True) is True
    assert await store.set("c", b"3", 100, only_if_absent=True) is True  # fresh, fresh TTL
    assert await store.ttl_ms("c") == 100


async def test_memory_lazy_purge_on_access() -> None:
    clock = FakeClock()
    store = MemoryBackend(clock)
    await store.set("k", b"v", 10)
    clock.now += 1
    assert store.stored_count() == 1
    assert await store.get("k") is None
    assert store.stored_count() == 0


@pytest.mark.parametrize("ttl_ms", [5, 2_000])
async def test_memory_stays_bounded_under_key_churn(ttl_ms: int) -> None:
    clock = FakeClock()
    store = MemoryBackend(clock)
    peak = 0
    for i in range(10_000):  # distinct keys, one write per simulated millisecond
        clock.now += 0.001
        await store.set(f"s{i}", b"x", ttl_ms, only_if_absent=bool(i % 2))
        peak = max(peak, store.stored_count())
    live = ttl_ms  # keys younger than the TTL
    assert peak <= 1.5 * live + 32, peak


# --- Redis only -----------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_keys_carry_the_prefix(clean_redis: RedisServer) -> None:
    store = RedisBackend(clean_redis.url, key_prefix="gwtest:")
    try:
        await store.set("k", b"v", HOUR_MS)
        await store.set("n", b"1", HOUR_MS)
        assert clean_redis.command("EXISTS", "gwtest:k") == 1
        assert clean_redis.command("EXISTS", "gwtest:n") == 1
        assert clean_redis.command("EXISTS", "k") == 0
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_cluster_mode_is_selected_by_url(redis_cluster: RedisCluster3) -> None:
    store = RedisBackend(redis_cluster.url)
    try:
        assert store.cluster is True
        # Different hash tags land on different masters; all of them must work.
        for tenant in ("hooli", "umbrella", "acme"):
            key = f"rl:{{{tenant}}}:n"
            assert await store.set(key, tenant.encode(), HOUR_MS) is True
            assert await store.get(key) == tenant.encode()
    finally:
        await store.close()


def _ops(store: RedisBackend) -> list[Callable[[], Awaitable[object]]]:
    return [
        lambda: store.get("k"),
        lambda: store.set("k", b"v", HOUR_MS),
        lambda: store.delete("k"),
        lambda: store.renew_leases("n", ["r1"], HOUR_MS),  # a script (EVALSHA)
        lambda: store.ttl_ms("k"),
    ]


async def _assert_all_fail_fast(store: RedisBackend, bound_s: float) -> None:
    for op in _ops(store):
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await op()
        assert time.monotonic() - started < bound_s
    started = time.monotonic()
    assert await store.ping() is False
    assert time.monotonic() - started < bound_s


@pytest.mark.redis
async def test_redis_stopped_server_fails_fast_and_recovers() -> None:
    with RedisServer() as server:  # our own: the session server stays up
        store = RedisBackend(server.url, timeout_s=0.25)
        try:
            await store.start()
            await store.renew_leases("n", ["r1"], HOUR_MS)  # caches the script SHA

            server.stop()
            await _assert_all_fail_fast(store, 1.5)

            server.start()  # same port, empty data, empty script cache
            deadline = time.monotonic() + 5
            while not await store.ping():
                assert time.monotonic() < deadline, "backend did not reconnect"
                await asyncio.sleep(0.05)
            # Same object, no re-creation; EVALSHA hits NOSCRIPT and the script reloads.
            await store.renew_leases("n", ["r1"], HOUR_MS)
            # A settle pipeline too: NOSCRIPT calls did not run, so they run once, reloaded.
            plans = [SettlePlan(f"r{i}", f"rl:{{t:a}}:done:r{i}", f"rl:{{t:a}}:hold:r{i}",
                                HOUR_MS, (), (("rl:{t:a}:day", 0, 7, HOUR_MS),), ())
                     for i in range(3)]
            assert await store.settle_many(plans) == [True, True, True]
            assert await store.get("rl:{t:a}:day") == b"21"
            assert await store.set("k", b"back", HOUR_MS) is True
            assert await store.get("k") == b"back"
        finally:
            await store.close()


@pytest.mark.redis
async def test_redis_hung_server_is_cut_off_by_the_deadline() -> None:
    with RedisServer() as server:
        store = RedisBackend(server.url, timeout_s=0.25)
        try:
            assert await store.set("k", b"v", HOUR_MS) is True
            server.pause()  # accepts TCP, answers nothing
            try:
                await _assert_all_fail_fast(store, 1.5)
            finally:
                server.resume()
            assert await store.get("k") == b"v"
        finally:
            await store.close()


@pytest.mark.redis
async def test_redis_cluster_ping_needs_every_primary(redis_cluster: RedisCluster3) -> None:
    store = RedisBackend(redis_cluster.url, timeout_s=0.25)
    try:
        assert await store.ping() is True
        redis_cluster.nodes[0].stop()
        try:
            started = time.monotonic()
            assert await store.ping() is False
            assert time.monotonic() - started < 1.5
        finally:
            redis_cluster.start()  # restarts the stopped node, waits for cluster_state:ok
        deadline = time.monotonic() + 5
        while not await store.ping():
            assert time.monotonic() < deadline, "cluster client did not recover"
            await asyncio.sleep(0.05)
    finally:
        await store.close()


@pytest.mark.redis
@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_redis_errors_never_show_the_password(scheme: str) -> None:
    port = pick_port()  # nothing listens there
    store = RedisBackend(f"{scheme}://user:hunter2secret@127.0.0.1:{port}", timeout_s=0.25)
    try:
        with pytest.raises(StateUnavailable) as caught:
            await store.get("k")
        assert "hunter2secret" not in str(caught.value)
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "hunter2secret" not in repr(store)
        assert await store.ping() is False
    finally:
        await store.close()


# --- construction and the factory -----------------------------------------------------


async def test_create_backend_memory_and_redis() -> None:
    memory = create_backend("memory", redis_url=None, timeout_s=0.25, key_prefix="gw:")
    assert isinstance(memory, MemoryBackend) and memory.name == "memory"
    standalone = create_backend(
        "redis", redis_url="redis://127.0.0.1:6379/0", timeout_s=0.25, key_prefix="gw:"
    )
    cluster = create_backend(
        "redis", redis_url="redis+cluster://h1:7000,h2:7001", timeout_s=0.25, key_prefix="gw:"
    )
    assert isinstance(standalone, RedisBackend) and standalone.cluster is False
    assert isinstance(cluster, RedisBackend) and cluster.cluster is True
    assert standalone.name == cluster.name == "redis"
    await standalone.close()
    await cluster.close()


@pytest.mark.parametrize(
    ("kind", "url", "message"),
    [
        ("redis", None, "needs a Redis URL"),
        ("redis", "", "needs a Redis URL"),
        ("etcd", None, "unknown state backend 'etcd'"),
        ("redis", "http://127.0.0.1:6379", "unsupported Redis URL scheme 'http'"),
        ("redis", "redis+cluster://h1:7000,h2", "cluster node 'h2' is not host:port"),
        ("redis", "redis+cluster://h1:7000/3", "takes no database"),
        ("redis", "redis+cluster://h1:7000?ssl_ca_certs=/ca.pem", "need a rediss\\+cluster"),
        ("redis", "rediss+cluster://h1:7000?db=2", "not db"),
    ],
)
def test_create_backend_rejects_bad_settings(kind: str, url: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_backend(kind, redis_url=url, timeout_s=0.25, key_prefix="gw:")


def test_redis_backend_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="rediss://"):
        RedisBackend("redis://127.0.0.1:6379", ssl_ca_certs="/etc/ssl/ca.pem")
    with pytest.raises(ValueError, match="hash tags"):
        RedisBackend("redis://127.0.0.1:6379", key_prefix="gw:{x}:")
