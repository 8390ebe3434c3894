"""What a load test counts: per request, per run, per group (overall, class, tenant, workload,
phase) and per time bucket.

A *request* is one logical call of an agent step: it may take several *attempts* when the
simulated client retries. Counts are exact; latencies go into HDR histograms. Every request
started ends in exactly one outcome (``OUTCOMES``), including ``cancelled`` for those the engine
stopped at the end, so the outcome counts of a group always add up to its requests.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Any

from .hist import Histogram, percentile_of_sorted

__all__ = ["OUTCOMES", "Group", "Recorder", "RequestRecord", "RunRecord", "Timeline"]

#: ok: 2xx, complete; shed: 503 overloaded; rate_limited: 429; deadline: 504;
#: upstream_error: other 5xx; client_error: other 4xx; stream_error: failed after the first
#: byte; timeout: the client gave up; transport: no answer; cancelled: stopped by the engine.
OUTCOMES = ("ok", "shed", "rate_limited", "deadline", "upstream_error", "client_error",
            "stream_error", "timeout", "transport", "cancelled")
OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}


@dataclass(slots=True)
class RequestRecord:
    """One finished request (times in seconds from the start of the test)."""

    workload: str
    klass: str
    tenant: str
    phase: str
    started: float
    ended: float
    ttft: float | None  # to the first content token (streams) or the whole answer
    outcome: str
    attempts: int
    good: bool  # ok and within the deadline (goodput)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0
    run: int = 0
    step: int = 0


@dataclass(slots=True)
class RunRecord:
    """One agent run: ``steps_ok`` of ``steps`` succeeded; ``outcome`` is completed, failed
    (a step did not succeed) or unfinished (stopped by the engine)."""

    workload: str
    klass: str
    tenant: str
    phase: str
    started: float
    ended: float
    steps: int
    steps_ok: int
    outcome: str
    run: int = 0
    tokens: int = 0  # prompt + completion tokens of its successful requests (what it spent)
    stopped_by: str | None = None  # error.code of the answer that ended a failed run


class Group:
    """Counters and histograms of one slice of the traffic."""

    __slots__ = ("attempts", "completion_tokens", "good", "latency", "outcomes", "prompt_tokens",
                 "requests", "runs", "ttft")

    def __init__(self) -> None:
        self.requests = 0
        self.attempts = 0
        self.good = 0
        self.outcomes = [0] * len(OUTCOMES)
        self.latency = Histogram()
        self.ttft = Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.runs = {"started": 0, "completed": 0, "failed": 0, "unfinished": 0}

    def add(self, rec: RequestRecord, outcome: int) -> None:
        self.requests += 1
        self.attempts += rec.attempts
        self.outcomes[outcome] += 1
        if rec.good:
            self.good += 1
        if outcome == 0:  # latencies of successes only: failures are fast and would hide them
            self.latency.record(rec.ended - rec.started)
            if rec.ttft is not None:
                self.ttft.record(rec.ttft)
        self.prompt_tokens += rec.prompt_tokens
        self.completion_tokens += rec.completion_tokens

    def merge(self, other: Group) -> None:
        self.requests += other.requests
        self.attempts += other.attempts
        self.good += other.good
        self.outcomes = [a + b for a, b in zip(self.outcomes, other.outcomes)]
        self.latency.add(other.latency)
        self.ttft.add(other.ttft)
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        for key, value in other.runs.items():
            self.runs[key] += value

    def to_dict(self, duration_s: float, *, with_hdr: bool = False) -> dict[str, Any]:
        """JSON-ready figures; rates are per second of ``duration_s``."""
        per_s = 1.0 / duration_s if duration_s > 0 else 0.0
        ok = self.outcomes[0]
        runs = dict(self.runs)
        ended_runs = runs["completed"] + runs["failed"]
        out: dict[str, Any] = {
            "requests": self.requests,
            "attempts": self.attempts,
            "retries": self.attempts - self.requests,
            "amplification": round(self.attempts / self.requests, 4) if self.requests else None,
            "offered_rps": round(self.requests * per_s, 3),
            "achieved_rps": round(ok * per_s, 3),
            "goodput": self.good,
            "goodput_rps": round(self.good * per_s, 3),
            "success_ratio": round(ok / self.requests, 5) if self.requests else None,
            "outcomes": dict(zip(OUTCOMES, self.outcomes)),
            "latency_ms": self.latency.summary_ms(),
            "ttft_ms": self.ttft.summary_ms(),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "completion_tokens_per_s": round(self.completion_tokens * per_s, 2),
            "runs": {**runs, "completion_ratio":
                     round(runs["completed"] / ended_runs, 4) if ended_runs else None},
        }
        if with_hdr:
            out["hdr"] = {"latency": self.latency.encode(), "ttft": self.ttft.encode()}
        return out


class Timeline:
    """Per time bucket and class: requests started, outcomes (by end time), latencies."""

    def __init__(self, bucket_s: float) -> None:
        self.bucket_s = bucket_s
        self.started: dict[str, dict[int, int]] = {}
        self.outcomes: dict[str, dict[int, list[int]]] = {}
        self.good: dict[str, dict[int, int]] = {}
        self.latency: dict[str, dict[int, array.array[float]]] = {}
        self.ttft: dict[str, dict[int, array.array[float]]] = {}
        self.in_flight: list[tuple[float, int]] = []

    def start(self, klass: str, t: float) -> None:
        buckets = self.started.setdefault(klass, {})
        b = int(t / self.bucket_s)
        buckets[b] = buckets.get(b, 0) + 1

    def end(self, rec: RequestRecord, outcome: int) -> None:
        b = int(rec.ended / self.bucket_s)
        counts = self.outcomes.setdefault(rec.klass, {})
        row = counts.get(b)
        if row is None:
            row = counts[b] = [0] * len(OUTCOMES)
        row[outcome] += 1
        if rec.good:
            good = self.good.setdefault(rec.klass, {})
            good[b] = good.get(b, 0) + 1
        if outcome == 0:
            _append(self.latency, rec.klass, b, rec.ended - rec.started)
            if rec.ttft is not None:
                _append(self.ttft, rec.klass, b, rec.ttft)

    def to_dict(self) -> dict[str, Any]:
        """``{"bucket_s", "in_flight": [[t, n]], "classes": {class: [row per bucket]}}``; a row
        is ``{"t", "started", "outcomes": {...}, "good", "latency_ms": {p50, p99}, "ttft_ms"}``
        (outcomes and good by the bucket the request ended in)."""
        classes: dict[str, list[dict[str, Any]]] = {}
        for klass in sorted(set(self.started) | set(self.outcomes)):
            started = self.started.get(klass, {})
            outcomes = self.outcomes.get(klass, {})
            last = max([*started, *outcomes, 0])
            rows = []
            for b in range(last + 1):
                counts = outcomes.get(b, [0] * len(OUTCOMES))
                rows.append({
                    "t": round(b * self.bucket_s, 3),
                    "started": started.get(b, 0),
                    "outcomes": {k: v for k, v in zip(OUTCOMES, counts) if v},
                    "good": self.good.get(klass, {}).get(b, 0),
                    "latency_ms": _quantiles(self.latency.get(klass, {}).get(b)),
                    "ttft_ms": _quantiles(self.ttft.get(klass, {}).get(b)),
                })
            classes[klass] = rows
        return {"bucket_s": self.bucket_s, "in_flight": self.in_flight, "classes": classes}


def _append(table: dict[str, dict[int, array.array[float]]], klass: str, b: int,
            value: float) -> None:
    by_bucket = table.setdefault(klass, {})
    values = by_bucket.get(b)
    if values is None:
        values = by_bucket[b] = array.array("f")
    values.append(value)


def _quantiles(values: array.array[float] | None) -> dict[str, float | None]:
    ordered = sorted(values) if values else []
    return {q: None if (v := percentile_of_sorted(ordered, p)) is None else round(v * 1e3, 2)
            for q, p in (("p50", 50.0), ("p99", 99.0))}


MAX_RUN_SPEND = 100_000  # runs kept for the report's runs section


class Recorder:
    """Records each request and run into one *cell* (phase x workload, which fixes the class
    and the tenant), so the hot path touches two histograms; ``groups`` adds cells up into
    every view afterwards (HDR histograms add exactly)."""

    def __init__(self, bucket_s: float, workloads: dict[str, tuple[str, str]]) -> None:
        self._who = workloads  # workload -> (class, tenant)
        self._cells: dict[tuple[str, str], Group] = {}
        self.timeline = Timeline(bucket_s)
        self.requests: list[RequestRecord] | None = None  # kept only when tracing
        self.runs: list[RunRecord] | None = None
        # Every run's spend and end, for the runs section of the report (bounded).
        self.run_spend: list[RunRecord] = []

    def _cell(self, phase: str, workload: str) -> Group:
        key = (phase, workload)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Group()
        return cell

    def request_started(self, klass: str, t: float) -> None:
        self.timeline.start(klass, t)

    def request_done(self, rec: RequestRecord) -> None:
        outcome = OUTCOME_INDEX[rec.outcome]
        self._cell(rec.phase, rec.workload).add(rec, outcome)
        self.timeline.end(rec, outcome)
        if self.requests is not None:
            self.requests.append(rec)

    def run_started(self, workload: str, phase: str) -> None:
        self._cell(phase, workload).runs["started"] += 1

    def run_done(self, run: RunRecord) -> None:
        self._cell(run.phase, run.workload).runs[run.outcome] += 1
        if len(self.run_spend) < MAX_RUN_SPEND:
            self.run_spend.append(run)
        if self.runs is not None:
            self.runs.append(run)

    def group(self, *, phase: str | None = None, klass: str | None = None,
              tenant: str | None = None, workload: str | None = None) -> Group:
        """The sum of the cells that match every given key."""
        total = Group()
        for (cell_phase, cell_workload), cell in self._cells.items():
            cell_class, cell_tenant = self._who[cell_workload]
            if ((phase is None or phase == cell_phase)
                    and (klass is None or klass == cell_class)
                    and (tenant is None or tenant == cell_tenant)
                    and (workload is None or workload == cell_workload)):
                total.merge(cell)
        return total

    def keys(self) -> dict[str, list[str]]:
        """Classes, tenants, workloads and phases seen, in a stable order."""
        phases = list(dict.fromkeys(p for p, _ in self._cells))
        workloads = list(dict.fromkeys(w for _, w in self._cells))
        return {
            "phases": phases,
            "workloads": workloads,
            "classes": sorted({self._who[w][0] for w in workloads}, key=class_order),
            "tenants": sorted({self._who[w][1] for w in workloads}),
        }


def class_order(klass: str) -> int:
    """critical, high, normal, low, then requests without a class."""
    order = ("critical", "high", "normal", "low")
    return order.index(klass) if klass in order else len(order)
