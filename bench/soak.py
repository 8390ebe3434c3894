#!/usr/bin/env python3
"""Soak: mixed traffic for a long time with periodic faults, watching for slow leaks.

Starts its own redis-server, mock upstream and one `gateway serve` (all on 127.0.0.1), then
drives open-loop mixed traffic: chat (whole and streamed), Anthropic streams, embeddings,
upstream errors and mid-stream cuts, bad requests, and clients that disconnect mid-stream,
each call under a new agent session (the worst case for Redis key churn). Every
``--fault-every`` seconds one fault runs, in turn: Redis killed and restarted, an upstream 5xx
storm, Redis paused (SIGSTOP), upstream hangs; the last fifth of the run (at most 2 minutes)
is quiet, so the end state is measured in steady state.

Every ``--sample-every`` seconds it prints the gateway's RSS, open file descriptors, event-loop
lag (``gateway_event_loop_lag_seconds``), the Redis key count, and what the clients saw.

Targets (``--check`` exits 1 when one is missed): RSS growth under 5% after warm-up (the
first fifth of the run and at least one round of the four faults), no file-descriptor growth, a Redis key count within
what the TTLs allow for the traffic sent, no 500 from the gateway itself and no request
without an answer.

    python bench/soak.py                  # 30 minutes
    python bench/soak.py --minutes 2 --fault-every 12 --sample-every 5 --check  # what CI runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp
import yaml

from gateway.request.auth import hash_key
from tests.redis_server import RedisServer, pick_port

TENANTS = {"acme": "sk-soak-acme", "globex": "sk-soak-globex", "initech": "sk-soak-initech"}
ADMIN_KEY = "sk-soak-admin"
# `gateway serve`, with faulthandler on SIGUSR1: a stalled gateway dumps its stacks to its log.
# With --heap-diff: tracemalloc on, and SIGUSR2 snapshots the heap: the first one is the
# baseline, every later one writes the lines whose allocations grew most since to HEAP_DIFF.
HEAP_HOOK = """
import os, signal, tracemalloc
tracemalloc.start(int(os.environ.get("PYTHONTRACEMALLOC_FRAMES", "1")))
_base = []
def _heap(*_):
    import gc
    gc.collect()  # what is still reachable, not garbage waiting for the next full collection
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    if not _base:
        _base.append(snap)
        return
    with open(os.environ["HEAP_DIFF"], "w") as out:
        for stat in snap.compare_to(_base[0], "lineno")[:40]:
            out.write(str(stat) + "\\n")
signal.signal(signal.SIGUSR2, _heap)
"""
# With --heap-stats: on SIGRTMIN+2 the gateway writes where its memory is to HEAP_STATS: Python's
# allocated blocks, glibc malloc's bytes in use, free inside its heaps (fragmentation malloc_trim
# cannot return) and mmapped, to tell objects that grow from an allocator that holds on.
STATS_HOOK = """
import ctypes, json, os, signal, sys
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _Mallinfo2
def _stats(*_):
    m = _libc.mallinfo2()
    with open(os.environ["HEAP_STATS"] + ".tmp", "w") as out:
        json.dump({"py_blocks": sys.getallocatedblocks(), "malloc_in_use": m.uordblks,
                   "malloc_free": m.fordblks, "malloc_mmapped": m.hblkhd}, out)
    os.replace(os.environ["HEAP_STATS"] + ".tmp", os.environ["HEAP_STATS"])
