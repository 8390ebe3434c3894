"""Deferred requests under a 3x burst: 30 % of the traffic is background ``low`` work, sent
either synchronously (variant ``shed``: what does not fit is shed with 503) or with
``Prefer: respond-async`` (variant ``deferred``: 202, run later on spare low-class capacity).

Checks the claims of the feature: every deferred request completes after the burst, and the
critical class's p99 time to first token is no worse than when that work is shed.

Set-up per variant (fresh processes): redis-server, ``gateway mock-upstream`` with a capacity
model (``--slots`` concurrent generations, a bounded queue, 429 beyond), and ``gateway serve``
on Redis with the admission policy of bench/overload.py's ``on`` variant (concurrency pinned to
the slots; low may fill 70 % of them). The gateway is pinned to the first CPU, everything else
to the second, when there are two.

Traffic (open loop, Poisson, seeded): class mix 10 % critical, 30 % high, 30 % normal (all
streamed, deadlines 5 / 10 / 20 s as X-Request-Timeout) and 30 % low (non-streaming).
Phases: ``warm`` at 0.8x capacity, ``burst`` at 3x, ``after`` at 0.8x; then the deferred
entries are collected with long polls (``GET /v1/deferred/{id}?wait=``). Capacity is
slots / (ttft + (tokens - 1) x gap).

Figures per run (critical/high time to first token in the burst and after it, answers per
class, the gateway's CPU seconds per phase and worst event-loop lag, how many deferred entries
succeeded and how long after the burst the last one did), then critical time to first token
pooled over the runs of each variant (a p99 of one run rests on two or three samples).

    .venv/bin/python bench/deferred_burst.py [--repeat 4] [--burst-s 15] [--timeline]
        [--json out.json] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
import yaml

from gateway.request.auth import hash_key

CLASSES = {"critical": 0.10, "high": 0.30, "normal": 0.30, "low": 0.30}
DEADLINES_S = {"critical": 5, "high": 10, "normal": 20, "low": 30}
KEYS = {"interactive": "sk-bench-interactive", "background": "sk-bench-background"}
TENANT_OF = {"critical": "interactive", "high": "interactive", "normal": "background",
             "low": "background"}


def policy(mock_port: int, gw_port: int, redis_url: str, slots: int, workers: int
           ) -> dict[str, Any]:
    tenants = {name: {"api_keys": [hash_key(key)], "models": ["*"],
                      "default_priority": "normal", "max_priority": "critical",
                      "loop_guard": {"enabled": False}}
               for name, key in KEYS.items()}
    classes = {  # bench/overload.py, variant "on"
        "critical": {"queue_target_ms": 100, "max_queue": 200, "holdback_share": 1.0},
        "high": {"queue_target_ms": 300, "max_queue": 200, "holdback_share": 0.95},
        "normal": {"queue_target_ms": 500, "max_queue": 200, "holdback_share": 0.85},
        "low": {"queue_target_ms": 500, "max_queue": 100, "holdback_share": 0.7},
    }
    for name, settings in classes.items():
        settings["default_deadline_s"] = DEADLINES_S[name]
    return {
        "server": {"host": "127.0.0.1", "port": gw_port},
        "state": {"backend": "redis", "redis_url": redis_url, "timeout_s": 0.5},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                               "pool_size": 2000, "forward_headers": ["x-mock-*"]}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": tenants,
        "admission": {"concurrency": {"min_limit": max(1, slots // 2), "initial_limit": slots,
                                      "max_limit": slots},
                      "classes": classes},
        "deferred": {"enabled": True, "workers": workers, "poll_interval_s": 0.5,
                     "sweep_interval_s": 1.0},
    }


@dataclass
class Sample:
    cls: str
    phase: str
    status: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    deferred_id: str | None = None


@dataclass
class Run:
    variant: str
    samples: list[Sample] = field(default_factory=list)
    deferred_done: dict[str, str] = field(default_factory=dict)  # id -> final status
    deferred_runs: dict[str, int] = field(default_factory=dict)
    collected_s: float = 0.0  # after the burst ended, until the last deferred one was final
    traffic_end_s: float = 0.0  # burst end -> end of the "after" phase
    timeline: list[dict[str, float]] = field(default_factory=list)
    gateway_cpu_s: dict[str, float] = field(default_factory=dict)  # per phase
    runs_by_result: dict[str, int] = field(default_factory=dict)  # gateway_deferred_runs_total


def schedule(rate: float, seconds: float, rng: random.Random) -> list[float]:
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


async def one(session: aiohttp.ClientSession, url: str, sample: Sample, knobs: dict[str, str],
              deferred: bool, i: int) -> None:
    cls = sample.cls
    stream = cls != "low"
    headers = {"Authorization": f"Bearer {KEYS[TENANT_OF[cls]]}", "X-Priority": cls,
               "X-Request-Timeout": str(DEADLINES_S[cls]), **knobs}
    if cls == "low" and deferred:
        headers["Prefer"] = "respond-async"
    body = {"model": "m", "stream": stream, "max_tokens": 64,
            "messages": [{"role": "user", "content": f"request {i}: " + "x" * 400}]}
    started = time.monotonic()
    try:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers=headers) as resp:
            sample.status = resp.status
            if resp.status == 202:
                sample.deferred_id = (await resp.json())["id"]
            elif stream and resp.status == 200:
                async for chunk in resp.content.iter_any():
                    if sample.ttft_s is None and b'"content"' in chunk:
                        sample.ttft_s = time.monotonic() - started
            else:
                await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        sample.status = -1
    sample.total_s = time.monotonic() - started


async def collect(session: aiohttp.ClientSession, url: str, ids: list[str], run: Run,
                  timeout_s: float) -> None:
    headers = {"Authorization": f"Bearer {KEYS['background']}"}
    until = time.monotonic() + timeout_s
    gate = asyncio.Semaphore(200)

    async def wait_one(entry: str) -> None:
        async with gate:
            while time.monotonic() < until:
                wait = max(1, min(30, int(until - time.monotonic())))
                try:
                    async with session.get(f"{url}/v1/deferred/{entry}?wait={wait}",
                                           headers=headers) as resp:
                        data = await resp.json()
                        # over the tenant's open-poll cap the answer came at once: wait as told
                        skipped = "x-gateway-wait-skipped" in resp.headers
                        retry_after = float(resp.headers.get("Retry-After", "1"))
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.5)
                    continue
                if data.get("status") in ("succeeded", "failed", "expired", "cancelled"):
                    run.deferred_done[entry] = data["status"]
                    run.deferred_runs[entry] = data.get("runs", 0)
                    return
                if skipped:
                    await asyncio.sleep(retry_after)

    await asyncio.gather(*(wait_one(e) for e in ids))


WATCHED = ("gateway_deferred_queue_depth", "gateway_deferred_running",
           "gateway_concurrency_limit", "gateway_in_flight_requests", "gateway_queued_requests",
           "gateway_event_loop_lag_seconds")


async def watch(session: aiohttp.ClientSession, url: str, run: Run, stop: asyncio.Event) -> None:
    """Once a second: the deferred queue, runs, the concurrency limit and in-flight requests."""
    begin = time.monotonic()
    while not stop.is_set():
        try:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            text = ""
        row: dict[str, float] = {"t": round(time.monotonic() - begin, 1)}
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in WATCHED and 'priority="high"' not in line and \
                    'priority="normal"' not in line and 'priority="critical"' not in line \
                    and 'tenant="interactive"' not in line:
                row[name.removeprefix("gateway_")] = float(line.rsplit(" ", 1)[1])
        run.timeline.append(row)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def cpu_marks(pid: int, run: Run, marks: list[tuple[str, float]]) -> None:
    """The gateway's CPU seconds used in each phase (and in the collection after it)."""
    begin, last = time.monotonic(), bl.proc_cpu_seconds(pid)
    for name, until in marks:
        await asyncio.sleep(max(0.0, begin + until - time.monotonic()))
        now = bl.proc_cpu_seconds(pid)
        run.gateway_cpu_s[name] = round(now - last, 2)
        last = now


