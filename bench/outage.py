"""Retry amplification during upstream trouble, with clients that behave like the official SDK.

The clients ARE the official ``openai`` SDK (AsyncOpenAI, max_retries=2: jittered backoff,
honouring Retry-After / retry-after-ms / x-should-retry). The upstream is a counting aiohttp
app in this process; the gateway runs as its own ``gateway serve`` process in front of it.

Scenarios (each at a steady open-loop rate):
1. total outage of the only deployment for --outage seconds: the gateway as configured
   (breaker, retry budget) vs a "naive stack" (the same gateway with its breaker and retry
   budget effectively off: 3 gateway attempts under 3 SDK attempts);
2. 20% random 5xx on the only deployment, no fallback: client-visible success and
   amplification.
Amplification = upstream attempts / client requests (a client request is one SDK call,
however many HTTP attempts the SDK makes).

Run: .venv/bin/python bench/outage.py [--rate 20] [--outage 60] [--flaky 30]
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-outage"


@dataclass
class Upstream:
    """Counts every call; fails all of them during an outage, or a share when flaky."""

    mode: str = "ok"  # ok | outage | flaky
    flaky_share: float = 0.2
    calls: int = 0
    rng: random.Random = random.Random(7)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.read()
        failing = self.mode == "outage" or (self.mode == "flaky"
                                             and self.rng.random() < self.flaky_share)
        if failing:
            return web.json_response({"error": {"message": "unavailable", "type": "server_error",
                                                "code": None, "param": None}}, status=503)
        return web.json_response({
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy(upstream_port: int, naive: bool) -> dict[str, Any]:
    from gateway.request.auth import hash_key

    data: dict[str, Any] = {
        "providers": {"only": {"kind": "openai",
                               "base_url": f"http://127.0.0.1:{upstream_port}/v1"}},
        "models": {"m": {"deployments": [{"provider": "only", "model": "m"}]}},
        "tenants": {"bench": {"api_keys": [hash_key(KEY)],
                              "loop_guard": {"enabled": False}}},
    }
    if naive:  # what a stack without breaker or retry budget does
        data["breaker"] = {"consecutive_failures": 1_000_000, "min_calls": 1_000_000}
        data["retries"] = {"budget_min_tokens": 1e9, "budget_max_tokens": 1e9}
    return data


class Gateway:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        path = workdir / f"policy-{self.port}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "GATEWAY_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port",
             str(self.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError("gateway did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def drive(url: str, rate: float, seconds: float) -> tuple[int, int]:
    """SDK calls at ``rate``/s for ``seconds``; returns (requests, successes)."""
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=2,
                                timeout=openai.Timeout(30.0, connect=5.0))
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        try:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"step {i}"}])
            ok += 1
        except openai.APIError:
            pass

    tasks = []
    started = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 180)
    await client.close()
    return n, ok


async def scenario(name: str, upstream: Upstream, config: dict[str, Any], mode: str,
                   rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    gateway = Gateway(config, workdir)
    try:
        await gateway.ready()
        upstream.mode, upstream.calls = mode, 0
        requests, ok = await drive(f"http://127.0.0.1:{gateway.port}/v1", rate, seconds)
        calls = upstream.calls
    finally:
        upstream.mode = "ok"
        gateway.stop()
    return {"scenario": name, "requests": requests, "upstream_calls": calls,
            "amplification": calls / requests, "success": ok / requests}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="SDK calls per second")
    parser.add_argument("--outage", type=float, default=60.0, help="outage seconds")
    parser.add_argument("--flaky", type=float, default=30.0, help="flaky-upstream seconds")
    args = parser.parse_args()
    upstream = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"# bench/outage.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"commit {commit}  {' '.join(sys.argv[1:]) or '(defaults)'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(await scenario("total outage, gateway", upstream, policy(port, False),
                                   "outage", args.rate, args.outage, work))
        rows.append(await scenario("outage, no breaker+budget", upstream, policy(port, True),
                                   "outage", args.rate, args.outage, work))
        rows.append(await scenario("20% 5xx, gateway", upstream, policy(port, False), "flaky",
                                   args.rate, args.flaky, work))
    await runner.cleanup()
    print(f"{'scenario':<28} {'requests':>9} {'upstream':>9} {'amplif.':>8} {'success':>8}")
    for r in rows:
        print(f"{r['scenario']:<28} {r['requests']:>9} {r['upstream_calls']:>9} "
              f"{r['amplification']:>7.2f}x {r['success']:>7.1%}")
    print("targets: total outage <= 1.10x; 20% 5xx: success >= 95% at <= 1.25x")


if __name__ == "__main__":
    asyncio.run(main())
