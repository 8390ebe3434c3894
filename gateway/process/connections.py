"""Caps on open client connections, checked the moment aiohttp accepts one (process/runner.py).

A connection costs a file descriptor before it sends a byte. Without a cap, one address opening
twenty thousand idle TCP connections took the process to its open-file limit: upstream calls,
Redis and log files then failed for every tenant (``Can not write request body``), and nothing
was logged. Here a connection beyond ``server.max_connections`` (this process) or
``server.max_connections_per_ip`` (one peer address; trusted proxies exempt, since behind a load
balancer every connection comes from it) is closed at once, before any byte is read; each one
is counted in ``gateway_connections_refused_total{reason}`` and logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from gateway.config import GatewayConfig

if TYPE_CHECKING:
    from gateway.observability import GatewayMetrics

log = logging.getLogger("gateway.server")

Reason = Literal["max_connections", "max_connections_per_ip", "header_timeout"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# File descriptors kept for everything that is not a client connection: Redis, the journal,
# logs, the listener, worker pipes, DNS; the upstream pools (pool_size each) come on top.
MIN_RESERVE_FDS = 256
# The default per-address cap is a quarter of the process cap, but never below this (a busy
# agent host, or a load balancer not listed in trusted_proxies, on a small open-file limit).
MIN_PER_IP = 256
# Refusals come in floods: one line per interval with the counts, never one per connection.
LOG_INTERVAL_S = 10.0


def open_file_limit() -> int:
    """This process's soft RLIMIT_NOFILE (unlimited counted as 2**20)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd and some container runtimes set
    1024 soft over a far higher hard limit; Python, unlike Go, does not raise it), so the
    default max_connections is sized on what the process may really open. Returns the soft
    limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. macOS caps at OPEN_MAX: keep what we have
            pass
    return open_file_limit()


def default_max_connections(config: GatewayConfig, nofile: int) -> int:
    """The open-file limit less a reserve: every provider's pool, plus a tenth (>= 256)."""
    pools = sum(p.pool_size for p in config.providers.values())
    reserve = pools + max(MIN_RESERVE_FDS, nofile // 10)
    return max(16, nofile - reserve)


class _Limits:
    """The caps of one policy version, resolved once."""

    __slots__ = ("per_ip", "total", "trusted")

    def __init__(self, config: GatewayConfig, nofile: int) -> None:
        server = config.server
        self.total = (server.max_connections if server.max_connections is not None
                      else default_max_connections(config, nofile))
        self.per_ip = (server.max_connections_per_ip if server.max_connections_per_ip
                       is not None else max(min(self.total, MIN_PER_IP), self.total // 4))
        self.trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(t, strict=False) for t in server.trusted_proxies)


class ConnectionGuard:
    """Open client connections of this process, in total and per peer address."""

    def __init__(self, config: Callable[[], GatewayConfig],
                 metrics: GatewayMetrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 nofile: Callable[[], int] = open_file_limit) -> None:
        self._config = config  # the live policy: a reload changes the caps for new connections
        self._metrics = metrics
        self._clock = clock
        self._nofile = nofile
        self._limits: tuple[GatewayConfig | None, _Limits | None] = (None, None)
        self.open = 0
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._last_peer = ""
        self._logged_at: float | None = None
        self._flush: asyncio.TimerHandle | None = None

    def limits(self) -> _Limits:
        config = self._config()
        cached_for, limits = self._limits
        if cached_for is not config or limits is None:
            limits = _Limits(config, self._nofile())
            self._limits = (config, limits)
        return limits

    @property
    def header_read_timeout_s(self) -> float:
        return self._config().server.header_read_timeout_s

    def admit(self, peer: str | None) -> tuple[str | None, Reason | None]:
        """Count a new connection from ``peer`` (an IP address, or None for a Unix socket).

        Returns (the key to pass to ``release``, None), or (None, why it must be closed)."""
        limits = self.limits()
        if self.open >= limits.total:
            self.refused("max_connections", peer)
            return None, "max_connections"
        key = _peer_key(peer, limits.trusted)
        if key is not None:
            if self._per_peer[key] >= limits.per_ip:
                self.refused("max_connections_per_ip", peer)
                return None, "max_connections_per_ip"
            self._per_peer[key] += 1
        self.open += 1
        self._gauge()
        return key or "", None

    def release(self, key: str) -> None:
        """An admitted connection closed."""
        self.open -= 1
        if key:
            left = self._per_peer[key] - 1
            if left > 0:
                self._per_peer[key] = left
            else:
                del self._per_peer[key]
        self._gauge()

    def refused(self, reason: Reason, peer: str | None) -> None:
        """A connection closed by a cap or the header timeout: counted, logged at a bounded
        rate (the first at once, then one line per LOG_INTERVAL_S with the counts)."""
        if self._metrics is not None:
            self._metrics.connection_refused(reason)
        self._unlogged[reason] += 1
        self._last_peer = (peer or "unix")[:64]
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL_S:
            self._log(now)
        elif self._flush is None:
            try:  # the tail of a flood is logged too, even if no connection comes after it
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flush = loop.call_later(LOG_INTERVAL_S - (now - self._logged_at),
                                          self._log_later)

    def _log_later(self) -> None:
        self._flush = None
        if self._unlogged:
            self._log(self._clock())

    def _log(self, now: float) -> None:
        limits = self.limits()
        log.warning("client connections closed by the connection limits", extra={"fields": {
            "closed": dict(self._unlogged), "last_peer": self._last_peer,
            "open": self.open, "max_connections": limits.total,
            "max_connections_per_ip": limits.per_ip}})
        self._unlogged.clear()
        self._logged_at = now

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.client_connections(self.open)


def _peer_key(peer: str | None, trusted: tuple[Network, ...]) -> str | None:
    """What the per-address cap counts by (an IPv4 address, an IPv6 /64), or None when the
    peer is not capped: a trusted proxy, or no IP peer (a Unix socket)."""
    if not peer:
        return None
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in trusted):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
