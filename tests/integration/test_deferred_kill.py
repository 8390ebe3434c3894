"""A replica killed (SIGKILL) while it runs a deferred request: another replica re-claims the
entry after the visibility timeout and completes it; the lost run is visible and charged once
(its reservation), the completing run its real usage."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import aiohttp
import pytest
import yaml
from pytest_aiohttp import AiohttpServer

from gateway.state import RedisBackend
from tests.gwtest import ACME_KEY, auth, chat, policy_dict
from tests.integration.test_deferred import ANSWER, DEFERRED, Upstream, budget_used, eventually
from tests.plugin_gateway import MakeGateway, settled
from tests.redis_server import RedisServer, pick_port

LATENCY_S = 1.5


def _serve(config: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Replica A: ``gateway serve`` in its own process (REDIS_URL from the policy file only)."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port",
         str(port), "--watch-interval", "0"], env=env, stdout=subprocess.DEVNULL, stderr=log)


@pytest.mark.redis
async def test_a_killed_replica_s_entry_completes_on_another(
        tmp_path: Path, aiohttp_server: AiohttpServer, make_gateway: MakeGateway,
        clean_redis: RedisServer,
) -> None:
    mock = Upstream()
    server = await aiohttp_server(mock.app())
    url = str(server.make_url("")).rstrip("/")
    config = policy_dict(url, deferred=DEFERRED,
                         tenants={"acme": {"budget": {"daily_tokens": 1_000_000}}},
                         state={"backend": "redis", "redis_url": clean_redis.url,
                                "timeout_s": 1.0})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(config))
    port = pick_port()
    log = (tmp_path / "replica-a.log").open("wb")
    proc = _serve(path, port, log)
    a_url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {ACME_KEY}"}
    try:
        async with aiohttp.ClientSession() as session:
            until = time.monotonic() + 15
            while True:
                assert proc.poll() is None, (tmp_path / "replica-a.log").read_text()
                assert time.monotonic() < until, "replica A never became ready"
                try:
                    async with session.get(a_url + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            async with session.post(a_url + "/v1/chat/completions", json=chat(max_tokens=100),
                                    headers={**headers, "Prefer": "respond-async",
                                             "x-mock-delay": str(LATENCY_S)}) as resp:
                assert resp.status == 202, await resp.text()
                entry = (await resp.json())["id"]
            # A took it and the upstream call is in flight: kill A now
            await eventually(lambda: len(mock.calls) == 1)
            async with session.get(f"{a_url}/v1/deferred/{entry}", headers=headers) as resp:
                assert (await resp.json())["status"] == "running"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
        killed_at = time.monotonic()
        # replica B, in this process, on the same Redis
        b = await make_gateway(upstream=url, state=RedisBackend(clean_redis.url, timeout_s=1.0),
                               deferred=DEFERRED,
                               tenants={"acme": {"budget": {"daily_tokens": 1_000_000}}})
        resp = await b.get(f"/v1/deferred/{entry}?wait=10", headers=auth())
        done = await resp.json()
        elapsed = time.monotonic() - killed_at
        assert done["status"] == "succeeded", done
        assert done["response"] == {"status_code": 200, "body": ANSWER,
                                    "headers": {"content-type": "application/json"}}
        assert done["runs"] == 2 and len(mock.calls) == 2
        lost, completed = done["run_log"]
        assert (lost["outcome"], lost["charged"]) == ("lost", "reserved")
        assert (completed["outcome"], completed["charged"]) == ("success", "actual")
        assert lost["replica"] != completed["replica"]
        # after the visibility timeout (1 s) plus the second call, not much later
        assert DEFERRED["visibility_timeout_s"] + LATENCY_S - 0.6 < elapsed < 6.0
        # charged: the lost run's reservation (prompt + 100) and the real 12 tokens; the
        # submit reservation refunded
        await settled(b)
        await eventually(lambda: 100 + 12 < budget_used(clean_redis) <= 100 + 20 + 12)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        log.close()
