"""Graceful drain and hot reload, on real ``gateway serve`` processes in front of the mock.

- SIGTERM during 100 concurrent streams: /readyz fails at once, the listener accepts during
  the drain delay and refuses after it, every stream completes, settlements reach Redis, exit 0;
- streams still running at the drain timeout end with an SSE error event (both dialects), a
  request not answered yet gets a 503, and the process still exits 0;
- reload under steady load (a ConfigMap-style symlink swap, then an invalid file, then SIGHUP):
  zero failed requests, the new limit on the next request, the old policy kept when invalid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from pytest_aiohttp import AiohttpClient

from gateway.app.server import GATEWAY, create_app
from gateway.config.model import parse_config
from gateway.limits.periods import period_keys
from gateway.process.lifecycle import DRAIN_ERROR_CODE
from gateway.process.reload import Reloader, file_signature, keep_running_settings
from gateway.request.auth import hash_key
from tests.gwtest import UMBRELLA_KEY, auth, chat, policy_dict
from tests.plugin_gateway import GatewayClient
from tests.redis_server import RedisServer, pick_port

CLAUDE_KEY = "sk-test-claude"


# --- helpers shared with test_workers.py ------------------------------------------------------


class GatewayProcess:
    """One ``gateway serve`` subprocess; its JSON log lines go to a file the test can read."""

    def __init__(self, config: Path, log_file: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.log_file = log_file
        self._argv = ["serve", "--config", str(config), *extra]
        self._env = {**os.environ, **(env or {})}
        self._spawn()

    def _spawn(self) -> None:
        self.port = pick_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = self.log_file.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *self._argv, "--port", str(self.port)],
            env=self._env, stdout=subprocess.DEVNULL, stderr=self._log,
        )

    def _respawned_after_port_race(self) -> bool:
        """pick_port is racy: another process may bind the port first. Try a new one."""
        if self.proc.poll() is None or "address already in use" not in self.log_file.read_text():
            return False
        self._log.close()
        self._spawn()
        return True

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"msg": line})
        return out

    def messages(self, msg: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("msg") == msg]

    async def wait_log(self, msg: str, count: int = 1, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.messages(msg)) < count:
            assert self.proc.poll() is None, f"gateway exited: {self.log_file.read_text()}"
            assert time.monotonic() < deadline, f"no {count}x '{msg}' in {self.logs()}"
            await asyncio.sleep(0.05)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        races = 0
        while True:
            if races < 3 and self._respawned_after_port_race():
                races += 1
            assert self.proc.poll() is None, f"gateway exited: {self.log_file.read_text()}"
            try:
                async with session.get(self.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "gateway never became ready"
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "gateway did not exit in time"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    """One mock upstream process for the module."""
    port = pick_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "mock-upstream", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@dataclass
class Stream:
    """What a client saw of one streamed call."""

    events: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    error: str | None = None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == b"data: [DONE]"

    def error_events(self) -> list[dict[str, Any]]:
        out = []
        for event in self.events:
            data = event.split(b"data: ", 1)[-1]
            if b'"error"' in data:
                out.append(json.loads(data))
        return out

    def deltas(self) -> int:
        return sum(1 for e in self.events if b'"delta"' in e and b'"content":"tok ' in e)

    def total_tokens(self) -> int:
        for event in reversed(self.events):
            if event.startswith(b"data: {") and b'"usage"' in event:
                usage = json.loads(event[6:]).get("usage")
                if usage:
                    return int(usage["total_tokens"])
        return 0


async def read_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      headers: dict[str, str], stream: Stream) -> Stream:
    """POST and read the SSE answer event by event until the server ends it."""
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            stream.status, stream.headers = resp.status, dict(resp.headers)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *complete, buffer = buffer.split(b"\n\n")
                for event in complete:
                    stream.events.append(event)
                    if b'"tok ' in event:  # a content delta, in either dialect
                        stream.started.set()
    except aiohttp.ClientError as exc:  # a cut connection: what a drain must never cause
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.started.set()
    return stream


def write_policy(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def budget_used(redis: RedisServer, tenant: str) -> int:
    _, day, _, _ = period_keys(time.time())[0]
    return int(redis.command("GET", f"gw:rl:{{t:{tenant}}}:b:tokens:{day}") or 0)


# Admission control would queue most of 100 concurrent streams behind its initial limit, and
# the provider's default pool (100 connections) would hold back a 101st call.
ROOMY = {"concurrency": {"initial_limit": 300, "max_limit": 400}}
POOLS = {"main": {"pool_size": 300}, "claude": {"pool_size": 300}}


def _drain_policy(mock_url: str, delay_s: float, timeout_s: float) -> dict[str, Any]:
    """Redis state, a daily token budget per tenant (so settlements land in Redis)."""
    budget = {"daily_tokens": 10_000_000}
    return policy_dict(
        mock_url,
        admission=ROOMY,
        providers=POOLS,
        server={"drain_delay_s": delay_s, "drain_timeout_s": timeout_s},
        state={"backend": "redis", "timeout_s": 1.0},
        tenants={
            "acme": {"budget": budget, "loop_guard": {"enabled": False}},
            "umbrella": {"budget": budget, "loop_guard": {"enabled": False}},
            "claude": {"api_keys": [hash_key(CLAUDE_KEY)], "models": ["claude-test"],
                       "loop_guard": {"enabled": False}},
        },
    )


STREAM_BODY = chat(stream=True, stream_options={"include_usage": True})


# --- drain --------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_sigterm_during_100_streams_completes_every_one_and_exits_0(
    tmp_path: Path, mock_url: str, clean_redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    config = write_policy(tmp_path / "policy.yaml", _drain_policy(mock_url, 1.0, 30.0))
    gw = GatewayProcess(config, tmp_path / "gw.log", env={"REDIS_URL": clean_redis.url})
    try:
        await gw.wait_ready(session)
        url = gw.url + "/v1/chat/completions"
        # 60 chunks 100 ms apart: every stream is still running when the listener closes.
        knobs = auth(**{"x-mock-chunks": "60", "x-mock-chunk-gap-ms": "100"})
        streams = [Stream() for _ in range(100)]
        tasks = [asyncio.create_task(read_stream(session, url, STREAM_BODY, knobs, s))
                 for s in streams]
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 15)
        assert all(s.error is None and not s.done for s in streams)

        gw.signal(signal.SIGTERM)
        await gw.wait_log("draining: not ready, still accepting")
        # During the delay: not ready, yet a new connection is still served (and told to close).
        async with aiohttp.ClientSession() as fresh:
            async with fresh.get(gw.url + "/readyz") as resp:
                assert resp.status == 503
            async with fresh.post(url, json=chat(), headers=auth(UMBRELLA_KEY)) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["Connection"] == "close"
                late_tokens = (await resp.json())["usage"]["total_tokens"]
        await gw.wait_log("draining: listener closed")
        with pytest.raises(aiohttp.ClientConnectorError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(gw.url + "/healthz")
        assert not any(s.done for s in streams), "streams must outlast the drain delay here"

        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert [s.error for s in streams if s.error] == []
        assert all(s.status == 200 and s.done and not s.error_events() for s in streams)
        assert all(s.deltas() == 60 for s in streams)
        assert await gw.exit_code(15) == 0
    finally:
        gw.close()
    # Every settlement was flushed before exit: real usage replaced each reservation.
    assert budget_used(clean_redis, "acme") == sum(s.total_tokens() for s in streams)
    assert budget_used(clean_redis, "umbrella") == late_tokens
    assert gw.messages("drained") and not gw.messages("drain timeout: ending what is still running")


@pytest.mark.redis
async def test_streams_left_at_the_drain_timeout_end_with_an_error_event(
    tmp_path: Path, mock_url: str, clean_redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    config = write_policy(tmp_path / "policy.yaml", _drain_policy(mock_url, 0.2, 1.0))
    gw = GatewayProcess(config, tmp_path / "gw.log", env={"REDIS_URL": clean_redis.url})
    try:
        await gw.wait_ready(session)
        slow = {"x-mock-chunks": "200", "x-mock-chunk-gap-ms": "100"}  # 20 s: never finishes
        openai = [Stream() for _ in range(5)]
        anthropic = Stream()
        tasks = [asyncio.create_task(read_stream(
            session, gw.url + "/v1/chat/completions", STREAM_BODY, auth(**slow), s))
            for s in openai]
        tasks.append(asyncio.create_task(read_stream(
            session, gw.url + "/v1/messages",
            {"model": "claude-test", "max_tokens": 500, "stream": True,
             "messages": [{"role": "user", "content": "hi"}]},
            {"x-api-key": CLAUDE_KEY, **slow}, anthropic)))
        waiting = asyncio.create_task(session.post(
            gw.url + "/v1/chat/completions", json=chat(),
            headers=auth(UMBRELLA_KEY, **{"x-mock-latency-ms": "20000"})))
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in [*openai, anthropic])),
                               15)
        began = time.monotonic()
        gw.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        elapsed = time.monotonic() - began
        assert 1.0 <= elapsed < 6.0, elapsed  # delay 0.2 s + timeout 1 s, then ended at once

        for s in openai:
            assert s.error is None, s.error  # ended by the server, not cut
            assert not s.done
            (event,) = s.error_events()
            assert event["error"]["code"] == DRAIN_ERROR_CODE
            assert event["error"]["type"] == "server_error"
            assert s.events[-1].startswith(b"data: {\"error\"")
        assert anthropic.error is None
        assert anthropic.events[-1].startswith(b"event: error\ndata: ")
        assert json.loads(anthropic.events[-1].split(b"data: ", 1)[1])["type"] == "error"

        resp = await waiting
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == DRAIN_ERROR_CODE
        resp.release()
        assert await gw.exit_code(15) == 0
    finally:
        gw.close()
    # Ended streams are still accounted for (no usage came: the deltas the client received,
    # plus the prompt estimate), and every settlement reached Redis before the exit.
    lines = [e for e in gw.messages("request") if e["tenant"] == "acme"]
    assert sorted(e["tokens_out"] for e in lines) == sorted(s.deltas() for s in openai)
    assert all(e["error_code"] == DRAIN_ERROR_CODE for e in lines)
    assert budget_used(clean_redis, "acme") == sum(e["tokens_in"] + e["tokens_out"] for e in lines)
    (timeout_line,) = gw.messages("drain timeout: ending what is still running")
    assert timeout_line["ended"] == 7


async def test_second_sigterm_ends_the_drain_at_once(
    tmp_path: Path, mock_url: str, session: aiohttp.ClientSession
) -> None:
    data = policy_dict(mock_url, server={"drain_delay_s": 0, "drain_timeout_s": 60},
                       admission=ROOMY)
    gw = GatewayProcess(write_policy(tmp_path / "policy.yaml", data), tmp_path / "gw.log")
    try:
        await gw.wait_ready(session)
        stream = Stream()
        task = asyncio.create_task(read_stream(
            session, gw.url + "/v1/chat/completions", STREAM_BODY,
            auth(**{"x-mock-chunks": "300", "x-mock-chunk-gap-ms": "100"}), stream))
        await asyncio.wait_for(stream.started.wait(), 10)
        gw.signal(signal.SIGTERM)
        await gw.wait_log("draining: listener closed")
        gw.signal(signal.SIGTERM)
        await asyncio.wait_for(task, 10)
        assert stream.error is None
        assert stream.error_events()[-1]["error"]["code"] == DRAIN_ERROR_CODE
        assert await gw.exit_code(10) == 0
    finally:
        gw.close()


# --- reload -------------------------------------------------------------------------------------


class ConfigMapDir:
    """A directory laid out as kubelet mounts a ConfigMap: ``policy.yaml -> ..data/policy.yaml``,
    ``..data -> ..<version>``; an update swaps the ``..data`` symlink atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir()
        (root / "policy.yaml").symlink_to("..data/policy.yaml")

    @property
    def path(self) -> Path:
        return self.root / "policy.yaml"

    def publish(self, data: dict[str, Any] | str) -> None:
        self.version += 1
        target = self.root / f"..v{self.version}"
        target.mkdir()
        (target / "policy.yaml").write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / "..data")


