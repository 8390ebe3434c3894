"""The process-wide runtime: current policy, state backend, services and background tasks.

One ``Gateway`` per process (it hangs off the aiohttp app, never off a module). It owns
- the state backend and its health (``DegradedMode``),
- the services that keep state across requests and reloads (admission, self-protection,
  breakers, retry budget, provider quotas),
- metrics and tracing,
- the current ``PolicyVersion`` and the retired ones still finishing requests after a reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable

from gateway.admission import (
    AdmissionController,
    AdmissionObserver,
    SelfProtection,
    cohort_key,
)
from gateway.breaker import BreakerBoard
from gateway.config import ConfigError, GatewayConfig, Priority, resolve_api_key
from gateway.deferred import DeferredService, create_store
from gateway.limits import (
    LEASE_TTL_MS,
    DegradedMode,
    InFlight,
    JournalFile,
    Limiter,
    ProviderQuotas,
)
from gateway.observability import ACCESS_LOGGER, GatewayMetrics, RefusalLog, Tracing
from gateway.pipeline import PolicyVersion, Services
from gateway.request import Authenticator
from gateway.state import StateBackend
from gateway.upstream import RetryBudget, TransportFactory, UpstreamPool, aiohttp_transport

log = logging.getLogger("gateway")
access_log = logging.getLogger(ACCESS_LOGGER)


class _AdmissionMetrics(AdmissionObserver):
    """Admission's hooks, counted in Prometheus (sheds carry their reason only here)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def on_shed(self, deployment: str | None, priority: Priority, reason: str,
                shadow: bool) -> None:
        if shadow:
            self._metrics.shadow_decision("shed")
        else:
            self._metrics.shed(reason, priority.name)


def _cohort_key(config: GatewayConfig) -> bytes:
    """The admission cohort hash's key (admission/shed.py ``cohort_key``): the providers' API
    keys, which every replica reads and no tenant sees, and every API key hash of the policy
    (all a key-less setup has: secret only from whoever cannot read the policy file)."""
    secrets = [*(h for t in config.tenants.values() for h in t.api_keys),
               *config.admin.api_keys]
    for name, provider in config.providers.items():
        try:
            key = resolve_api_key(name, provider)
        except ConfigError:  # unreadable here: the upstream pool says so where it matters
            continue
        if key:
            secrets.append(key)
    return cohort_key(secrets)


def deployment_labels(config: GatewayConfig) -> list[str]:
    return sorted({d.label for m in config.models.values() for d in m.deployments})


