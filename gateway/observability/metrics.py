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

Modules: observability/labels.py (the bounded label values both halves use), observability/pulled.py (the
pull half: snapshot shapes, sources, the scrape-time collector) and this one: the push half,
the registry and the ``/metrics`` handler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.config import GatewayConfig
from gateway.request import error_dialect

from .labels import (
    DEFERRED_OUTCOMES,
    DEFERRED_RUN_RESULTS,
    DEFERRED_VIA,
    DIALECTS,
    LOOP_ACTIONS,
    OUTCOMES,
    PRIORITIES,
    RUN_CAPS,
    SHED_REASONS,
    LabelBounds,
    attempt_outcome,
    bounded,
    breaker_state,
    rejection_reason,
)
from .pulled import (
    AdmissionSource,
    BreakerSource,
    BudgetSource,
    DeferredSource,
    LoopLagSource,
    PulledGauges,
    RedisSource,
)
from .worker_group import WORKER_GROUP

if TYPE_CHECKING:  # pipeline/handler.py imports this module; avoid the cycle at runtime
    from gateway.request import RequestRecord

# 1 ms .. 10 min: dense below 1 s for the gateway's own waits, 0.25/1/2/5 s exact so the default
# queue targets (critical 250 ms, high 1 s, low 2 s, normal 5 s) are bucket edges, and a long
# tail for streamed answers that run for minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
                   10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)

M = TypeVar("M", Counter, Histogram)


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