def _limited(mock_url: str, rpm: int, **extra: Any) -> dict[str, Any]:
    return policy_dict(mock_url, admission=ROOMY, server={"drain_delay_s": 0}, tenants={"acme": {
        "limits": {"requests_per_minute": rpm}, "loop_guard": {"enabled": False}}}, **extra)


async def _steady_load(session: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                       results: list[tuple[str, int, bool]]) -> None:
    """One client doing streams and plain calls back to back until ``stop``."""
    i = 0
    while not stop.is_set() and i < 2000:
        i += 1
        if i % 2:
            s = await read_stream(session, url, STREAM_BODY,
                                  auth(**{"x-mock-chunks": "8", "x-mock-chunk-gap-ms": "25"}),
                                  Stream())
            results.append(("stream", s.status, s.done and s.error is None))
        else:
            async with session.post(url, json=chat(), headers=auth()) as resp:
                body = await resp.read()
                results.append(("plain", resp.status, b'"choices"' in body))


async def _limit_header(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(url, json=chat(), headers=auth()) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-ratelimit-limit-requests"]


async def test_reload_under_load_applies_on_the_next_request_and_rejects_invalid(
    tmp_path: Path, mock_url: str, session: aiohttp.ClientSession
) -> None:
    cm = ConfigMapDir(tmp_path / "policy")
    cm.publish(_limited(mock_url, 6000))
    gw = GatewayProcess(cm.path, tmp_path / "gw.log", "--watch-interval", "0.2")
    try:
        await gw.wait_ready(session)
        url = gw.url + "/v1/chat/completions"
        assert await _limit_header(session, url) == "6000"
        stop = asyncio.Event()
        results: list[tuple[str, int, bool]] = []
        load = [asyncio.create_task(_steady_load(session, url, stop, results)) for _ in range(6)]
        # A long stream that starts under the old policy and must finish under it.
        long = Stream()
        long_task = asyncio.create_task(read_stream(
            session, url, STREAM_BODY, auth(**{"x-mock-chunks": "30", "x-mock-chunk-gap-ms": "50"}),
            long))
        await asyncio.wait_for(long.started.wait(), 10)
        await asyncio.sleep(0.3)

        cm.publish(_limited(mock_url, 3000))  # the kubelet's symlink swap
        await gw.wait_log("policy reload applied")
        assert await _limit_header(session, url) == "3000"  # the very next request

        cm.publish("tenants: [this is not a policy\n")
        await gw.wait_log("policy reload rejected: the running policy stays")
        cm.publish(_limited(mock_url, 1500) | {"unknown_key": 1})
        await gw.wait_log("policy reload rejected: the running policy stays", count=2)
        gw.signal(signal.SIGHUP)  # same invalid file: rejected again, on the signal
        await gw.wait_log("policy reload rejected: the running policy stays", count=3)
        assert await _limit_header(session, url) == "3000"  # the old policy still serves
        async with session.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'gateway_config_reloads_total{result="failure"} 3.0' in metrics
        assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics
        assert "gateway_config_last_reload_successful 0.0" in metrics

        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load, long_task), 20)
        failures = [r for r in results if r[1] != 200 or not r[2]]
        assert failures == [] and len(results) >= 20, (failures, len(results))
        assert long.done and long.error is None and long.headers[
            "x-ratelimit-limit-requests"] == "6000"
        gw.signal(signal.SIGTERM)
        assert await gw.exit_code(15) == 0
    finally:
        gw.close()
    rejected = gw.messages("policy reload rejected: the running policy stays")
    assert [r["trigger"] for r in rejected] == ["file changed", "file changed", "SIGHUP"]
    assert "not valid YAML" in rejected[0]["problems"][0]
    assert rejected[1]["problems"] == ["unknown_key: unknown key"]


