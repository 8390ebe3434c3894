"""How fast is the mock upstream? Non-streaming chat completions at concurrency 64 for ~5 s.

Usage: ``python bench/mock_speed.py [--seconds 5] [--concurrency 64]``

The mock runs in a subprocess (its own event loop and CPU) on a free 127.0.0.1 port; this
process drives it with one aiohttp session and prints requests/s and p50/p99 latency.
The client shares nothing with the server, but it is Python too: the figure is a lower
bound on the mock's throughput (whichever side saturates a core first sets it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
MAX_REQUESTS = 5_000_000  # hard cap on top of the time bound
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_mock(port: int) -> subprocess.Popen[bytes]:
    code = (
        "import asyncio\n"
        "from gateway.mock.upstream import run_mock_upstream\n"
        "try:\n"
        f"    asyncio.run(run_mock_upstream('127.0.0.1', {port}))\n"
        "except KeyboardInterrupt:\n"  # SIGINT is how this script stops it: no traceback
        "    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(100):  # up to ~10 s for the subprocess to import and bind
        try:
            async with session.get(f"{url}/v1/models") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("mock upstream did not start")


async def drive(url: str, seconds: float, concurrency: int) -> tuple[list[float], int, float]:
    """(latencies of 200 answers, non-200 count, measured wall time) for one timed run."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(session, url)
        began = time.perf_counter()
        deadline = began + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < MAX_REQUESTS:
                start = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=BODY) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        window = time.perf_counter() - began
    return latencies, errors, window


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU time of ``pid`` (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    seconds = min(args.seconds, 60.0)  # bounded whatever the caller asks

    port = free_port()
    proc = start_mock(port)
    try:
        latencies, errors, window = asyncio.run(
            drive(f"http://127.0.0.1:{port}", seconds, args.concurrency))
        # Includes start-up (imports), so it overstates how busy the mock was.
        mock_cpu = cpu_seconds(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt -> cancel -> runner.cleanup()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    latencies.sort()
    print(f"requests: {len(latencies)} ok, {errors} errors in {window:.1f} s "
          f"at concurrency {args.concurrency}")
    print(f"throughput: {len(latencies) / window:,.0f} req/s")
    if latencies:
        print(f"latency p50: {percentile(latencies, 0.50) * 1000:.2f} ms, "
              f"p99: {percentile(latencies, 0.99) * 1000:.2f} ms")
    if mock_cpu is not None:
        print(f"mock process CPU: {mock_cpu:.1f} s over a {window:.1f} s run "
              f"({mock_cpu / window:.0%} of one core, start-up included)")


if __name__ == "__main__":
    main()
