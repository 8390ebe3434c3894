"""Redis down across a restart, and Redis restarted empty (issue 15 items 4-6), on a real
redis-server.

- A tenant that spent its budget stays refused while Redis is down (degraded mode starts from
  the last-known budget state, not from zero).
- Usage journaled during an outage survives the replica stopping: it is written to the journal
  file and replayed exactly once by the next start; loss is logged and counted.
- A Redis that comes back empty is detected, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from pytest_aiohttp import AiohttpClient

from gateway.app.server import GATEWAY, create_app
from gateway.limits.journal import JournalFile
from gateway.state import RedisBackend
from tests.faults.helpers import budget_key, until
from tests.faults.tcpproxy import FaultProxy
from tests.gwtest import UMBRELLA_KEY, auth, chat, log_fields, policy, policy_dict
from tests.plugin_gateway import GatewayClient, gateway_client, settled
from tests.redis_server import RedisServer, pick_port

pytestmark = pytest.mark.redis

BUDGET = 300
TENANTS = {
    "acme": {"default_max_tokens": 50, "loop_guard": {"enabled": False},
             "budget": {"daily_tokens": BUDGET}},
    "umbrella": {"default_max_tokens": 50, "loop_guard": {"enabled": False},
                 "budget": {"daily_tokens": 10_000_000}},
}
DEGRADED = {"degraded": {"replicas": 1, "probe_interval_s": 0.1}}


@pytest.fixture
async def proxy(clean_redis: RedisServer) -> AsyncIterator[FaultProxy]:
    assert clean_redis.port is not None
    p = await FaultProxy(clean_redis.port).start()
    yield p
    await p.close()


def _recorded(server: RedisServer, tenant: str = "acme") -> int:
    value = server.command("GET", budget_key(tenant))
    return int(value) if isinstance(value, bytes) else 0


async def _gateway(aiohttp_client: AiohttpClient, upstream_url: str, redis_url: str,
                   journal_dir: Path | None = None) -> GatewayClient:
    degraded = {**DEGRADED["degraded"],
                **({"journal_dir": str(journal_dir)} if journal_dir else {})}
    config = policy(upstream_url, tenants=TENANTS, state={"degraded": degraded})
    client: GatewayClient = await gateway_client(aiohttp_client, create_app(
        config, state=RedisBackend(redis_url, timeout_s=1.0)))
    return client


async def _usage(gw: GatewayClient, text: str, key: str | None = None) -> int:
    resp = await gw.post("/v1/chat/completions", json=chat(text=text, max_tokens=20),
                         headers=auth(key) if key else auth())
    assert resp.status == 200, await resp.text()
    usage = (await resp.json())["usage"]
    return int(usage["prompt_tokens"] + usage["completion_tokens"])


async def test_a_tenant_over_budget_stays_refused_while_redis_is_down(
    aiohttp_client: AiohttpClient, upstream_url: str, clean_redis: RedisServer, proxy: FaultProxy
) -> None:
    gw = await _gateway(aiohttp_client, upstream_url, proxy.url)
    gateway = gw.app[GATEWAY]
    # Spend acme's budget through the gateway until it refuses a request of this size.
    refused = None
    for i in range(100):
        resp = await gw.post("/v1/chat/completions",
                             json=chat(text=f"spend {i}", max_tokens=20), headers=auth())
        if resp.status == 429:
            refused = await resp.json()
            break
        assert resp.status == 200
        await settled(gw)
    assert refused is not None and refused["error"]["code"] == "insufficient_quota"
    proxy.stall()  # Redis hangs: nothing answers
    try:
        # Before the fix: degraded mode started this tenant at zero with limit / replicas,
        # so these were served again.
        for i in range(5):
            resp = await gw.post("/v1/chat/completions",
                                 json=chat(text=f"during outage {i}", max_tokens=20),
                                 headers=auth())
            assert resp.status == 429, await resp.text()
            assert (await resp.json())["error"]["code"] == "insufficient_quota"
            assert resp.headers["x-should-retry"] == "false"
        assert gateway.degraded.active
        # A tenant with budget left is still served locally.
        assert await _usage(gw, "umbrella during outage", UMBRELLA_KEY) > 0
    finally:
        proxy.resume()


async def test_headroom_in_degraded_mode_is_what_was_left_not_the_whole_budget(
    aiohttp_client: AiohttpClient, upstream_url: str, clean_redis: RedisServer, proxy: FaultProxy
) -> None:
    gw = await _gateway(aiohttp_client, upstream_url, proxy.url)
    spent = 0
    while spent < BUDGET - 150:  # leave about 150 tokens
        spent += await _usage(gw, f"spend {spent}")
        await settled(gw)
    await _usage(gw, "the last admission sees what is left")
    await settled(gw)
    left = BUDGET - _recorded(clean_redis)
    proxy.stall()
    try:
        served, used = 0, 0
        for i in range(60):  # each reserves about 25 tokens (max_tokens 20 + the prompt)
            resp = await gw.post("/v1/chat/completions",
                                 json=chat(text=f"outage {i}", max_tokens=20), headers=auth())
            if resp.status != 200:
                assert resp.status == 429
                break
            usage = (await resp.json())["usage"]
            served, used = served + 1, used + usage["total_tokens"]
        # What was served while Redis was down fits in what was left at the last admission
        # (local settlements refund each reservation down to real usage). Before the fix the
        # whole budget was handed out again: 300 tokens, over twice what was left.
        assert served > 0
        assert used <= left < BUDGET / 2
    finally:
        proxy.resume()


async def test_journal_written_at_stop_is_replayed_exactly_once_by_the_next_start(
    aiohttp_client: AiohttpClient, upstream_url: str, clean_redis: RedisServer, proxy: FaultProxy,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    journal = tmp_path / "journal"
    first = await _gateway(aiohttp_client, upstream_url, proxy.url, journal)
    proxy.stall()
    charged = 0
    for i in range(4):  # the case: four requests journaled during a Redis stall
        charged += await _usage(first, f"journaled {i}")
    await settled(first)
    degraded = first.app[GATEWAY].degraded
    assert degraded.journal_size == 4
    with caplog.at_level(logging.WARNING, "gateway.limits"):
        await first.close()  # stop while Redis still hangs: the journal goes to the file
    assert "usage journal written for the next start to replay" in caplog.text
    files = list(journal.iterdir())
    assert len(files) == 1 and len(files[0].read_bytes().splitlines()) == 4
    assert degraded.journal_lost == 0
    proxy.resume()
    assert _recorded(clean_redis) == 0  # nothing reached Redis so far

    second = await _gateway(aiohttp_client, upstream_url, clean_redis.url, journal)
    gateway = second.app[GATEWAY]
    await until(lambda: gateway.degraded.replayed == 4, 10.0, "the journal file to be replayed")
    assert _recorded(clean_redis) == charged
    assert list(journal.iterdir()) == []  # replayed: the file is gone
    await second.close()

    # A third start finds nothing to replay, and even the same file replayed again (a crash
    # between replay and delete) charges nothing twice: settle is idempotent per request id.
    files[0].write_bytes(b"")
    third = await _gateway(aiohttp_client, upstream_url, clean_redis.url, journal)
    await settled(third)
    assert third.app[GATEWAY].degraded.replayed == 0
    await third.close()
    assert _recorded(clean_redis) == charged


async def test_a_journal_file_replayed_twice_charges_once(
    tmp_path: Path, clean_redis: RedisServer, aiohttp_client: AiohttpClient, upstream_url: str,
    proxy: FaultProxy,
) -> None:
    journal = tmp_path / "journal"
    first = await _gateway(aiohttp_client, upstream_url, proxy.url, journal)
    proxy.stall()
    charged = await _usage(first, "journaled once")
    await settled(first)
    await first.close()
    proxy.resume()
    saved = next(journal.iterdir()).read_bytes()
    for _ in range(2):  # the same file again, as if the first replay crashed before deleting
        (journal / "usage-journal-crashed.jsonl").write_bytes(saved)
        gw = await _gateway(aiohttp_client, upstream_url, clean_redis.url, journal)
        degraded = gw.app[GATEWAY].degraded
        await until(lambda d=degraded: d.journal_size == 0, 10.0,  # type: ignore[misc]
                    "the replay")
        await gw.close()
    assert _recorded(clean_redis) == charged


async def test_loss_without_a_journal_file_is_logged_and_counted(
    aiohttp_client: AiohttpClient, upstream_url: str, proxy: FaultProxy, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the journal directory should be")
    gw = await _gateway(aiohttp_client, upstream_url, proxy.url, blocker / "journal")
    proxy.stall()
    await _usage(gw, "will be lost")
    await settled(gw)
    gateway = gw.app[GATEWAY]
    scrape = await (await gw.get("/metrics")).text()
    assert "gateway_usage_journal_lost_total 0.0" in scrape
    with caplog.at_level(logging.ERROR, "gateway.limits"):
        await gw.close()
    assert gateway.degraded.journal_lost == 1
    assert "usage lost" in caplog.text
    record = next(r for r in caplog.records if "usage lost" in r.getMessage())
    assert log_fields(record)["lost"] == 1
    proxy.resume()


def test_journal_file_round_trip_and_claim_once(tmp_path: Path) -> None:
    from fractions import Fraction

    from gateway.state.plan import SettlePlan

    plan = SettlePlan("r1", "rl:{t:a}:done:r1", "rl:{t:a}:hold:r1", 600_000,
                      (("rl:{t:a}:tok", Fraction(60_000, 7), 70, 31),),
                      (("rl:{t:a}:b:tokens:d", 70, 31, 9),), ("rl:{t:a}:conc",))
    JournalFile(str(tmp_path), "old-replica").save([plan, plan])
    (tmp_path / "usage-journal-x.jsonl").write_bytes(b"not json\n")
    a, b = JournalFile(str(tmp_path), "a"), JournalFile(str(tmp_path), "b")
    plans, corrupt = a.claim()
    assert plans == [plan, plan] and corrupt == 1
    assert b.claim() == ([], 0)  # claimed by a: never replayed by b as well
    a.replayed()
    assert list(tmp_path.iterdir()) == []


async def test_redis_restarted_empty_is_detected_logged_and_counted(
    aiohttp_client: AiohttpClient, upstream_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer()  # no persistence: a restart comes back empty
    server.start()
    try:
        gw = await _gateway(aiohttp_client, upstream_url, server.url)
        gateway = gw.app[GATEWAY]
        await _usage(gw, "before the restart")
        await settled(gw)
        assert await gateway.degraded.check_epoch()  # same epoch: nothing to report
        server.stop()
        server.start()  # same port, empty
        with caplog.at_level(logging.ERROR, "gateway.limits"):
            assert not await gateway.degraded.check_epoch()
        assert gateway.degraded.resets == 1
        assert "shared state restarted empty" in caplog.text
        scrape = await (await gw.get("/metrics")).text()
        assert "gateway_state_resets_total 1.0" in scrape
        # The epoch is written again: the next check is quiet.
        assert await gateway.degraded.check_epoch()
        assert gateway.degraded.resets == 1
        await gw.close()
    finally:
        server.close()


# --- the case end to end: `gateway serve` processes and SIGTERM ---------------------


class Serve:
    """One `gateway serve` process on a free port, its JSON log in a file."""

    def __init__(self, config: Path, redis_url: str, log: Path) -> None:
        self.port = pick_port()
        self.log = log
        env = {**os.environ, "REDIS_URL": redis_url, "GATEWAY_LOG_LEVEL": "INFO"}
        env.pop("GATEWAY_JOURNAL_DIR", None)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                 "--port", str(self.port)], env=env, stdout=out, stderr=out)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with session.get(self.url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "never started"
            await asyncio.sleep(0.1)

    async def stop(self) -> float:
        """SIGTERM; seconds until the process exited (0)."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None:
            assert time.monotonic() - began < 30, "did not exit"
            await asyncio.sleep(0.05)
        assert self.proc.returncode == 0, self.log.read_text()[-2000:]
        return time.monotonic() - began

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def messages(self) -> list[str]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(orjson.loads(line).get("msg", ""))
        return out