async def test_sighup_reloads_when_the_file_watch_is_off(
    tmp_path: Path, mock_url: str, session: aiohttp.ClientSession
) -> None:
    path = write_policy(tmp_path / "policy.yaml", _limited(mock_url, 6000))
    gw = GatewayProcess(path, tmp_path / "gw.log", "--watch-interval", "0")
    try:
        await gw.wait_ready(session)
        url = gw.url + "/v1/chat/completions"
        write_policy(path, _limited(mock_url, 1200))
        await asyncio.sleep(0.5)
        assert await _limit_header(session, url) == "6000"  # no watch: nothing happened
        gw.signal(signal.SIGHUP)
        await gw.wait_log("policy reload applied")
        assert await _limit_header(session, url) == "1200"
        gw.signal(signal.SIGTERM)
        assert await gw.exit_code(15) == 0
    finally:
        gw.close()
    assert gw.messages("policy reload applied")[0]["trigger"] == "SIGHUP"


# --- in-process units -------------------------------------------------------------------------


def test_file_signature_sees_a_configmap_swap_even_with_identical_size_and_mtime(
    tmp_path: Path
) -> None:
    cm = ConfigMapDir(tmp_path / "cm")
    cm.publish("a: 1\n")
    before = file_signature([str(cm.path)])
    cm.publish("a: 2\n")
    stamp = os.stat(tmp_path / "cm" / "..v1" / "policy.yaml").st_mtime_ns
    os.utime(tmp_path / "cm" / "..v2" / "policy.yaml", ns=(stamp, stamp))
    assert file_signature([str(cm.path)]) != before
    missing = file_signature([str(tmp_path / "nope.yaml")])
    assert missing[0][1] is None