async def drive(url: str, variant: str, capacity: float, knobs: dict[str, str],
                args: argparse.Namespace, pid: int) -> Run:
    run = Run(variant)
    rng = random.Random(args.seed)
    phases = [("warm", args.warm_s, 0.8), ("burst", args.burst_s, 3.0),
              ("after", args.after_s, 0.8)]
    arrivals: list[tuple[float, str, str]] = []
    offset = 0.0
    for name, seconds, load in phases:
        for t in schedule(load * capacity, seconds, rng):
            cls = rng.choices(list(CLASSES), weights=list(CLASSES.values()))[0]
            arrivals.append((offset + t, name, cls))
        offset += seconds
    burst_end = args.warm_s + args.burst_s
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(session, url, run, stop))
        marks = asyncio.create_task(cpu_marks(pid, run, [
            ("warm", args.warm_s), ("burst", burst_end), ("after", burst_end + args.after_s)]))
        begin = time.monotonic()
        for i, (at, phase, cls) in enumerate(arrivals):
            await asyncio.sleep(max(0.0, begin + at - time.monotonic()))
            sample = Sample(cls, phase)
            run.samples.append(sample)
            tasks.append(asyncio.create_task(
                one(session, url, sample, knobs, variant == "deferred", i)))
        await asyncio.gather(*tasks)
        ids = [s.deferred_id for s in run.samples if s.deferred_id]
        if ids:
            await collect(session, url, ids, run, args.collect_timeout_s)
        run.collected_s = time.monotonic() - begin - burst_end
        run.traffic_end_s = args.after_s
        async with session.get(url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("gateway_deferred_runs_total{"):
                    result = line.split('result="')[1].split('"')[0]
                    run.runs_by_result[result] = run.runs_by_result.get(result, 0) + int(
                        float(line.rsplit(" ", 1)[1]))
        stop.set()
        await watcher
        await marks
    return run


def run_variant(variant: str, args: argparse.Namespace, tmp: Path, rep: int) -> Run:
    procs = bl.Procs()
    server_pin, support_pin, _ = bl.pin_plan()
    mock_port, gw_port, redis_port = bl.free_port(), bl.free_port(), bl.free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server not found")
    service_s = (args.ttft_ms + (args.tokens - 1) * args.gap_ms) / 1000
    capacity = args.slots / service_s
    try:
        procs.start("redis", [*support_pin, redis_bin, "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"])
        procs.start("mock", [
            *support_pin, bl.PYTHON, "-m", "gateway.cli", "mock-upstream", "--port",
            str(mock_port), "--slots", str(args.slots), "--max-queue", str(args.max_queue),
            "--queue-ttft-ms", str(args.queue_ttft_ms),
            "--quota-rpm", str(int(1.5 * 60 * capacity))],
            stderr=open(tmp / f"mock-{variant}-{rep}.log", "wb"))  # noqa: SIM115
        config = tmp / f"policy-{variant}-{rep}.yaml"
        config.write_text(yaml.safe_dump(policy(mock_port, gw_port,
                                                f"redis://127.0.0.1:{redis_port}", args.slots,
                                                args.workers)))
        gateway = procs.start("gateway", [
            *server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config", str(config),
            "--log-level", args.log_level, "--watch-interval", "0"],
            stderr=open(tmp / f"gateway-{variant}-{rep}.log", "wb"))  # noqa: SIM115
        bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
        bl.wait_http(f"http://127.0.0.1:{gw_port}/readyz", procs=procs)
        knobs = {"x-mock-ttft-ms": str(args.ttft_ms), "x-mock-chunks": str(args.tokens),
                 "x-mock-chunk-gap-ms": str(args.gap_ms)}
        print(f"[{variant} #{rep + 1}] capacity {capacity:.0f} req/s; warm {args.warm_s:g} s at "
              f"0.8x, burst {args.burst_s:g} s at 3x, after {args.after_s:g} s at 0.8x",
              flush=True)
        return asyncio.run(drive(f"http://127.0.0.1:{gw_port}", variant, capacity, knobs, args,
                                 gateway.pid))
    finally:
        procs.stop_all()


def _pct(values: list[float], q: float) -> float:
    return bl.percentile(sorted(values), q) * 1000 if values else float("nan")


def figures(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"variant": run.variant}
    for phase in ("burst", "after"):
        crit = [s.ttft_s for s in run.samples if s.cls == "critical" and s.phase == phase
                and s.ttft_s is not None]
        out[f"_critical_ttft_{phase}"] = crit  # raw, for the pooled figures
        out[f"critical_ttft_p50_ms_{phase}"] = _pct(crit, 50)
        out[f"critical_ttft_p99_ms_{phase}"] = _pct(crit, 99)
        high = [s.ttft_s for s in run.samples if s.cls == "high" and s.phase == phase
                and s.ttft_s is not None]
        out[f"high_ttft_p99_ms_{phase}"] = _pct(high, 99)
    for cls in CLASSES:
        mine = [s for s in run.samples if s.cls == cls]
        ok = sum(1 for s in mine if s.status == 200)
        out[f"{cls}_sent"] = len(mine)
        out[f"{cls}_ok_sync"] = ok
        out[f"{cls}_shed"] = sum(1 for s in mine if s.status == 503)
        other = Counter(s.status for s in mine if s.status not in (200, 202, 503))
        out[f"{cls}_other"] = " ".join(f"{k}x{v}" for k, v in sorted(other.items())) or "0"
    for phase, seconds in run.gateway_cpu_s.items():
        out[f"gateway_cpu_s_{phase}"] = seconds
    lags = [row.get("event_loop_lag_seconds", 0.0) for row in run.timeline]
    out["gateway_loop_lag_max_ms"] = max(lags) * 1000 if lags else float("nan")
    low = [s for s in run.samples if s.cls == "low"]
    deferred = [s for s in low if s.status == 202]
    out["low_deferred"] = len(deferred)
    out["low_deferred_in_burst"] = sum(1 for s in deferred if s.phase == "burst")
    statuses = list(run.deferred_done.values())
    out["deferred_succeeded"] = statuses.count("succeeded")
    out["deferred_not_succeeded"] = len(deferred) - statuses.count("succeeded")
    out["deferred_rerun"] = sum(1 for n in run.deferred_runs.values() if n > 1)
    out["deferred_runs_no_slot"] = run.runs_by_result.get("no_slot", 0)
    out["deferred_all_done_after_burst_s"] = round(run.collected_s, 1) if deferred else None
    low_done = out["low_ok_sync"] + out["deferred_succeeded"]
    out["low_answered_share"] = low_done / len(low) if low else float("nan")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="shed,deferred")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (interleaved)")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--queue-ttft-ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=16,
                        help="deferred.workers of the gateway (per replica)")
    parser.add_argument("--warm-s", type=float, default=4.0)
    parser.add_argument("--burst-s", type=float, default=15.0)
    parser.add_argument("--after-s", type=float, default=6.0)
    parser.add_argument("--collect-timeout-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--log-dir", help="keep the processes' logs here")
    parser.add_argument("--log-level", default="WARNING", help="the gateway's")
    parser.add_argument("--timeline", action="store_true",
                        help="print the deferred queue, runs and limit once a second")
    args = parser.parse_args()
    bl.exit_on_sigterm()
    bl.raise_nofile()
    _, support_pin, pin_desc = bl.pin_plan()
    if support_pin:
        os.sched_setaffinity(0, {int(support_pin[-1])})
    header = bl.run_header(sys.argv, bl.GatewaySource(None, Path(tempfile.gettempdir())))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deferred-") as scratch:
        tmp = args.log_dir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for rep in range(args.repeat):
            for variant in args.variants.split(","):
                run = run_variant(variant, args, Path(tmp), rep)
                results.append(figures(run))
                if args.timeline:
                    for row in run.timeline:
                        print("  " + "  ".join(f"{k}={v:g}" for k, v in row.items()))
    print("\n" + "\n".join(header))
    print(pin_desc)
    keys = [k for k in results[0] if k != "variant" and not k.startswith("_")]
    names = [f"{r['variant']}#{i // len(args.variants.split(',')) + 1}"
             for i, r in enumerate(results)]
    print(f"\n{'figure':<34}" + "".join(f"{n:>14}" for n in names))
    for key in keys:
        cells = []
        for r in results:
            value = r.get(key)
            cells.append(f"{value:>14.1f}" if isinstance(value, float)
                         else f"{value!s:>14}")
        print(f"{key:<34}" + "".join(cells))
    print("\npooled over every run of a variant (critical time to first token, ms):")
    for variant in args.variants.split(","):
        mine = [r for r in results if r["variant"] == variant]
        for phase in ("burst", "after"):
            pooled = [t for r in mine for t in r[f"_critical_ttft_{phase}"]]
            print(f"  {variant:<9} {phase:<6} n={len(pooled):<5} p50 {_pct(pooled, 50):7.1f}  "
                  f"p90 {_pct(pooled, 90):7.1f}  p99 {_pct(pooled, 99):7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "figures": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
