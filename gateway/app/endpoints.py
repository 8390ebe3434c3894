"""Every route the gateway serves and how each is limited (docs/architecture.md, "Routes").

Routes are registered only through ``Routes``, whose four methods are the four kinds of route;
each wraps its handler so the limiting cannot be left out, and records the route in the app's
``ROUTE_TABLE``. ``tests/integration/test_endpoints.py`` walks the app's router: a route added any other
way (``app.router.add_get`` directly) is not in the table and fails that test.

- ``proxied``: the API routes of ``pipeline.handle_proxy``, which authenticates and admits the
  request itself (the full plan: requests, tokens, concurrency lease, budgets, loop guard; the
  token-counting routes requests and the lease only).
- ``tenant``: authenticated routes the gateway answers itself (models, deferred status, answer
  and cancel). The wrapper authenticates, then counts the request against the tenant's (and,
  with ``X-Agent-Session``, the session's) ``requests_per_minute`` with a request-only plan,
  in the same single atomic call the proxied routes make, unless the tenant lists the route in
  ``limits.exempt_routes``. No concurrency lease: these answers are quick, and the one that is
  not (a ``?wait=`` long poll) has its own cap (app/deferred_api.py).
- ``admin``: the admin key, then the replica's own admin limit (``admin.requests_per_minute``).
- ``public``: probes and the open metrics scrape; unauthenticated and not limited.

Every kind that reads a key first passes the failed-authentication limit of its client address
(``AuthFailureGuard``): an address that failed too often is refused with 429 before its key is
compared. The guard lives in each replica's memory, not in Redis, on purpose: checking a shared
store would put a round trip in front of every request (successful ones included) and make
authentication fail when Redis does; a guesser spread over R replicas gets R times the tries,
which against 128-bit keys changes nothing, while the point, bounding a 401 flood and making
guessing slow, holds on each replica.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from aiohttp import web

from gateway.config import AuthFailureLimit, GatewayConfig
from gateway.errors import GatewayError, RateLimited, retry_headers
from gateway.request import AuthenticationFailed, TenantPolicy, header_id
from gateway.state import Gcra, Scope, Tat, gcra_step

from .admin import check_admin

if TYPE_CHECKING:
    from gateway.request import RequestRecord

    from .runtime import Gateway

RouteKind = Literal["proxied", "tenant", "admin", "public"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TenantHandler = Callable[[web.Request, TenantPolicy], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One registered route: ``name`` is ``METHOD /path/{template}``."""

    name: str
    kind: RouteKind
    handler: Handler  # the wrapped handler the router calls


ROUTE_TABLE = web.AppKey("route_table", dict[str, RouteInfo])


class AuthFailureGuard:
    """Failed authentications per client address, as a GCRA per address: ``max_failures`` may
    come at once, then one per ``window_s / max_failures``. ``check`` refuses an address whose
    next failure would not fit, before its key is looked at; success never touches it."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # address -> theoretical arrival time; empty while nobody failed (checked first)
        self.table: collections.OrderedDict[str, float] = collections.OrderedDict()

    def check(self, address: str, limit: AuthFailureLimit) -> None:
        tat = self.table.get(address)
        if tat is None:
            return
        now = self.clock()
        if tat <= now:  # every failure forgiven
            del self.table[address]
            return
        interval = limit.window_s / limit.max_failures
        allow_at = tat - (limit.max_failures - 1) * interval
        if now < allow_at:
            wait_ms = max(1, math.ceil((allow_at - now) * 1000))
            raise RateLimited(
                "Too many failed authentications from this address; retry in "
                f"{math.ceil(wait_ms / 1000)} s.",
                code="too_many_auth_failures", headers=retry_headers(wait_ms))

    def failed(self, address: str, limit: AuthFailureLimit) -> None:
        now = self.clock()
        tat = self.table.pop(address, now)
        self.table[address] = max(tat, now) + limit.window_s / limit.max_failures
        while len(self.table) > limit.max_addresses:  # forget the least recently failing
            self.table.popitem(last=False)


class AdminLimit:
    """The replica's admin requests per minute (one GCRA, all admin keys together): admin
    answers are built from in-process snapshots, so the limit is per replica as well."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._tat: Tat | None = None

    def take(self, config: GatewayConfig) -> None:
        rpm = config.admin.requests_per_minute
        check = Gcra("admin", Fraction(60_000, rpm), config.admin.burst, 1, "requests",
                     scope=Scope.replica)
        ok, tat, result = gcra_step(self._tat, math.floor(self.clock() * 1000), check)
        if ok:
            self._tat = tat
            return
        wait_ms = max(1, result.retry_after_ms)
        raise RateLimited(
            f"Admin rate limit reached ({rpm} requests per minute on this replica); retry "
            f"in {math.ceil(wait_ms / 1000)} s.",
            code="rate_limit_exceeded", headers=retry_headers(wait_ms))


AUTH_GUARD = web.AppKey("auth_guard", AuthFailureGuard)
ADMIN_LIMIT = web.AppKey("admin_limit", AdminLimit)


