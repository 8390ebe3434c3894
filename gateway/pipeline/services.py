"""The objects the pipeline works with: one ``PolicyVersion`` (what one version of the policy
file built; swapped whole on reload) and the ``Services`` (process-wide, keeping state across
requests and reloads).

``Deferral`` is what the pipeline asks of deferred requests; deferred/service.py implements it on
top of the attempt loop, so it is a protocol here rather than an import of that module.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from aiohttp import web

from gateway.admission import AdmissionController, SelfProtection
from gateway.breaker import BreakerBoard
from gateway.config import GatewayConfig
from gateway.limits import Limiter, ProviderQuotas
from gateway.observability import Tracing
from gateway.request import Authenticator, ProxyCall, RequestRecord
from gateway.upstream import RetryBudget, UpstreamPool


@dataclass(slots=True)
class PolicyVersion:
    """Everything derived from one version of the policy file; swapped whole on reload (the
    requests that started under it finish with it)."""

    config: GatewayConfig
    auth: Authenticator
    upstreams: UpstreamPool
    limiter: Limiter
    active: int = 0  # requests running under this policy (a retired one closes at 0)


class RetryObserver(Protocol):
    """Told of every retry or failover the attempt loop decides (the metrics count them)."""

    def retry(self, deployment: str | None, reason: str | None) -> None: ...


@dataclass(slots=True)
class Services:
    """Process-wide policy objects; each keeps its own state across requests and reloads."""

    # Monotonic seconds: deadlines, waits, measured durations. Not necessarily loop.time():
    # the upstream attempt moves deadlines to the clock its timers run on.
    clock: Callable[[], float]
    rng: random.Random
    admission: AdmissionController
    self_protection: SelfProtection
    breakers: BreakerBoard
    retry_budget: RetryBudget
    quotas: ProviderQuotas
    tracing: Tracing
    observers: list[RetryObserver] = field(default_factory=list)
    deferred: Deferral | None = None  # Prefer: respond-async; set by runtime.Gateway
    wall_clock: Callable[[], float] = time.time  # epoch seconds: Retry-After dates, run logs


class Deferral(Protocol):
    """Deferred requests as the pipeline sees them (``deferred.DeferredService``)."""

    def mode(self, call: ProxyCall, headers: Mapping[str, str], config: GatewayConfig
             ) -> Literal["now", "on_shed"] | None:
        """"now": store and answer 202; "on_shed": run, defer a would-be shed; None: run."""

    async def submit(self, policy: PolicyVersion, call: ProxyCall, headers: Mapping[str, str],
                     record: RequestRecord, *, via: Literal["prefer", "shed"]) -> web.Response:
        """Reserve, store, and answer 202 (or the refusal)."""
