"""One view of a pod's ``--workers N``: /metrics and /admin/status answer for every worker.

SO_REUSEPORT hands each connection to one worker, so a scrape would see only that worker's
counters, and two scrapes in a row could see different ones (counters jumping up and down).
Instead, every worker also listens on a Unix socket of its own in a directory the supervisor
creates for this run (``tempfile.mkdtemp``: empty at start, mode 0700, removed at exit), where
it answers its *local* metrics (as JSON) and status. The worker that takes a scrape asks the
others there, at scrape time, and merges:

- counters and histograms are summed, sample by sample, so every worker serving the scrape
  reports the same totals;
- gauges are merged by meaning (``GAUGE_MERGE``): in-flight and queued requests add up, a
  budget left is the smallest any worker saw, breaker state and loop lag take the worst;
- a worker that does not answer within ``PEER_TIMEOUT_S`` contributes its last answer, so
  counters never go backwards; ``gateway_workers_answering`` says how many answered now.

Why not prometheus-client's multiprocess mode: it needs ``PROMETHEUS_MULTIPROC_DIR`` in the
environment before the library is imported and is process-global (this code keeps every
registry on its ``GatewayMetrics``, several per test process), it has no custom collectors or
``set_function`` (the gauges of observability/pulled.py read live snapshots at scrape time), and
every increment becomes an mmap write on the request path. Merging at scrape time costs
nothing per request; a scrape costs one local round trip per other worker.

Nothing here runs without ``--workers`` above 1: a single process serves its own /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger("gateway")

PEER_TIMEOUT_S = 2.0  # a worker whose loop is this late contributes its previous answer
LOCAL_METRICS, LOCAL_STATUS = "/local/metrics", "/local/status"

# How one gauge of N workers becomes one value; any gauge not listed is summed (most gauges
# count something each worker holds: requests, streams, entries). Add new gauges here when
# summing them would be wrong.
GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    "gateway_queue_target_seconds": max,  # policy: the same in every worker
    "gateway_breaker_state": max,  # 1 for a state any worker is in: open anywhere shows
    "gateway_budget_remaining": min,  # shared (Redis) or per worker: the least left
    "gateway_budget_limit": max,
    "gateway_redis_degraded": max,
    "gateway_redis_latency_seconds": max,
    "gateway_event_loop_lag_seconds": max,
    "gateway_deferred_queue_depth": max,  # fleet-wide figures every worker reads from Redis
    "gateway_deferred_oldest_age_seconds": max,
    "gateway_deferred_ttl_seconds": max,
    "gateway_config_last_reload_successful": min,
}


@dataclass(slots=True)
class WorkerGroup:
    """This worker's place in the group: the shared directory, its index, the group size."""

    directory: Path
    index: int
    size: int
    timeout_s: float = PEER_TIMEOUT_S
    _last_metrics: dict[int, list[Metric]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def socket_path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    def peers(self) -> list[int]:
        return [i for i in range(self.size) if i != self.index]

    # --- this worker's local answers ----------------------------------------------------------

    async def start(self, registry: CollectorRegistry,
                    local_status: Callable[[], Mapping[str, Any]]) -> None:
        """Listen on this worker's socket for the others (call before taking traffic)."""
        app = web.Application()

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=dump_families(registry.collect()),
                                content_type="application/json")

        async def status(_request: web.Request) -> web.Response:
            return web.Response(body=orjson.dumps({**local_status(), "pid": os.getpid()}),
                                content_type="application/json")

        app.router.add_get(LOCAL_METRICS, metrics)
        app.router.add_get(LOCAL_STATUS, status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        path = self.socket_path(self.index)
        path.unlink(missing_ok=True)
        await web.UnixSite(self._runner, str(path)).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.socket_path(self.index).unlink(missing_ok=True)

    # --- asking the others --------------------------------------------------------------------

    async def _ask(self, index: int, path: str) -> bytes | None:
        # A Unix connector is bound to one path: one short session per peer and scrape.
        connector = aiohttp.UnixConnector(path=str(self.socket_path(index)))
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as session, session.get(f"http://worker{path}") as resp:
                if resp.status != 200:
                    return None
                return await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def _ask_all(self, path: str) -> dict[int, bytes | None]:
        peers = self.peers()
        answers = await asyncio.gather(*(self._ask(i, path) for i in peers))
        return dict(zip(peers, answers, strict=True))

    async def metrics_registry(self, registry: CollectorRegistry) -> CollectorRegistry:
        """A registry whose one collector yields every worker's metrics merged."""
        parts: list[list[Metric]] = [list(registry.collect())]
        answering = 1
        for index, body in (await self._ask_all(LOCAL_METRICS)).items():
            if body is not None:
                try:
                    self._last_metrics[index] = load_families(body)
                    answering += 1
                except (ValueError, KeyError, TypeError):
                    log.warning("worker %d sent unreadable metrics", index)
            if index in self._last_metrics:
                parts.append(self._last_metrics[index])
        merged = merge_families(parts)
        merged.append(_gauge("gateway_workers", "Worker processes of this gateway (--workers).",
                             self.size))
        merged.append(_gauge("gateway_workers_answering", "Workers whose metrics this scrape "
                             "read live (the others: their last answer).", answering))
        out = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
        out.register(_Fixed(merged))
        return out

    async def status(self, local: Mapping[str, Any]) -> dict[str, Any]:
        """``/admin/status`` for the whole group: the local status merged with the others'."""
        statuses: list[Mapping[str, Any] | None] = [None] * self.size
        statuses[self.index] = {**local, "pid": os.getpid()}
        for index, body in (await self._ask_all(LOCAL_STATUS)).items():
            if body is not None:
                try:
                    statuses[index] = orjson.loads(body)
                except orjson.JSONDecodeError:
                    log.warning("worker %d sent an unreadable status", index)
        return merge_status(statuses, local_index=self.index)


# --- metrics: JSON between workers, and the merge ------------------------------------------


def dump_families(families: Iterable[Metric]) -> bytes:
    return orjson.dumps([
        {"name": m.name, "documentation": m.documentation, "type": m.type, "unit": m.unit,
         "samples": [[s.name, s.labels, s.value] for s in m.samples]}
        for m in families
    ])


def load_families(body: bytes) -> list[Metric]:
    out = []
    for item in orjson.loads(body):
        metric = Metric(item["name"], item["documentation"], item["type"], item["unit"])
        metric.samples = [Sample(name, dict(labels), float(value))
                          for name, labels, value in item["samples"]]
        out.append(metric)
    return out


def merge_families(parts: Sequence[Sequence[Metric]]) -> list[Metric]:
    """One family per name, its samples combined across ``parts`` (one list per worker):
    summed, except gauges named in ``GAUGE_MERGE``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for part in parts:
        for metric in part:
            if metric.name not in families:
                families[metric.name] = Metric(metric.name, metric.documentation, metric.type,
                                               metric.unit)
                values[metric.name] = {}
            family_values = values[metric.name]
            for sample in metric.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                family_values.setdefault(key, []).append(sample.value)
    out = []
    for name, family in families.items():
        combine = GAUGE_MERGE.get(name, sum) if family.type == "gauge" else sum
        family.samples = [Sample(sample_name, dict(labels), float(combine(found)))
                          for (sample_name, labels), found in values[name].items()]
        out.append(family)
    return out


def _gauge(name: str, documentation: str, value: float) -> Metric:
    metric = Metric(name, documentation, "gauge")
    metric.samples = [Sample(name, {}, float(value))]
    return metric


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# --- status ---------------------------------------------------------------------------------

_BREAKER_WORST = {"open": 2, "half_open": 1, "closed": 0}
_MAX = frozenset({"oldest_wait_s", "loop_lag_s", "pressure", "failure_rate",
                  "consecutive_failures", "open_for_s", "cooling_for_s", "ttft_estimate_s",
                  "shed_level", "queue_target_s", "limit_per_minute", "bucket",
                  "prefill_s_per_1k_tokens"})
# others_per_minute: each worker counts the other workers as "others"; the least is the
# closest to what the pod's neighbours spend.
# ttft_baseline_s: the lowest no-load first token any worker estimated (a sum means nothing).
_MIN = frozenset({"remaining", "others_per_minute", "ttft_baseline_s"})
_SAME = frozenset({"limits", "budget", "max_priority", "max_loop_lag_s",
                   "max_open_streams", "max_rss_mib", "worst", "degraded_action", "backend",
                   "replicas", "shadow", "run_budget"})  # policy or per-worker settings:
                                                            # taken from one


def merge_status(statuses: Sequence[Mapping[str, Any] | None],
                 local_index: int) -> dict[str, Any]:
    """``admin.status()`` of several workers as one: counts summed, worst states and waits
    kept, policy taken once; ``workers`` lists each with whether it answered."""
    local = statuses[local_index]
    assert local is not None
    present = [s for s in statuses if s is not None]
    merged: dict[str, Any] = dict(local)
    for key in ("state", "tenants", "admission", "self_protection", "breakers", "retry_budget"):
        if key in local:
            merged[key] = _merge([s.get(key) for s in present], key)
    merged["ready"] = all(bool(s.get("ready")) for s in present)
    merged["workers"] = [
        {"index": i, "answered": s is not None, "pid": (s or {}).get("pid"),
         "replica": (s or {}).get("replica"), "ready": (s or {}).get("ready")}
        for i, s in enumerate(statuses)
    ]
    return merged


def _merge(values: list[Any], key: str) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    first = values[0]
    if key in _SAME:
        return first
    if key == "runs":  # each worker's biggest agent runs: one list, again the biggest
        return _merge_runs(values)
    if key == "budget_remaining":  # {kind: {remaining, limit}}: the least left, of one limit
        kinds = {k: None for v in values for k in v}
        return {k: {"remaining": min(v[k]["remaining"] for v in values if k in v),
                    "limit": max(v[k]["limit"] for v in values if k in v)} for k in kinds}
    if isinstance(first, Mapping):
        keys: dict[str, None] = {}
        for value in values:
            if isinstance(value, Mapping):
                keys.update(dict.fromkeys(value))
        return {k: _merge([v.get(k) for v in values if isinstance(v, Mapping)], k)
                for k in keys}
    if isinstance(first, bool):
        return any(values)  # drop_mode, overloaded, ...: true anywhere
    if isinstance(first, (int, float)):
        numbers = [v for v in values if isinstance(v, (int, float))]
        if key in _MAX:
            return max(numbers)
        if key in _MIN:
            return min(numbers)
        return sum(numbers)
    if key == "state" and isinstance(first, str):  # a breaker: the worst any worker sees
        return max(values, key=lambda s: _BREAKER_WORST.get(s, 0))
    if key == "limits_mode":
        return "degraded" if "degraded" in values else first
    return first


def _merge_runs(lists: list[Any], top: int = 10) -> list[dict[str, Any]]:
    """One run seen by several workers: its largest totals (a capped run's are fleet-wide, an
    uncapped run's each worker's share, so the largest is a lower bound), its oldest age, its
    loop warnings summed; then the ``top`` biggest by cost, then tokens."""
    runs: dict[str, dict[str, Any]] = {}
    for entries in lists:
        for entry in entries if isinstance(entries, list) else ():
            seen = runs.get(entry.get("run"))
            if seen is None:
                runs[entry.get("run")] = dict(entry)
                continue
            for total in ("tokens", "cost", "steps", "age_s"):
                seen[total] = max(seen.get(total, 0), entry.get(total, 0))
            seen["idle_s"] = min(seen.get("idle_s", 0), entry.get("idle_s", 0))
            seen["loop_warnings"] = seen.get("loop_warnings", 0) + entry.get("loop_warnings", 0)
            seen["stopped_by"] = seen.get("stopped_by") or entry.get("stopped_by")
    return sorted(runs.values(), key=lambda r: (r.get("cost", 0), r.get("tokens", 0)),
                  reverse=True)[:top]


WORKER_GROUP = web.AppKey("worker_group", WorkerGroup)


def worker_group_from(directory: str | None, index: int | None,
                      size: int | None) -> WorkerGroup | None:
    """The group ``gateway serve --workers N`` passes its workers; None for a lone process."""
    if not directory or index is None or not size or size < 2:
        return None
    return WorkerGroup(Path(directory), index, size)
