"""``gateway serve --workers N``: processes sharing one port (SO_REUSEPORT), limits shared
through Redis, signals forwarded, and the parent exiting when its workers do."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.process.workers import supervise
from tests.gwtest import auth, chat, policy_dict
from tests.integration.test_lifecycle import GatewayProcess, mock_url, write_policy
from tests.redis_server import RedisServer

__all__ = ["mock_url"]  # the module-scoped mock upstream fixture, shared

RPM, BURST = 60, 10


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: an orphan waits for whoever reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _worker_pids(gw: GatewayProcess) -> list[int]:
    return sorted(e["pid"] for e in gw.messages("gateway listening"))


@pytest.mark.redis
async def test_two_workers_serve_from_two_processes_and_share_limits_through_redis(
    tmp_path: Path, mock_url: str, clean_redis: RedisServer
) -> None:
    data = policy_dict(mock_url, server={"drain_delay_s": 0},
                       state={"backend": "redis", "timeout_s": 1.0},
                       tenants={"acme": {"limits": {"requests_per_minute": RPM,
                                                    "request_burst": BURST},
                                         "loop_guard": {"enabled": False}}})
    gw = GatewayProcess(write_policy(tmp_path / "policy.yaml", data), tmp_path / "gw.log",
                        "--workers", "2", env={"REDIS_URL": clean_redis.url})
    try:
        # A fresh connection per request: SO_REUSEPORT balances connections, not requests.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await gw.wait_ready(session)
            await gw.wait_log("gateway listening", count=2)
            began = time.monotonic()

            async def one() -> int:
                async with session.post(gw.url + "/v1/chat/completions", json=chat(),
                                        headers=auth()) as resp:
                    await resp.read()
                    return resp.status

            statuses = [s for _ in range(4) for s in await asyncio.gather(*(one() for _ in range(10)))]
            elapsed = time.monotonic() - began
        pids = _worker_pids(gw)
        gw.signal(signal.SIGTERM)
        assert await gw.exit_code(15) == 0
        assert await _gone(pids, 5)
    finally:
        gw.close()

    assert len(set(pids)) == 2 and gw.proc.pid not in pids
    served_by = {e["worker"] for e in gw.messages("request")}
    assert served_by == {0, 1}, served_by  # both processes answered
    admitted = statuses.count(200)
    # One fleet-wide bucket: the burst plus what refilled meanwhile. Per-process buckets would
    # admit about twice the burst.
    assert BURST <= admitted <= BURST + RPM / 60 * elapsed + 1, (admitted, elapsed)
    assert set(statuses) == {200, 429}
    assert not gw.messages("worker exited unasked: stopping the others")


async def test_memory_backend_warning_and_workers_drain_when_their_parent_is_killed(
    tmp_path: Path, mock_url: str
) -> None:
    data = policy_dict(mock_url, server={"drain_delay_s": 0})
    gw = GatewayProcess(write_policy(tmp_path / "policy.yaml", data), tmp_path / "gw.log",
                        "--workers", "2")
    try:
        async with aiohttp.ClientSession() as session:
            await gw.wait_ready(session)
        await gw.wait_log("gateway listening", count=2)
        (warning,) = [e for e in gw.logs() if "limits" in e.get("msg", "")]
        assert warning["level"] == "warning" and "2x the configured limits" in warning["msg"]
        pids = _worker_pids(gw)
        gw.proc.kill()  # SIGKILL: nothing is forwarded; the workers notice on their own
        assert await _gone(pids, 10)
    finally:
        gw.close()
    assert len(gw.messages("parent process gone: draining")) == 2
    assert len(gw.messages("gateway stopped")) == 2


# --- the supervisor in-process, with stand-in workers ------------------------------------------


CHILD = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def note(sig, _frame):
    with out.open("a") as f:
        f.write(signal.Signals(sig).name + "\\n")
    if sig != signal.SIGHUP:
        sys.exit(0)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, note)
out.touch()
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
    os.kill(os.getpid(), signal.SIGKILL)
for _ in range(300):
    time.sleep(0.1)
sys.exit(3)
"""


def _children(tmp_path: Path, die_after: dict[int, float]
              ) -> tuple[list[Path], Callable[[int], list[str]]]:
    notes = [tmp_path / f"child{i}.txt" for i in range(3)]

    def argv_for(index: int) -> list[str]:
        extra = [str(die_after[index])] if index in die_after else []
        return [sys.executable, "-c", CHILD, str(notes[index]), *extra]

    return notes, argv_for


def _send_when_started(notes: list[Path], *signals: int) -> threading.Thread:
    def send() -> None:
        deadline = time.monotonic() + 10
        while not all(n.exists() for n in notes) and time.monotonic() < deadline:
            time.sleep(0.02)
        for sig in signals:
            os.kill(os.getpid(), sig)  # to ourselves: supervise's handlers forward it
            time.sleep(0.2)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_supervise_forwards_sighup_and_sigterm_and_exits_0_when_the_workers_do(
    tmp_path: Path
) -> None:
    notes, argv_for = _children(tmp_path, {})
    before = signal.getsignal(signal.SIGTERM)
    sender = _send_when_started(notes, signal.SIGHUP, signal.SIGTERM)
    assert supervise(3, argv_for) == 0
    sender.join(5)
    assert [n.read_text().split() for n in notes] == [["SIGHUP", "SIGTERM"]] * 3
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_supervise_stops_the_others_when_a_worker_dies_unasked(tmp_path: Path) -> None:
    notes, argv_for = _children(tmp_path, {1: 0.3})
    assert supervise(3, argv_for) == 128 + signal.SIGKILL
    assert [n.read_text().split() for n in notes] == [["SIGTERM"], [], ["SIGTERM"]]
