"""Prometheus metrics, all named ``gateway_*``, served on ``/metrics``.

Two feeding styles, chosen by how a value changes:
- push, on the request path: ``observe_request(record)`` once per request (counters and
  histograms made from the ``RequestRecord``, so metrics agree with the access log), plus event
  methods (``rejected``, ``shed``, ``retry``, ``breaker_transition``, ...);
- pull, at scrape time: gauges (in flight, queued, limits, breakers, budgets, Redis, loop lag)
  come from snapshot callables their owners register, so no code has to keep a gauge in step.

Label values are bounded by construction: tenants, models and deployments must appear in the
policy file (anything else becomes ``other``, a missing value ``none``); priorities, outcomes,
reasons and states come from fixed sets. Nothing taken from a request (session ids, paths, raw
model strings) can become a label value.

Everything hangs off one ``GatewayMetrics`` with its own ``CollectorRegistry``; prometheus-client's
global registry and its process-global ``_created`` switch are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, NotRequired, TypedDict, TypeVar

from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import GatewayConfig, Priority

if TYPE_CHECKING:  # pipeline.py imports this module; avoid the cycle at runtime
    from .context import RequestRecord

log = logging.getLogger("gateway.metrics")

NONE = "none"  # the value was missing (e.g. the tenant of an unauthenticated request)
OTHER = "other"  # a value outside the configured or fixed set

# 1 ms .. 10 min: dense below 1 s for the gateway's own waits, 0.25/1/2/5 s exact so the default
# queue targets (critical 250 ms, high 1 s, low 2 s, normal 5 s) are bucket edges, and a long
# tail for streamed answers that run for minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
                   10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)

PRIORITIES = frozenset(p.name for p in Priority)
OUTCOMES = frozenset({"ok", "rejected", "shed", "error", "upstream_error", "client_disconnected"})
REJECTION_REASONS = frozenset({
    "rate_limited", "budget_exhausted", "loop_detected", "overloaded", "deadline_exceeded",
    "upstream_unavailable", "limits_unavailable", "invalid_request", "unauthenticated",
    "forbidden", "not_found", "too_large",
})
SHED_REASONS = frozenset({"queue_full", "cohort", "retry", "loop_lag", "open_streams", "memory"})
ATTEMPT_OUTCOMES = frozenset({"success", "http_429", "http_4xx", "http_5xx", "connect_error",
                              "timeout", "stream_cut", "breaker_open", "cancelled"})
BREAKER_STATES = ("closed", "half_open", "open")
BUDGET_KINDS = frozenset({"daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"})
# Deferred requests (gateway/deferred.py)
DEFERRED_VIA = frozenset({"prefer", "shed"})
DEFERRED_OUTCOMES = frozenset({"succeeded", "failed", "expired", "cancelled"})
DEFERRED_RUN_RESULTS = frozenset({"answered", "retried", "lost", "interrupted", "no_slot"})
# The gateway's own error codes, so the error boundary can pass ``exc.code`` straight through.
_REASON_BY_CODE = {
    "rate_limit_exceeded": "rate_limited", "insufficient_quota": "budget_exhausted",
    "invalid_api_key": "unauthenticated", "model_not_allowed": "forbidden",
    "model_not_found": "not_found", "unknown_url": "not_found", "request_too_large": "too_large",
    "model_not_supported_on_route": "invalid_request", "unsupported_media_type": "invalid_request",
}


def _bounded(value: str | None, allowed: frozenset[str]) -> str:
    if value is None:
        return NONE
    return value if value in allowed else OTHER


def rejection_reason(reason_or_code: str | None) -> str:
    """A bounded rejection reason from a reason name or one of the gateway's error codes."""
    if reason_or_code in REJECTION_REASONS:
        return reason_or_code
    return _REASON_BY_CODE.get(reason_or_code or "", OTHER)


def attempt_outcome(outcome: str | None) -> str:
    """``AttemptRecord.outcome`` (``http_503``, ``first_byte_timeout``, ...) to a fixed set."""
    if not outcome or outcome in ATTEMPT_OUTCOMES:
        return outcome or OTHER
    if outcome.startswith("http_") and outcome[5:].isdigit():
        status = int(outcome[5:])
        return "http_5xx" if status >= 500 else "http_4xx" if status >= 400 else "success"
    if outcome in ("server_error", "slow_first_byte"):  # breaker.py's failure kinds
        return "http_5xx" if outcome == "server_error" else "timeout"
    return "timeout" if "timeout" in outcome else OTHER


