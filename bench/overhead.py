"""Gateway overhead against a bare pass-through proxy and against the mock upstream direct.

Starts, as separate processes on free loopback ports: the mock upstream, bench/passthrough.py
and the gateway (memory backend, bench/configs/overhead.yaml: no limits), plus a load
generator process (bench/loadgen.py). With 2+ CPUs the gateway and the pass-through are
pinned to the first CPU and the mock and the load generator to the second.

(a) closed loop: ``--concurrency`` connections each send the next non-streaming chat completion
    as soon as the last one answered, for ``--duration`` s; requests/s of mock-direct,
    passthrough and gateway, and the ratio gateway/passthrough (target >= 0.70). Uses ``wrk``
    when installed (cheap, so the mock's CPU is not shared with a Python client), else the
    aiohttp generator.
(b) open loop: ``--rate`` requests/s on a fixed schedule (aiohttp generator); latency p50/p99
    per variant and the gateway's added latency vs direct (target: < 1 ms at p50).

(c) observability cost (issue #6): two more gateways in the same rounds of (a): ``bare`` with
    metrics off (``server.metrics: false``) and tracing off, and ``observed`` with metrics on
    and OpenTelemetry tracing exporting over OTLP/HTTP to a sink process
    (bench/otlp_sink.py), sampling ``--trace-sample-ratio`` of the traces
    (parentbased_traceidratio); cost = 1 - observed/bare (target < 10 %). ``gateway`` itself
    runs with metrics on and tracing off, as shipped. ``--no-observability`` skips (c).

(d) translation cost (issue #21): one more gateway in the same rounds of (a), ``translated``,
    whose deployment is Anthropic-kind (the mock's /v1/messages), so every OpenAI chat request
    is translated to the Messages API and its answer back; CPU per request against ``gateway``
    (same config, same-dialect relay), target at most +10 %. ``--no-translated`` skips (d).
(e) ``--agent-history`` (only this part runs): the loop detector that reads the conversation
    (gateway/request/agent_loop.py) on a 50-message agent history (25 assistant tool calls, each with
    its tool result, no loop). In process: microseconds per ``find_loop`` against the
    ``orjson.loads`` of the same body that the gateway does anyway. End to end: two gateways,
    detector on (as shipped) and off, closed loop in alternating rounds; ratio on/off within
    each round, median over rounds.

Variants are measured alternately, ``--rounds`` times, in a rotating order; figures are
medians over rounds, ratios and differences are taken within a round. A full run with the
defaults takes about 150 s.

    .venv/bin/python bench/overhead.py [--duration 5] [--rounds 3] [--concurrency 64] [--rate 200]
                                       [--trace-sample-ratio 0.1] [--no-observability]
                                       [--no-translated]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl
import yaml

LATENCY_VARIANTS = ("direct", "passthrough", "gateway")  # (b)
OBSERVABILITY_VARIANTS = ("bare", "observed")  # (c)
TRANSLATED_VARIANTS = ("translated",)  # (d)
TARGET_TRANSLATION_CPU = 0.10
REQUEST_BODY = json.dumps({
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "You are a concise assistant."},
                 {"role": "user", "content": "Reply with five words."}],
    "max_tokens": 16,
}, separators=(",", ":"))
HEADERS = {"Authorization": f"Bearer {bl.DEMO_KEY}", "Content-Type": "application/json"}
PATH = "/v1/chat/completions"
TARGET_RATIO = 0.70
TARGET_ADDED_P50_MS = 1.0
TARGET_OBSERVABILITY_COST = 0.10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop connections")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unrecorded seconds before each aiohttp measurement")
    parser.add_argument("--no-wrk", action="store_true",
                        help="closed loop with the aiohttp generator even if wrk is installed")
    parser.add_argument("--gateway-ref", metavar="REF",
                        help="measure this commit (git archive of gateway/) instead of the "
                        "working tree, e.g. HEAD")
    parser.add_argument("--baseline-ref", metavar="REF",
                        help="also measure the gateway of this commit (e.g. main) in the same "
                        "rounds of (a), as variant 'baseline': throughput and CPU per request "
                        "of the gateway under test relative to it")
    parser.add_argument("--trace-sample-ratio", type=float, default=0.1,
                        help="share of traces the 'observed' gateway samples (OTEL_TRACES_"
                        "SAMPLER_ARG); 1 traces every request")
    parser.add_argument("--no-observability", action="store_true",
                        help="skip (c): no 'bare' and 'observed' gateways")
    parser.add_argument("--no-translated", action="store_true",
                        help="skip (d): no 'translated' gateway")
    parser.add_argument("--gateway-log-level", default="INFO",
                        help="the gateway's --log-level (INFO writes one access line a request)")
    parser.add_argument("--agent-history", action="store_true",
                        help="run (e) only: the conversation loop detector's cost on a "
                        "50-message history")
    args = parser.parse_args()
    if args.agent_history:
        return _agent_history(args)
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.rate <= 0:
        parser.error("rounds, duration, concurrency and rate must be positive")

    variants = LATENCY_VARIANTS + ((), OBSERVABILITY_VARIANTS)[not args.no_observability]
    variants += ("baseline",) if args.baseline_ref else ()
    variants += ((), TRANSLATED_VARIANTS)[not args.no_translated]

    bl.exit_on_sigterm()
    bl.raise_nofile()
    server_pin, support_pin, pin_desc = bl.pin_plan()
    wrk = None if args.no_wrk else shutil.which("wrk")
    procs = bl.Procs()
    tmp = tempfile.TemporaryDirectory(prefix="bench-overhead-")
    tmpdir = Path(tmp.name)
    loadgen: subprocess.Popen[str] | None = None
    t_begin = time.monotonic()
    try:
        source = bl.GatewaySource(args.gateway_ref, tmpdir)
        header = bl.run_header(sys.argv, source)
        mock_port, pt_port, gw_port = bl.free_port(), bl.free_port(), bl.free_port()
        config = bl.gateway_config(bl.BENCH / "configs" / "overhead.yaml", tmpdir, mock_port)
        mock_log = open(tmpdir / "mock.log", "wb")  # noqa: SIM115 (the children write it)
        gw_log = open(tmpdir / "gateway.log", "wb")  # noqa: SIM115
        mock = procs.start("mock", [*support_pin, bl.PYTHON, "-m", "gateway.cli", "mock-upstream",
                                    "--host", "127.0.0.1", "--port", str(mock_port)],
                           stderr=mock_log, cwd=source.cwd, env=source.env)
        passthrough = procs.start("passthrough", [
            *server_pin, bl.PYTHON, str(bl.BENCH / "passthrough.py"), "--port", str(pt_port),
            "--upstream", f"http://127.0.0.1:{mock_port}"], stderr=subprocess.DEVNULL)
        gateway = procs.start("gateway", [
            *server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(gw_port), "--log-level", args.gateway_log_level,
        ], stderr=gw_log, cwd=source.cwd, env=source.env)
        urls = {
            "direct": f"http://127.0.0.1:{mock_port}{PATH}",
            "passthrough": f"http://127.0.0.1:{pt_port}{PATH}",
            "gateway": f"http://127.0.0.1:{gw_port}{PATH}",
        }
        server_pid = {"direct": mock.pid, "passthrough": passthrough.pid, "gateway": gateway.pid}
        if not args.no_observability:
            sink_port = bl.free_port()
            procs.start("otlp-sink", [*support_pin, bl.PYTHON, str(bl.BENCH / "otlp_sink.py"),
                                      "--port", str(sink_port)])
            bare_config = tmpdir / "bare.yaml"
            bare = yaml.safe_load(config.read_text(encoding="utf-8"))
            bare.setdefault("server", {})["metrics"] = False
            bare_config.write_text(yaml.safe_dump(bare, sort_keys=False), encoding="utf-8")
            traced_env = {**(source.env or os.environ), "OTEL_TRACES_EXPORTER": "otlp",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                          "OTEL_SERVICE_NAME": "gateway-bench",
                          "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                          "OTEL_TRACES_SAMPLER_ARG": f"{args.trace_sample_ratio:g}"}
            for name, cfg, env in (("bare", bare_config, source.env),
                                   ("observed", config, traced_env)):
                port = bl.free_port()
                proc = procs.start(name, [
                    *server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config", str(cfg),
                    "--host", "127.0.0.1", "--port", str(port),
                    "--log-level", args.gateway_log_level,
                ], stderr=gw_log, cwd=source.cwd, env=env)
                urls[name] = f"http://127.0.0.1:{port}{PATH}"
                server_pid[name] = proc.pid
            bl.wait_http(f"http://127.0.0.1:{sink_port}/healthz", procs=procs)
        if args.baseline_ref:
            (tmpdir / "baseline").mkdir()
            base_source = bl.GatewaySource(args.baseline_ref, tmpdir / "baseline")
            header.append(f"baseline: {base_source.describe}")
            port = bl.free_port()
            proc = procs.start("baseline", [
                *server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config", str(config),
                "--host", "127.0.0.1", "--port", str(port),
                "--log-level", args.gateway_log_level,
            ], stderr=subprocess.DEVNULL, cwd=base_source.cwd, env=base_source.env)
            urls["baseline"] = f"http://127.0.0.1:{port}{PATH}"
            server_pid["baseline"] = proc.pid
        if not args.no_translated:
            # The same policy, its one deployment Anthropic-kind: every request is translated.
            translated = yaml.safe_load(config.read_text(encoding="utf-8"))
            provider = translated["providers"]["mock"]
            provider["kind"] = "anthropic"
            provider["base_url"] = provider["base_url"].removesuffix("/v1")
            translated_config = tmpdir / "translated.yaml"
            translated_config.write_text(yaml.safe_dump(translated, sort_keys=False),
                                         encoding="utf-8")
            port = bl.free_port()
            proc = procs.start("translated", [
                *server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config",
                str(translated_config), "--host", "127.0.0.1", "--port", str(port),
                "--log-level", args.gateway_log_level,
            ], stderr=gw_log, cwd=source.cwd, env=source.env)
            urls["translated"] = f"http://127.0.0.1:{port}{PATH}"
            server_pid["translated"] = proc.pid
        loadgen = procs.start("loadgen", [*support_pin, bl.PYTHON, str(bl.BENCH / "loadgen.py"),
                                          "serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        loadgen_io = _LoadgenIO(loadgen)
        bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
        bl.wait_http(f"http://127.0.0.1:{pt_port}/v1/models", procs=procs)
        for name in variants[2:]:
            bl.wait_http(urls[name].replace(PATH, "/healthz"), procs=procs)
        for name, url in urls.items():
            _check_answer(name, url, tmpdir / "gateway.log")

        print("\n".join(["LLM gateway overhead benchmark", *header,
                         f"pinning:  {pin_desc}",
                         (f"request:  POST {PATH}, non-streaming, {len(REQUEST_BODY)}-byte "
                          "body, mock answers 5 tokens"),
                         "closed-loop generator: "
                         + (f"wrk ({wrk}), 1 thread" if wrk else "aiohttp (bench/loadgen.py)"),
                         "open-loop generator:   aiohttp (bench/loadgen.py)", ""]), flush=True)

        # Warm-up: connections in every pool, code paths, allocator.
        for name in variants:
            loadgen_io.run({"op": "closed", "url": urls[name], "headers": HEADERS,
                            "body": REQUEST_BODY, "concurrency": args.concurrency,
                            "duration": 1.0, "warmup": 0.2})

        closed: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for name in _rotated(variants, r):
                cpu0 = {v: bl.proc_cpu_seconds(server_pid[v]) for v in variants}
                wait0 = bl.proc_wait_seconds(server_pid[name])
                t0 = time.monotonic()
                if wrk:
                    res = _wrk(wrk, support_pin, urls[name], args, tmpdir)
                else:
                    res = loadgen_io.run({"op": "closed", "url": urls[name], "headers": HEADERS,
                                          "body": REQUEST_BODY, "concurrency": args.concurrency,
                                          "duration": args.duration, "warmup": args.warmup})
                wall = time.monotonic() - t0
                cpu1 = {v: bl.proc_cpu_seconds(server_pid[v]) for v in variants}
                res["cpu_server"] = (cpu1[name] - cpu0[name]) / wall
                res["cpu_mock"] = (cpu1["direct"] - cpu0["direct"]) / wall
                res["wait_server"] = (bl.proc_wait_seconds(server_pid[name]) - wait0) / wall
                closed[name].append(res)
                print(f"  closed round {r + 1}/{args.rounds} {name:<11} "
                      f"{res['rps']:8.0f} req/s  errors {res['errors']}", flush=True)
                procs.check_alive()

        opened: dict[str, list[dict[str, Any]]] = {v: [] for v in LATENCY_VARIANTS}
        for r in range(args.rounds):
            for name in _rotated(LATENCY_VARIANTS, r):
                res = loadgen_io.run({"op": "open", "url": urls[name], "headers": HEADERS,
                                      "body": REQUEST_BODY, "rate": args.rate,
                                      "duration": args.duration, "warmup": args.warmup})
                opened[name].append(res)
                print(f"  open   round {r + 1}/{args.rounds} {name:<11} "
                      f"p50 {res['p50_ms']:6.3f} ms  p99 {res['p99_ms']:6.3f} ms  "
                      f"errors {res['errors']}", flush=True)
                procs.check_alive()

        gw_log.flush()
        problems = _log_problems(tmpdir / "gateway.log")
        print()
        print(_report(args, closed, opened, bool(wrk), problems))
        print(f"\n(total run time {time.monotonic() - t_begin:.0f} s; at the end: "
              f"{bl.cpu_pressure()})")
        ok = all(r.get("errors", 1) == 0 for rs in (*closed.values(), *opened.values())
                 for r in rs)
        return 0 if ok else 1
    finally:
        if loadgen is not None and loadgen.poll() is None and loadgen.stdin:
            try:
                loadgen.stdin.write('{"op": "quit"}\n')
                loadgen.stdin.flush()
            except OSError:
                pass
        procs.stop_all()
        tmp.cleanup()


class _LoadgenIO:
    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.stdout = proc.stdout

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.stdin.write(json.dumps(cmd) + "\n")
        self.stdin.flush()
        limit = float(cmd.get("duration", 0)) + float(cmd.get("warmup", 0)) + 60
        res: dict[str, Any] = json.loads(bl.readline_timeout(self.stdout, self.proc, limit))
        if "error" in res:
            raise RuntimeError(f"load generator: {res['error']}")
        return res


def _rotated(variants: tuple[str, ...], r: int) -> list[str]:
    k = r % len(variants)
    return list(variants[k:] + variants[:k])


def _check_answer(name: str, url: str, log: Path) -> None:
    status, text = bl.post(url, REQUEST_BODY.encode(), HEADERS)
    if status != 200 or b'"choices"' not in text:
        raise RuntimeError(f"{name}: a test request failed: HTTP {status} {text[:300]!r}\n"
                           f"gateway log tail:\n{bl.log_tail(log)}")


def _wrk(wrk: str, pin: list[str], url: str, args: argparse.Namespace,
         tmpdir: Path) -> dict[str, Any]:
    script = tmpdir / "post.lua"
    if not script.exists():
        lines = ['wrk.method = "POST"', f"wrk.body = [[{REQUEST_BODY}]]"]
        lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items()]
        script.write_text("\n".join(lines) + "\n")
    seconds = max(1, round(args.duration))
    out = subprocess.run(
        [*pin, wrk, "-t1", f"-c{args.concurrency}", f"-d{seconds}s", "--latency",
         "--timeout", "10s", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30, check=False,
    ).stdout
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", out, re.MULTILINE)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (m and rps):
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)

    def pct(q: str) -> float:
        found = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not found:
            return float("nan")
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[found.group(2)]
        return float(found.group(1)) * scale

    return {"rps": float(rps.group(1)), "ok": int(m.group(1)), "errors": errors,
            "p50_ms": pct("50"), "p99_ms": pct("99")}


def _log_problems(path: Path) -> list[str]:
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if b'"level":"error"' in line or b'"level":"warning"' in line \
                        or b"Traceback" in line:
                    out.append(line.decode(errors="replace").strip()[:300])
    except OSError:
        pass
    return out


def _fmt(x: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.{digits}f}"


def _report(args: argparse.Namespace, closed: dict[str, list[dict[str, Any]]],
            opened: dict[str, list[dict[str, Any]]], used_wrk: bool, problems: list[str]) -> str:
    rounds = args.rounds
    lines = []
    med = {v: bl.median([r["rps"] for r in closed[v]]) for v in closed}
    per_round_ratio = [g["rps"] / p["rps"] if p["rps"] else float("nan")
                       for g, p in zip(closed["gateway"], closed["passthrough"])]
    ratio = bl.median(per_round_ratio)
    lines.append(f"(a) closed loop: {args.concurrency} connections, non-streaming chat "
                 f"completions, {rounds} rounds x {max(1, round(args.duration)) if used_wrk else args.duration:g} s "
                 f"per variant ({'wrk' if used_wrk else 'aiohttp generator'})")
    head = f"  {'variant':<12}" + "".join(f"{'round ' + str(i + 1):>10}" for i in range(rounds))
    head += f"{'median':>10}{'vs pass':>9}{'p50 ms':>9}{'p99 ms':>9}{'srv CPU':>9}{'srv wait':>9}{'mock CPU':>9}{'errors':>8}"
    lines.append(head)
    for v in closed:
        rs = closed[v]
        row = f"  {v:<12}" + "".join(f"{_fmt(r['rps']):>10}" for r in rs)
        rel = med[v] / med["passthrough"] if med["passthrough"] else float("nan")
        row += f"{_fmt(med[v]):>10}{_fmt(rel, 2):>9}"
        row += f"{_fmt(bl.median([r['p50_ms'] for r in rs]), 2):>9}"
        row += f"{_fmt(bl.median([r['p99_ms'] for r in rs]), 2):>9}"
        row += f"{bl.median([r['cpu_server'] for r in rs]) * 100:>8.0f}%"
        row += f"{bl.median([r['wait_server'] for r in rs]) * 100:>8.0f}%"
        row += f"{bl.median([r['cpu_mock'] for r in rs]) * 100:>8.0f}%"
        row += f"{sum(r['errors'] for r in rs):>8}"
        lines.append(row)
    lines.append("  (req/s; 'vs pass' = median / passthrough median; srv CPU = share of a core used "
                 "by the process under test, srv wait = share of the time it was runnable but "
                 "waited for a CPU (other load on the machine), mock CPU = used by the mock; "
                 "latency = median over rounds)")
    verdict = "MET" if ratio >= TARGET_RATIO else "NOT MET"
    lines.append(f"  gateway/passthrough throughput ratio: {ratio:.2f} (median of per-round ratios "
                 f"{', '.join(f'{x:.2f}' for x in per_round_ratio)}); target >= "
                 f"{TARGET_RATIO:.2f}: {verdict}")
    if not used_wrk:
        lines.append("  note: the aiohttp generator shares a CPU with the mock, so mock-direct and "
                     "passthrough may be limited by that CPU; the ratio then errs high.")
    lines.append("")
    lines.append(f"(b) open loop: {args.rate:g} req/s for {args.duration:g} s per variant, "
                 f"{rounds} rounds (latency from send to full body, aiohttp client)")
    lines.append(f"  {'variant':<12}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
                 f"{'req/s':>8}{'errors':>8}{'+p50 ms':>9}{'+p99 ms':>9}")
    added: dict[str, tuple[float, float]] = {}
    for v in LATENCY_VARIANTS:
        rs = opened[v]
        d50 = bl.median([a["p50_ms"] - b["p50_ms"] for a, b in zip(rs, opened["direct"])])
        d99 = bl.median([a["p99_ms"] - b["p99_ms"] for a, b in zip(rs, opened["direct"])])
        added[v] = (d50, d99)
        lines.append(
            f"  {v:<12}{bl.median([r['p50_ms'] for r in rs]):>9.3f}"
            f"{bl.median([r['p90_ms'] for r in rs]):>9.3f}{bl.median([r['p99_ms'] for r in rs]):>9.3f}"
            f"{max(r['max_ms'] for r in rs):>9.2f}{bl.median([r['rps'] for r in rs]):>8.0f}"
            f"{sum(r['errors'] + r.get('dropped', 0) for r in rs):>8}"
            + ("" if v == "direct" else f"{d50:>+9.3f}{d99:>+9.3f}"))
    lag99 = max(r["sched_lag_p99_ms"] for rs in opened.values() for r in rs)
    lines.append("  (medians over rounds; +p50/+p99 = that percentile minus direct's, same round, "
                 f"median over rounds; generator schedule lag p99 <= {lag99:.2f} ms)")
    g50, g99 = added["gateway"]
    p50, p99 = added["passthrough"]
    verdict = "MET" if g50 < TARGET_ADDED_P50_MS else "NOT MET"
    lines.append(f"  gateway added latency vs direct: p50 {g50:+.3f} ms, p99 {g99:+.3f} ms "
                 f"(passthrough: p50 {p50:+.3f} ms, p99 {p99:+.3f} ms); "
                 f"gateway vs passthrough: p50 {g50 - p50:+.3f} ms")
    lines.append(f"  target: gateway added p50 < {TARGET_ADDED_P50_MS:g} ms: {verdict}")
    if "observed" in closed:
        lines.append("")
        lines.append(_observability_report(args, closed))
    if "baseline" in closed:
        lines.append("")
        lines.append(_baseline_report(args, closed))
    if "translated" in closed:
        lines.append("")
        lines.append(_translation_report(closed))
    if problems:
        lines.append("")
        lines.append(f"gateway log: {len(problems)} warning/error line(s), first: {problems[0]}")
    return "\n".join(lines)


def _baseline_report(args: argparse.Namespace,
                     closed: dict[str, list[dict[str, Any]]]) -> str:
    """The gateway under test against --baseline-ref, from the same rounds of (a)."""
    def cpu_per_request(r: dict[str, Any]) -> float:
        return r["cpu_server"] / r["rps"] if r["rps"] else float("nan")

    rps = [g["rps"] / b["rps"] if b["rps"] else float("nan")
           for g, b in zip(closed["gateway"], closed["baseline"])]
    cpu = [cpu_per_request(g) / cpu_per_request(b)
           for g, b in zip(closed["gateway"], closed["baseline"])]
    return "\n".join([
        f"(d) against the baseline ({args.baseline_ref}), same rounds of (a)",
        (f"  gateway/baseline throughput: {bl.median(rps):.3f} (per round "
         f"{', '.join(f'{x:.3f}' for x in rps)})"),
        (f"  gateway/baseline CPU per request: {bl.median(cpu):.3f} (per round "
         f"{', '.join(f'{x:.3f}' for x in cpu)}); 1.05 = 5 % more per request"),
    ])


def _observability_report(args: argparse.Namespace,
                          closed: dict[str, list[dict[str, Any]]]) -> str:
    """(c): what metrics and tracing cost, from the same rounds of (a)."""
    def cost(name: str) -> tuple[float, list[float]]:
        per_round = [1 - o["rps"] / b["rps"] if b["rps"] else float("nan")
                     for o, b in zip(closed[name], closed["bare"])]
        return bl.median(per_round), per_round

    def cpu_us(name: str) -> float:
        """CPU per request (us): steadier than req/s here, where the VM's speed swings."""
        return bl.median([r["cpu_server"] / r["rps"] * 1e6 for r in closed[name] if r["rps"]])

    observed, observed_rounds = cost("observed")
    metrics_only, _ = cost("gateway")
    cpu = {name: cpu_us(name) for name in ("bare", "gateway", "observed")}
    verdict = "MET" if observed < TARGET_OBSERVABILITY_COST else "NOT MET"
    return "\n".join([
        f"(c) observability: 'bare' = metrics and tracing off; 'gateway' = metrics on; "
        f"'observed' = metrics on + tracing, {args.trace_sample_ratio:g} of traces sampled "
        "(OTLP/HTTP to bench/otlp_sink.py)",
        f"  metrics cost {metrics_only:.1%} of bare throughput; metrics + tracing cost "
        f"{observed:.1%} (per round {', '.join(f'{x:.1%}' for x in observed_rounds)}); "
        f"target < {TARGET_OBSERVABILITY_COST:.0%}: {verdict}",
        f"  CPU per request (median over rounds): bare {cpu['bare']:.0f} us, gateway "
        f"{cpu['gateway']:.0f} us ({cpu['gateway'] / cpu['bare'] - 1:+.1%}), observed "
        f"{cpu['observed']:.0f} us ({cpu['observed'] / cpu['bare'] - 1:+.1%})",
    ])


