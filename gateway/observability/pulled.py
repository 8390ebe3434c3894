"""The pulled gauges: what a scrape reads from the components' own snapshots.

Kept apart from observability/metrics.py (the push side, fed on the request path) because this half runs only
at scrape time: the snapshot shapes sources return, the registered sources themselves, and a
collector that turns one call of each into gauge families. A source that raises loses its
series for that scrape only; the scrape itself never fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NotRequired, TypedDict, TypeVar

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .labels import BREAKER_STATES, BUDGET_KINDS, PRIORITIES, LabelBounds, breaker_state

log = logging.getLogger("gateway.metrics")  # one logger name for all of the metrics

_T = TypeVar("_T")


# --- gauge sources: plain dicts; the TypedDicts only document the keys ------------------------


class ClassSnapshot(TypedDict):
    """One priority class, as the admission controller sees it right now."""

    in_flight: int  # admitted, not finished
    queued: int  # waiting for a slot
    queue_target_s: NotRequired[float]  # the class's CoDel target


class ProviderQuotaSnapshot(TypedDict):
    """A provider's request quota as paced from its rate-limit headers (admission/pacing.py)."""

    remaining: float  # requests this replica may still send now
    others_per_minute: NotRequired[float]  # what other replicas / clients were seen to spend


class DeploymentSnapshot(TypedDict):
    limit: float  # adaptive concurrency limit
    in_flight: NotRequired[int]
    provider_quota: NotRequired[ProviderQuotaSnapshot | None]  # None: no quota reported


class AdmissionSnapshot(TypedDict):
    classes: Mapping[str, ClassSnapshot]  # by priority name
    deployments: Mapping[str, DeploymentSnapshot]  # by deployment label "provider/model"


class BudgetSnapshot(TypedDict):
    remaining: float  # in the budget's unit (tokens or currency), for the current period
    limit: float


class RedisSnapshot(TypedDict):
    degraded: bool  # True: limits run locally (limit / replicas) or fail open/closed
    latency_s: NotRequired[float | None]  # recent round trip
    journal_lost: NotRequired[int]  # settlements lost for good (counter)
    resets: NotRequired[int]  # Redis found restarted empty (counter)


# Typed loosely (Mapping[str, Any]) so a component's own ``snapshot() -> dict[str, Any]`` that
# is a superset of the shape above can be registered as is, without a cast.
AdmissionSource = Callable[[], Mapping[str, Any]]  # shaped like AdmissionSnapshot
BreakerSource = Callable[[], Mapping[str, str]]  # deployment label -> state name
BudgetSource = Callable[[], Mapping[str, Mapping[str, Mapping[str, Any]]]]  # tenant -> kind ->
# BudgetSnapshot; kinds: daily_tokens, monthly_tokens, daily_cost, monthly_cost
RedisSource = Callable[[], Mapping[str, Any] | None]  # RedisSnapshot; None: no Redis here
# {"running": n, "tenants": {tenant: {"depth", "oldest_age_s", "ttl_s"}}}; None: deferral off
DeferredSource = Callable[[], Mapping[str, Any] | None]
LoopLagSource = Callable[[], float]  # seconds, e.g. lambda: self_protection.loop_lag.lag_s

PULLED_GAUGES = (
    "gateway_in_flight_requests", "gateway_queued_requests", "gateway_queue_target_seconds",
    "gateway_concurrency_limit", "gateway_deployment_in_flight_requests",
    "gateway_provider_requests_remaining", "gateway_breaker_state",
    "gateway_budget_remaining", "gateway_budget_limit", "gateway_redis_degraded",
    "gateway_redis_latency_seconds", "gateway_event_loop_lag_seconds",
    "gateway_deferred_queue_depth", "gateway_deferred_oldest_age_seconds",
    "gateway_deferred_ttl_seconds", "gateway_deferred_running",
)
PULLED_COUNTERS = ("gateway_usage_journal_lost", "gateway_state_resets")