class GatewayMetrics:
    """Every gateway metric, in a registry this object owns (or the one passed in)."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._bounds = LabelBounds(config)
        # Tokens by billed dimension and cost in micro-units per tenant label since start, for
        # /admin/status (which must not parse the registry); keyed like the metric labels.
        self.usage_by_tenant: dict[str, dict[str, int]] = {}
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
        self._dialects = counter("gateway_dialect_requests", "Requests sent upstream, by "
                                 "the client's dialect and that of the deployment tried last "
                                 "(they differ when the gateway translated).", "client",
                                 "upstream")
        self._tokens = counter("gateway_tokens", "Tokens reported by the upstream (or counted "
                               "from a cut stream).", "tenant", "model", "direction")
        self._billed = counter("gateway_billed_tokens", "Tokens by billed dimension: input "
                               "(uncached), cache_read, cache_write_5m, cache_write_1h, output; "
                               "and the parts of output reasoning, accepted_prediction, "
                               "rejected_prediction (already in output).",
                               "tenant", "model", "dimension")
        self._tool_calls = counter("gateway_billed_tool_calls", "Calls of tools the provider "
                                   "ran and bills per call (web_search, web_fetch, "
                                   "file_search, code_interpreter, image_generation), as its "
                                   "answers reported them.", "tenant", "model", "tool")
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
        self._run_stops = counter(
            "gateway_run_budget_stops", "Agent runs stopped by a run budget cap (counted once "
            "per run and replica, at its first refusal), by cap: tokens, cost, steps, age.",
            "tenant", "cap")
        self._agent_loops = counter(
            "gateway_agent_loops", "Requests whose conversation the loop detector flagged, by "
            "the action taken: warn, refuse, shadow.", "tenant", "action")
        self._conns_refused = counter(
            "gateway_connections_refused", "Client connections closed before a request was "
            "read, by reason: max_connections, max_connections_per_ip (closed as accepted), "
            "header_timeout (no complete request head within server.header_read_timeout_s).",
            "reason")
        self._conns_open = Gauge("gateway_client_connections", "Client connections open in "
                                 "this process (within server.max_connections).",
                                 registry=inner)
        self._pulled = PulledGauges(inner, lambda: self._bounds)
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
        self.registry.register(_WithoutCreated(inner))
        self.registry.register(self._pulled)

    def update_config(self, config: GatewayConfig) -> None:
        """Take the label values of a reloaded policy file (old series stay, as counters must)."""
        self._bounds = LabelBounds(config)

    # --- push -------------------------------------------------------------------------------

    def observe_request(self, record: RequestRecord) -> None:
        """Everything one finished request did; call once, after ``record.total_s`` is set.
        Timings that are None (the step did not run) are skipped."""
        bounds = self._bounds
        tenant = bounded(record.tenant, bounds.tenants)
        model = bounded(record.model, bounds.models)
        priority = bounded(record.priority, PRIORITIES)
        self._requests.get(tenant, model, priority, bounded(record.outcome, OUTCOMES)).inc()
        if record.upstream_dialect is not None:
            self._dialects.get(error_dialect(record.route),
                               bounded(record.upstream_dialect, DIALECTS)).inc()
        usage = record.usage
        if usage.input_tokens > 0:
            self._tokens.get(tenant, model, "input").inc(usage.input_tokens)
        if usage.output_tokens > 0:
            self._tokens.get(tenant, model, "output").inc(usage.output_tokens)
        totals = self.usage_by_tenant.setdefault(tenant, {})
        for dimension, tokens in usage.dimensions().items():  # a fixed set of 8 names
            if tokens > 0:
                self._billed.get(tenant, model, dimension).inc(tokens)
                totals[dimension] = totals.get(dimension, 0) + tokens
        for tool, calls in usage.tool_calls.items():  # SERVER_TOOLS: 5 names at most
            if calls > 0:
                self._tool_calls.get(tenant, model, tool).inc(calls)
        if record.cost_micros:
            totals["cost_micros"] = totals.get("cost_micros", 0) + record.cost_micros
        if record.cost > 0:
            self._cost.get(tenant, model).inc(record.cost)
        if record.loop_action is not None:
            self._agent_loops.get(tenant, bounded(record.loop_action, LOOP_ACTIONS)).inc()
        if record.limits_s is not None:
            self._limits_check.observe(record.limits_s)
        if record.queue_s is not None and not record.queue_refused:
            self._queue_wait.get(priority).observe(record.queue_s)
        if record.ttft_s is not None:
            self._ttft.get(model, priority).observe(record.ttft_s)
        if record.total_s is not None:
            stream = "true" if record.stream else "false"
            self._duration.get(priority, stream).observe(record.total_s)
        if record.attempt_log:  # per attempt: where each try went and how it ended
            for attempt in record.attempt_log:
                deployment = bounded(attempt.deployment, bounds.deployments)
                self._attempts.get(deployment, attempt_outcome(attempt.outcome)).inc()
                if attempt.first_byte_s is not None:
                    self._first_byte.get(deployment).observe(attempt.first_byte_s)
                self._upstream.get(deployment).observe(attempt.duration_s)
        elif record.deployment is not None:  # no log: the request-level timings of one attempt
            deployment = bounded(record.deployment, bounds.deployments)
            if record.first_byte_s is not None:
                self._first_byte.get(deployment).observe(record.first_byte_s)
            if record.upstream_s is not None:
                self._upstream.get(deployment).observe(record.upstream_s)
        window = record.context_window
        if window > 0:
            if record.prompt_tokens_estimate > 0:
                ratio = record.prompt_tokens_estimate / window
                self._context_use.get(model, "estimated").observe(ratio)
            if usage.input_seen:
                self._context_use.get(model, "actual").observe(usage.input_tokens / window)

    def rejected(self, reason: str | None, priority: str | None = None,
                 tenant: str | None = None, status: int | None = None) -> None:
        """The gateway refused a request. ``reason``: one of ``REJECTION_REASONS`` or a gateway
        error code (``rate_limit_exceeded``, ``insufficient_quota``, ...); without a known
        one, the answer's ``status`` decides (a 400 is ``invalid_request``); else ``other``."""
        self._rejections.get(rejection_reason(reason, status), bounded(priority, PRIORITIES),
                             bounded(tenant, self._bounds.tenants)).inc()

    def shed(self, reason: str | None, priority: str | None = None) -> None:
        """An overload shed, by its reason (admission and self-protection know the reason, not
        the tenant). The 503 it becomes is counted by ``rejected`` with the request's tenant,
        like every refusal, where the answer is made (gateway/app/server.py)."""
        self._sheds.get(bounded(priority, PRIORITIES), bounded(reason, SHED_REASONS)).inc()

    def retry(self, deployment: str | None, reason: str | None) -> None:
        """A retry or failover away from ``deployment``; ``reason`` is the failed attempt's
        outcome (``http_503``, ``connect_error``, ``first_byte_timeout``, ...)."""
        self._retries.get(bounded(deployment, self._bounds.deployments),
                          attempt_outcome(reason)).inc()

    def retry_budget_exhausted(self, deployment: str | None) -> None:
        self._retry_budget.get(bounded(deployment, self._bounds.deployments)).inc()

    def breaker_transition(self, deployment: str | None, old: str, new: str) -> None:
        """From a pybreaker listener's ``state_change``: pass ``old_state.name``."""
        self._transitions.get(bounded(deployment, self._bounds.deployments),
                              breaker_state(old), breaker_state(new)).inc()

    def shadow_decision(self, kind: str | None) -> None:
        """A shadow-mode policy would have refused; ``kind`` is the would-be reason or code."""
        self._shadow.get(rejection_reason(kind)).inc()

    def deferred_submitted(self, tenant: str | None, via: str) -> None:
        self._deferred_submitted.get(bounded(tenant, self._bounds.tenants),
                                     bounded(via, DEFERRED_VIA)).inc()

    def deferred_finished(self, tenant: str | None, outcome: str) -> None:
        self._deferred_finished.get(bounded(tenant, self._bounds.tenants),
                                    bounded(outcome, DEFERRED_OUTCOMES)).inc()

    def deferred_run(self, tenant: str | None, result: str) -> None:
        self._deferred_runs.get(bounded(tenant, self._bounds.tenants),
                                bounded(result, DEFERRED_RUN_RESULTS)).inc()

    def run_stopped(self, tenant: str, cap: str) -> None:
        self._run_stops.get(bounded(tenant, self._bounds.tenants), bounded(cap, RUN_CAPS)).inc()

    def agent_loop(self, tenant: str, action: str) -> None:
        self._agent_loops.get(bounded(tenant, self._bounds.tenants),
                              bounded(action, LOOP_ACTIONS)).inc()

    def connection_refused(self, reason: str) -> None:
        """A client connection closed by a connection cap or the header timeout."""
        self._conns_refused.get(reason).inc()

    def client_connections(self, count: int) -> None:
        self._conns_open.set(count)

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
        self._pulled.admission = source

    def set_breaker_source(self, source: BreakerSource | None) -> None:
        self._pulled.breakers = source

    def set_budget_source(self, source: BudgetSource | None) -> None:
        self._pulled.budgets = source

    def set_redis_source(self, source: RedisSource | None) -> None:
        self._pulled.redis = source

    def set_loop_lag_source(self, source: LoopLagSource | None) -> None:
        self._pulled.loop_lag = source

    def set_deferred_source(self, source: DeferredSource | None) -> None:
        self._pulled.deferred = source


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
    OpenMetrics) and aiohttp compresses per Accept-Encoding. Under ``--workers N`` the answer
    is every worker's metrics merged (observability/worker_group.py), whichever worker takes the scrape."""
    local = make_aiohttp_handler(metrics.registry)

    async def scrape(request: web.Request) -> web.StreamResponse:
        group = request.app.get(WORKER_GROUP)
        if group is None:
            return await local(request)
        merged = await group.metrics_registry(metrics.registry)
        response = await make_aiohttp_handler(merged)(request)
        response.headers["x-gateway-worker"] = str(group.index)
        return response

    return scrape
