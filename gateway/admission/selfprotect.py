"""Step 4 of the pipeline: protect the gateway process itself, at the door, before any work.

Three gauges, each cheap to read on every request:
- event-loop lag: a background probe sleeps ``lag_probe_interval_ms`` and records how late it
  woke up (``LoopLagMonitor``); a late loop delays every request in the process;
- open streams: streamed responses being relayed (``StreamCounter``; each one is a handle);
- resident memory: ``/proc/self/statm``, read at most every ``rss_sample_s`` (``RssReader``).

``SelfProtection.check(priority, now)`` compares each with its limit. The worst ratio
decides who is shed: from 1x ``low``, from 1.5x ``normal`` too, from 2x ``high`` too, ``critical``
never (a human waits on it, and a gateway that sheds everything protects nobody). Refusals are
503 ``overloaded`` with a jittered Retry-After; in shadow mode they are only counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.config import AdmissionPolicy, Priority
from gateway.errors import Overloaded, RateLimited, retry_headers

from .shed import ShedReason, counts_by_class, overloaded_error, retry_after_s
from .state import AdmissionObserver

Clock = Callable[[], float]
log = logging.getLogger("gateway.selfprotect")

# Pressure (worst gauge / its limit) from which each class is shed at the door.
SHED_FROM: dict[Priority, float] = {Priority.low: 1.0, Priority.normal: 1.5, Priority.high: 2.0}
_MIB = 1024 * 1024
_AUTO_RSS_SHARE = 0.85  # of the cgroup memory limit, leaving room to finish what is in flight


class LoopLagMonitor:
    """How late the event loop runs a callback that is due, in seconds.

    Rises at once with a late probe and falls by a quarter of the gap per probe, so one quick
    probe after a stall does not hide it (and a lone spike fades within about a second).
    """

    _FALL = 0.25

    def __init__(self, interval_s: float, clock: Clock) -> None:
        self._interval = interval_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.lag_s = 0.0

    def record(self, due: float, woke: float) -> None:
        """One probe: it was due at ``due`` and ran at ``woke``."""
        sample = max(0.0, woke - due)
        self.lag_s = sample if sample >= self.lag_s else self.lag_s + self._FALL * (
            sample - self.lag_s
        )

    def start(self) -> None:
        """Start the probe task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            due = self._clock() + self._interval
            await asyncio.sleep(self._interval)
            self.record(due, self._clock())


class StreamHandle:
    """One open stream; ``release`` when it ends (idempotent, safe in ``finally``)."""

    __slots__ = ("_counter", "_released")

    def __init__(self, counter: StreamCounter) -> None:
        self._counter = counter
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._counter.count -= 1


class StreamCounter:
    """Streamed responses being relayed by this process."""

    def __init__(self) -> None:
        self.count = 0

    def open(self) -> StreamHandle:
        self.count += 1
        return StreamHandle(self)


class RssReader:
    """Resident set size in MiB from ``/proc/self/statm``, re-read at most every ``sample_s``.

    None where the file does not exist (not Linux): the memory check is then off.
    """

    def __init__(self, sample_s: float, path: str = "/proc/self/statm") -> None:
        self._sample_s = sample_s
        self._path = path
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._read_at: float | None = None
        self._mib: float | None = None

    def mib(self, now: float) -> float | None:
        if self._read_at is None or now - self._read_at >= self._sample_s:
            self._read_at = now
            try:
                resident_pages = int(Path(self._path).read_text().split()[1])
                self._mib = resident_pages * self._page / _MIB
            except (OSError, IndexError, ValueError):
                self._mib = None
        return self._mib


