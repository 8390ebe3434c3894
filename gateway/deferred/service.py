"""Deferred requests: ``Prefer: respond-async`` work is queued durably and run at the low class's
spare capacity, so background agent work waits instead of being shed.

Submit (``DeferredService.submit``, from pipeline/handler.py right after classify): the tenant's limits
and budgets are checked and the token/cost reservation is held (``Limiter.admit`` without a
concurrency lease, with a hold that lives as long as the entry); the request is stored
(gateway/deferred/store.py) and answered ``202 Accepted`` with ``Location: /v1/deferred/{id}``.
A tenant in mode ``on_shed`` runs such requests at once and defers only a would-be overload
shed of its ``low`` class.

Run (``DeferredService.run``, one dispatcher per replica): while this replica's admission
controller has a free ``low`` slot and fewer than ``workers`` runs are going, claim the next
entry (tenants in turn; an entry whose claim went idle first), and run it through the same
attempt loop as a synchronous call (pipeline/attempts.py) with the stored headers, taking only a free
slot (``try_acquire``), so deferred work never holds a slot a waiting interactive request needs.
The claim is renewed while the run goes; a replica that dies stops renewing it and another
replica re-claims the entry after the visibility timeout and runs it again.

Accounting (the tenant is charged once per upstream call actually made) is set out in
deferred/hold.py, which every path that ends an entry settles through; one run and its
retries are in deferred/run.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import orjson
from aiohttp import web

from gateway.config import DeferredPolicy, Degraded, GatewayConfig, Priority
from gateway.errors import GatewayError, RateLimited, Unavailable, retry_headers
from gateway.jsonbytes import dumps_kept
from gateway.observability import GatewayMetrics
from gateway.pipeline import PolicyVersion, Services
from gateway.request import ProxyCall, RequestRecord
from gateway.state import StateBackend, StateUnavailable
from gateway.upstream import FORWARDED_REQUEST_HEADERS

from .hold import hold_from_json, hold_to_json, refund
from .run import DeferredRunner, free_low_slots
from .store import FORGET_CONSUMER_MS, Claim, DeferredStore, Fields, QueueFull, entry_bytes
from .store_memory import MemoryDeferredStore
from .store_redis import RedisDeferredStore

log = logging.getLogger("gateway.deferred")

FINAL = frozenset({"succeeded", "failed", "expired", "cancelled"})
MIN_POLL_S = 0.02
CAPACITY_POLL_S = 0.05  # while this replica has no free low slot
# Long polls wake at once for an entry that finished on this replica; for one finishing on
# another replica they re-read it, first after 0.1 s, then less and less often (at most 2 s).
WAIT_POLL_S = (0.1, 2.0)
STOP_GRACE_S = 2.0  # runs still going when the replica stops are given this long
SWEEP_HEAD = 20  # oldest entries looked at per tenant and sweep
_ID = re.compile(r"^dfr_[0-9a-f]{32}$")
_STORED_HEADERS = frozenset({*FORWARDED_REQUEST_HEADERS, "x-priority", "x-agent-session",
                             "x-agent-step"})

# How often the store is looked at again while unreachable, when no policy is at hand.
_PROBE_INTERVAL_S: float = Degraded.model_fields["probe_interval_s"].default


def prefers_async(headers: Mapping[str, str]) -> bool:
    """Whether the request carries ``Prefer: respond-async`` (RFC 7240; several preferences per
    header, parameters after ``;``, several Prefer headers)."""
    getall = getattr(headers, "getall", None)
    values = getall("Prefer", ()) if getall is not None else [headers.get("Prefer", "")]
    for value in values:
        for pref in value.split(","):
            if pref.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async":
                return True
    return False


def create_store(state: StateBackend, clock: Callable[[], float] = time.time) -> DeferredStore:
    """Redis Streams on the Redis the state backend shares; else the in-process store (the
    memory backend's state is this process's too). ``clock``: epoch seconds, memory only."""
    shared = state.shared_redis()
    if shared is not None:
        return RedisDeferredStore(shared)
    return MemoryDeferredStore(clock)


def valid_id(entry_id: str) -> bool:
    return bool(_ID.match(entry_id))


def _stored_headers(headers: Mapping[str, str], config: GatewayConfig) -> dict[str, str]:
    """The request headers a run needs later: what classify reads and what may go upstream
    (the allow-list and the providers' forward_headers); never credentials or cookies."""
    rules = {r for p in config.providers.values() for r in p.forward_headers}
    out: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _STORED_HEADERS or any(
                lowered == r or (r.endswith("*") and lowered.startswith(r[:-1])) for r in rules):
            out[lowered] = value
    return out


class DeferredService:
    """Submit, look up, cancel and run deferred requests for one replica."""

    def __init__(self, policy: Callable[[], PolicyVersion], services: Services,
                 store: DeferredStore, metrics: GatewayMetrics, consumer: str,
                 policy_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        self._policy = policy
        self._svc = services
        self.store = store
        self._metrics = metrics
        self.consumer = consumer
        self._running: set[asyncio.Task[None]] = set()
        self._starting = 0  # runs claimed that hold no admission slot yet
        self._wake = asyncio.Event()  # a local submit, or a run finished
        self._waiters: dict[str, tuple[asyncio.Event, int]] = {}  # entry id -> (event, waiters)
        self._stats: dict[str, dict[str, float]] = {}
        self._rr = 0
        self._last_error_log = 0.0
        self._runner = DeferredRunner(policy, services, store, metrics, consumer, self._notify,
                                      policy_idle)

    # --- submit --------------------------------------------------------------------------------

    def mode(self, call: ProxyCall, headers: Mapping[str, str], config: GatewayConfig
             ) -> Literal["now", "on_shed"] | None:
        """"now": store and answer 202; "on_shed": run, defer a would-be shed; None: run."""
        if not config.deferred.enabled or call.stream or not prefers_async(headers):
            return None
        mode = config.deferred.for_tenant(call.tenant.name).mode
        if mode == "always":
            return "now"
        if mode == "on_shed" and call.priority == Priority.low:
            return "on_shed"
        return None

    async def submit(self, policy: PolicyVersion, call: ProxyCall, headers: Mapping[str, str],
                     record: RequestRecord, *, via: Literal["prefer", "shed"]) -> web.Response:
        """Reserve, store, and answer 202 (429 for limits, budgets or a full queue; 503 when
        the store is unreachable)."""
        config = policy.config
        cfg = config.deferred
        tenant = call.tenant.name
        settings = cfg.for_tenant(tenant)
        entry_id = "dfr_" + uuid.uuid4().hex
        ttl_ms, grace_ms = settings.ttl_s * 1000, cfg.result_grace_s * 1000
        began = self._svc.clock()
        hold = await policy.limiter.admit(call, entry_id, lease=False,
                                          hold_ttl_ms=ttl_ms + grace_ms)
        record.limits_s = self._svc.clock() - began
        if hold.mode not in ("global", "none"):
            await refund(policy.limiter, hold)
            raise unavailable(config.state.degraded.probe_interval_s)
        fields = {
            "tenant": tenant.encode(), "route": call.route.path.encode(),
            "model": call.model.encode(), "body": dumps_kept(call.body),
            "headers": dumps_kept(_stored_headers(headers, config)),
            "hold": hold_to_json(hold), "via": via.encode(),
            "request_id": record.request_id.encode(),
        }
        try:
            sub = await self.store.submit(tenant, entry_id, fields, ttl_ms=ttl_ms,
                                          grace_ms=grace_ms, max_queued=settings.max_queued,
                                          max_bytes=settings.max_queued_bytes)
        except QueueFull as exc:
            await refund(policy.limiter, hold)
            held = (f"{exc.depth} deferred requests waiting (limit {settings.max_queued})"
                    if exc.held_bytes is None else
                    f"{exc.held_bytes} bytes of deferred requests waiting, and this one's "
                    f"{entry_bytes(fields)} would pass its limit of "
                    f"{settings.max_queued_bytes} (deferred.max_queued_bytes)")
            raise RateLimited(
                f"Tenant {tenant} already has {held}; submit more when some have finished "
                "(GET /v1/deferred/{id} tells when).",
                code="deferred_queue_full",
                # When a slot frees depends on runs at the providers' pace, which nobody can
                # promise: no Retry-After rather than an invented one, and no SDK retry.
                headers={**hold.headers, **retry_headers(None)},
            ) from None
        except StateUnavailable as exc:
            await refund(policy.limiter, hold)
            self._log_error("deferred submit failed", exc)
            raise unavailable(config.state.degraded.probe_interval_s) from None
        self._metrics.deferred_submitted(tenant, via)
        self._wake.set()
        record.status = 202
        body = {
            "id": entry_id, "object": "deferred.request", "status": "queued",
            "queue_position": sub.position, "created_at": sub.created_ms // 1000,
            "expires_at": sub.expires_ms // 1000, "endpoint": call.route.path,
            "model": call.model, "url": f"/v1/deferred/{entry_id}",
        }
        out_headers = {**hold.headers, "Content-Type": "application/json",
                       "Location": f"/v1/deferred/{entry_id}",
                       "Preference-Applied": "respond-async"}
        return web.Response(status=202, body=orjson.dumps(body), headers=out_headers)

    # --- look up and cancel -------------------------------------------------------------------

    async def wait(self, tenant: str, entry_id: str, wait_s: float) -> Fields | None:
        """The entry, once final or after ``wait_s`` (long poll); None when unknown."""
        clock = self._svc.clock
        until = clock() + wait_s
        poll = WAIT_POLL_S[0]
        event, count = self._waiters.get(entry_id) or (asyncio.Event(), 0)
        self._waiters[entry_id] = (event, count + 1)
        try:
            while True:
                fields = await self.store.get(tenant, entry_id)
                left = until - clock()
                if fields is None or fields["status"].decode() in FINAL or left <= 0:
                    return fields
                try:
                    await asyncio.wait_for(event.wait(), min(poll, left))
                except TimeoutError:
                    poll = min(poll * 2, WAIT_POLL_S[1])
        finally:
            event, count = self._waiters.get(entry_id, (event, 1))
            if count <= 1:
                self._waiters.pop(entry_id, None)
            else:
                self._waiters[entry_id] = (event, count - 1)

    async def cancel(self, tenant: str, entry_id: str) -> str:
        """Cancel a queued entry and refund its reservation; the status it has now
        (``missing`` when there is none)."""
        status, raw_hold = await self.store.cancel(tenant, entry_id)
        if raw_hold is not None:  # this call cancelled it
            await refund(self._policy().limiter, hold_from_json(raw_hold))
            self._metrics.deferred_finished(tenant, "cancelled")
            self._notify(entry_id)
        return status

    def _notify(self, entry_id: str) -> None:
        """The entry reached a final state here: wake its long polls (at once)."""
        waiting = self._waiters.get(entry_id)
        if waiting is not None:
            waiting[0].set()
        self._wake.set()

    # --- the dispatcher ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run entries until ``stop``; then give running ones ``STOP_GRACE_S``."""
        loop = asyncio.get_running_loop()
        sweeper = loop.create_task(self._sweep_loop(stop))
        stopper = loop.create_task(self._wake_on(stop))
        try:
            await self._dispatch(stop)
        finally:
            sweeper.cancel()
            stopper.cancel()
            await asyncio.gather(sweeper, stopper, return_exceptions=True)
            await self._drain()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _dispatch(self, stop: asyncio.Event) -> None:
        idle = MIN_POLL_S
        while not stop.is_set():
            policy = self._policy()
            cfg = policy.config.deferred
            if not cfg.enabled or cfg.workers == 0:
                await self._pause(stop, cfg.poll_interval_s)
                continue
            if len(self._running) >= cfg.workers or \
                    free_low_slots(self._svc.admission, _labels(policy)) <= self._starting:
                await self._pause(stop, CAPACITY_POLL_S)
                continue
            try:
                claim = await self._next_claim(policy.config, cfg)
            except StateUnavailable as exc:
                self._log_error("deferred queue unreachable", exc)
                await self._pause(stop, cfg.poll_interval_s)
                continue
            if claim is None:
                await self._pause(stop, idle)
                idle = min(idle * 2, cfg.poll_interval_s)
                continue
            idle = MIN_POLL_S
            self._starting += 1  # until its attempt holds a slot (or it ends without one)
            task = asyncio.get_running_loop().create_task(self._execute(claim))
            self._running.add(task)
            task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Until woken (a local submit, a run ended, stop) or ``seconds`` passed."""
        if stop.is_set():
            return
        self._wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _next_claim(self, config: GatewayConfig, cfg: DeferredPolicy) -> Claim | None:
        """Tenants in turn, one entry each: a tenant with a deep queue cannot starve others."""
        tenants = sorted(config.tenants)
        visibility_ms = int(cfg.visibility_timeout_s * 1000)
        for i in range(len(tenants)):
            tenant = tenants[(self._rr + i) % len(tenants)]
            claim = await self.store.claim(tenant, self.consumer, reclaim_idle_ms=visibility_ms)
            if claim is not None:
                self._rr = (self._rr + i + 1) % len(tenants)
                return claim
        return None

    async def _drain(self) -> None:
        tasks = list(self._running)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # --- one run -----------------------------------------------------------------------------

    async def _execute(self, claim: Claim) -> None:
        starting = True

        def has_slot() -> None:
            nonlocal starting
            if starting:
                starting = False
                self._starting -= 1

        try:
            await self._runner.execute(claim, has_slot)
        except StateUnavailable as exc:
            # The entry stays claimed by nobody alive: re-claimed after the visibility timeout.
            self._log_error("deferred run lost its store", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deferred run failed", extra={"fields": {"id": claim.id}})
        finally:
            has_slot()

    # --- sweeper and metrics --------------------------------------------------------------------

    async def _sweep_loop(self, stop: asyncio.Event) -> None:
        sweeps = 0
        while not stop.is_set():
            cfg = self._policy().config.deferred
            if cfg.enabled:
                try:
                    await self.sweep(forget=sweeps % 100 == 0)
                except StateUnavailable as exc:
                    self._log_error("deferred sweep failed", exc)
                sweeps += 1
            try:
                await asyncio.wait_for(stop.wait(), cfg.sweep_interval_s)
            except TimeoutError:
                pass

    async def sweep(self, *, forget: bool = False) -> int:
        """Expire queued entries past their expiry (refunding them) and refresh the depth and
        age gauges; the number expired."""
        policy = self._policy()
        config = policy.config
        expired = 0
        stats: dict[str, dict[str, float]] = {}
        for tenant in sorted(config.tenants):
            scan = await self.store.scan(tenant, SWEEP_HEAD,
                                         forget_idle_ms=FORGET_CONSUMER_MS if forget else -1)
            stats[tenant] = {"depth": scan.depth, "oldest_age_s": scan.oldest_age_s,
                             "ttl_s": config.deferred.for_tenant(tenant).ttl_s}
            for sid, entry_id, expires_ms in scan.head:
                if expires_ms > scan.now_ms:
                    continue
                status, raw_hold = await self.store.expire(tenant, entry_id, sid)
                if status == "expired" and raw_hold is not None:
                    await refund(policy.limiter, hold_from_json(raw_hold))
                    self._metrics.deferred_finished(tenant, "expired")
                    self._notify(entry_id)
                    expired += 1
        self._stats = stats
        return expired

    def snapshot(self) -> dict[str, Any] | None:
        """The metrics' deferred source (no store round trip: the last sweep's figures)."""
        if not self._policy().config.deferred.enabled:
            return None
        return {"running": len(self._running), "tenants": self._stats}

    def _log_error(self, message: str, exc: Exception) -> None:
        now = self._svc.clock()
        if now - self._last_error_log >= 10.0:  # at most one line per 10 s
            self._last_error_log = now
            log.warning(message, extra={"fields": {"error": str(exc)}})


def _labels(policy: PolicyVersion) -> list[str]:
    return sorted({d.label for m in policy.config.models.values() for d in m.deployments})


def unavailable(probe_interval_s: float = _PROBE_INTERVAL_S) -> GatewayError:
    """503 while the queue's store is unreachable; the gateway looks at the store again every
    ``probe_interval_s`` (``state.degraded.probe_interval_s``): a retry can succeed then."""
    return Unavailable(
        "Deferred requests are unavailable now: the queue cannot be reached; retry later "
        "or send the request without Prefer: respond-async.",
        code="deferred_unavailable", headers=retry_headers(probe_interval_s * 1000),
    )