signal.signal(signal.SIGRTMIN + 2, _stats)
"""
SERVE = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, "
         "all_threads=True); from gateway.cli import main; sys.exit(main(sys.argv[1:]))")
DONE_TTL_S = 600  # gateway/limits/limiter.py DONE_TTL_MS: one settled-marker key per request lives this long


def policy(mock_port: int) -> dict[str, Any]:
    limits = {"requests_per_minute": 100_000, "tokens_per_minute": 50_000_000,
              "max_concurrent": 200,
              "per_session": {"requests_per_minute": 600, "max_concurrent": 20}}
    return {
        # The bad-key traffic comes "from" one guessing address behind a trusted proxy: the
        # failed-auth limit refuses it (401, then 429) without touching the honest traffic.
        "server": {"drain_delay_s": 0, "drain_timeout_s": 5, "trusted_proxies": ["127.0.0.1"]},
        "state": {"backend": "redis", "timeout_s": 0.25,
                  "degraded": {"replicas": 1, "probe_interval_s": 0.5}},
        "breaker": {"reset_timeout_s": 2, "max_reset_timeout_s": 5},
        "admin": {"api_keys": [hash_key(ADMIN_KEY)]},
        "providers": {
            "mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                     "forward_headers": ["x-mock-*"],
                     "timeouts": {"connect_s": 2, "first_byte_s": 3, "idle_s": 3,
                                  "total_s": 20}},
            "claude": {"kind": "anthropic", "base_url": f"http://127.0.0.1:{mock_port}",
                       "forward_headers": ["x-mock-*"],
                       "timeouts": {"connect_s": 2, "first_byte_s": 3, "idle_s": 3,
                                    "total_s": 20}},
        },
        "models": {
            "chat": {"deployments": [{"provider": "mock", "model": "chat-a"}],
                     "price": {"input_per_million": 1.0, "output_per_million": 2.0}},
            "embed": {"deployments": [{"provider": "mock", "model": "embed-a"}]},
            # the steady share of upstream errors goes to a deployment of its own, so its
            # breaker, not chat's, is the one they open
            "flaky": {"deployments": [{"provider": "mock", "model": "flaky-a"}]},
            "claude": {"deployments": [{"provider": "claude", "model": "claude-a"}]},
        },
        "tenants": {name: {"api_keys": [hash_key(key)], "default_max_tokens": 64,
                           "limits": limits, "loop_guard": {"enabled": False},
                           "budget": {"daily_tokens": 10_000_000_000, "monthly_cost": 1e9}}
                    for name, key in TENANTS.items()},
    }


# --- measurements -------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int, ports: dict[int, str]) -> dict[str, int]:
    """The process's open fds by what they are: TCP sockets by the named port at either end
    (``ports``: port -> name, e.g. the gateway's listener, Redis, the mock), other sockets,
    and the rest (files, pipes, epoll): to tell pooled connections from a leak."""
    ends: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    local, remote = (int(c.rsplit(":", 1)[1], 16) for c in cols[1:3])
                    ends[cols[9]] = (local, remote)
        except OSError:
            continue
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = "other"
        if target.startswith("socket:["):
            local, remote = ends.get(target[8:-1], (0, 0))
            kind = ports.get(remote) or (f"{ports[local]} (served)" if local in ports
                                         else "socket")
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    loop_lag_ms: float | None
    redis_keys: int | None
    requests: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    fault: str
    fd_kinds: dict[str, int] = field(default_factory=dict)
    heap: dict[str, int] = field(default_factory=dict)  # --heap-stats


@dataclass
class Stats:
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    total: int = 0
    internal_errors: int = 0  # 500 with code internal_error: the gateway itself failed
    no_answer: int = 0  # client-side timeouts or connection errors not caused by the client

    def take(self) -> tuple[dict[str, int], list[float]]:
        out = self.statuses, self.latencies
        self.statuses, self.latencies = {}, []
        return out


# --- traffic --------------------------------------------------------------------------------


MIX = [  # (weight, kind)
    (36, "chat"), (22, "chat-stream"), (10, "claude-stream"), (10, "embed"),
    (5, "upstream-5xx"), (3, "midstream-cut"), (4, "bad-request"), (3, "disconnect"),
    (3, "models"), (2, "admin"), (2, "bad-key"),
]


class Traffic:
    def __init__(self, base: str, rate: float, seed: int) -> None:
        self.base = base
        self.rate = rate
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.storm = False  # upstream 5xx storm: every call asks the mock for a 500
        self.hang = False
        self._kinds = [k for w, k in MIX for _ in range(w)]
        self._n = 0

    async def run(self, session: aiohttp.ClientSession, until: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        i = 0
        while (due := started + i / self.rate) < until:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.ensure_future(self.one(session, self.rng.choice(self._kinds)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=40)

    async def one(self, session: aiohttp.ClientSession, kind: str) -> None:
        self._n += 1
        n = self._n
        tenant = self.rng.choice(list(TENANTS))
        headers = {"Authorization": f"Bearer {TENANTS[tenant]}",
                   "X-Agent-Session": f"soak-{n}", "x-mock-chunks": str(self.rng.randint(1, 40))}
        if self.storm:
            headers["x-mock-status"] = "500"
        if self.hang and self.rng.random() < 0.3:
            headers["x-mock-fail"] = "hang"
        path, method = "/v1/chat/completions", "POST"
        body: dict[str, Any] = {
            "model": "chat", "messages": [{"role": "user", "content": f"call {n} " * 8}]}
        stream = False
        if kind == "chat-stream":
            body["stream"] = stream = True
            headers["x-mock-chunk-gap-ms"] = "5"
        elif kind == "claude-stream":
            path, stream = "/v1/messages", True
            body = {"model": "claude", "max_tokens": 64, "stream": True,
                    "messages": [{"role": "user", "content": f"call {n}"}]}
        elif kind == "embed":
            path, body = "/v1/embeddings", {"model": "embed", "input": [f"a {n}", f"b {n}"]}
        elif kind == "upstream-5xx":
            body["model"] = "flaky"
            headers["x-mock-status"] = self.rng.choice(["500", "503", "429"])
        elif kind == "midstream-cut":
            body["stream"] = stream = True
            headers.update({"x-mock-fail": "midstream-cut", "x-mock-chunks": "20"})
        elif kind == "bad-request":
            body = self.rng.choice([{"model": "chat"}, {"model": "nope", "messages": []},
                                    {"model": "chat", "messages": "x", "max_tokens": -1}])
        elif kind == "disconnect":
            body["stream"] = stream = True
            headers.update({"x-mock-chunks": "200", "x-mock-chunk-gap-ms": "20"})
        elif kind == "models":
            path, method = "/v1/models", "GET"
        elif kind == "admin":
            path, method = "/admin/status", "GET"
            headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        elif kind == "bad-key":
            headers["Authorization"] = "Bearer sk-wrong"
            headers["X-Forwarded-For"] = "203.0.113.66"
        began = time.monotonic()
        try:
            async with session.request(method, self.base + path,
                                       json=body if method == "POST" else None,
                                       headers=headers) as resp:
                if kind == "disconnect":
                    await resp.content.readuntil(b"\n\n")
                    label = f"{resp.status}-disconnected"
                else:
                    raw = await resp.read()
                    label = str(resp.status)
                    if resp.status == 500 and b'"internal_error"' in raw:
                        self.stats.internal_errors += 1
                    if stream and resp.status == 200 and b"error" in raw[-400:]:
                        label = "200-stream-error"
        except (aiohttp.ClientError, TimeoutError) as exc:
            label = type(exc).__name__
            self.stats.no_answer += 1
        self.stats.total += 1
        self.stats.statuses[label] = self.stats.statuses.get(label, 0) + 1
        self.stats.latencies.append(time.monotonic() - began)


# --- faults ---------------------------------------------------------------------------------


async def run_faults(traffic: Traffic, redis: RedisServer, every: float, until: float,
                     started: list[str]) -> None:
    """One fault every ``every`` seconds, in turn; each name is appended to ``started``."""
    cycle = ["redis-kill", "upstream-5xx-storm", "redis-pause", "upstream-hangs"]
    # The last part of the run is quiet, so the end state is measured in steady state (a
    # burst of hung calls leaves pooled connections that take about a minute to close).
    quiet = max(15.0, min(120.0, 0.2 * (until - time.monotonic())))
    i = 0
    while True:
        await asyncio.sleep(every)
        if time.monotonic() + 5 + quiet > until:
            return
        name = cycle[i % len(cycle)]
        i += 1
        started.append(name)
        if name == "redis-kill":
            redis.kill()
            await asyncio.sleep(3)
            await asyncio.to_thread(redis.start)
        elif name == "redis-pause":
            redis.pause()
            await asyncio.sleep(2)
            redis.resume()
        elif name == "upstream-5xx-storm":
            traffic.storm = True
            await asyncio.sleep(5)
            traffic.storm = False
        else:
            traffic.hang = True
            await asyncio.sleep(4)
            traffic.hang = False


# --- main -----------------------------------------------------------------------------------


async def scrape_lag(base: str) -> float | None:
    """The gateway's own loop-lag gauge, in ms; None when /metrics does not answer in 5 s."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.get(base + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith("gateway_event_loop_lag_seconds "):
                    return float(line.split()[1]) * 1000
    except (aiohttp.ClientError, TimeoutError):
        return None
    return -1.0  # answered, without the gauge


def redis_keys(redis: RedisServer) -> int | None:
    try:
        value = redis.command("DBSIZE")
        return int(value) if isinstance(value, int) else None
    except (OSError, RuntimeError):
        return None


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


class Stack:
    """Redis (AOF), the mock upstream and one `gateway serve`, started and stopped outside
    the event loop that drives the traffic."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="gw-soak-"))
        self.redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_path = self.workdir / "gateway.log"
        self._log: Any = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.ports: dict[int, str] = {}
        self.heap_diff: Path | None = None
        self.heap_stats: Path | None = None

    def start(self, heap_diff: bool = False, heap_stats: bool = False) -> None:
        self.redis.start()
        mock_port, gw_port = pick_port(), pick_port()
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "mock-upstream", "--port", str(mock_port)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = self.workdir / "policy.yaml"
        config.write_text(yaml.safe_dump(policy(mock_port)))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "REDIS_URL": self.redis.url, "GATEWAY_LOG_LEVEL": "WARNING"}
        serve = SERVE
        if heap_diff:
            self.heap_diff = self.workdir / "heap-diff.txt"
            env["HEAP_DIFF"] = str(self.heap_diff)
            serve = HEAP_HOOK + "\n" + SERVE
        if heap_stats:
            self.heap_stats = self.workdir / "heap-stats.json"
            env["HEAP_STATS"] = str(self.heap_stats)
            serve = STATS_HOOK + "\n" + serve
        self.gateway = subprocess.Popen(
            [sys.executable, "-c", serve, "serve", "--config", str(config), "--port",
             str(gw_port)], cwd=REPO, env=env, stdout=self._log, stderr=self._log)
        self.procs.append(self.gateway)
        self.base = f"http://127.0.0.1:{gw_port}"
        self.ports = {gw_port: "clients", mock_port: "upstream", self.redis.port or 0: "redis"}

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
        self.redis.close()


async def drive(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    gateway, redis, base = stack.gateway, stack.redis, stack.base
    assert gateway is not None
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=500)) as session:
        for _ in range(300):
            try:
                async with session.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the gateway never became ready: " + stack.log_tail())
        duration = args.minutes * 60
        began = time.monotonic()
        until = began + duration
        traffic = Traffic(base, args.rate, args.seed)
        faults_started: list[str] = []
        load = asyncio.ensure_future(traffic.run(session, until))
        faults = asyncio.ensure_future(run_faults(traffic, redis, args.fault_every, until,
                                                  faults_started))
        print(f"soak: {args.minutes:g} min at {args.rate:g} req/s, a fault every "
              f"{args.fault_every:g} s; gateway pid {gateway.pid}", flush=True)
        print(f"{'t_s':>6} {'rss_mb':>7} {'fds':>5} {'lag_ms':>7} {'keys':>7} {'reqs':>6} "
              f"{'p50_ms':>7} {'p99_ms':>7}  fault / statuses", flush=True)
        heap_base_taken = False
        try:
            while not load.done():
                await asyncio.wait({load}, timeout=args.sample_every)
                if gateway.poll() is not None:
                    raise RuntimeError("the gateway died: " + stack.log_tail())
                lag_ms = await scrape_lag(base)
                if lag_ms is None:  # no answer within 5 s: dump its stacks and stop
                    gateway.send_signal(signal.SIGUSR1)
                    await asyncio.sleep(1)
                    raise RuntimeError("the gateway stopped answering /metrics: "
                                       + stack.log_tail())
                statuses, lat = traffic.stats.take()
                s = Sample(round(time.monotonic() - began, 1), rss_kb(gateway.pid) / 1024,
                           open_fds(gateway.pid), lag_ms, redis_keys(redis),
                           sum(statuses.values()), statuses, round(pct(lat, 0.5), 1),
                           round(pct(lat, 0.99), 1), ",".join(faults_started),
                           fd_kinds(gateway.pid, stack.ports))
                faults_started.clear()
                if stack.heap_stats is not None:
                    s.heap = await read_heap_stats(gateway, stack.heap_stats)
                samples.append(s)
                if stack.heap_diff is not None and not heap_base_taken and s.t >= warmup_s(args):
                    gateway.send_signal(signal.SIGUSR2)  # the baseline heap snapshot
                    heap_base_taken = True
                lag = f"{s.loop_lag_ms:7.1f}" if s.loop_lag_ms is not None else "      -"
                keys = f"{s.redis_keys:7d}" if s.redis_keys is not None else "      -"
                top = ", ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
                heap = ("" if not s.heap else "heap MiB py_blocks={:.0f}k in_use={:.1f} free={:.1f} "
                        "mmapped={:.1f} | ".format(s.heap["py_blocks"] / 1000,
                                                   s.heap["malloc_in_use"] / 2**20,
                                                   s.heap["malloc_free"] / 2**20,
                                                   s.heap["malloc_mmapped"] / 2**20))
                print(f"{s.t:6.0f} {s.rss_mb:7.1f} {s.fds:5d} {lag} {keys} {s.requests:6d} "
                      f"{s.p50_ms:7.1f} {s.p99_ms:7.1f}  {heap}{s.fault or '-'} / {top}",
                      flush=True)
        finally:
            for task in (load, faults):
                task.cancel()
            await asyncio.gather(load, faults, return_exceptions=True)
        if stack.heap_diff is not None and heap_base_taken:
            await asyncio.sleep(10)  # the requests still in flight finish: state, not traffic
            gateway.send_signal(signal.SIGUSR2)
            for _ in range(120):  # a snapshot of a traced heap takes seconds
                await asyncio.sleep(0.5)
                if stack.heap_diff.exists() and stack.heap_diff.stat().st_size:
                    await asyncio.sleep(0.5)  # let the writer finish
                    break
            text = (stack.heap_diff.read_text(errors="replace") if stack.heap_diff.exists()
                    else "(no diff written within 60 s)\n")
            print("heap growth since the warm-up mark (tracemalloc, top lines):\n" + text,
                  flush=True)
    return summarize(samples, traffic.stats, args)


async def read_heap_stats(gateway: subprocess.Popen[bytes], path: Path) -> dict[str, int]:
    """Ask the gateway (SIGRTMIN+2, STATS_HOOK) where its memory is; {} if it does not say."""
    path.unlink(missing_ok=True)
    gateway.send_signal(signal.SIGRTMIN + 2)
    for _ in range(50):
        await asyncio.sleep(0.02)
        if path.exists():
            stats: dict[str, int] = json.loads(path.read_text())
            return stats
    return {}


def warmup_s(args: argparse.Namespace) -> float:
    """The first fifth of the run, and at least one round of every fault (each kind raises
    the allocator's high-water mark once; a leak keeps raising it afterwards)."""
    duration: float = args.minutes * 60
    fault_every: float = args.fault_every
    return max(30.0, duration / 5, min(duration / 2, 4 * fault_every + 15))


def summarize(samples: list[Sample], stats: Stats, args: argparse.Namespace) -> dict[str, Any]:
    duration = args.minutes * 60
    warm = warmup_s(args)
    after = [s for s in samples if s.t >= warm] or samples[-1:]
    base_rss = statistics.median(s.rss_mb for s in after[:3])
    end_rss = statistics.median(s.rss_mb for s in after[-3:])
    growth = (end_rss - base_rss) / base_rss * 100
    # The floor of the open fds: a burst of hung calls leaves pooled connections that close
    # over a minute or two; a leak raises the floor itself.
    fd_base = min(s.fds for s in after[:3])
    fd_end = min(s.fds for s in after[-3:])
    keys = [s.redis_keys for s in samples if s.redis_keys is not None]
    # Per request at most one settled marker (DONE_TTL) plus short-lived session keys.
    key_bound = int(args.rate * (min(duration, DONE_TTL_S) + 120) * 1.5 + 1000)
    lags = [s.loop_lag_ms for s in samples if s.loop_lag_ms is not None]
    result = {
        "minutes": args.minutes, "rate": args.rate, "requests": stats.total,
        "warmup_s": warm, "rss_mb_after_warmup": round(base_rss, 1),
        "rss_mb_end": round(end_rss, 1), "rss_growth_pct": round(growth, 2),
        "rss_mb_max": round(max(s.rss_mb for s in samples), 1),
        "fds_after_warmup": fd_base, "fds_end": fd_end,
        "fds_max": max(s.fds for s in samples),
        "fd_kinds_after_warmup": after[0].fd_kinds, "fd_kinds_end": after[-1].fd_kinds,
        "redis_keys_max": max(keys) if keys else None, "redis_keys_end": keys[-1] if keys else None,
        "redis_keys_bound": key_bound,
        "loop_lag_ms_p50": round(statistics.median(lags), 1) if lags else None,
        "loop_lag_ms_max": round(max(lags), 1) if lags else None,
        "internal_errors": stats.internal_errors, "no_answer": stats.no_answer,
        "statuses": _totals(samples),
    }
    problems = []
    if growth >= args.rss_target:
        problems.append(f"RSS grew {growth:.1f}% after warm-up (target < {args.rss_target:g}%)")
    if fd_end > fd_base + args.fd_slack:
        problems.append(f"open fds grew from {fd_base} to {fd_end}")
    if keys and max(keys) > key_bound:
        problems.append(f"Redis held {max(keys)} keys, above the bound of {key_bound}")
    if stats.internal_errors:
        problems.append(f"{stats.internal_errors} requests got the gateway's own 500")
    if stats.no_answer:
        problems.append(f"{stats.no_answer} requests got no answer")
    result["problems"] = problems
    result["samples"] = [asdict(s) for s in samples]
    return result


def _totals(samples: list[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        for k, v in s.statuses.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--fd-slack", type=int, default=8,
                        help="fds above the warm-up level still counted as no growth "
                        "(pooled connections come and go)")
    parser.add_argument("--rss-target", type=float, default=5.0,
                        help="largest RSS growth after warm-up, in percent, that passes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="write the summary and samples here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--heap-stats", action="store_true",
                        help="print Python's allocated blocks and glibc malloc's in-use, free "
                        "and mmapped bytes with every sample")
    parser.add_argument("--heap-diff", action="store_true",
                        help="diagnosis: run the gateway under tracemalloc and print which "
                        "source lines' allocations grew after the warm-up (slows it down)")
    args = parser.parse_args()
    stack = Stack()
    try:
        stack.start(heap_diff=args.heap_diff, heap_stats=args.heap_stats)
        result = asyncio.run(drive(args, stack))
    finally:
        stack.stop()
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["problems"]:
        print("soak: targets missed: " + "; ".join(result["problems"]), file=sys.stderr)
        return 1 if args.check else 0
    print("soak: all targets met", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