class Gateway:
    """Everything one gateway process runs on; ``start``/``stop`` from the app's lifecycle.

    The seams a test drives the whole app through: ``clock`` (monotonic seconds: limits,
    admission, breakers, deadlines, measured times), ``wall_clock`` (epoch seconds: budget
    periods, Retry-After dates, deferred entries) and ``transport`` (how each provider is
    called: ``transport.MockTransport`` answers in-process, without sockets).
    """

    def __init__(self, config: GatewayConfig, state: StateBackend,
                 tracing: Tracing | None = None, metrics: GatewayMetrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 transport: TransportFactory = aiohttp_transport) -> None:
        self.state = state
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock, self.wall_clock = clock, wall_clock
        self._transport = transport
        rng = random.Random()
        self.metrics = metrics or GatewayMetrics(config)
        self.tracing = tracing or Tracing(None)
        self.degraded = DegradedMode(config.state.degraded, state, clock, self.replica_id,
                                     _journal_file(config, state, self.replica_id))
        observer = _AdmissionMetrics(self.metrics)
        self.services = Services(
            clock=clock,
            rng=rng,
            admission=AdmissionController(config.admission, clock, rng, observer,
                                          cohort_key=_cohort_key(config)),
            self_protection=SelfProtection(config.admission, clock, rng, observer),
            breakers=BreakerBoard(config.breaker, state, deployments=deployment_labels(config),
                                  clock=clock, rng=rng, observer=self.metrics,
                                  replica_id=self.replica_id),
            retry_budget=RetryBudget(config.retries,
                                     on_exhausted=self.metrics.retry_budget_exhausted),
            quotas=ProviderQuotas(state, clock, self.replica_id),
            tracing=self.tracing,
            observers=[self.metrics],
            wall_clock=wall_clock,
        )
        self.inflight = InFlight(clock, wall_clock)
        # Access lines of refused requests, rate-bounded per tenant and reason (observability/logs.py)
        self.refusals = RefusalLog(clock, config.server.refused_log_per_s)
        self.policy = self.build_policy(config)
        self.ready = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._retired: list[PolicyVersion] = []
        self._wire_metric_sources()
        # Deferred requests (deferred/service.py): queue, dispatcher and sweeper; idle unless enabled
        self.deferred = DeferredService(lambda: self.policy, self.services,
                                        create_store(state, wall_clock),
                                        self.metrics, self.replica_id, self.close_idle_retired)
        self.services.deferred = self.deferred
        self.metrics.set_deferred_source(self.deferred.snapshot)

    def build_policy(self, config: GatewayConfig) -> PolicyVersion:
        limiter = Limiter(config, self.state, self.degraded, self.wall_clock, self.inflight,
                          self.clock)
        upstreams = UpstreamPool(config, transport=self._transport, clock=self.clock)
        return PolicyVersion(config, Authenticator(config), upstreams, limiter)

    def _wire_metric_sources(self) -> None:
        svc, m = self.services, self.metrics
        m.set_admission_source(svc.admission.snapshot)
        m.set_breaker_source(svc.breakers.states)
        m.set_loop_lag_source(lambda: svc.self_protection.loop_lag.lag_s)
        m.set_budget_source(self.inflight.budget_snapshot)
        self.inflight.on_run_stop = m.run_stopped
        if self.state.name == "redis":
            m.set_redis_source(lambda: {"degraded": self.degraded.active,
                                        "latency_s": self.degraded.last_latency_s,
                                        "journal_lost": self.degraded.journal_lost,
                                        "resets": self.degraded.resets})

    async def swap_policy(self, config: GatewayConfig) -> None:
        """Put a new, already validated policy in place atomically.

        Requests that started under the old policy finish with it (they hold a reference);
        the next request sees the new one. The old connection pools close once idle.
        """
        new = self.build_policy(config)
        await new.upstreams.start()
        old, self.policy = self.policy, new
        self._retired.append(old)
        self.services.admission.reconfigure(config.admission, _cohort_key(config))
        self.services.self_protection.reconfigure(config.admission)
        self.refusals.per_s = config.server.refused_log_per_s
        self.metrics.update_config(config)
        log.info("policy reloaded", extra={"fields": {
            "tenants": len(config.tenants), "models": len(config.models)}})
        await self.close_idle_retired()

    async def close_idle_retired(self) -> None:
        for old in [p for p in self._retired if p.active == 0]:
            self._retired.remove(old)
            await old.upstreams.close()

    async def start(self) -> None:
        await self.state.start()
        self.degraded.load_journal()  # replayed by the degraded loop as soon as Redis answers
        await self.degraded.check_epoch()
        await self.policy.upstreams.start()
        self.services.self_protection.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.degraded.run(self._stop)),
            loop.create_task(self._renew_leases()),
            loop.create_task(self.services.breakers.run_sync(self._stop)),
            loop.create_task(self.deferred.run(self._stop)),  # returns after its runs stop
            loop.create_task(self._summarize_refusals()),
        ]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.services.self_protection.stop()
        await self.policy.limiter.drain()
        await self.degraded.recover_once()  # last chance to hand the journal over
        self.degraded.save_journal()  # what is left: a file for the next start, or counted lost
        await self.degraded.leave()  # the others' degraded shares need not wait for its TTL
        for old in self._retired:
            await old.upstreams.close()
        await self.policy.upstreams.close()
        await self.state.close()
        await self.tracing.close()

    async def flush_journal(self, timeout_s: float) -> bool:
        """Drain: wait (bounded) for pending settlements and the usage journal to reach the
        store; True when nothing is left to write to a file."""
        await self.policy.limiter.drain()
        return await self.degraded.flush(timeout_s)

    def log_refusal_summary(self, force: bool = False) -> None:
        summary = self.refusals.summary(force)
        if summary is not None:
            access_log.info("refused requests folded", extra={"fields": summary})

    async def _summarize_refusals(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.refusals.summary_every_s)
            except TimeoutError:
                self.log_refusal_summary()
        self.log_refusal_summary(force=True)  # stopping: nothing folded goes unreported

    async def _renew_leases(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), LEASE_TTL_MS / 3000)
            except TimeoutError:
                await self.policy.limiter.renew_leases()


def _journal_file(config: GatewayConfig, state: StateBackend,
                  replica_id: str) -> JournalFile | None:
    """Where unflushed usage goes at stop: only a shared store outlives this process."""
    directory = config.state.degraded.journal_dir or os.environ.get("GATEWAY_JOURNAL_DIR")
    if state.name != "redis" or not directory:
        return None
    return JournalFile(directory, replica_id)