def cgroup_memory_limit_mib(root: str = "/sys/fs/cgroup") -> float | None:
    """The container's memory limit (cgroup v2 ``memory.max`` or v1 ``limit_in_bytes``)."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = Path(root, name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return int(text) / _MIB
        return None
    return None


_AUTO_BODY_SHARE = 0.25  # of the cgroup memory limit, for request bodies held at once
_AUTO_BODY_BYTES = 256 * _MIB  # without a cgroup limit


class BodyHold:
    """Request-body bytes held by one request; ``release`` when it ends (idempotent)."""

    __slots__ = ("_budget", "_tenant", "nbytes")

    def __init__(self, budget: BodyBudget, tenant: str, nbytes: int) -> None:
        self._budget = budget
        self._tenant = tenant
        self.nbytes = nbytes

    def release(self) -> None:
        if self.nbytes:
            self._budget.release(self._tenant, self.nbytes)
            self.nbytes = 0

    def keep(self, nbytes: int) -> None:
        """Hold only ``nbytes`` from now: the body read was shorter than reserved (a chunked
        body reserves ``max_body_bytes``, which it would hold to the end of its request)."""
        if nbytes < self.nbytes:
            self._budget.release(self._tenant, self.nbytes - nbytes)
            self.nbytes = nbytes


class _Bytes:
    """Bytes held, and the rate at which held bytes have been coming back (a decaying
    average): when ``excess`` more will have come back is the honest Retry-After."""

    __slots__ = ("held", "rate", "rate_at")

    _HALF_LIFE_S = 5.0

    def __init__(self, now: float) -> None:
        self.held = 0
        self.rate = 0.0
        self.rate_at = now

    def release(self, nbytes: int, now: float) -> None:
        self.held -= nbytes
        self._decay(now)
        self.rate += nbytes / self._HALF_LIFE_S

    def _decay(self, now: float) -> None:
        self.rate *= 0.5 ** ((now - self.rate_at) / self._HALF_LIFE_S)
        self.rate_at = now

    def retry_after_s(self, excess: int, now: float) -> float:
        """When ``excess`` bytes will have come back at the recent release rate; 1-60 s."""
        self._decay(now)
        if self.rate <= 0:
            return 1.0
        return min(60.0, max(1.0, excess / self.rate))


class BodyBudget:
    """Request-body bytes this process holds at once: each request reserves
    its Content-Length (or ``max_body_bytes`` when chunked) before its body is read, and gives
    it back when it ends. A request that does not fit is refused before it is read, with a
    Retry-After from the rate at which held bytes have been coming back.

    No tenant may hold more than ``TENANT_SHARE`` of what the other tenants leave (and always
    one body of ``max_body_bytes``): the budget is reserved before the body is read, so before
    any of the tenant's own limits, and 26 connections of one key that declared 10 MiB bodies
    and sent one byte held all 256 MiB of it, every other tenant refused until they closed.
    Such a tenant is refused (429) for its own bytes; the others keep the rest. The share is
    of what the others leave, not of the whole, so two such tenants hold three quarters
    between them (half each of the whole would be all of it) and every further one half of
    what is left."""

    TENANT_SHARE = 0.5

    def __init__(self, clock: Clock, cgroup_mib: float | None) -> None:
        self._clock = clock
        self.auto_limit = int(cgroup_mib * _MIB * _AUTO_BODY_SHARE) if cgroup_mib \
            else _AUTO_BODY_BYTES
        self._all = _Bytes(clock())
        self._tenants: dict[str, _Bytes] = {}  # only tenants holding bytes now
        self.refused = 0

    @property
    def held(self) -> int:
        return self._all.held

    def held_by(self, tenant: str) -> int:
        account = self._tenants.get(tenant)
        return 0 if account is None else account.held

    def limit(self, configured: int | None, max_body_bytes: int) -> int:
        return max(configured if configured is not None else self.auto_limit, max_body_bytes)

    def reserve(self, tenant: str, nbytes: int, limit: int, max_body_bytes: int) -> BodyHold:
        """Hold ``nbytes`` for ``tenant``, or raise (nothing held): 429 when the tenant would
        hold more than its share of what the others leave of ``limit``, 503 ``overloaded`` when
        the process would hold more than ``limit``."""
        if not nbytes:
            return BodyHold(self, tenant, 0)
        now = self._clock()
        account = self._tenants.get(tenant)
        own = 0 if account is None else account.held
        share = max(int(self.TENANT_SHARE * (limit - (self._all.held - own))), max_body_bytes)
        if account is not None and own and own + nbytes > share:
            self.refused += 1
            wait = account.retry_after_s(account.held + nbytes - share, now)
            raise RateLimited(
                f"This key holds too many request bodies at once ({account.held} bytes of "
                f"the {share} one tenant may); retry after {wait:.1f} s.",
                code="too_many_request_bodies", headers=retry_headers(wait * 1000))
        if self._all.held and self._all.held + nbytes > limit:
            self.refused += 1
            wait = self._all.retry_after_s(self._all.held + nbytes - limit, now)
            raise Overloaded(
                f"The gateway holds too many request bodies at once ({self._all.held} bytes); "
                f"retry after {wait:.1f} s.",
                headers={"Retry-After": str(max(1, math.ceil(wait))),
                         "retry-after-ms": str(max(1, round(wait * 1000))),
                         "x-should-retry": "true"})
        if account is None:
            account = self._tenants[tenant] = _Bytes(now)
        account.held += nbytes
        self._all.held += nbytes
        return BodyHold(self, tenant, nbytes)

    def release(self, tenant: str, nbytes: int) -> None:
        now = self._clock()
        self._all.release(nbytes, now)
        account = self._tenants.get(tenant)
        if account is not None:
            account.release(nbytes, now)
            if account.held <= 0:  # (its rate goes with it: a tenant holding nothing
                del self._tenants[tenant]  # is refused nothing)


class WorkBudget:
    """Event-loop time each tenant's requests take before its own limits can refuse them:
    reading the body as JSON, checking it and counting its prompt (pipeline step 3). A
    tenant's limits count requests and tokens, not the CPU a body costs, and a body refused
    at step 3 (too long a prompt, bad input) counts against no limit at all: three
    connections of one key sending 10 MB bodies of nested empty lists kept the loop every
    tenant shares busy, and the others got 503 ``overloaded (loop_lag)``.

    A token bucket of seconds per tenant: ``share`` of a second every second, ``burst_s``
    ahead. A tenant past it is refused (429, before its next body is read) until its debt is
    back within the burst. ``server.max_body_values`` bounds what one body can cost; this
    bounds how often. A tenant is forgotten once it owes nothing."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._debt: dict[str, tuple[float, float]] = {}  # tenant -> (seconds owed, as of)
        self.refused = 0

    def _owed(self, tenant: str, share: float, now: float) -> float:
        owed, at = self._debt.get(tenant, (0.0, now))
        return max(0.0, owed - (now - at) * share)

    def check(self, tenant: str, share: float, burst_s: float) -> None:
        if tenant not in self._debt:
            return
        now = self._clock()
        owed = self._owed(tenant, share, now)
        if owed <= 0:
            del self._debt[tenant]
        if owed <= burst_s:
            return
        self.refused += 1
        wait = (owed - burst_s) / share
        raise RateLimited(
            f"This key's requests took {owed:.2f} s of the gateway's time to read before its "
            f"limits ({share:g} s a second at most, {burst_s:g} s ahead); retry after "
            f"{wait:.1f} s. Smaller bodies (fewer JSON values) cost less.",
            code="too_much_request_work", headers=retry_headers(wait * 1000))

    def charge(self, tenant: str, seconds: float, share: float) -> None:
        now = self._clock()
        owed = self._owed(tenant, share, now) + seconds
        if owed > 0:
            self._debt[tenant] = (owed, now)
        else:
            self._debt.pop(tenant, None)