class Routes:
    """The only way routes are added to the gateway app (see the module docstring)."""

    def __init__(self, app: web.Application, gateway_key: web.AppKey[Gateway],
                 record_key: web.RequestKey[RequestRecord],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.gateway_key = gateway_key
        self.record_key = record_key
        app[ROUTE_TABLE] = {}
        self.guard = app[AUTH_GUARD] = AuthFailureGuard(clock)
        app[ADMIN_LIMIT] = AdminLimit(clock)
        self._networks: tuple[tuple[str, ...], tuple[Network, ...]] = ((), ())

    def proxied(self, method: str, path: str, handler: Handler) -> None:
        """A route whose handler authenticates and admits the request itself
        (pipeline.handle_proxy)."""
        guard = self.guard

        async def limited(request: web.Request) -> web.StreamResponse:
            # The hot path: nothing but this test while no address has failed lately.
            if guard.table:
                self._pass_guard(request, request.app[self.gateway_key].policy.config)
            try:
                return await handler(request)
            except AuthenticationFailed:
                self._failed(request, request.app[self.gateway_key].policy.config)
                raise

        self._add(method, path, "proxied", limited)

    def tenant(self, method: str, path: str, handler: TenantHandler) -> None:
        """An authenticated route the gateway answers itself: counted with a request-only
        plan unless the tenant exempts it; the handler gets the authenticated tenant."""
        name = f"{method} {path}"

        async def limited(request: web.Request) -> web.StreamResponse:
            policy = request.app[self.gateway_key].policy
            config = policy.config
            self._pass_guard(request, config)
            try:
                tenant = policy.auth.authenticate(request.headers)
            except AuthenticationFailed:
                self._failed(request, config)
                raise
            request[self.record_key].tenant = tenant.name
            headers: dict[str, str] = {}
            if name not in config.tenants[tenant.name].limits.exempt_routes:
                session = header_id(request.headers, "X-Agent-Session")
                hold = await policy.limiter.admit_request(
                    tenant.name, session, os.urandom(16).hex(), tenant.default_priority.name)
                headers = hold.headers
            try:
                response = await handler(request, tenant)
            except GatewayError as exc:  # a 404 or 409 counted too: say how many remain
                exc.headers = {**headers, **exc.headers}
                raise
            if headers and not response.prepared:
                response.headers.update(headers)
            return response

        self._add(method, path, "tenant", limited)

    def admin(self, method: str, path: str, handler: Handler) -> None:
        """An admin route: the admin key, then the replica's admin limit."""
        async def limited(request: web.Request) -> web.StreamResponse:
            gateway = request.app[self.gateway_key]
            config = gateway.policy.config
            try:
                self._pass_guard(request, config)
                digests = [bytes.fromhex(k.removeprefix("sha256:"))
                           for k in config.admin.api_keys]
                try:
                    check_admin(request.headers, digests)
                except AuthenticationFailed:
                    self._failed(request, config)
                    raise
                request.app[ADMIN_LIMIT].take(config)
            except GatewayError as exc:
                # admin paths are quiet (no access-log line or request metrics): count here
                if config.server.metrics:
                    gateway.metrics.rejected(exc.code)
                raise
            return await handler(request)

        self._add(method, path, "admin", limited)

    def public(self, method: str, path: str, handler: Handler) -> None:
        """Probes and the open metrics scrape: no key, no limit (keep the port private)."""
        self._add(method, path, "public", handler)

    def _add(self, method: str, path: str, kind: RouteKind, handler: Handler) -> None:
        name = f"{method} {path}"
        table = self.app[ROUTE_TABLE]
        if name in table:
            raise ValueError(f"route {name} registered twice")
        if method == "GET":
            self.app.router.add_get(path, handler)  # and HEAD, as aiohttp does by default
        else:
            self.app.router.add_route(method, path, handler)
        table[name] = RouteInfo(name, kind, handler)

    def _pass_guard(self, request: web.Request, config: GatewayConfig) -> None:
        """429 unless the client's address passes the failed-authentication limit."""
        if self.guard.table:  # nobody failed lately (the usual case): nothing to look up
            self.guard.check(self.client_address(request, config.server.trusted_proxies),
                             config.server.auth_failures)

    def _failed(self, request: web.Request, config: GatewayConfig) -> None:
        self.guard.failed(self.client_address(request, config.server.trusted_proxies),
                          config.server.auth_failures)

    def client_address(self, request: web.Request, trusted: list[str]) -> str:
        if not trusted:
            return address_key(request.remote)
        if tuple(trusted) != self._networks[0]:  # parsed once per policy version
            self._networks = (tuple(trusted),
                              tuple(ipaddress.ip_network(t, strict=False) for t in trusted))
        xff = ",".join(request.headers.getall("X-Forwarded-For", ()))
        return client_address(request.remote, xff, self._networks[1])


def client_address(peer: str | None, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    """The peer, or, when the peer is a trusted proxy, the first hop of X-Forwarded-For that
    is not, read from the right (each proxy appends the address it saw; hops to the left of
    an untrusted one are whatever the client wrote, so never believed)."""
    if not trusted or not forwarded_for or not _trusted(peer, trusted):
        return address_key(peer)
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return address_key(hop)
    return address_key(hops[0]) if hops else address_key(peer)


def _trusted(address: str | None, trusted: tuple[Network, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in trusted)


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(address: str | None) -> str:
    """What the guard counts by: an IPv4 address, or an IPv6 address's /64 (one host commonly
    owns a whole /64, so counting single IPv6 addresses would let it rotate freely)."""
    if address and ":" not in address:  # IPv4 (or a stray name): as it is, without parsing
        return address[:64]
    ip = _ip(address)
    if ip is None:
        return (address or "unknown")[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
