"""What one admission costs, the admit script and its in-process twin: a base commit against
the working tree, measured alternately in one run.

Each variant admits the plan the gateway builds for a tenant with requests/min, tokens/min,
max concurrent, a daily token budget and the loop guard (two GCRA checks, a lease, a counter,
a repeat counter), with limits far above the load so every request is admitted:
- ``lua``: ``admit.lua`` by EVALSHA on a redis-server on loopback, one call at a time.
  Figures: the server's own time per call (INFO commandstats, usec_per_call: the script's
  cost, free of client noise) and the round trip seen by the client;
- ``twin``: ``LocalLimits.admit`` (memory backend, degraded mode), CPU time per call.
The base variant is ``gateway/state/plan.py`` and ``gateway/state/lua/admit.lua`` as of --base,
read with ``git show`` (default: where this branch left main); the other is the working tree.

Run: .venv/bin/python bench/admit_script.py [--base REF] [--rounds 5] [--calls 3000]
Traffic goes to 127.0.0.1 only; every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
TAG = "{t:bench}"


def git_show(ref: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=30).stdout


def load_module(name: str, source: str, tmp: Path) -> ModuleType:
    path = tmp / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building classes
    spec.loader.exec_module(module)
    return module


def plan(rl: Any, variant: str, i: int) -> Any:
    """The plan of one request (gateway/limits/limiter.py's shape), as module ``rl`` spells it."""
    exact = hasattr(rl, "GCRA_KEY_SUFFIX")
    rpm, tpm = 10_000_000, 10**10
    p = f"rl:{TAG}:{variant}:"
    interval = (lambda n: Fraction(60_000, n)) if exact else (lambda n: 60_000 / n)
    checks = (
        rl.Gcra(p + "req", interval(rpm), rpm // 10, 1, "requests"),
        rl.Gcra(p + "tok", interval(tpm), tpm, 500, "tokens"),
        rl.Lease(p + "conc", 100_000, 300_000),
        rl.Counter(p + "b:d", 10**12, 500, 86_400_000, 3_600_000),
        rl.Repeat(p + "loop:x", 10**9, 60_000),
    )
    rid = f"{variant}{i % 100}"  # 100 requests in flight: the lease set stays that size
    return rl.AdmitPlan(rid, checks, f"rl:{TAG}:hold:{rid}", 60_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lua_block(client: redis.Redis, sha: str, rl: Any, variant: str, calls: int) -> tuple[
    float, float
]:
    """(server us per call, client us per call) for ``calls`` admissions."""
    encoded = [rl.encode_admit(plan(rl, variant, i), "") for i in range(calls)]
    client.flushall()
    client.config_resetstat()
    started = time.perf_counter()
    for keys, args in encoded:
        if not client.evalsha(sha, len(keys), *keys, *args)[0]:
            raise SystemExit(f"{variant}: a request was refused; the bench measures admission")
    wall = (time.perf_counter() - started) / calls * 1e6
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return float(stats["usec_per_call"]), wall


def twin_block(rl: Any, variant: str, calls: int) -> float:
    now = [1000.0]
    limits = rl.LocalLimits(lambda: now[0])
    plans = [plan(rl, variant, i) for i in range(calls)]
    started = time.process_time()  # CPU time: other processes on the machine do not count
    for p in plans:
        now[0] += 0.0001
        limits.admit(p)
    return (time.process_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="default: git merge-base main HEAD")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    if not redis_bin:
        raise SystemExit("redis-server is needed")
    if args.base is None:
        args.base = subprocess.run(["git", "merge-base", "main", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.strip()
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
    from gateway.state import plan as current

    lua: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
    twin: dict[str, list[float]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "base": (load_module("ratelimit_base", git_show(args.base, "gateway/state/plan.py"),
                                 Path(tmp)), git_show(args.base, "gateway/state/lua/admit.lua")),
            "new": (current, (ROOT / "gateway/state/lua/admit.lua").read_text(encoding="utf-8")),
        }
        port = free_port()
        proc = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            shas = {n: client.script_load(src) for n, (_, src) in variants.items()}
            for n, (rl, _) in variants.items():  # warm up
                lua_block(client, shas[n], rl, n, 200)
                twin_block(rl, n, 200)
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for n in order:
                    lua[n].append(lua_block(client, shas[n], variants[n][0], n, args.calls))
                    twin[n].append(twin_block(variants[n][0], n, args.calls))
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    print(f"# bench/admit_script.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"base {args.base} ({base_sha}) vs working tree at {head}  "
          f"{' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"{'variant':<6} {'lua server us/call (rounds)':<38} {'median':>7} "
          f"{'client us':>10} {'twin us/call':>13}")
    med = {}
    for n in variants:
        server = [s for s, _ in lua[n]]
        med[n] = (statistics.median(server), statistics.median(w for _, w in lua[n]),
                  statistics.median(twin[n]))
        rounds = ", ".join(f"{s:.1f}" for s in server)
        print(f"{n:<6} {rounds:<38} {med[n][0]:>7.1f} {med[n][1]:>10.1f} {med[n][2]:>13.1f}")
    ratios = [lua["new"][i][0] / lua["base"][i][0] for i in range(args.rounds)]
    print(f"new/base: lua server {med['new'][0] / med['base'][0]:.2f}x (per round "
          f"{', '.join(f'{x:.2f}' for x in ratios)}), client round trip "
          f"{med['new'][1] / med['base'][1]:.2f}x, twin {med['new'][2] / med['base'][2]:.2f}x")


if __name__ == "__main__":
    main()