def history_body(messages: int = 50) -> dict[str, Any]:
    """An agent conversation of ``messages`` messages: a system and a user message, then
    assistant tool calls (distinct arguments: no loop) each followed by its tool result."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [
        {"role": "system", "content": "You are an agent. Use the tools."},
        {"role": "user", "content": "Collect the quarterly figures for every region."}]}
    i = 0
    while len(body["messages"]) < messages:
        body["messages"].append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {
                "name": "fetch_figures",
                "arguments": json.dumps({"region": f"region-{i}", "quarter": "Q3",
                                         "fields": ["revenue", "cost", "headcount"]})}}]})
        body["messages"].append({"role": "tool", "tool_call_id": f"call_{i}",
                                 "content": f"region-{i}: revenue 1200, cost 800, headcount 31"})
        i += 1
    return body


def _agent_history(args: argparse.Namespace) -> int:
    """(e): the loop detector on a 50-message history, in process and end to end."""
    import orjson

    from gateway.request.agent_loop import CanonicalCache, find_loop

    body = history_body()
    raw = orjson.dumps(body)
    assert find_loop(body, 5, 8) is None

    def per_call_us(fn: Any, n: int = 20_000) -> float:
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        return best

    detect_us = per_call_us(lambda: find_loop(body, 5, 8))  # every argument string new
    cache = CanonicalCache()  # as in a run: the history's earlier calls were seen before
    cached_us = per_call_us(lambda: find_loop(body, 5, 8, cache))
    parse_us = per_call_us(lambda: orjson.loads(raw))
    bl.exit_on_sigterm()
    bl.raise_nofile()
    server_pin, support_pin, pin_desc = bl.pin_plan()
    procs = bl.Procs()
    tmp = tempfile.TemporaryDirectory(prefix="bench-history-")
    tmpdir = Path(tmp.name)
    loadgen: subprocess.Popen[str] | None = None
    try:
        source = bl.GatewaySource(args.gateway_ref, tmpdir)
        header = bl.run_header(sys.argv, source)
        mock_port = bl.free_port()
        config = bl.gateway_config(bl.BENCH / "configs" / "overhead.yaml", tmpdir, mock_port)
        procs.start("mock", [*support_pin, bl.PYTHON, "-m", "gateway.cli", "mock-upstream",
                             "--host", "127.0.0.1", "--port", str(mock_port)],
                    stderr=subprocess.DEVNULL, cwd=source.cwd, env=source.env)
        off = yaml.safe_load(config.read_text(encoding="utf-8"))
        off["tenants"]["acme"]["agent_loop"] = {"enabled": False}
        off_config = tmpdir / "detector-off.yaml"
        off_config.write_text(yaml.safe_dump(off, sort_keys=False), encoding="utf-8")
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        for name, cfg in (("detector-on", config), ("detector-off", off_config)):
            port = bl.free_port()
            pids[name] = procs.start(name, [*server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config",
                               str(cfg), "--host", "127.0.0.1", "--port", str(port),
                               "--log-level", "WARNING"],
                        stderr=subprocess.DEVNULL, cwd=source.cwd, env=source.env).pid
            urls[name] = f"http://127.0.0.1:{port}{PATH}"
        loadgen = procs.start("loadgen", [*support_pin, bl.PYTHON,
                                          str(bl.BENCH / "loadgen.py"), "serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        io = _LoadgenIO(loadgen)
        for url in urls.values():
            bl.wait_http(url.replace(PATH, "/healthz"), procs=procs)
            status, text = bl.post(url, raw, HEADERS)
            if status != 200:
                raise RuntimeError(f"{url}: HTTP {status} {text[:300]!r}")
        body_text = raw.decode()
        print("\n".join(["Loop detector on a 50-message agent history", *header,
                         f"pinning:  {pin_desc}",
                         f"request:  POST {PATH}, {len(raw)}-byte body, 25 tool calls", ""]),
              flush=True)
        for url in urls.values():  # warm-up
            io.run({"op": "closed", "url": url, "headers": HEADERS, "body": body_text,
                    "concurrency": args.concurrency, "duration": 1.0, "warmup": 0.2})
        rps: dict[str, list[float]] = {name: [] for name in urls}
        cpu_us: dict[str, list[float]] = {name: [] for name in urls}  # CPU per request
        for r in range(args.rounds):
            for name in _rotated(tuple(urls), r):
                cpu0 = bl.proc_cpu_seconds(pids[name])
                res = io.run({"op": "closed", "url": urls[name], "headers": HEADERS,
                              "body": body_text, "concurrency": args.concurrency,
                              "duration": args.duration, "warmup": args.warmup})
                rps[name].append(res["rps"])
                served = res["rps"] * (args.duration + args.warmup)
                cpu_us[name].append((bl.proc_cpu_seconds(pids[name]) - cpu0) / served * 1e6
                                    if served else float("nan"))
                print(f"  round {r + 1}/{args.rounds} {name:<13} {res['rps']:8.0f} req/s  "
                      f"{cpu_us[name][-1]:6.0f} us CPU/request  errors {res['errors']}",
                      flush=True)
        ratios = [on / off_ if off_ else float("nan")
                  for on, off_ in zip(rps["detector-on"], rps["detector-off"])]
        cpu_ratios = [on / off_ for on, off_ in zip(cpu_us["detector-on"],
                                                      cpu_us["detector-off"])]
        print()
        print(f"(e) in process: find_loop {cached_us:.1f} us per request with the history's "
              f"arguments seen before (a run's next step), {detect_us:.1f} us with all 25 new; "
              f"orjson.loads of the same body {parse_us:.1f} us (detector = "
              f"{cached_us / parse_us:.2f}x / {detect_us / parse_us:.2f}x the parse the gateway "
              "does anyway)")
        print(f"    end to end: detector on / off throughput {bl.median(ratios):.3f} (per round "
              f"{', '.join(f'{x:.3f}' for x in ratios)}); medians on "
              f"{bl.median(rps['detector-on']):.0f}, off {bl.median(rps['detector-off']):.0f} "
              "req/s")
        print(f"    CPU per request (steadier on a shared machine): on / off "
              f"{bl.median(cpu_ratios):.3f} (per round "
              f"{', '.join(f'{x:.3f}' for x in cpu_ratios)}); medians on "
              f"{bl.median(cpu_us['detector-on']):.0f} us, off "
              f"{bl.median(cpu_us['detector-off']):.0f} us")
        return 0
    finally:
        if loadgen is not None and loadgen.poll() is None and loadgen.stdin:
            try:
                loadgen.stdin.write('{"op": "quit"}\n')
                loadgen.stdin.flush()
            except OSError:
                pass
        procs.stop_all()
        tmp.cleanup()


def _translation_report(closed: dict[str, list[dict[str, Any]]]) -> str:
    """(d): what translating OpenAI chat <-> Anthropic Messages costs, from the rounds of (a)."""
    def cpu_per_request(name: str) -> list[float]:
        return [r["cpu_server"] / r["rps"] * 1e6 if r["rps"] else float("nan")
                for r in closed[name]]

    same, translated = cpu_per_request("gateway"), cpu_per_request("translated")
    per_round = [t / g - 1 for t, g in zip(translated, same)]
    extra = bl.median(per_round)
    throughput = bl.median([t["rps"] / g["rps"] if g["rps"] else float("nan")
                            for t, g in zip(closed["translated"], closed["gateway"])])
    verdict = "MET" if extra <= TARGET_TRANSLATION_CPU else "NOT MET"
    return "\n".join([
        "(d) translation: 'translated' = the same gateway with an Anthropic-kind deployment "
        "(OpenAI chat request -> Messages API -> chat completion); 'gateway' relays the same "
        "dialect",
        f"  CPU per request (median over rounds): gateway {bl.median(same):.0f} us, translated "
        f"{bl.median(translated):.0f} us; translation adds {extra:+.1%} (per round "
        f"{', '.join(f'{x:+.1%}' for x in per_round)}); throughput translated/gateway "
        f"{throughput:.2f}; target <= +{TARGET_TRANSLATION_CPU:.0%}: {verdict}",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