def test_settings_only_a_restart_can_change_are_kept_and_named(mock_url: str) -> None:
    running = parse_config(policy_dict(mock_url, server={"port": 8080}))
    new = parse_config(policy_dict(mock_url, server={"port": 9999, "drain_timeout_s": 5},
                                   state={"key_prefix": "other:"}))
    merged, changed = keep_running_settings(running, new)
    assert changed == ["server.port", "state"]
    assert merged.server.port == 8080 and merged.state == running.state
    assert merged.server.drain_timeout_s == 5  # reloadable: taken from the new file
    same, none = keep_running_settings(running, running)
    assert same is running and none == []


def test_serve_runs_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    from gateway.cli import loop_factory
    from gateway.config.model import ConfigError

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="server.event_loop"):
        loop_factory("uvloop", "policy.yaml")


async def test_reloader_keeps_the_old_policy_object_when_the_file_is_invalid(
    tmp_path: Path, mock_url: str, aiohttp_client: AiohttpClient
) -> None:
    path = write_policy(tmp_path / "policy.yaml", _limited(mock_url, 6000))
    app = create_app(parse_config(_limited(mock_url, 6000)))
    client: GatewayClient = await aiohttp_client(app)
    results: list[bool] = []
    reloader = Reloader(app, str(path), prepare=lambda c: c, on_result=results.append)
    old = app[GATEWAY].policy
    path.write_text("providers: {}\n")
    assert await reloader.reload("test") is False
    assert app[GATEWAY].policy is old and not reloader.changed()
    write_policy(path, _limited(mock_url, 100))
    assert reloader.changed()
    assert await reloader.reload("test") is True
    assert app[GATEWAY].policy is not old
    assert app[GATEWAY].policy.config.tenants["acme"].limits.requests_per_minute == 100
    assert results == [False, True]
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.headers["x-ratelimit-limit-requests"] == "100"