def breaker_state(state: str | None) -> str:
    """pybreaker's ``closed`` / ``open`` / ``half-open`` (or ``half_open``) to a label value."""
    value = (state or "").replace("-", "_").lower()
    return value if value in BREAKER_STATES else OTHER


# --- gauge sources: plain dicts; the TypedDicts only document the keys ------------------------


class ClassSnapshot(TypedDict):
    """One priority class, as the admission controller sees it right now."""

    in_flight: int  # admitted, not finished
    queued: int  # waiting for a slot
    queue_target_s: NotRequired[float]  # the class's CoDel target


class DeploymentSnapshot(TypedDict):
    limit: float  # adaptive concurrency limit
    in_flight: NotRequired[int]


class AdmissionSnapshot(TypedDict):
    classes: Mapping[str, ClassSnapshot]  # by priority name
    deployments: Mapping[str, DeploymentSnapshot]  # by deployment label "provider/model"


class BudgetSnapshot(TypedDict):
    remaining: float  # in the budget's unit (tokens or currency), for the current period
    limit: float


class RedisSnapshot(TypedDict):
    degraded: bool  # True: limits run locally (limit / replicas) or fail open/closed
    latency_s: NotRequired[float | None]  # recent round trip


# Typed loosely (Mapping[str, Any]) so a component's own ``snapshot() -> dict[str, Any]`` that
# is a superset of the shape above can be registered as is, without a cast.
AdmissionSource = Callable[[], Mapping[str, Any]]  # shaped like AdmissionSnapshot
BreakerSource = Callable[[], Mapping[str, str]]  # deployment label -> state name
BudgetSource = Callable[[], Mapping[str, Mapping[str, Mapping[str, Any]]]]  # tenant -> kind ->
# BudgetSnapshot; kinds: daily_tokens, monthly_tokens, daily_cost, monthly_cost
RedisSource = Callable[[], Mapping[str, Any] | None]  # RedisSnapshot; None: no Redis here
# {"running": n, "tenants": {tenant: {"depth", "oldest_age_s", "ttl_s"}}}; None: deferral off
DeferredSource = Callable[[], Mapping[str, Any] | None]
LoopLagSource = Callable[[], float]  # seconds, e.g. lambda: selfprotect_monitor.lag_s

M = TypeVar("M", Counter, Histogram)
_T = TypeVar("_T")


