"""Session-wide fixtures. Redis fixtures start real servers and fail (never skip) when
redis-server cannot start."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.state import MemoryBackend, RedisBackend, StateBackend
from tests.redis_server import RedisCluster3, RedisServer

pytest_plugins = ["tests.plugin_gateway"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone redis-server for the whole session (started on first use)."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster3]:
    """A 3-master Redis Cluster for the session, created only if a test asks for it."""
    cluster = RedisCluster3()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    """The session server, FLUSHALLed before the test (and restarted if a test left it
    stopped), so every test starts from an empty store."""
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server


@pytest.fixture
def clean_redis_cluster(redis_cluster: RedisCluster3) -> RedisCluster3:
    """The session cluster, every node FLUSHALLed before the test."""
    if not all(node.running for node in redis_cluster.nodes):
        redis_cluster.start()
    redis_cluster.flushall()
    return redis_cluster


# --- one fixture, three backends: the conformance suites run against each --------------


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory backend, else the URL of a freshly flushed Redis."""
    if request.param == "memory":
        return None
    return _shared_url(request)


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def shared_backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of a freshly flushed Redis, then of a 3-node Cluster: for tests of what only a
    shared store does (replicas, TTLs read back); they fail, never skip, without one."""
    return _shared_url(request)


def _shared_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("clean_redis")
        return server.url
    cluster: RedisCluster3 = request.getfixturevalue("clean_redis_cluster")
    return cluster.url


@pytest.fixture
async def backend(backend_url: str | None) -> AsyncIterator[StateBackend]:
    # A roomy timeout: these tests are about behaviour, and a loaded CI machine must
    # not turn 200 concurrent calls into StateUnavailable. Fault tests use 0.25 s.
    store: StateBackend = (
        MemoryBackend() if backend_url is None else RedisBackend(backend_url, timeout_s=1.0)
    )
    await store.start()
    yield store
    await store.close()


# --- tiers: the directory a test lives in is its marker -----------------------------------------
TIERS = ("unit", "contract", "integration", "faults")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`-m unit` (exactly one tier) does not import the other tiers' modules at all: their
    markers come from their directory, so none of their tests could be selected, and importing
    them (the SDKs, schemathesis) is most of the fast loop's time."""
    tier = str(config.getoption("markexpr", "")).strip()
    root = config.rootpath / "tests"
    if tier in TIERS and collection_path.parent == root and collection_path.name in TIERS:
        return collection_path.name != tier
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """tests/<tier>/... gets the <tier> marker, so `pytest -m unit` is the fast loop; the
    default run selects nothing away and runs every tier."""
    root = config.rootpath / "tests"
    for item in items:
        parts = item.path.relative_to(root).parts if item.path.is_relative_to(root) else ()
        if parts and parts[0] in TIERS:
            item.add_marker(parts[0])
