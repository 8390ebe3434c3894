"""Cold start: a fresh gateway with the shipped admission defaults in front of an idle
provider, and a burst of calls to a slow model.

``--clients`` clients each make ``--rounds`` chat completions in a row (default 20 x 3), of
``--latency-ms`` each (default 5,000: a reasoning model), against the mock upstream with
unlimited capacity: nothing upstream is ever full, so every refusal and every second beyond
the model's own time is the gateway's. Run once not streamed (the mock's ``x-mock-latency-ms``:
the whole answer after that long) and once streamed (``x-mock-ttft-ms``: the first token after
that long), for each gateway commit given (``--refs``, default the parent of this change and
HEAD), all in one invocation so the figures compare within the run.

Prints, per commit and mode: answers by status, 503s, and the calls' times (median and
maximum) against the model's. Traffic goes to 127.0.0.1 only; bounded in count and time.

    .venv/bin/python bench/cold_start.py [--refs cfe0a60,HEAD] [--clients 20] [--rounds 3]
        [--latency-ms 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
import yaml

from gateway.request.auth import hash_key

KEY = "sk-bench-cold"


def policy(mock_port: int, gw_port: int) -> dict[str, Any]:
    """Tenants and a model only: admission at its shipped defaults."""
    return {
        "server": {"host": "127.0.0.1", "port": gw_port},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                               "forward_headers": ["x-mock-*"],
                               "timeouts": {"first_byte_s": 120, "total_s": 300}}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": {"t": {"api_keys": [hash_key(KEY)], "models": ["*"]}},
    }


async def burst(base: str, clients: int, rounds: int, latency_ms: int,
                stream: bool) -> list[tuple[int, float]]:
    """(status, seconds) of every call."""
    knob = "x-mock-ttft-ms" if stream else "x-mock-latency-ms"
    headers = {"authorization": f"Bearer {KEY}", knob: str(latency_ms)}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "max_tokens": 5}
    results: list[tuple[int, float]] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client() -> None:
            for _ in range(rounds):
                began = time.monotonic()
                async with session.post(f"{base}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    await resp.read()
                    results.append((resp.status, time.monotonic() - began))

        await asyncio.gather(*(client() for _ in range(clients)))
    return results


def run(ref: str, stream: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        source = bl.GatewaySource(ref, Path(tmp))
        procs = bl.Procs()
        mock_port, gw_port = bl.free_port(), bl.free_port()
        config = Path(tmp) / "policy.yaml"
        config.write_text(yaml.safe_dump(policy(mock_port, gw_port)))
        try:
            procs.start("mock", [bl.PYTHON, "-m", "gateway.cli", "mock-upstream", "--port",
                                 str(mock_port)], stderr=subprocess.DEVNULL, cwd=source.cwd,
                        env=source.env)
            procs.start("gateway", [bl.PYTHON, "-m", "gateway.cli", "serve", "--config",
                                    str(config), "--log-level", "ERROR"],
                        cwd=source.cwd, env=source.env)
            bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
            bl.wait_http(f"http://127.0.0.1:{gw_port}/readyz", procs=procs)
            results = asyncio.run(burst(f"http://127.0.0.1:{gw_port}", args.clients,
                                        args.rounds, args.latency_ms, stream))
        finally:
            procs.stop_all()
    times = sorted(t for status, t in results if status == 200)
    return {"commit": source.commit, "mode": "streamed" if stream else "not streamed",
            "statuses": collections.Counter(status for status, _ in results),
            "median_s": times[len(times) // 2] if times else None,
            "max_s": times[-1] if times else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", default="cfe0a60,HEAD")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=int, default=5000)
    args = parser.parse_args()
    bl.exit_on_sigterm()
    bl.raise_nofile()
    with tempfile.TemporaryDirectory() as tmp:
        header = bl.run_header(sys.argv, bl.GatewaySource(None, Path(tmp)))
    print("\n".join(header))
    model_s = args.latency_ms / 1000
    print(f"{args.clients} clients x {args.rounds} calls in a row; the model answers in "
          f"{model_s:g} s (unlimited capacity)\n")
    print(f"{'commit':8}  {'mode':13}  {'answers':24}  {'503':>4}  {'median':>8}  {'max':>8}")
    for ref in args.refs.split(","):
        for stream in (False, True):
            r = run(ref, stream, args)
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
            median = "-" if r["median_s"] is None else f"{r['median_s']:.1f} s"
            peak = "-" if r["max_s"] is None else f"{r['max_s']:.1f} s"
            print(f"{r['commit']:8}  {r['mode']:13}  {answers:24}  {r['statuses'][503]:>4}  "
                  f"{median:>8}  {peak:>8}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