class _Family(Generic[M]):
    """A labelled metric with its children cached: ``.labels()`` costs ~2.5 µs, a dict hit
    ~0.1 µs. Keys are already-bounded values, so the cache is bounded too."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def get(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class _Bounds:
    """The label values one policy file allows."""

    def __init__(self, config: GatewayConfig) -> None:
        self.tenants = frozenset(config.tenants)
        self.models = frozenset(config.models)
        self.deployments = frozenset(
            f"{d.provider}/{d.model}"  # == Target.label
            for m in config.models.values() for d in m.deployments
        )


class GatewayMetrics:
    """Every gateway metric, in a registry this object owns (or the one passed in)."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._bounds = _Bounds(config)
        # Instruments live in a private registry, exposed through a filter that drops the
        # *_created series (prometheus-client's own switch for that is process-global).
        inner = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> _Family[Counter]:
            return _Family(Counter(name, doc, labels, registry=inner))

        def histogram(name: str, doc: str, *labels: str) -> _Family[Histogram]:
            buckets = RATIO_BUCKETS if name.endswith("_ratio") else LATENCY_BUCKETS
            return _Family(Histogram(name, doc, labels, registry=inner, buckets=buckets))

        self._requests = counter("gateway_requests", "Requests finished, by outcome.",
                                 "tenant", "model", "priority", "outcome")
        self._tokens = counter("gateway_tokens", "Tokens reported by the upstream (or counted "
                               "from a cut stream).", "tenant", "model", "direction")
        self._cost = counter("gateway_cost", "Cost in the price table's currency.",
                             "tenant", "model")
        self._rejections = counter("gateway_rejections", "Requests the gateway refused itself.",
                                   "reason", "priority", "tenant")
        self._sheds = counter("gateway_sheds", "Overload sheds, by class and shed reason.",
                              "priority", "reason")
        self._attempts = counter("gateway_upstream_attempts", "Upstream attempts by result.",
                                 "deployment", "outcome")
        self._retries = counter("gateway_retries", "Retries and failovers away from a "
                                "deployment, by the failed attempt's result.",
                                "deployment", "reason")
        self._retry_budget = counter("gateway_retry_budget_exhausted",
                                     "Retries the retry budget refused.", "deployment")
        self._transitions = counter("gateway_breaker_transitions", "Breaker state changes.",
                                    "deployment", "from_state", "to_state")
        self._shadow = counter("gateway_shadow_decisions", "Refusals a policy in shadow mode "
                               "would have made.", "reason")
        self._reloads = counter("gateway_config_reloads", "Policy reloads.", "result")
        self._deferred_submitted = counter(
            "gateway_deferred_submitted", "Deferred requests accepted (202), by how: the "
            "client's Prefer: respond-async, or a would-be shed turned into a deferral.",
            "tenant", "via")
        self._deferred_finished = counter(
            "gateway_deferred_finished", "Deferred requests finished, by final status.",
            "tenant", "outcome")
        self._deferred_runs = counter(
            "gateway_deferred_runs", "Runs of deferred requests: answered (final), retried "
            "(retryable failure, queued again), lost (its replica died; run again), "
            "interrupted (replica stopping), no_slot (put back before reaching the upstream).",
            "tenant", "result")
        self._source_errors = counter("gateway_metrics_source_errors",
                                      "Gauge sources that raised during a scrape.", "source")
        self._reload_ok = Gauge("gateway_config_last_reload_successful",
                                "1 when the last policy reload worked.", registry=inner)
        self._reload_ok.set(1)
        self._limits_check = Histogram("gateway_limits_check_duration_seconds",
                                       "Tenant limit and budget check.", registry=inner,
                                       buckets=LATENCY_BUCKETS)
        self._queue_wait = histogram("gateway_queue_wait_seconds",
                                     "Waiting for an admission slot.", "priority")
        self._first_byte = histogram("gateway_upstream_first_byte_seconds",
                                     "Request sent to upstream response headers.", "deployment")
        self._upstream = histogram("gateway_upstream_duration_seconds",
                                   "Whole upstream attempt, body or stream included.",
                                   "deployment")
        self._ttft = histogram("gateway_time_to_first_token_seconds",
                               "Request arrival to first content relayed.", "model", "priority")
        self._duration = histogram("gateway_request_duration_seconds",
                                   "Request arrival to last byte.", "priority", "stream")
        self._context_use = histogram("gateway_context_window_usage_ratio",
                                      "Prompt tokens over the model's context window.",
                                      "model", "phase")
        self._admission: AdmissionSource | None = None
        self._breakers: BreakerSource | None = None
        self._budgets: BudgetSource | None = None
        self._redis: RedisSource | None = None
        self._loop_lag: LoopLagSource | None = None
        self._deferred: DeferredSource | None = None
        self._failing: set[str] = set()  # sources whose current failure streak was logged
        self.registry.register(_WithoutCreated(inner))
        self.registry.register(_PulledGauges(self))

    def update_config(self, config: GatewayConfig) -> None:
        """Take the label values of a reloaded policy file (old series stay, as counters must)."""
        self._bounds = _Bounds(config)

    # --- push -------------------------------------------------------------------------------

    def observe_request(self, record: RequestRecord) -> None:
        """Everything one finished request did; call once, after ``record.total_s`` is set.
        Timings that are None (the step did not run) are skipped."""
        bounds = self._bounds
        tenant = _bounded(record.tenant, bounds.tenants)
        model = _bounded(record.model, bounds.models)
        priority = _bounded(record.priority, PRIORITIES)
        self._requests.get(tenant, model, priority, _bounded(record.outcome, OUTCOMES)).inc()
        usage = record.usage
        if usage.input_tokens > 0:
            self._tokens.get(tenant, model, "input").inc(usage.input_tokens)
        if usage.output_tokens > 0:
            self._tokens.get(tenant, model, "output").inc(usage.output_tokens)
        if record.cost > 0:
            self._cost.get(tenant, model).inc(record.cost)
        if record.limits_s is not None:
            self._limits_check.observe(record.limits_s)
        if record.queue_s is not None:
            self._queue_wait.get(priority).observe(record.queue_s)
        if record.ttft_s is not None:
            self._ttft.get(model, priority).observe(record.ttft_s)
        if record.total_s is not None:
            stream = "true" if record.stream else "false"
            self._duration.get(priority, stream).observe(record.total_s)
        if record.attempt_log:  # per attempt: where each try went and how it ended
            for attempt in record.attempt_log:
                deployment = _bounded(attempt.deployment, bounds.deployments)
                self._attempts.get(deployment, attempt_outcome(attempt.outcome)).inc()
                if attempt.first_byte_s is not None:
                    self._first_byte.get(deployment).observe(attempt.first_byte_s)
                self._upstream.get(deployment).observe(attempt.duration_s)
        elif record.deployment is not None:  # no log: the request-level timings of one attempt
            deployment = _bounded(record.deployment, bounds.deployments)
            if record.first_byte_s is not None:
                self._first_byte.get(deployment).observe(record.first_byte_s)
            if record.upstream_s is not None:
                self._upstream.get(deployment).observe(record.upstream_s)
        window = record.context_window
        if window > 0:
            if record.prompt_tokens_estimate > 0:
                ratio = record.prompt_tokens_estimate / window
                self._context_use.get(model, "estimated").observe(ratio)
            if usage.reported and usage.input_tokens > 0:
                self._context_use.get(model, "actual").observe(usage.input_tokens / window)

    def rejected(self, reason: str | None, priority: str | None = None,
                 tenant: str | None = None) -> None:
        """The gateway refused a request. ``reason``: one of ``REJECTION_REASONS`` or a gateway
        error code (``rate_limit_exceeded``, ``insufficient_quota``, ...); else ``other``."""
        self._rejections.get(rejection_reason(reason), _bounded(priority, PRIORITIES),
                             _bounded(tenant, self._bounds.tenants)).inc()

    def shed(self, reason: str | None, priority: str | None = None,
             tenant: str | None = None) -> None:
        """An overload shed (503 ``overloaded``): counts as a rejection with reason
        ``overloaded`` too, so call this *instead of* ``rejected`` for sheds."""
        self.rejected("overloaded", priority, tenant)
        self._sheds.get(_bounded(priority, PRIORITIES), _bounded(reason, SHED_REASONS)).inc()

    def retry(self, deployment: str | None, reason: str | None) -> None:
        """A retry or failover away from ``deployment``; ``reason`` is the failed attempt's
        outcome (``http_503``, ``connect_error``, ``first_byte_timeout``, ...)."""
        self._retries.get(_bounded(deployment, self._bounds.deployments),
                          attempt_outcome(reason)).inc()

    def retry_budget_exhausted(self, deployment: str | None) -> None:
        self._retry_budget.get(_bounded(deployment, self._bounds.deployments)).inc()

    def breaker_transition(self, deployment: str | None, old: str, new: str) -> None:
        """From a pybreaker listener's ``state_change``: pass ``old_state.name``."""
        self._transitions.get(_bounded(deployment, self._bounds.deployments),
                              breaker_state(old), breaker_state(new)).inc()

    def shadow_decision(self, kind: str | None) -> None:
        """A shadow-mode policy would have refused; ``kind`` is the would-be reason or code."""
        self._shadow.get(rejection_reason(kind)).inc()

    def deferred_submitted(self, tenant: str | None, via: str) -> None:
        self._deferred_submitted.get(_bounded(tenant, self._bounds.tenants),
                                     _bounded(via, DEFERRED_VIA)).inc()

    def deferred_finished(self, tenant: str | None, outcome: str) -> None:
        self._deferred_finished.get(_bounded(tenant, self._bounds.tenants),
                                    _bounded(outcome, DEFERRED_OUTCOMES)).inc()

    def deferred_run(self, tenant: str | None, result: str) -> None:
        self._deferred_runs.get(_bounded(tenant, self._bounds.tenants),
                                _bounded(result, DEFERRED_RUN_RESULTS)).inc()

    def config_reload(self, ok: bool) -> None:
        """A policy reload finished; on success call ``update_config`` too."""
        self._reloads.get("success" if ok else "failure").inc()
        self._reload_ok.set(1 if ok else 0)

    # --- pull: called at scrape time, in the event loop --------------------------------------
    # Each setter replaces the previous source (a policy reload re-registers its new objects).
    # Sources must be cheap, synchronous and non-blocking. One that raises loses its series for
    # that scrape and counts in gateway_metrics_source_errors_total. Entries whose tenant,
    # deployment or class is not in the policy (stale during a reload) are skipped.

    def set_admission_source(self, source: AdmissionSource | None) -> None:
        self._admission = source

    def set_breaker_source(self, source: BreakerSource | None) -> None:
        self._breakers = source

    def set_budget_source(self, source: BudgetSource | None) -> None:
        self._budgets = source

    def set_redis_source(self, source: RedisSource | None) -> None:
        self._redis = source

    def set_loop_lag_source(self, source: LoopLagSource | None) -> None:
        self._loop_lag = source

    def set_deferred_source(self, source: DeferredSource | None) -> None:
        self._deferred = source

    def _pulled(self) -> Iterator[Metric]:
        deployments, tenants = self._bounds.deployments, self._bounds.tenants
        admission = self._call("admission", self._admission)
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
            for label, dep in admission["deployments"].items():
                if label in deployments:
                    limit.add_metric([label], dep["limit"])
                    if "in_flight" in dep:
                        used.add_metric([label], dep["in_flight"])
            yield from (in_flight, queued, target, limit, used)
        breakers = self._call("breakers", self._breakers)
        if breakers is not None:
            state = _gauge("gateway_breaker_state", "1 for the current state.",
                           "deployment", "state")
            for label, current in breakers.items():
                if label in deployments:
                    now = breaker_state(current)
                    for name in BREAKER_STATES:
                        state.add_metric([label, name], 1.0 if name == now else 0.0)
            yield state
        budgets = self._call("budgets", self._budgets)
        if budgets is not None:
            remaining = _gauge("gateway_budget_remaining", "Left this period.", "tenant", "budget")
            total = _gauge("gateway_budget_limit", "Budget this period.", "tenant", "budget")
            for tenant, kinds in budgets.items():
                for kind, budget in kinds.items() if tenant in tenants else ():
                    if kind in BUDGET_KINDS:
                        remaining.add_metric([tenant, kind], budget["remaining"])
                        total.add_metric([tenant, kind], budget["limit"])
            yield from (remaining, total)
        redis = self._call("redis", self._redis)
        if redis is not None:
            yield GaugeMetricFamily("gateway_redis_degraded", "1 while limits run without Redis.",
                                    value=1.0 if redis["degraded"] else 0.0)
            latency = redis.get("latency_s")
            if latency is not None:
                yield GaugeMetricFamily("gateway_redis_latency_seconds", "Recent round trip.",
                                        value=latency)
        deferred = self._call("deferred", self._deferred)
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
        lag = self._call("loop_lag", self._loop_lag)
        if lag is not None:
            yield GaugeMetricFamily("gateway_event_loop_lag_seconds",
                                    "How late timers run (recent maximum).", value=lag)

    def _call(self, name: str, source: Callable[[], _T] | None) -> _T | None:
        if source is None:
            return None
        try:
            value = source()
        except Exception:
            self._source_errors.get(name).inc()
            if name not in self._failing:  # log once per failure streak, not every scrape
                self._failing.add(name)
                log.warning("metrics source %s failed", name, exc_info=True)
            return None
        self._failing.discard(name)
        return value


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