async def test_key_files_are_watched_without_a_reload_at_start(
    tmp_path: Path, mock_url: str, aiohttp_client: AiohttpClient
) -> None:
    key = tmp_path / "openai.key"
    key.write_text("sk-one\n")
    data = policy_dict(mock_url, providers={"main": {"api_key_file": str(key)}})
    path = write_policy(tmp_path / "policy.yaml", data)
    baseline = file_signature([str(path)])  # what `gateway serve` takes before reading
    app = create_app(parse_config(data))
    await aiohttp_client(app)
    reloader = Reloader(app, str(path), prepare=lambda c: c, baseline=baseline)
    assert not reloader.changed()  # the key file joins the watch quietly
    key.write_text("sk-two\n")  # a rotated Secret
    assert reloader.changed()
    assert await reloader.reload("file changed")
    assert not reloader.changed()


async def test_served_timings_keep_sub_millisecond_resolution_on_uvloop(
    tmp_path: Path, mock_url: str, session: aiohttp.ClientSession
) -> None:
    # uvloop's loop.time() ticks in whole milliseconds; durations must not be measured with it.
    config = write_policy(tmp_path / "policy.yaml", policy_dict(mock_url))
    gw = GatewayProcess(config, tmp_path / "gw.log")
    try:
        await gw.wait_ready(session)
        for _ in range(8):
            async with session.post(gw.url + "/v1/chat/completions", json=chat(),
                                    headers=auth(UMBRELLA_KEY)) as resp:
                assert resp.status == 200
        await gw.wait_log("request", count=8)
        lines = [e for e in gw.logs() if e.get("msg") == "request"]
        durations = [e["duration_ms"] for e in lines] + [e["upstream_ms"] for e in lines]
        assert any(d != round(d) for d in durations), durations
    finally:
        gw.close()
