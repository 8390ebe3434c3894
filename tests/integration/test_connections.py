"""Connection caps and the request-head timeout, over real sockets on loopback.

A connection beyond server.max_connections_per_ip (one address) or server.max_connections (the
process) is closed as accepted, before any byte is read, while other clients keep being
served; trusted proxies are not capped per address; a connection that sends no complete
request head within server.header_read_timeout_s is closed, an idle keep-alive is not.
127.0.0.2 is a second source address (Linux routes all of 127.0.0.0/8 to loopback).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.app.server import GATEWAY
from gateway.config.model import GatewayConfig, parse_config
from gateway.process.connections import ConnectionGuard, default_max_connections
from tests.gwtest import FakeClock, log_fields, policy_dict
from tests.plugin_gateway import GatewayClient, MakeGateway

Client = GatewayClient
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.fixture
async def opened() -> AsyncIterator[list[Conn]]:
    conns: list[Conn] = []
    yield conns
    for _, writer in conns:
        writer.close()


async def connect(client: Client, conns: list[Conn], source: str = "127.0.0.1") -> Conn:
    """A raw TCP connection from ``source`` to the gateway; nothing is sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.server.port))
    conn = await asyncio.open_connection(sock=sock)
    conns.append(conn)
    return conn


async def closed_by_server(conn: Conn, within_s: float = 10.0) -> bool:
    """True when the gateway closes the connection (EOF or reset) without answering."""
    try:
        data = await asyncio.wait_for(conn[0].read(1024), within_s)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert data == b"", data  # closed without a byte of answer
    return True


async def answered(conn: Conn) -> bytes:
    """Send a health check on ``conn`` and return the response head's status line."""
    conn[1].write(HEALTH)
    await conn[1].drain()
    head = await asyncio.wait_for(conn[0].readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    length = next(int(v) for k, _, v in (ln.partition(b":") for ln in lines)
                  if k.lower() == b"content-length")
    await asyncio.wait_for(conn[0].readexactly(length), 10)  # the next answer starts clean
    return lines[0]


def metric(client: Client, name: str, **labels: str) -> float:
    value = client.app[GATEWAY].metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def until_open(client: Client, count: int) -> None:
    """Wait until the gateway counts ``count`` open connections (accept order is FIFO, but
    the accept itself happens a loop turn after the client's connect returns)."""
    for _ in range(500):
        if metric(client, "gateway_client_connections") == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"open connections: {metric(client, 'gateway_client_connections')}")


Make = Callable[..., Awaitable[Client]]


@pytest.fixture
def make(make_gateway: MakeGateway) -> Make:
    async def build(**server: Any) -> Client:
        return await make_gateway(server=server)
    return build


async def test_connections_beyond_the_per_address_cap_are_closed_while_others_are_served(
        make: Make, opened: list[Conn], caplog: pytest.LogCaptureFixture) -> None:
    client = await make(max_connections=100, max_connections_per_ip=3)
    held = [await connect(client, opened) for _ in range(3)]
    await until_open(client, 3)
    with caplog.at_level(logging.WARNING, "gateway.server"):
        extra = [await connect(client, opened) for _ in range(2)]
        assert [await closed_by_server(c) for c in extra] == [True, True]
    assert metric(client, "gateway_connections_refused_total",
                  reason="max_connections_per_ip") == 2
    # One log line for the flood, with the count, not one per connection.
    lines = [r for r in caplog.records if "connection limits" in r.getMessage()]
    assert len(lines) == 1
    # Another address is served; the three held connections still work.
    other = await connect(client, opened, "127.0.0.2")
    assert await answered(other) == b"HTTP/1.1 200 OK"
    assert await answered(held[0]) == b"HTTP/1.1 200 OK"
    # A closed connection frees its place for the same address.
    held[1][1].close()
    await until_open(client, 3)
    again = await connect(client, opened)
    assert await answered(again) == b"HTTP/1.1 200 OK"


async def test_connections_beyond_the_process_cap_are_closed_whoever_opens_them(
        make: Make, opened: list[Conn]) -> None:
    client = await make(max_connections=3, max_connections_per_ip=100)
    held = [await connect(client, opened) for _ in range(3)]
    await until_open(client, 3)
    assert await closed_by_server(await connect(client, opened, "127.0.0.2"))
    assert metric(client, "gateway_connections_refused_total", reason="max_connections") == 1
    assert await answered(held[2]) == b"HTTP/1.1 200 OK"
    held[0][1].close()
    await until_open(client, 2)
    assert await answered(await connect(client, opened, "127.0.0.2")) == b"HTTP/1.1 200 OK"


async def test_trusted_proxies_are_not_capped_per_address(make: Make,
                                                          opened: list[Conn]) -> None:
    client = await make(max_connections=100, max_connections_per_ip=2,
                        trusted_proxies=["127.0.0.1/32"])
    proxy = [await connect(client, opened) for _ in range(5)]
    await until_open(client, 5)
    for conn in proxy:
        assert await answered(conn) == b"HTTP/1.1 200 OK"
    [await connect(client, opened, "127.0.0.2") for _ in range(2)]
    await until_open(client, 7)
    assert await closed_by_server(await connect(client, opened, "127.0.0.2"))