PULLED_GAUGES = (
    "gateway_in_flight_requests", "gateway_queued_requests", "gateway_queue_target_seconds",
    "gateway_concurrency_limit", "gateway_deployment_in_flight_requests", "gateway_breaker_state",
    "gateway_budget_remaining", "gateway_budget_limit", "gateway_redis_degraded",
    "gateway_redis_latency_seconds", "gateway_event_loop_lag_seconds",
    "gateway_deferred_queue_depth", "gateway_deferred_oldest_age_seconds",
    "gateway_deferred_ttl_seconds", "gateway_deferred_running",
)


class _PulledGauges(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:  # names only: for duplicate checks and ?name[]=
        return [GaugeMetricFamily(name, name) for name in PULLED_GAUGES]

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics._pulled())


class _WithoutCreated(Collector):
    """A registry's metrics minus the ``*_created`` samples."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def describe(self) -> Iterable[Metric]:
        return list(self._inner.collect())

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():  # fresh families on every collect: safe to edit
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def metrics_handler(metrics: GatewayMetrics) -> Handler:
    """``GET /metrics``: prometheus-client picks the format from Accept (text 0.0.4 or
    OpenMetrics) and aiohttp compresses per Accept-Encoding."""
    return make_aiohttp_handler(metrics.registry)