class PulledGauges(Collector):
    """The sources ``GatewayMetrics.set_*_source`` registered, read on every collect."""

    def __init__(self, registry: CollectorRegistry, bounds: Callable[[], LabelBounds]) -> None:
        self._bounds = bounds  # the current policy's label values (replaced on reload)
        self._source_errors = Counter("gateway_metrics_source_errors",
                                      "Gauge sources that raised during a scrape.", ("source",),
                                      registry=registry)
        self.admission: AdmissionSource | None = None
        self.breakers: BreakerSource | None = None
        self.budgets: BudgetSource | None = None
        self.redis: RedisSource | None = None
        self.loop_lag: LoopLagSource | None = None
        self.deferred: DeferredSource | None = None
        self._failing: set[str] = set()  # sources whose current failure streak was logged

    def describe(self) -> Iterable[Metric]:  # names only: for duplicate checks and ?name[]=
        return [*(GaugeMetricFamily(name, name) for name in PULLED_GAUGES),
                *(CounterMetricFamily(name, name) for name in PULLED_COUNTERS)]

    def collect(self) -> Iterable[Metric]:
        return list(self._pulled())

    def _pulled(self) -> Iterator[Metric]:
        bounds = self._bounds()
        deployments, tenants = bounds.deployments, bounds.tenants
        admission = self._call("admission", self.admission)
        if admission is not None:
            in_flight = _gauge("gateway_in_flight_requests", "Admitted, unfinished.", "priority")
            queued = _gauge("gateway_queued_requests", "Waiting for a slot.", "priority")
            target = _gauge("gateway_queue_target_seconds", "Queue delay target.", "priority")
            for name, cls in admission["classes"].items():
                if name in PRIORITIES:
                    in_flight.add_metric([name], cls["in_flight"])
                    queued.add_metric([name], cls["queued"])
                    if "queue_target_s" in cls:
                        target.add_metric([name], cls["queue_target_s"])
            limit = _gauge("gateway_concurrency_limit", "Adaptive limit.", "deployment")
            used = _gauge("gateway_deployment_in_flight_requests", "In flight.", "deployment")
            quota = _gauge("gateway_provider_requests_remaining",
                           "Requests this replica may send now within the provider's own quota, "
                           "as paced from its rate-limit headers (deployments that report one).",
                           "deployment")
            for label, dep in admission["deployments"].items():
                if label in deployments:
                    limit.add_metric([label], dep["limit"])
                    if "in_flight" in dep:
                        used.add_metric([label], dep["in_flight"])
                    if dep.get("provider_quota"):
                        quota.add_metric([label], dep["provider_quota"]["remaining"])
            yield from (in_flight, queued, target, limit, used, quota)
        breakers = self._call("breakers", self.breakers)
        if breakers is not None:
            state = _gauge("gateway_breaker_state", "1 for the current state.",
                           "deployment", "state")
            for label, current in breakers.items():
                if label in deployments:
                    now = breaker_state(current)
                    for name in BREAKER_STATES:
                        state.add_metric([label, name], 1.0 if name == now else 0.0)
            yield state
        budgets = self._call("budgets", self.budgets)
        if budgets is not None:
            remaining = _gauge("gateway_budget_remaining", "Left this period.", "tenant", "budget")
            total = _gauge("gateway_budget_limit", "Budget this period.", "tenant", "budget")
            for tenant, kinds in budgets.items():
                for kind, budget in kinds.items() if tenant in tenants else ():
                    if kind in BUDGET_KINDS:
                        remaining.add_metric([tenant, kind], budget["remaining"])
                        total.add_metric([tenant, kind], budget["limit"])
            yield from (remaining, total)
        redis = self._call("redis", self.redis)
        if redis is not None:
            yield GaugeMetricFamily("gateway_redis_degraded", "1 while limits run without Redis.",
                                    value=1.0 if redis["degraded"] else 0.0)
            latency = redis.get("latency_s")
            if latency is not None:
                yield GaugeMetricFamily("gateway_redis_latency_seconds", "Recent round trip.",
                                        value=latency)
            if "journal_lost" in redis:
                yield CounterMetricFamily(
                    "gateway_usage_journal_lost", "Settlements never recorded in Redis (usage "
                    "journal full, or no journal file at stop).", value=redis["journal_lost"])
            if "resets" in redis:
                yield CounterMetricFamily(
                    "gateway_state_resets", "Times Redis was found restarted empty (the fleet "
                    "epoch key gone): every budget and limit in it was back at zero.",
                    value=redis["resets"])
        deferred = self._call("deferred", self.deferred)
        if deferred is not None:
            depth = _gauge("gateway_deferred_queue_depth", "Deferred requests not finished "
                           "(queued or running), fleet-wide.", "tenant")
            age = _gauge("gateway_deferred_oldest_age_seconds", "Age of the oldest unfinished "
                         "deferred request, fleet-wide.", "tenant")
            ttl = _gauge("gateway_deferred_ttl_seconds", "Deferred requests expire this long "
                         "after submit.", "tenant")
            for tenant, queue in deferred["tenants"].items():
                if tenant in tenants:
                    depth.add_metric([tenant], queue["depth"])
                    age.add_metric([tenant], queue["oldest_age_s"])
                    ttl.add_metric([tenant], queue["ttl_s"])
            yield from (depth, age, ttl)
            yield GaugeMetricFamily("gateway_deferred_running", "Deferred requests this replica "
                                    "is running now.", value=deferred["running"])
        lag = self._call("loop_lag", self.loop_lag)
        if lag is not None:
            yield GaugeMetricFamily("gateway_event_loop_lag_seconds",
                                    "How late timers run (recent maximum).", value=lag)

    def _call(self, name: str, source: Callable[[], _T] | None) -> _T | None:
        if source is None:
            return None
        try:
            value = source()
        except Exception:
            self._source_errors.labels(name).inc()
            if name not in self._failing:  # log once per failure streak, not every scrape
                self._failing.add(name)
                log.warning("metrics source %s failed", name, exc_info=True)
            return None
        self._failing.discard(name)
        return value


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)