async def test_a_connection_without_a_complete_request_head_in_time_is_closed(
        make: Make, opened: list[Conn]) -> None:
    client = await make(header_read_timeout_s=0.5)
    silent = await connect(client, opened)
    trickling = await connect(client, opened)
    began = time.monotonic()
    trickling[1].write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")

    async def trickle() -> None:
        for _ in range(100):  # a header line every 0.1 s, never the blank line
            await asyncio.sleep(0.1)
            if trickling[1].is_closing():
                return
            trickling[1].write(b"X-a: b\r\n")

    task = asyncio.create_task(trickle())
    assert await closed_by_server(silent)
    assert await closed_by_server(trickling)
    task.cancel()
    assert time.monotonic() - began < 8  # aiohttp alone held them 75 s
    assert metric(client, "gateway_connections_refused_total", reason="header_timeout") == 2
    await until_open(client, 0)


async def test_an_idle_keep_alive_connection_outlives_the_header_timeout(
        make: Make, opened: list[Conn]) -> None:
    client = await make(header_read_timeout_s=0.3)
    conn = await connect(client, opened)
    assert await answered(conn) == b"HTTP/1.1 200 OK"  # a head in time
    await asyncio.sleep(1.0)  # idle between requests: keepalive_timeout's business, not ours
    assert await answered(conn) == b"HTTP/1.1 200 OK"
    # ...but the next head, once started, must be completed in time too.
    conn[1].write(b"GET /healthz HTTP/1.1\r\n")
    assert await closed_by_server(conn)


def test_default_caps_leave_file_descriptors_for_upstream_pools_and_redis() -> None:
    config = parse_config(policy_dict("http://127.0.0.1:1"))
    pools = sum(p.pool_size for p in config.providers.values())
    assert default_max_connections(config, 20_000) == 20_000 - pools - 2_000
    assert default_max_connections(config, 1024) == 1024 - pools - 256
    guard = ConnectionGuard(lambda: config, nofile=lambda: 20_000)
    limits = guard.limits()
    assert limits.per_ip == limits.total // 4
    small = ConnectionGuard(lambda: config, nofile=lambda: 1024).limits()
    assert small.per_ip == 256 < small.total  # a busy host on a small limit keeps room
    # The red team's flood: 20,400 connections from one address; at most a quarter held.
    admitted = sum(guard.admit("10.0.0.9")[1] is None for _ in range(20_400))
    assert admitted == limits.per_ip
    assert guard.admit("10.0.0.10")[1] is None  # another client still gets in


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_at_start() -> None:
    # In a child process: the test process's own limit stays as it is.
    script = ("import resource; from gateway.process.connections import raise_open_file_limit; "
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
              "print(raise_open_file_limit() == (hard if hard != resource.RLIM_INFINITY "
              "else max(256, 1 << 20)), hard > 256)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    if out[1] == "False":
        pytest.skip("the hard limit is 256 or less here")
    assert out[0] == "True"


async def test_refusals_are_logged_once_per_interval_with_their_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(policy_dict("http://127.0.0.1:1", server={
        "max_connections": 10, "max_connections_per_ip": 1}))
    clock = FakeClock(100.0)
    guard = ConnectionGuard(lambda: config, clock=clock)
    with caplog.at_level(logging.WARNING, "gateway.server"):
        assert guard.admit("10.0.0.1")[1] is None
        for _ in range(1000):  # a flood within one interval: the first line at once...
            assert guard.admit("10.0.0.1")[1] == "max_connections_per_ip"
            clock.now += 0.001
        lines = [r for r in caplog.records if "connection limits" in r.getMessage()]
        assert len(lines) == 1
        assert guard._flush is not None  # ...the rest at the end of the interval
        guard._flush.cancel()
        clock.now += 10
        guard._log_later()
    lines = [r for r in caplog.records if "connection limits" in r.getMessage()]
    assert len(lines) == 2
    fields: list[dict[str, Any]] = [log_fields(r) for r in lines]
    assert [f["closed"] for f in fields] == [{"max_connections_per_ip": 1},
                                             {"max_connections_per_ip": 999}]
    assert fields[1]["last_peer"] == "10.0.0.1" and fields[1]["open"] == 1


def test_a_reloaded_policy_changes_the_caps_for_new_connections() -> None:
    def config(per_ip: int) -> GatewayConfig:
        return parse_config(policy_dict("http://127.0.0.1:1", server={
            "max_connections": 10, "max_connections_per_ip": per_ip}))
    live = [config(1)]
    guard = ConnectionGuard(lambda: live[0], nofile=lambda: 20_000)
    key, _ = guard.admit("10.0.0.1")
    assert guard.admit("10.0.0.1")[1] == "max_connections_per_ip"
    live[0] = config(2)  # what a reload does: a new policy object
    assert guard.admit("10.0.0.1")[1] is None
    assert guard.open == 2
    assert key is not None
    guard.release(key)
    guard.release(key)
    assert guard.open == 0 and not guard._per_peer  # nothing left behind per address


def test_addresses_are_counted_like_the_failed_auth_limit_counts_them() -> None:
    from ipaddress import ip_network

    from gateway.process.connections import _peer_key
    trusted = (ip_network("10.1.0.0/16"),)
    assert _peer_key("2001:db8::1", ()) == _peer_key("2001:db8::ffff", ()) == "2001:db8::/64"
    assert _peer_key("::ffff:192.0.2.7", ()) == "192.0.2.7"
    assert _peer_key("10.1.2.3", trusted) is None  # a load balancer: not capped per address
    assert _peer_key("10.2.2.3", trusted) == "10.2.2.3"
    assert _peer_key(None, ()) is None  # a Unix socket: only the process cap