class SelfProtection:
    """Self-protection: the check at step 4 and the gauges behind it (module docstring).

    ``max_rss_mib`` overrides the policy's limit (and its cgroup default) when given; tests use
    it together with ``statm_path``, and ``cgroup_root`` for the cgroup default.
    """

    def __init__(
        self,
        policy: AdmissionPolicy,
        clock: Clock,
        rng: random.Random,
        observer: AdmissionObserver | None = None,
        *,
        max_rss_mib: float | None = None,
        statm_path: str = "/proc/self/statm",
        cgroup_root: str = "/sys/fs/cgroup",
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._rng = rng
        self._observer = observer or AdmissionObserver()
        settings = policy.self_protection
        self.loop_lag = LoopLagMonitor(settings.lag_probe_interval_ms / 1000, clock)
        self.streams = StreamCounter()
        self.rss = RssReader(settings.rss_sample_s, statm_path)
        cgroup = cgroup_memory_limit_mib(cgroup_root)
        if max_rss_mib is None:
            max_rss_mib = settings.max_rss_mib
        if max_rss_mib is None:
            max_rss_mib = cgroup * _AUTO_RSS_SHARE if cgroup is not None else None
        self.max_rss_mib = max_rss_mib
        self.bodies = BodyBudget(clock, cgroup)
        self.work = WorkBudget(clock)
        self._shed: Counter[tuple[Priority, str]] = Counter()
        self._would_shed: Counter[tuple[Priority, str]] = Counter()

    def reconfigure(self, policy: AdmissionPolicy) -> None:
        """Apply a reloaded policy (limits, shadow); gauges and counters are kept. The probe
        interval and the RSS sample period stay as they were at start."""
        self._policy = policy
        if policy.self_protection.max_rss_mib is not None:
            self.max_rss_mib = policy.self_protection.max_rss_mib

    def start(self) -> None:
        """Start the loop-lag probe (call from the app's startup, e.g. a cleanup_ctx)."""
        self.loop_lag.start()

    async def stop(self) -> None:
        await self.loop_lag.stop()

    def check_work(self, tenant: str) -> None:
        """429 when ``tenant``'s requests have taken more than their share of the event loop
        before their limits ran (``WorkBudget``); call before reading its body."""
        settings = self._policy.self_protection
        self.work.check(tenant, settings.tenant_work_share, settings.tenant_work_burst_s)

    @contextlib.contextmanager
    def working(self, tenant: str) -> Iterator[None]:
        """Charge the time spent inside to ``tenant``'s work budget, refused or not."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.work.charge(tenant, time.perf_counter() - began,
                             self._policy.self_protection.tenant_work_share)

    def pressure(self, now: float) -> tuple[float, ShedReason]:
        """The worst gauge as a multiple of its limit, and which gauge it is."""
        settings = self._policy.self_protection
        worst: tuple[float, ShedReason] = (
            self.loop_lag.lag_s * 1000 / settings.max_loop_lag_ms, "loop_lag")
        streams = self.streams.count / settings.max_open_streams
        if streams > worst[0]:
            worst = (streams, "open_streams")
        if self.max_rss_mib is not None:
            rss = self.rss.mib(now)
            if rss is not None and rss / self.max_rss_mib > worst[0]:
                worst = (rss / self.max_rss_mib, "memory")
        return worst

    def check(self, priority: Priority, now: float) -> None:
        """Raise 503 ``overloaded`` when the process is too loaded for this class (see
        ``SHED_FROM``); in shadow mode count and log instead. Never refuses ``critical``."""
        threshold = SHED_FROM.get(priority)
        if threshold is None:
            return
        pressure, reason = self.pressure(now)
        if pressure < threshold:
            return
        shadow = self._policy.shadow
        (self._would_shed if shadow else self._shed)[(priority, reason)] += 1
        self._observer.on_shed(None, priority, reason, shadow)
        fields = {"priority": priority.name, "reason": reason, "pressure": round(pressure, 3)}
        if shadow:
            log.info("would shed at the door", extra={"fields": fields})
            return
        log.debug("shed at the door", extra={"fields": fields})
        # The further over the limit, the longer the client should stay away.
        wait = retry_after_s(self._policy.retry_after_min_s * pressure, self._policy, self._rng)
        raise overloaded_error(
            priority, wait,
            f"The gateway is overloaded ({reason}) and is refusing {priority.name} requests; "
            f"retry after {wait:.1f} s.",
        )

    def snapshot(self) -> dict[str, Any]:
        """Gauges, limits and door sheds by class and reason, for metrics and /admin/status."""
        now = self._clock()
        settings = self._policy.self_protection
        pressure, worst = self.pressure(now)
        return {
            "loop_lag_s": self.loop_lag.lag_s,
            "max_loop_lag_s": settings.max_loop_lag_ms / 1000,
            "open_streams": self.streams.count,
            "max_open_streams": settings.max_open_streams,
            "rss_mib": self.rss.mib(now),
            "max_rss_mib": self.max_rss_mib,
            "pressure": pressure,
            "worst": worst,
            "shed": counts_by_class(self._shed),
            "would_shed": counts_by_class(self._would_shed),
        }
