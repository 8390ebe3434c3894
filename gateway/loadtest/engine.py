"""The load engine: phases, open-loop arrivals, agent runs, requests with client retries.

One asyncio task per agent run. A run sends its steps one after the other, each only after the
previous one succeeded (plus think time), all with the same ``X-Agent-Session``; a step that
fails after the client's retries ends the run. Arrivals never wait for answers (open loop),
so queues build as they would in production; the generator measures its own lag
(``Monitor``) to say when it, not the target, is the bottleneck.

Bounded by construction: phases have a fixed length, the drain after them is bounded, the
number of attempts is capped (``max_requests``), and ``stop()`` (Ctrl-C) ends everything
within a short grace period. Every request that was started is recorded exactly once, those
the engine stopped as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from .arrivals import arrival_times
from .client import AttemptResult, retry_delay, send
from .hist import Histogram
from .hooks import run_hook
from .monitor import Monitor
from .scenario import Phase, Scenario
from .stats import OUTCOME_INDEX, OUTCOMES, Recorder, RequestRecord, RunRecord
from .traffic import PhaseKnobs, SyntheticText, WorkloadPlan, plan_workloads

__all__ = ["DRAIN_PHASE", "Engine", "EngineOptions"]

DRAIN_PHASE = "(drain)"  # requests started after the last phase, by runs still going
STOP_GRACE_S = 2.0


@dataclass
class EngineOptions:
    target: str
    allow_hooks: bool = False
    max_requests: int | None = None  # None: the scenario's
    max_in_flight_runs: int = 50_000
    trace: bool = False  # keep every request and run record (tests, small runs)
    seed: int | None = None  # None: the scenario's


@dataclass
class LiveCounters:
    """What the live view reads."""

    arrivals: int = 0
    started: int = 0
    in_flight: int = 0
    outcomes: list[int] = field(default_factory=lambda: [0] * len(OUTCOMES))
    latency: Histogram = field(default_factory=Histogram)
    phase: str = ""


class Engine:
    """Runs one scenario against one target (see the module docstring)."""

    def __init__(self, scenario: Scenario, keys: dict[str, str], options: EngineOptions) -> None:
        self.scenario = scenario
        self.options = options
        seed = options.seed if options.seed is not None else scenario.seed
        self.seed = seed
        self.rng = random.Random(seed)  # sizes, streaming, think times: drawn as runs go
        self.plans = plan_workloads(scenario, keys, self.rng)
        self.text = SyntheticText(random.Random(0))
        self.url = URL(options.target.rstrip("/") + scenario.path)
        self.max_requests = options.max_requests or scenario.max_requests
        bucket = scenario.bucket_s or max(1.0, round(scenario.duration_s / 150))
        self.recorder = Recorder(bucket, {p.spec.name: (p.klass, p.spec.tenant)
                                          for p in self.plans})
        if options.trace:
            self.recorder.requests, self.recorder.runs = [], []
        self.monitor = Monitor()
        self.live = LiveCounters()
        self.phases: list[dict[str, Any]] = []
        self.hooks: list[dict[str, Any]] = []
        self.interrupted = False
        self.limit_reached = False
        self.t0 = 0.0
        self.started_at = 0.0  # wall clock
        self.active_s = 0.0  # the phases' time
        self.ended_s = 0.0  # with the drain
        self._runs: set[asyncio.Task[None]] = set()
        # Each hook's task, and what the report says of it if it is cut short at the end.
        self._hook_tasks: list[tuple[asyncio.Task[dict[str, Any]], dict[str, Any]]] = []
        self._run_ids = itertools.count(1)
        self._attempts = 0
        self._accepting = True  # new runs
        self._continuing = True  # new steps and retries
        self._stop = asyncio.Event()
        self._knobs: PhaseKnobs | None = None
        self._phase_start = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._timeouts = {p.spec.name: aiohttp.ClientTimeout(total=p.spec.timeout_s)
                          for p in self.plans}

    # -- control --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop now: no new runs, steps or retries; in-flight requests get a short grace."""
        self.interrupted = True
        self._accepting = self._continuing = False
        self._stop.set()

    async def run(self) -> None:
        """Run every phase, then drain; returns when everything started has been recorded."""
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        self.started_at = time.time()
        connector = aiohttp.TCPConnector(limit=self.scenario.client.connections,
                                         limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        monitor = asyncio.create_task(self.monitor.run(
            self.t0, self.recorder.timeline.bucket_s, self._tick))
        try:
            offset = 0.0
            for index, phase in enumerate(self.scenario.phases):
                if self._stop.is_set():
                    break
                await self._phase(phase, index, self.t0 + offset)
                # A generator that fell behind ends a phase late: rates use the real length.
                self.phases[-1]["end_s"] = round(max(self.phases[-1]["end_s"],
                                                     loop.time() - self.t0), 3)
                offset += phase.duration_s
            self.active_s = loop.time() - self.t0
            self._accepting = False
            self.live.phase = DRAIN_PHASE
            await self._drain()
        finally:
            if not self.active_s:
                self.active_s = loop.time() - self.t0
            for task in self._runs:
                task.cancel()
            if self._runs:
                await asyncio.wait(self._runs, timeout=10)
            for hook, _ in self._hook_tasks:
                hook.cancel()
            results = await asyncio.gather(*(t for t, _ in self._hook_tasks),
                                           return_exceptions=True)
            for result, (_, cut) in zip(results, self._hook_tasks):
                # A hook still running at the end did not do its job in its phase: failed.
                self.hooks.append(result if isinstance(result, dict) else cut)
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            await self._session.close()
            self.ended_s = loop.time() - self.t0

    # -- phases and arrivals ----------------------------------------------------------------

    async def _phase(self, phase: Phase, index: int, start: float) -> None:
        loop = asyncio.get_running_loop()
        self.live.phase = phase.name
        # Its own random stream: drawing first-token delays leaves every other draw as it was.
        knobs_rng = random.Random(None if self.seed is None else f"{self.seed}:knobs:{index}")
        self._knobs, self._phase_start = PhaseKnobs(phase, knobs_rng), start
        self.phases.append({"name": phase.name, "start_s": round(start - self.t0, 3),
                            "end_s": round(start - self.t0 + phase.duration_s, 3),
                            "arrival": phase.arrival.model_dump(exclude_defaults=True)})
        if phase.hook is not None:
            task = asyncio.create_task(run_hook(
                phase.hook, phase=phase.name, scenario=self.scenario.name,
                target=self.options.target, allowed=self.options.allow_hooks,
                at_s=start - self.t0))
            self._hook_tasks.append((task, {
                "phase": phase.name, "at_s": round(start - self.t0, 3),
                "command": phase.hook.command, "exit_status": None, "timed_out": True,
                "output": "still running when the load test ended"}))
        end = start + phase.duration_s
        cumulative = list(itertools.accumulate(self.scenario.weights(phase)))
        # Arrival times and workload choices from their own generator per phase, so one seed
        # gives the same arrivals whatever the target's timing did to the other draws.
        rng = random.Random(None if self.seed is None else f"{self.seed}:{index}")
        if phase.arrival.process == "closed":
            workers = [asyncio.create_task(self._closed_worker(phase.name, cumulative, end, rng))
                       for _ in range(phase.arrival.concurrency)]
            await self._sleep_until(end)
            for worker in workers:
                worker.cancel()  # the run in progress goes on; the worker just stops waiting
            await asyncio.gather(*workers, return_exceptions=True)
            return
        burst = 0
        for offset in arrival_times(phase.arrival, phase.duration_s, rng):
            due = start + offset
            if due - loop.time() > 0.0005:
                await self._sleep_until(due)
                burst = 0
            elif (burst := burst + 1) >= 64:
                await asyncio.sleep(0)  # a burst must not starve the requests in flight
                burst = 0
            if not self._accepting:
                return
            self.monitor.arrival(max(0.0, loop.time() - due))
            self._launch(self._pick(cumulative, rng), phase.name)
        await self._sleep_until(end)

    def _pick(self, cumulative: list[float], rng: random.Random) -> WorkloadPlan:
        index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return self.plans[min(index, len(self.plans) - 1)]

    def _launch(self, plan: WorkloadPlan, phase: str) -> asyncio.Task[None] | None:
        self.live.arrivals += 1
        if len(self._runs) >= self.options.max_in_flight_runs:
            self.monitor.dropped_arrivals += 1
            return None
        task = asyncio.create_task(self._run(plan, phase, next(self._run_ids)))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return task

    async def _closed_worker(self, phase: str, cumulative: list[float], end: float,
                             rng: random.Random) -> None:
        loop = asyncio.get_running_loop()
        while self._accepting and loop.time() < end:
            task = self._launch(self._pick(cumulative, rng), phase)
            if task is None:
                return
            await asyncio.shield(task)

    async def _sleep_until(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        # Slices, so a stop is noticed within 0.25 s even at very low rates.
        while not self._stop.is_set() and (left := when - loop.time()) > 0:
            await asyncio.sleep(min(left, 0.25))

    async def _drain(self) -> None:
        """Let runs still going finish, within the scenario's drain_s (or the stop grace)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.scenario.drain_s
        while self._runs:
            if self._stop.is_set():
                deadline = min(deadline, loop.time() + STOP_GRACE_S)
            left = deadline - loop.time()
            if left <= 0:
                break
            stop_wait = asyncio.create_task(self._stop.wait())
            await asyncio.wait([*self._runs, stop_wait], timeout=min(left, 1.0),
                               return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
        self._continuing = False

    def _tick(self, since_t0: float) -> None:
        self.recorder.timeline.in_flight.append((round(since_t0, 3), self.live.in_flight))

    # -- runs and requests --------------------------------------------------------------------

    async def _run(self, plan: WorkloadPlan, phase: str, run_id: int) -> None:
        spec = plan.spec
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.recorder.run_started(spec.name, phase)
        steps_ok, outcome = 0, "unfinished"
        tokens, stopped_by = 0, None
        session = f"lt-{self.started_at:.0f}-{run_id}" if spec.steps > 1 else None
        try:
            for step in range(1, spec.steps + 1):
                if not self._continuing:
                    break
                result = await self._request(plan, run_id, step, session)
                if result.outcome != "ok":
                    outcome = "failed" if self._continuing else "unfinished"
                    stopped_by = result.code
                    break
                tokens += result.prompt_tokens + result.completion_tokens
                steps_ok += 1
                if step < spec.steps:
                    await asyncio.sleep(plan.think_s())
            else:
                outcome = "completed"
        finally:
            self.recorder.run_done(RunRecord(
                spec.name, plan.klass, spec.tenant, phase, started - self.t0,
                loop.time() - self.t0, spec.steps, steps_ok, outcome, run_id, tokens,
                stopped_by))

    async def _request(self, plan: WorkloadPlan, run_id: int, step: int,
                       session: str | None) -> AttemptResult:
        """One step with the client's retries; records it; its last attempt's result."""
        loop = asyncio.get_running_loop()
        if self._attempts >= self.max_requests:
            self._limit()
            return AttemptResult(0, "cancelled", loop.time())
        spec = plan.spec
        started = loop.time()
        phase = self.live.phase
        stream = self.rng.random() < spec.stream
        body, output_tokens = plan.body(run_id, step, self.text, self.rng, stream)
        base = dict(plan.headers)
        if session is not None:
            base["X-Agent-Session"] = session
            base["X-Agent-Step"] = str(step)
        base["x-mock-chunks"] = str(output_tokens)
        self.recorder.request_started(plan.klass, started - self.t0)
        self.live.started += 1
        self.live.in_flight += 1
        result = AttemptResult(0, "cancelled", started)
        attempts = 0
        try:
            while True:
                attempts += 1
                self._attempts += 1
                assert self._knobs is not None and self._session is not None
                # Knobs of the moment: an outage window may have opened or closed.
                headers = {**self._knobs.headers(loop.time() - self._phase_start), **base}
                if self.scenario.client.retries:
                    headers["x-stainless-retry-count"] = str(attempts - 1)
                result = await send(self._session, self.url, headers, body, stream,
                                    self._timeouts[spec.name])
                delay = retry_delay(self.scenario.client, result, attempts - 1, self.rng)
                if delay is None or not self._continuing:
                    break
                if self._attempts >= self.max_requests:
                    self._limit()
                    break
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            result = AttemptResult(result.status, "cancelled", loop.time())
            raise
        finally:
            self.live.in_flight -= 1
            self._record(plan, phase, started, result, attempts, run_id, step)
        return result

    def _record(self, plan: WorkloadPlan, phase: str, started: float, result: AttemptResult,
                attempts: int, run_id: int, step: int) -> None:
        ttft = None if result.first_at is None else result.first_at - started
        deadline = plan.spec.deadline_s
        ok = result.outcome == "ok"
        good = ok and (deadline is None or (ttft is not None and ttft <= deadline))
        ended = result.ended_at - self.t0
        self.recorder.request_done(RequestRecord(
            plan.spec.name, plan.klass, plan.spec.tenant, phase, started - self.t0, ended, ttft,
            result.outcome, attempts, good, result.prompt_tokens, result.completion_tokens,
            result.status, run_id, step))
        self.live.outcomes[OUTCOME_INDEX[result.outcome]] += 1
        if ok:
            self.live.latency.record(ended - (started - self.t0))

    def _limit(self) -> None:
        """max_requests reached: no new runs, steps or retries; what is in flight finishes."""
        self.limit_reached = True
        self._accepting = self._continuing = False

    def report_info(self) -> dict[str, Any]:
        """Run facts for the report (call after ``run``)."""
        return {
            "started_at": self.started_at, "active_s": round(self.active_s, 3),
            "ended_s": round(self.ended_s, 3), "phases": self.phases, "hooks": self.hooks,
            "interrupted": self.interrupted, "max_requests_reached": self.limit_reached,
            "attempts_sent": self._attempts, "engine": self.monitor.report(),
        }

