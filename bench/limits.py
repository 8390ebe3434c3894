"""What enforcement costs: the gateway with tenant limits + budget on Redis vs the same
gateway with no policies, measured alternately in one run.

Variants (each a `gateway serve` process in front of one `gateway mock-upstream` process):
- ``core``:   memory backend, no limits, no budget, no loop guard (bench/configs/overhead.yaml);
- ``limits``: Redis on loopback, the tenant with requests/min, tokens/min, max concurrent, a
  daily token budget and the loop guard: one atomic admit script per request plus one
  settle script after it.
Limits are set far above the offered load so every request is admitted (the cost measured
is that of checking, not of refusing).

Figures: closed-loop throughput at --concurrency, and latency p50/p99 at a fixed open-loop
--rate; ratios against ``core`` in the same round.

Run: .venv/bin/python bench/limits.py [--rounds 3] [--duration 4] [--rate 200]
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-demo-acme"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GATEWAY_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **kw)


async def wait_http(url: str) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def policies(mock_port: int, redis_url: str, work: Path) -> dict[str, Path]:
    base = yaml.safe_load((ROOT / "bench/configs/overhead.yaml").read_text())
    base["providers"]["mock"]["base_url"] = f"http://127.0.0.1:{mock_port}/v1"
    base.setdefault("server", {})["drain_delay_s"] = 0
    limited = yaml.safe_load(yaml.safe_dump(base))
    limited["state"] = {"backend": "redis", "redis_url": redis_url}
    tenant = limited["tenants"]["acme"]
    tenant["limits"] = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10**10,
                        "max_concurrent": 100_000}
    tenant["budget"] = {"daily_tokens": 10**12}
    tenant["loop_guard"] = {"enabled": True, "max_repeats": 10**9, "window_s": 60}
    out = {}
    for name, data in (("core", base), ("limits", limited)):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        out[name] = path
    return out


async def closed_loop(url: str, concurrency: int, seconds: float) -> float:
    headers = {"Authorization": f"Bearer {KEY}"}
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            async with session.post(url, json=BODY, headers=headers) as r:
                await r.read()
                done += r.status == 200

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return done / (time.monotonic() - started)


async def open_loop(url: str, rate: float, seconds: float) -> tuple[float, float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=500)) as session:
        async def one() -> None:
            t = time.perf_counter()
            async with session.post(url, json=BODY, headers=headers) as r:
                await r.read()
            latencies.append((time.perf_counter() - t) * 1000)

        tasks = []
        begin = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    latencies.sort()
    return latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]


async def redis_hop(redis_url: str, rate: float, seconds: float) -> float:
    """p50 ms of a bare PING to the same Redis at the same open-loop rate, from this process:
    what one round trip to Redis costs on this machine when the CPUs idle between requests
    (the floor under anything that consults Redis per request)."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    times: list[float] = []
    try:
        begin = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
            t = time.perf_counter()
            await client.ping()
            times.append((time.perf_counter() - t) * 1000)
    finally:
        await client.aclose()
    return statistics.median(times)


async def alternate(urls: dict[str, str], args: argparse.Namespace) -> tuple[
    dict[str, list[float]], dict[str, list[tuple[float, float]]]
]:
    """Closed-loop req/s and open-loop (p50, p99) per variant, rounds alternating the order."""
    for url in urls.values():  # warm up connections and scripts
        await closed_loop(url, 8, 0.5)
    rps: dict[str, list[float]] = {n: [] for n in urls}
    lat: dict[str, list[tuple[float, float]]] = {n: [] for n in urls}
    for r in range(args.rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for name in order:
            rps[name].append(await closed_loop(urls[name], args.concurrency, args.duration))
        for name in order:
            lat[name].append(await open_loop(urls[name], args.rate, args.duration))
    return rps, lat


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if not redis_bin:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            redis_port, mock_port = free_port(), free_port()
            procs.append(start([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", tmp]))
            procs.append(start([sys.executable, "-m", "gateway.cli", "mock-upstream",
                                "--port", str(mock_port)]))
            ports = {}
            for name, path in policies(mock_port, f"redis://127.0.0.1:{redis_port}/0",
                                       work).items():
                ports[name] = free_port()
                procs.append(start([sys.executable, "-m", "gateway.cli", "serve", "--config",
                                    str(path), "--port", str(ports[name])]))
            for port in ports.values():
                await wait_http(f"http://127.0.0.1:{port}/readyz")
            urls = {n: f"http://127.0.0.1:{p}/v1/chat/completions" for n, p in ports.items()}
            rps, lat = await alternate(urls, args)
            hop = await redis_hop(f"redis://127.0.0.1:{redis_port}/0", args.rate, args.duration)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"# bench/limits.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"commit {commit}  {' '.join(sys.argv[1:]) or '(defaults)'}")
    med = {n: statistics.median(v) for n, v in rps.items()}
    p50 = {n: statistics.median(x[0] for x in v) for n, v in lat.items()}
    p99 = {n: statistics.median(x[1] for x in v) for n, v in lat.items()}
    print(f"{'variant':<8} {'req/s (rounds)':<28} {'median':>8} {'vs core':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for n in urls:
        rounds = ", ".join(f"{x:.0f}" for x in rps[n])
        print(f"{n:<8} {rounds:<28} {med[n]:>8.0f} {med[n] / med['core']:>7.2f}x "
              f"{p50[n]:>8.2f} {p99[n]:>8.2f}")
    print(f"enforcement adds p50 {p50['limits'] - p50['core']:+.2f} ms, "
          f"p99 {p99['limits'] - p99['core']:+.2f} ms at {args.rate:g} req/s; "
          f"throughput {med['limits'] / med['core']:.0%} of core "
          "(targets: p50 added <= 0.5 ms, throughput >= 60%)")
    print(f"one Redis round trip (PING, same rate, client in this process): p50 {hop:.2f} ms "
          "(the floor under the admission round trip on this machine)")


if __name__ == "__main__":
    asyncio.run(main())
