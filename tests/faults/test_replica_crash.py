"""A replica SIGKILLed mid-stream, in a fleet of three `gateway serve` processes on one Redis.

What users see: the streams that replica was relaying break off (their TCP connection
closes with no [DONE]); every request to the other replicas keeps being answered.
What is recorded: nothing the dead replica admitted is lost. Admission reserved each
in-flight request's prompt estimate + max_tokens in Redis before the first upstream byte,
and that reservation simply stays charged (an over-charge of at most reservation - actual
per stream in flight). Its concurrency leases expire after the lease TTL (60 s in
production; 2 s here), after which the tenant has its full concurrency again.
docs/reliability.md states the bound, including what *is* lost: a replica's unreplayed
degraded-mode journal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway.request.auth import hash_key
from gateway.request.classifier import estimate_prompt_tokens
from tests.faults.helpers import budget_key, stream_usage
from tests.redis_server import RedisServer, pick_port

pytestmark = pytest.mark.redis

KEY = "sk-crash-test"
MAX_TOKENS = 100
CONCURRENCY = 6
LEASE_TTL_MS = 2000
# `gateway serve` with a short lease TTL, so the test need not wait a production minute.
_SERVE = ("import sys, gateway.limits.limiter as l, gateway.app.runtime as r; "
          f"l.LEASE_TTL_MS = r.LEASE_TTL_MS = {LEASE_TTL_MS}; "
          "from gateway.cli import main; sys.exit(main(sys.argv[1:]))")


def _policy(mock_port: int) -> dict[str, Any]:
    return {
        "server": {"drain_delay_s": 0},
        "admission": {"self_protection": {"max_loop_lag_ms": 5000}},  # not what is tested
        "state": {"backend": "redis", "timeout_s": 1.0, "degraded": {"replicas": 3}},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                               "forward_headers": ["x-mock-*"]}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": {"acme": {"api_keys": [hash_key(KEY)], "default_max_tokens": MAX_TOKENS,
                             "loop_guard": {"enabled": False},
                             "limits": {"max_concurrent": CONCURRENCY},
                             "budget": {"daily_tokens": 10_000_000}}},
    }


@pytest.fixture
def fleet(tmp_path: Path,
          clean_redis: RedisServer) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "REDIS_URL": clean_redis.url, "GATEWAY_LOG_LEVEL": "WARNING"}
    try:
        mock_port = pick_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "mock-upstream", "--port", str(mock_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = tmp_path / "policy.yaml"
        config.write_text(yaml.safe_dump(_policy(mock_port)))
        replicas = []
        for _ in range(3):
            port = pick_port()
            proc = subprocess.Popen([sys.executable, "-c", _SERVE, "serve", "--config",
                                     str(config), "--port", str(port)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            replicas.append((f"http://127.0.0.1:{port}", proc))
        yield replicas
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _ready(session: aiohttp.ClientSession, urls: list[str]) -> None:
    deadline = time.monotonic() + 20
    for url in urls:
        while True:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} never became ready"
            await asyncio.sleep(0.1)


def _body(text: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "stream": stream,
                            "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def test_replica_killed_mid_stream_others_carry_on_and_nothing_admitted_is_lost(
    fleet: list[tuple[str, subprocess.Popen[bytes]]], clean_redis: RedisServer
) -> None:
    (victim_url, victim), *others = fleet
    headers = {"Authorization": f"Bearer {KEY}"}
    reported = 0
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        await _ready(session, [victim_url] + [u for u, _ in others])
        started = asyncio.Event()
        broken: list[bool] = []

        async def doomed_stream(i: int) -> None:
            body = _body(f"long stream {i}", True)
            try:
                async with session.post(victim_url + "/v1/chat/completions", json=body,
                                        headers={**headers, "x-mock-chunks": "100",
                                                 "x-mock-chunk-gap-ms": "50"}) as resp:
                    assert resp.status == 200
                    await resp.content.readuntil(b"\n\n")
                    started.set()
                    raw = await resp.read()
                broken.append(b"[DONE]" not in raw)
            except aiohttp.ClientError:
                broken.append(True)

        stop = asyncio.Event()

        async def steady(url: str, n: int) -> None:
            nonlocal reported
            for i in range(10_000):
                if stop.is_set():
                    return
                stream = i % 2 == 0
                async with session.post(url + "/v1/chat/completions",
                                        json=_body(f"steady {n} {i}", stream),
                                        headers={**headers, "x-mock-chunks": "5"}) as resp:
                    raw = await resp.read()
                    statuses.append(resp.status)
                    if resp.status == 200:
                        usage = stream_usage(raw) if stream else orjson.loads(raw)["usage"]
                        assert usage is not None
                        reported += usage["prompt_tokens"] + usage["completion_tokens"]

        doomed = [asyncio.ensure_future(doomed_stream(i)) for i in range(4)]
        steadies = [asyncio.ensure_future(steady(url, n)) for n, (url, _) in enumerate(others)]
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.5)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*doomed), 10)
        assert broken == [True] * 4  # the victim's clients see their streams break off

        # The others carry on; the dead replica's 4 leases + 2 steady workers = the limit of
        # 6, so no request is refused even before those leases expire.
        await asyncio.sleep(1.0)
        # After the lease TTL the tenant has all 6 slots again, through a survivor.
        await asyncio.sleep(max(0.0, killed_at + LEASE_TTL_MS / 1000 + 0.5 - time.monotonic()))
        stop.set()
        await asyncio.gather(*steadies)
        assert statuses and set(statuses) == {200}

        async def slot(i: int) -> int:
            async with session.post(others[0][0] + "/v1/chat/completions",
                                    json=_body(f"slot {i}", False),
                                    headers={**headers, "x-mock-latency-ms": "300"}) as resp:
                usage = (await resp.json()).get("usage") if resp.status == 200 else None
                return usage["total_tokens"] if usage else -resp.status

        slots = await asyncio.gather(*(slot(i) for i in range(CONCURRENCY)))
        assert all(s > 0 for s in slots), slots
        reported += sum(slots)

    for _, proc in others:  # SIGTERM drains the survivors' pending settlements
        proc.terminate()
    for _, proc in others:
        proc.wait(timeout=10)
    recorded = int(clean_redis.command("GET", budget_key()))  # type: ignore[arg-type]
    reservations = sum(estimate_prompt_tokens(_body(f"long stream {i}", True)) + MAX_TOKENS
                       for i in range(4))
    # Exact: what the survivors settled, plus each killed stream's full reservation.
    assert recorded == reported + reservations