def _serve_policy(tmp_path: Path, upstream_url: str, journal: Path) -> Path:
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump(policy_dict(upstream_url, tenants=TENANTS, state={
        "backend": "redis", "degraded": {**DEGRADED["degraded"], "journal_dir": str(journal)}},
        server={"drain_delay_s": 0, "drain_timeout_s": 3})))
    return config


async def _post(session: aiohttp.ClientSession, url: str, text: str) -> int:
    async with session.post(url + "/v1/chat/completions", json=chat(text=text, max_tokens=20),
                            headers=auth()) as resp:
        assert resp.status == 200, await resp.text()
        usage = (await resp.json())["usage"]
        return int(usage["prompt_tokens"] + usage["completion_tokens"])


async def test_sigterm_during_an_outage_keeps_the_journal_for_the_next_start(
    tmp_path: Path, upstream_url: str, clean_redis: RedisServer, proxy: FaultProxy
) -> None:
    journal = tmp_path / "journal"
    config = _serve_policy(tmp_path, upstream_url, journal)
    first = Serve(config, proxy.url, tmp_path / "first.log")
    second: Serve | None = None
    try:
        async with aiohttp.ClientSession() as session:
            await first.ready(session)
            proxy.stall()
            # The case: four requests journaled during a Redis stall, then SIGTERM.
            charged = sum([await _post(session, first.url, f"stalled {i}") for i in range(4)])
            took = await first.stop()
            # The drain waited for Redis (bounded by drain_timeout_s, 3 s), then wrote the file.
            assert 2.5 < took < 15
            assert "usage journal written for the next start to replay" in first.messages()
            assert "usage lost" not in " ".join(first.messages())
            assert sum(len(f.read_bytes().splitlines()) for f in journal.iterdir()) == 4
            proxy.resume()
            assert _recorded(clean_redis) == 0
            second = Serve(config, clean_redis.url, tmp_path / "second.log")
            await second.ready(session)
            await until(lambda: _recorded(clean_redis) == charged, 10.0,
                        "the next start to replay the journal file")
            await second.stop()
            assert list(journal.iterdir()) == []
            assert _recorded(clean_redis) == charged  # once, not twice
    finally:
        first.kill()
        if second is not None:
            second.kill()


async def test_sigterm_waits_for_redis_to_take_the_journal_when_it_returns_in_time(
    tmp_path: Path, upstream_url: str, clean_redis: RedisServer, proxy: FaultProxy
) -> None:
    journal = tmp_path / "journal"
    serve = Serve(_serve_policy(tmp_path, upstream_url, journal), proxy.url,
                  tmp_path / "serve.log")
    try:
        async with aiohttp.ClientSession() as session:
            await serve.ready(session)
            proxy.stall()
            charged = sum([await _post(session, serve.url, f"stalled {i}") for i in range(4)])
            stopping = asyncio.ensure_future(serve.stop())
            await asyncio.sleep(1.0)
            proxy.resume()  # Redis is back within the drain timeout
            await stopping
        assert _recorded(clean_redis) == charged
        assert not journal.exists() or list(journal.iterdir()) == []
    finally:
        serve.kill()
