"""Bodies crafted to be costly to read: what one tenant sending them does to another's calls.

A tenant's limits count requests and tokens, not what a body costs the event loop every
tenant shares to parse, check and count, and a body refused as bad input counts against no
limit at all. ``--attackers`` connections of one key send, in turn, for ``--duration`` s:

- ``lists``: 10 MB of nested empty lists in ``tools`` (3.3 million lists; refused for size);
- ``keys``: 9.6 MB of ``metadata`` with 416,666 distinct keys (no prompt: admitted);
- ``arguments``: an assistant tool call whose ``arguments`` string is 3.9 MB of nested empty
  lists, with ``X-Agent-Session`` (the loop detector parses it), on a 1,000,000-token model.

Meanwhile another tenant (the victim) sends a small chat completion every 50 ms. Printed per
gateway commit (``--refs``, all in one invocation so they compare within the run): the
victim's answers by status and latency (median, p99, maximum), and the attacker's answers by
status. The gateway has the shipped admission defaults; the mock upstream answers at once.
Traffic goes to 127.0.0.1 only; bounded in count and time.

    .venv/bin/python bench/hostile_bodies.py [--refs 221533e,HEAD] [--duration 20]
        [--attackers 3] [--work-share 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
import orjson
import yaml

from gateway.request.auth import hash_key

ATTACKER, VICTIM = "sk-bench-attacker", "sk-bench-victim"
MAX_ATTACKS = 5_000  # bounded whatever the duration


def policy(mock_port: int, gw_port: int, work_share: float | None) -> dict[str, Any]:
    admission = {} if work_share is None else {
        "admission": {"self_protection": {"tenant_work_share": work_share}}}
    return {**admission,
        "server": {"host": "127.0.0.1", "port": gw_port},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1"}},
        "models": {"big": {"deployments": [{"provider": "mock", "model": "big"}],
                           "context_window": 1_000_000},
                   "m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": {"attacker": {"api_keys": [hash_key(ATTACKER)], "models": ["*"]},
                    "victim": {"api_keys": [hash_key(VICTIM)], "models": ["*"]}},
    }


def bodies() -> list[tuple[str, bytes, dict[str, str]]]:
    chat = b'{"model":"big","max_tokens":1,"messages":[{"role":"user","content":"x"}]'
    lists = chat + b',"tools":[' + b",".join([b"[]"] * 3_300_000) + b"]}"
    keys = chat + b',"metadata":{' + b",".join(
        b'"key%012d":1' % i for i in range(416_666)) + b"}}"
    arguments = "[" + ",".join(["[]"] * 1_300_000) + "]"
    history = orjson.dumps({"model": "big", "max_tokens": 1, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]})
    return [("lists", lists, {}), ("keys", keys, {}),
            ("arguments", history, {"X-Agent-Session": "run-1"})]


async def attack(base: str, args: argparse.Namespace) -> dict[str, Any]:
    shapes = bodies()
    victim: list[tuple[int, float]] = []
    attacker: collections.Counter[str] = collections.Counter()
    until = time.monotonic() + args.duration
    timeout = aiohttp.ClientTimeout(total=60)
    url = f"{base}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def attacker_loop(offset: int) -> None:
            n = offset
            while time.monotonic() < until and sum(attacker.values()) < MAX_ATTACKS:
                name, body, extra = shapes[n % len(shapes)]
                n += 1
                headers = {"authorization": f"Bearer {ATTACKER}",
                           "content-type": "application/json", **extra}
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        attacker[f"{name} {resp.status}"] += 1
                except (aiohttp.ClientError, TimeoutError):
                    attacker[f"{name} error"] += 1

        async def victim_loop() -> None:
            body = {"model": "m", "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}]}
            headers = {"authorization": f"Bearer {VICTIM}"}
            while time.monotonic() < until:
                began = time.monotonic()
                try:
                    async with session.post(url, json=body, headers=headers) as resp:
                        await resp.read()
                        victim.append((resp.status, time.monotonic() - began))
                except (aiohttp.ClientError, TimeoutError):
                    victim.append((0, time.monotonic() - began))
                await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - began)))

        await asyncio.gather(victim_loop(), *(attacker_loop(i) for i in range(args.attackers)))
    return {"victim": victim, "attacker": attacker}


def run(ref: str, args: argparse.Namespace) -> dict[str, Any]:
    server_pin, support_pin, _ = bl.pin_plan()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        source = bl.GatewaySource(ref, Path(tmp))
        procs = bl.Procs()
        mock_port, gw_port = bl.free_port(), bl.free_port()
        config = Path(tmp) / "policy.yaml"
        config.write_text(yaml.safe_dump(policy(mock_port, gw_port, args.work_share)))
        try:
            procs.start("mock", [*support_pin, bl.PYTHON, "-m", "gateway.cli", "mock-upstream",
                                 "--port", str(mock_port)], stderr=subprocess.DEVNULL,
                        cwd=source.cwd, env=source.env)
            procs.start("gateway", [*server_pin, bl.PYTHON, "-m", "gateway.cli", "serve",
                                    "--config", str(config), "--log-level", "ERROR"],
                        cwd=source.cwd, env=source.env)
            bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
            bl.wait_http(f"http://127.0.0.1:{gw_port}/readyz", procs=procs)
            result = asyncio.run(attack(f"http://127.0.0.1:{gw_port}", args))
        finally:
            procs.stop_all()
    result["commit"] = source.commit
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", default="221533e,HEAD")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--attackers", type=int, default=3)
    parser.add_argument("--work-share", type=float, default=None,
                        help="admission.self_protection.tenant_work_share (default: shipped)")
    args = parser.parse_args()
    args.duration = min(args.duration, 120.0)
    bl.exit_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(bl.run_header(sys.argv, bl.GatewaySource(None, Path(tmp)))))
    cores = bl.cpus()
    if len(cores) >= 2:  # the load (this process) beside the mock, off the gateway's CPU
        os.sched_setaffinity(0, {cores[1]})
    print(f"{args.attackers} attacker connections for {args.duration:g} s; the victim sends a "
          "small chat completion every 50 ms\n")
    print(f"{'commit':8}  {'victim answers':28}  {'p50':>7}  {'p99':>7}  {'max':>7}  attacker")
    for ref in args.refs.split(","):
        r = run(ref, args)
        statuses = collections.Counter(status for status, _ in r["victim"])
        times = sorted(t for _, t in r["victim"])
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
        attacker = ", ".join(f"{k}: {v}" for k, v in sorted(r["attacker"].items()))
        print(f"{r['commit']:8}  {answers:28}  {1000 * bl.percentile(times, 50):5.0f} ms  "
              f"{1000 * bl.percentile(times, 99):5.0f} ms  {1000 * times[-1]:5.0f} ms  "
              f"{attacker}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
