"""The demo: scripts/setup.sh installs once per pyproject.toml, and `gateway status` works on
the demo policy with the admin key the demo prints."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from gateway.app.server import create_app
from gateway.cli import DEMO_ADMIN_KEY, demo_banner, demo_policy, main
from gateway.config.model import load_config
from tests.plugin_gateway import gateway_client

ROOT = Path(__file__).resolve().parent.parent.parent


def _fake_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of setup.sh beside a pyproject.toml and a .venv whose python records its calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "gateway").write_text("#!/bin/sh\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    return tmp_path, calls


def _setup(repo: Path, *args: str) -> None:
    subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *args], check=True, timeout=30)


def _installs(calls: Path) -> int:
    return sum("pip install" in line for line in calls.read_text().splitlines()) \
        if calls.exists() else 0


def test_setup_installs_once_per_pyproject_and_extras(tmp_path: Path) -> None:
    repo, calls = _fake_repo(tmp_path)
    _setup(repo)
    assert _installs(calls) == 1
    _setup(repo)  # current: skipped
    assert _installs(calls) == 1
    _setup(repo, "test")  # the test extras are not installed yet
    assert _installs(calls) == 2
    _setup(repo)  # a [test] install covers a plain one
    _setup(repo, "test")
    assert _installs(calls) == 2
    with (repo / "pyproject.toml").open("a") as f:
        f.write("\n# a dependency changed\n")
    _setup(repo, "test")
    assert _installs(calls) == 3
    (repo / ".venv" / "bin" / "gateway").unlink()  # a broken venv is repaired
    _setup(repo, "test")
    assert _installs(calls) == 4


def test_demo_prints_the_url_and_the_admin_key_for_gateway_status() -> None:
    config = load_config(ROOT / "config" / "example.yaml")
    text = demo_banner(config, 9000)
    assert "http://127.0.0.1:8080/v1" in text
    assert f"gateway status --url http://127.0.0.1:8080 --admin-key {DEMO_ADMIN_KEY}" in text
    no_admin = config.model_copy(update={"admin": config.admin.model_copy(
        update={"api_keys": []})})
    assert "admin-key" not in demo_banner(no_admin, 9000)


async def test_gateway_status_works_on_the_demo_policy(
    aiohttp_client: AiohttpClient, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(ROOT / "config" / "example.yaml")
    client = await gateway_client(aiohttp_client, create_app(config))
    url = str(client.server.make_url("")).rstrip("/")
    code = await asyncio.to_thread(main, ["status", "--url", url, "--admin-key", DEMO_ADMIN_KEY])
    out = capsys.readouterr().out
    assert code == 0, capsys.readouterr().err
    assert "acme" in out and "20,000" in out and "umbrella" in out  # the tenants' limits
    assert await asyncio.to_thread(main, ["status", "--url", url, "--admin-key", "wrong"]) == 1


def _free_ports(n: int) -> list[int]:
    """``n`` different free ports (held open together, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("taken_flag", ["--port", "--mock-port"])
def test_demo_on_a_taken_port_says_which_and_how_to_choose_another(
    taken_flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = _free_ports(2)
        ports = {"--port": free[0], "--mock-port": free[1], taken_flag: port}
        code = main(["demo", "--config", str(ROOT / "config" / "example.yaml"),
                     "--port", str(ports["--port"]), "--mock-port", str(ports["--mock-port"])])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("gateway demo:")]
    assert len(lines) == 1 and str(port) in lines[0] and f"{taken_flag} N" in lines[0]
    # bound first: no banner for a demo that is not running, and no traceback
    assert "Try it" not in err and "Traceback" not in err and "never awaited" not in err


def test_demo_ports_take_effect(tmp_path: Path) -> None:
    port, mock_port = _free_ports(2)
    with subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "gateway"), "demo", "--config",
         str(ROOT / "config" / "example.yaml"), "--port", str(port), "--mock-port",
         str(mock_port)], stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            banner = ""
            deadline = time.monotonic() + 60
            while "Ctrl-C" not in banner and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line:  # it exited
                    break
                banner += line
            assert f"http://127.0.0.1:{port}/v1" in banner
            assert f"127.0.0.1:{mock_port}" in banner
            body = json.dumps({"model": "gpt-4o-mini", "messages": [
                {"role": "user", "content": "hi"}]}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={
                    "Authorization": "Bearer sk-demo-acme", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as resp:  # reached the mock
                assert resp.status == 200 and json.loads(resp.read())["choices"]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


def test_demo_policy_points_the_loopback_providers_at_the_mock_port() -> None:
    config = demo_policy(load_config(ROOT / "config" / "example.yaml"), 18080, 19001)
    assert config.server.port == 18080
    urls = [p.base_url for p in config.providers.values()]
    assert urls and all(":19001" in url for url in urls), urls
    assert "http://127.0.0.1:19001/v1" in urls  # the path is kept
