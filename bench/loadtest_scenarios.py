"""Run the shipped loadtest scenarios (config/scenarios/*.yaml) against the demo setup and
record what they show in docs/benchmarks.md (``## Loadtest``).

For each scenario: a fresh mock upstream (``gateway mock-upstream``, unlimited capacity, as in
the demo) and a fresh ``gateway serve`` with config/example.yaml (ports moved to free ones),
on loopback; the scenario runs in this process with the loadtest engine, exactly as
``gateway loadtest`` would run it. The Redis outage drill gets a ``redis-server`` of its own, a
gateway on ``state.backend: redis``, and the phase hooks filled in to stop and start that
Redis (LOADTEST_REDIS_STOP / LOADTEST_REDIS_START). Reports (JSON) and plots (PNG) go to
--out-dir.

    .venv/bin/python bench/loadtest_scenarios.py [--only burst,steady] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import benchlib as bl
import yaml
from overload_report import write_docs

from gateway.loadtest.engine import Engine, EngineOptions
from gateway.loadtest.plots import plot_report
from gateway.loadtest.report import build_report, write_report
from gateway.loadtest.scenario import load_scenario, parse_scenario

SCENARIOS = bl.REPO / "config" / "scenarios"
ORDER = ("steady", "burst", "spike-and-recover", "diurnal", "brownout", "redis-outage")


def _policy(tmpdir: Path, mock_port: int, gw_port: int, redis: bool) -> Path:
    data = yaml.safe_load((bl.REPO / "config" / "example.yaml").read_text())
    data["server"]["port"] = gw_port
    for provider in data["providers"].values():
        provider["base_url"] = provider["base_url"].replace("127.0.0.1:9000",
                                                            f"127.0.0.1:{mock_port}")
    if redis:
        data["state"]["backend"] = "redis"
    out = tmpdir / "policy.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _redis(port: int) -> tuple[str, str]:
    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if not server or not cli:
        raise SystemExit("redis-outage needs redis-server and redis-cli (apt-get install "
                         "redis-server)")
    start = f"{server} --port {port} --bind 127.0.0.1 --save '' --appendonly no --daemonize yes"
    stop = f"{cli} -p {port} shutdown nosave"
    return start, stop


def run_one(name: str, out_dir: Path, tmpdir: Path) -> dict[str, Any]:
    procs = bl.Procs()
    logs = contextlib.ExitStack()

    def log(name: str) -> IO[bytes]:
        return logs.enter_context(open(tmpdir / name, "wb"))

    server_pin, support_pin, _ = bl.pin_plan()
    mock_port, gw_port = bl.free_port(), bl.free_port()
    redis = name == "redis-outage"
    env = dict(os.environ)
    stop_redis = None
    if redis:
        redis_port = bl.free_port()
        start, stop_redis = _redis(redis_port)
        subprocess.run(start, shell=True, check=True, timeout=10)
        env.update(REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", LOADTEST_REDIS_STOP=stop_redis,
                   LOADTEST_REDIS_START=start)
    try:
        procs.start("mock", [*support_pin, bl.PYTHON, "-m", "gateway.cli", "mock-upstream",
                             "--port", str(mock_port)], stderr=subprocess.DEVNULL)
        config = _policy(tmpdir, mock_port, gw_port, redis)
        procs.start("gateway", [*server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config",
                                str(config), "--log-level", "WARNING"], env=env,
                    stderr=log(f"gateway-{name}.log"))
        bl.wait_http(f"http://127.0.0.1:{gw_port}/readyz", procs=procs)
        scenario = load_scenario(SCENARIOS / f"{name}.yaml")
        target = f"http://127.0.0.1:{gw_port}"
        engine = Engine(scenario, scenario.api_keys(),
                        EngineOptions(target=target, allow_hooks=redis))
        os.environ.update({k: v for k, v in env.items() if k.startswith("LOADTEST_")})
        print(f"[{name}] {scenario.duration_s:.0f} s against {target}", flush=True)
        asyncio.run(engine.run())
        report: dict[str, Any] = build_report(
            engine, source=f"config/scenarios/{name}.yaml",
            command=f"gateway loadtest {name} --target {target}")
        write_report(report, out_dir / f"{name}.json")
        plot_report(report, out_dir / f"{name}.png")
        return report
    finally:
        procs.stop_all()
        logs.close()
        if stop_redis is not None:
            subprocess.run(stop_redis, shell=True, timeout=10, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def engine_check(rate: float, seconds: float, streams: int) -> dict[str, Any]:
    """The generator against the mock directly (bench/mockserver.py: big backlog, no GC), on
    separate CPUs: (1) ``rate`` non-streaming requests/s for ``seconds``; (2) ``streams``
    concurrent streams (20 chunks 250 ms apart), opened over 2 s."""
    procs = bl.Procs()
    server_pin, support_pin, _ = bl.pin_plan()
    port = bl.free_port()
    mine = os.sched_getaffinity(0)
    try:
        procs.start("mock", [*support_pin, bl.PYTHON, str(bl.BENCH / "mockserver.py"), "--port",
                             str(port)], stderr=subprocess.DEVNULL)
        bl.wait_http(f"http://127.0.0.1:{port}/v1/models", procs=procs)
        if server_pin:
            os.sched_setaffinity(0, {int(server_pin[-1])})
        base = {"name": "engine-check", "seed": 1, "tenants": {"t": {"api_key": "k"}},
                "drain_s": 30, "bucket_s": 1}
        rate_run = {**base, "workloads": [{
            "name": "w", "tenant": "t", "priority": "high", "prompt_tokens": {"median": 100},
            "max_tokens": {"median": 16}}],
            "phases": [{"name": "rate", "duration_s": seconds,
                        "arrival": {"process": "poisson", "rate": rate}}]}
        stream_run = {**base, "workloads": [{
            "name": "w", "tenant": "t", "stream": 1.0, "prompt_tokens": {"median": 100},
            "max_tokens": {"median": 20}}],
            "phases": [{"name": "streams", "duration_s": 2.0,
                        "arrival": {"process": "constant", "rate": streams / 2.0},
                        "upstream": {"chunk_gap_ms": 250}}]}
        out = {}
        for key, data in (("rate", rate_run), ("streams", stream_run)):
            spec = parse_scenario(data)
            engine = Engine(spec, spec.api_keys(),
                            EngineOptions(target=f"http://127.0.0.1:{port}"))
            peak = [0]

            async def go(engine: Engine = engine, peak: list[int] = peak) -> None:
                task = asyncio.create_task(engine.run())
                while not task.done():
                    peak[0] = max(peak[0], engine.live.in_flight)
                    await asyncio.sleep(0.05)
                await task

            cpu0 = time.process_time()
            asyncio.run(go())
            cpu = time.process_time() - cpu0
            report = build_report(engine)
            overall = report["overall"]
            out[key] = {"requests": overall["requests"], "ok": overall["outcomes"]["ok"],
                        "achieved_rps": report["phases"][0]["stats"]["achieved_rps"],
                        "cpu_us_per_request": 1e6 * cpu / max(1, overall["requests"]),
                        "cpu_share": report["engine"]["cpu_share"],
                        "arrival_lag_ms": report["engine"]["arrival_lag_ms"],
                        "peak_in_flight": peak[0], "warnings": report["engine"]["warnings"]}
        return out
    finally:
        os.sched_setaffinity(0, mine)
        procs.stop_all()


def _engine_lines(check: dict[str, Any], rate: float, streams: int) -> list[str]:
    r, s = check["rate"], check["streams"]
    lag = r["arrival_lag_ms"]
    lines = [
        "",
        "### The generator itself",
        "",
        (f"Against the mock directly (bench/mockserver.py on the other CPU), the engine pinned to "
        f"one CPU: Poisson {rate:g} requests/s (non-streaming) -> achieved "
        f"{r['achieved_rps']:.0f}/s, {r['ok']} of {r['requests']} ok, "
        f"{r['cpu_us_per_request']:.0f} us of CPU per request (mean CPU "
        f"{100 * (r['cpu_share']['mean'] or 0):.0f} % of a core), arrival lag p50 "
        f"{lag['p50']:.2f} ms, p99 {lag['p99']:.1f} ms. Streams: {streams} opened over 2 s, "
        f"20 chunks 250 ms apart each -> peak {s['peak_in_flight']} in flight, {s['ok']} of "
        f"{s['requests']} complete, {s['cpu_us_per_request']:.0f} us of CPU per stream."),
    ]
    lines += [f"\nGenerator warning: {w}" for w in r["warnings"] + s["warnings"]]
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _row(label: str, s: dict[str, Any]) -> str:
    o = s["outcomes"]
    errors = sum(v for k, v in o.items() if k not in ("ok", "shed", "rate_limited", "cancelled"))
    runs = s["runs"]
    return (f"| {label} | {s['requests']} | {s['offered_rps']:.1f} | {s['achieved_rps']:.1f} | "
            f"{_pct(s['success_ratio'])} | {o['shed']} | {o['rate_limited']} | {errors} | "
            f"{_ms(s['latency_ms']['p50'])} | {_ms(s['latency_ms']['p99'])} | "
            f"{_ms(s['ttft_ms']['p99'])} | {s['goodput_rps']:.1f} | "
            f"{runs['completed']}/{runs['started']} | {s['amplification'] or 0:.2f} |")


HEAD = ("| | requests | offered/s | ok/s | ok | shed 503 | 429 | errors | p50 ms | p99 ms | "
        "TTFT p99 ms | goodput/s | runs done | ampl |\n|---|" + "---|" * 13)


def section(reports: dict[str, dict[str, Any]], header: list[str], pin_desc: str,
            engine_lines: list[str]) -> str:
    lines = [
        "## Loadtest",
        "",
        ("The shipped scenarios (config/scenarios/) run by `bench/loadtest_scenarios.py` with the "
        "loadtest engine against the demo setup: `gateway serve` with config/example.yaml "
        "(default admission policy, memory state; Redis for the outage drill) in front of the "
        "mock upstream with unlimited capacity, each scenario on a fresh gateway. Rows per "
        "class, then per phase. Latency is of successes, client view (retries included); "
        "errors are every outcome but ok, shed and 429; ampl = HTTP attempts per request. "
        "`gateway loadtest NAME --plot` reproduces one run and its plot; `gateway loadtest "
        "--compare A.json B.json` compares two."),
        "",
        "```",
        *header,
        f"pinning:  {pin_desc}",
        "```",
        *engine_lines,
    ]
    for name, r in reports.items():
        summary = (f"{r['scenario']['description']}. {r['duration_s']:.0f} s of phases + "
                   f"{r['drain_s']:.0f} s drain, {r['attempts_sent']} HTTP requests.")
        lines += ["", f"### {name}", "", summary, "", HEAD, _row("**overall**", r["overall"])]
        lines += [_row(f"class {k}", v) for k, v in r["classes"].items()]
        lines += [_row(f"phase {p['name']}", p["stats"]) for p in r["phases"]]
        for hook in r["hooks"]:
            status = hook.get("skipped") or f"exit status {hook.get('exit_status')}"
            lines.append(f"\nHook at {hook['at_s']:.0f} s ({hook['phase']}): `{hook['command']}`"
                         f" -> {status}.")
        lines += [f"\nGenerator warning: {w}" for w in r["engine"]["warnings"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--out-dir", default=None, help="reports and plots (default: a temp dir)")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--engine-rate", type=float, default=2000.0,
                        help="requests/s of the generator check (0: skip the check)")
    parser.add_argument("--engine-streams", type=int, default=3000)
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(ORDER)
    bl.exit_on_sigterm()
    bl.raise_nofile()
    header = bl.run_header(sys.argv, bl.GatewaySource(None, Path(tempfile.gettempdir())))
    _, support_pin, pin_desc = bl.pin_plan()
    engine_lines: list[str] = []
    if args.engine_rate > 0:
        check = engine_check(args.engine_rate, 10.0, args.engine_streams)
        engine_lines = _engine_lines(check, args.engine_rate, args.engine_streams)
        print("\n".join(engine_lines), flush=True)
    if support_pin:
        os.sched_setaffinity(0, {int(support_pin[-1])})
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="loadtest-scenarios-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    reports = {}
    with tempfile.TemporaryDirectory(prefix="bench-scenarios-") as tmp:
        for name in names:
            reports[name] = run_one(name, out_dir, Path(tmp))
    text = section(reports, header, pin_desc, engine_lines)
    print(text)
    print(f"reports and plots: {out_dir}; total {time.monotonic() - started:.0f} s")
    if args.write_docs:
        write_docs(bl.REPO / "docs" / "benchmarks.md", text, heading="## Loadtest")
        print("docs/benchmarks.md: ## Loadtest section updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
