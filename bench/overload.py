"""Overload control: the gateway with its admission control on, then off, at 2x, 3x and 10x the
upstream's capacity, driven by the loadtest engine (gateway/loadtest).

The upstream is the mock with a capacity model (``gateway mock-upstream --slots``): ``--slots``
concurrent generations, each a stream of ``--tokens`` chunks ``--gap-ms`` apart after a first
token at ``--ttft-ms``; requests beyond the slots queue (first tokens later by
``--queue-ttft-ms`` per request ahead), and beyond ``--max-queue`` waiting or the RPM quota it
answers 429 with Retry-After. Capacity (requests/s) is measured from the mock's own counters:
slots x served / slot-seconds busy.

Traffic: open-loop Poisson arrivals (bursty on/off at 10x) of 10-step agent runs (one
X-Agent-Session per run, think time between steps), class mix 10 % critical, 30 % high, 30 %
normal, 30 % low, SDK-like clients (2 retries honouring Retry-After and x-should-retry),
deadlines per class sent as X-Request-Timeout. Load L means arrivals of L x capacity / 10 runs/s.
Each level has a warm-up, a measured window and a tail at the same load (so the measured runs
finish under the same load), then a quiet gap. Figures are of the measured window; runs are
the runs that *started* in it.

Variants (separate processes, fresh mock each; the gateway is pinned to the first CPU, the
mock and this process to the second, when there are two):
- ``on``: the gateway with admission tuned for this upstream (see ``policy``);
- ``defaults``: the gateway with no ``admission:`` section at all (the shipped defaults: what a
  user who does not know the provider's capacity gets);
- ``off``: the same gateway with admission disabled: concurrency limit 10000, unbounded
  queues, CoDel targets of an hour, self-protection out of reach (``--off-mode passthrough``
  uses bench/passthrough.py instead).

Upstreams: ``--slots 4,16,64`` runs every variant against each slot count in turn (a section
of docs/benchmarks.md each); ``--quota-rpm N`` without ``--slots`` is a provider limited only
by its quota: unlimited slots, 429 with Retry-After beyond N requests per minute (capacity N/60
requests/s).

    .venv/bin/python bench/overload.py [--write-docs] [--variants on,defaults,off]
        [--slots 4,16,64 | --quota-rpm 3400] [--measure-s 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import benchlib as bl
import yaml
from overload_report import docs_section, evaluate, print_summary, write_docs

from gateway.loadtest.engine import Engine, EngineOptions
from gateway.loadtest.report import build_report
from gateway.loadtest.scenario import Dist, parse_scenario
from gateway.request.auth import hash_key

CLASSES = {"critical": 0.10, "high": 0.30, "normal": 0.30, "low": 0.30}
DEADLINES_S = {"critical": 5, "high": 10, "normal": 20, "low": 30}
KEYS = {"interactive": "sk-bench-interactive", "background": "sk-bench-background"}
ADMIN_KEY = "sk-bench-admin"  # --trace reads /admin/status
TENANT_OF = {"critical": "interactive", "high": "interactive", "normal": "background",
             "low": "background"}
STEPS = 10
UNLIMITED_SLOTS = 100_000  # a quota-limited provider: slots are never the limit


def ttft_dist(args: argparse.Namespace) -> Dist:
    """The mock's first token: --ttft-ms always, or a lognormal with that median and
    --ttft-p99-ms, and a share --ttft-slow-share of them --ttft-slow-factor times slower
    (drawn per request)."""
    return Dist(median=args.ttft_ms, p99=args.ttft_p99_ms, slow_share=args.ttft_slow_share,
                slow_factor=args.ttft_slow_factor)


def ttft_drawn(args: argparse.Namespace) -> bool:
    """Whether the mock's first token is drawn per request (else always --ttft-ms)."""
    return bool(args.ttft_p99_ms is not None or args.ttft_slow_share > 0)


def policy(mock_port: int, gw_port: int, slots: int, variant: str,
           holdback: dict[str, float]) -> dict[str, Any]:
    """The gateway's policy. ``on``: concurrency pinned to the mock's slots (min half), queue
    targets short enough that agent steps do not wait seconds; ``defaults``: no ``admission``
    section; ``off``: admission disabled."""
    shedding = variant == "on"
    tenants = {name: {"api_keys": [hash_key(key)], "models": ["*"],
                      "default_priority": "normal", "max_priority": "critical",
                      "loop_guard": {"enabled": False}}
               for name, key in KEYS.items()}
    if shedding:
        admission: dict[str, Any] = {
            "concurrency": {"min_limit": max(1, slots // 2), "initial_limit": slots,
                            "max_limit": slots},
            "classes": {
                "critical": {"queue_target_ms": 100, "max_queue": 200, "holdback_share": 1.0,
                             "default_deadline_s": DEADLINES_S["critical"]},
                "high": {"queue_target_ms": 300, "max_queue": 200,
                         "holdback_share": holdback["high"],
                         "default_deadline_s": DEADLINES_S["high"]},
                "normal": {"queue_target_ms": 500, "max_queue": 200,
                           "holdback_share": holdback["normal"],
                           "default_deadline_s": DEADLINES_S["normal"]},
                "low": {"queue_target_ms": 500, "max_queue": 100,
                        "holdback_share": holdback["low"],
                        "default_deadline_s": DEADLINES_S["low"]},
            },
        }
    else:
        hour = 3_600_000
        admission = {
            "concurrency": {"min_limit": 10000, "initial_limit": 10000, "max_limit": 10000},
            "classes": {name: {"queue_target_ms": hour, "max_queue": 100000,
                               "holdback_share": 1.0, "default_deadline_s": DEADLINES_S[name]}
                        for name in CLASSES},
            "self_protection": {"max_loop_lag_ms": 60000, "max_open_streams": 1000000},
        }
    out = {
        "server": {"host": "127.0.0.1", "port": gw_port},
        "providers": {"mock": {"kind": "openai", "base_url": f"http://127.0.0.1:{mock_port}/v1",
                               "pool_size": 2000, "forward_headers": ["x-mock-*"]}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": tenants,
        "admission": admission,
        # For --trace: the limit's own view (/admin/status), read twice a second.
        "admin": {"api_keys": [hash_key(ADMIN_KEY)]},
    }
    if variant == "defaults":
        del out["admission"]
    return out


def scenario(target: str, run_rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Phases: an unloaded baseline, then per level warm-up / measured / tail / gap."""
    # A first token that scatters (--ttft-p99-ms, --ttft-slow-share) is drawn per request.
    ttft: float | dict[str, Any] = (
        ttft_dist(args).model_dump(exclude_defaults=True) if ttft_drawn(args)
        else args.ttft_ms)
    knobs = {"ttft_ms": ttft, "chunk_gap_ms": args.gap_ms}
    workloads = [{
        "name": name, "tenant": TENANT_OF[name], "priority": name, "weight": share,
        "model": "m", "stream": 1.0, "steps": STEPS, "think_ms": {"median": 50, "p99": 200},
        "prompt_tokens": {"median": 300, "p99": 2000}, "max_tokens": {"median": 64},
        "output_tokens": {"median": args.tokens}, "deadline_s": DEADLINES_S[name],
        "timeout_s": 60,
    } for name, share in CLASSES.items()]
    phases: list[dict[str, Any]] = [{
        "name": "unloaded", "duration_s": args.baseline_s,
        "arrival": {"process": "poisson", "rate": 0.3 * run_rate},
        "mix": {"critical": 1.0},  # the critical class's own unloaded time to first token
        "upstream": knobs,
    }]
    for level in args.levels:
        rate = level * run_rate
        bursty = level >= 10  # the 10x level arrives in on/off bursts (same mean)
        arrival: dict[str, Any] = (
            {"process": "onoff", "rate": 2 * rate, "off_rate": 0.0, "on_s": 1.0, "off_s": 1.0}
            if bursty else {"process": "poisson", "rate": rate})
        name = f"{level:g}x"
        phases += [
            {"name": f"{name}-warm", "duration_s": args.warm_s, "arrival": arrival,
             "upstream": knobs},
            {"name": name, "duration_s": args.measure_s, "arrival": arrival, "upstream": knobs},
        ]
        if level < 10:
            phases.append({"name": f"{name}-tail", "duration_s": args.tail_s,
                           "arrival": arrival, "upstream": knobs})
        phases.append({"name": f"{name}-gap", "duration_s": args.gap_s,
                       "arrival": {"process": "poisson", "rate": 0}, "upstream": knobs})
    return {
        "name": "overload", "target": target, "seed": args.seed,
        "tenants": {name: {"api_key": key} for name, key in KEYS.items()},
        "workloads": workloads, "client": {"retries": 2, "backoff": "sdk"},
        "phases": phases, "drain_s": args.tail_s, "max_requests": 2_000_000, "bucket_s": 1.0,
    }


class RssSampler(threading.Thread):
    """The gateway's resident memory once a second (KiB), while the load runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(1.0):
            kib = bl.proc_status_kib(self.pid, "VmRSS")
            if kib > 0:
                self.samples.append((round(time.monotonic() - start, 1), kib))


class LimitSampler(threading.Thread):
    """The gateway's concurrency limit, in-flight and queued requests, and its sheds so far
    by class and reason, twice a second (from /metrics), for ``--trace``: how the limit moved
    while the load ran. Also the limit's own view from ``/admin/status`` (``upstream_queue``,
    ``upstream_queue_top``, ``ttft_baseline_s``) and the mock's busy slots and queue (``mock_in_use``,
    ``mock_queued``): whether a wait was the gateway's or the provider's, and what the limit
    made of it."""

    NAMES = ("gateway_concurrency_limit", "gateway_deployment_in_flight_requests",
             "gateway_queued_requests")

    def __init__(self, gateway_url: str, mock_url: str) -> None:
        super().__init__(daemon=True)
        self.gateway_url = gateway_url
        self.mock_url = mock_url
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(0.5):
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/metrics", timeout=2) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            sample = {"t": round(time.monotonic() - start, 1)}
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in self.NAMES:
                    short = name.removeprefix("gateway_").split("_")[0]
                    sample[short] = sample.get(short, 0.0) + float(line.rsplit(" ", 1)[1])
                elif name == "gateway_sheds_total":  # sheds so far, by class and reason
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                    key = f"shed_{labels.get('priority')}_{labels.get('reason')}"
                    sample[key] = float(line.rsplit(" ", 1)[1])
            try:
                status = _get_json(f"{self.gateway_url}/admin/status", timeout=2,
                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                mock = _get_json(self.mock_url, timeout=2)
            except OSError:
                status, mock = {}, {}
            for view in status.get("admission", {}).get("deployments", {}).values():
                for key in ("upstream_queue", "upstream_queue_top", "ttft_baseline_s"):
                    if view.get(key) is not None:
                        sample[key] = float(view[key])
            for key in ("in_use", "queued"):
                if key in mock:
                    sample[f"mock_{key}"] = float(mock[key])
            self.samples.append(sample)


def _get_json(url: str, timeout: float = 5,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def run_variant(name: str, args: argparse.Namespace, tmpdir: Path,
                source: bl.GatewaySource) -> dict[str, Any]:
    procs = bl.Procs()
    logs = contextlib.ExitStack()

    def log(name: str) -> IO[bytes]:
        return logs.enter_context(open(tmpdir / name, "wb"))

    server_pin, support_pin, _ = bl.pin_plan()
    mock_port, gw_port = bl.free_port(), bl.free_port()
    try:
        procs.start("mock", [
            *support_pin, bl.PYTHON, "-m", "gateway.cli", "mock-upstream", "--port",
            str(mock_port), "--slots", str(args.slots), "--max-queue", str(args.max_queue),
            "--queue-ttft-ms", str(args.queue_ttft_ms), "--quota-rpm", str(args.quota_rpm)],
            stderr=log(f"mock-{name}.log"), cwd=source.cwd, env=source.env)
        if name == "off" and args.off_mode == "passthrough":
            server = procs.start("passthrough", [
                *server_pin, bl.PYTHON, str(bl.BENCH / "passthrough.py"), "--port", str(gw_port),
                "--upstream", f"http://127.0.0.1:{mock_port}", "--pool-size", "2000"],
                stderr=log("passthrough.log"))
            ready = f"http://127.0.0.1:{gw_port}/v1/models"
        else:
            config = tmpdir / f"policy-{name}.yaml"
            config.write_text(yaml.safe_dump(policy(mock_port, gw_port, args.tuned_slots,
                                                    variant=name, holdback=args.holdback)))
            server = procs.start("gateway", [
                *server_pin, bl.PYTHON, "-m", "gateway.cli", "serve", "--config", str(config),
                "--log-level", "WARNING"],
                stderr=log(f"gateway-{name}.log"), cwd=source.cwd, env=source.env)
            ready = f"http://127.0.0.1:{gw_port}/readyz"
        bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
        bl.wait_http(ready, procs=procs)
        # Capacity from the mock's knobs first (the plan), measured from its counters after.
        service_s = (ttft_dist(args).mean() + (args.tokens - 1) * args.gap_ms) / 1000
        planned = args.quota_rpm / 60 if args.quota_only else args.slots / service_s
        data = scenario(f"http://127.0.0.1:{gw_port}", planned / STEPS, args)
        spec = parse_scenario(data)
        engine = Engine(spec, spec.api_keys(), EngineOptions(target=data["target"]))
        rss = RssSampler(server.pid)
        rss.start()
        limits = LimitSampler(f"http://127.0.0.1:{gw_port}",
                              f"http://127.0.0.1:{mock_port}/_mock/capacity")
        if args.trace and name != "off":
            limits.start()
        print(f"[{name}] running {spec.duration_s:.0f} s of phases against {data['target']} "
              f"({'gateway' if name != 'off' or args.off_mode == 'gateway' else 'passthrough'})",
              flush=True)
        asyncio.run(engine.run())
        rss.stop.set()
        rss.join()
        if limits.is_alive():
            limits.stop.set()
            limits.join()
            with open(f"{args.trace}.{name}.jsonl", "w", encoding="utf-8") as out:
                out.writelines(json.dumps(s) + "\n" for s in limits.samples)
        alive = server.poll() is None
        healthy = alive and _answers(ready)
        capacity = _get_json(f"http://127.0.0.1:{mock_port}/_mock/capacity")
        report = build_report(engine, source="bench/overload.py")
        busy = capacity["busy_s"]
        # A quota-limited upstream's capacity is its quota (slots are never busy).
        measured = (planned if args.quota_only or not busy
                    else args.slots * capacity["served"] / busy)
        return {"variant": name, "report": report, "mock": capacity,
                "capacity_rps": measured, "planned_capacity_rps": planned,
                "rss_kib": rss.samples, "alive": alive, "healthy": healthy,
                "mode": "gateway" if name != "off" or args.off_mode == "gateway"
                else "passthrough"}
    finally:
        procs.stop_all()
        logs.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="on,defaults,off")
    parser.add_argument("--gateway-ref", metavar="REF",
                        help="measure this commit (git archive of gateway/), not the working "
                        "tree")
    parser.add_argument("--off-mode", choices=("gateway", "passthrough"), default="gateway")
    parser.add_argument("--levels", default="2,3,10", type=lambda s: [float(x) for x in
                                                                      s.split(",")])
    parser.add_argument("--slots", type=lambda s: [int(x) for x in s.split(",")],
                        help="the mock's generation slots, e.g. 4,16,64 for a sweep (default "
                        "16; without it but with --quota-rpm: unlimited slots)")
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--ttft-p99-ms", type=float,
                        help="first tokens scatter as hosted models' do: lognormal with median "
                        "--ttft-ms and this 99th percentile, drawn per request (default: every "
                        "first token at --ttft-ms)")
    parser.add_argument("--ttft-slow-share", type=float, default=0.0,
                        help="a provider's slow few: this share of first tokens is "
                        "--ttft-slow-factor times slower (a cache miss, a busy replica)")
    parser.add_argument("--ttft-slow-factor", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--queue-ttft-ms", type=float, default=5.0)
    parser.add_argument("--quota-rpm", type=int, default=0,
                        help="the mock's RPM quota (0: 1.5x the planned capacity); alone, "
                        "without --slots: a provider limited by its quota only")
    parser.add_argument("--baseline-s", type=float, default=12.0)
    parser.add_argument("--warm-s", type=float, default=5.0)
    parser.add_argument("--measure-s", type=float, default=15.0)
    parser.add_argument("--tail-s", type=float, default=10.0)
    parser.add_argument("--gap-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--holdback", default="high=0.95,normal=0.95,low=0.9",
                        type=lambda s: {k: float(v) for k, v in
                                        (kv.split("=") for kv in s.split(","))},
                        help="holdback shares of the on policy (the gateway's defaults are "
                        "high=0.95,normal=0.85,low=0.7)")
    parser.add_argument("--json", help="write every figure (and both reports) here")
    parser.add_argument("--trace", metavar="PREFIX",
                        help="write each gateway variant's concurrency limit, in-flight and "
                        "queued requests, twice a second, to PREFIX.<variant>.jsonl")
    parser.add_argument("--write-docs", action="store_true",
                        help="record the figures in docs/benchmarks.md (## Overload section)")
    args = parser.parse_args()
    bl.exit_on_sigterm()
    bl.raise_nofile()
    started = time.monotonic()
    source_dir = tempfile.TemporaryDirectory(prefix="bench-overload-src-")
    source = bl.GatewaySource(args.gateway_ref, Path(source_dir.name))
    header = bl.run_header(sys.argv, source)
    _, support_pin, pin_desc = bl.pin_plan()
    if support_pin:
        os.sched_setaffinity(0, {int(support_pin[-1])})  # this process drives the load
    service_s = (ttft_dist(args).mean() + (args.tokens - 1) * args.gap_ms) / 1000
    quota_only = args.slots is None and args.quota_rpm > 0
    for slots in ([UNLIMITED_SLOTS] if quota_only else args.slots or [16]):
        setup = argparse.Namespace(**vars(args))
        setup.slots, setup.quota_only, setup.steps = slots, quota_only, STEPS
        if quota_only:
            # The tuned policy pins the concurrency that fills the quota and no more.
            setup.tuned_slots = max(1, math.ceil(args.quota_rpm / 60 * service_s))
        else:
            setup.tuned_slots = slots
            setup.quota_rpm = args.quota_rpm or int(1.5 * 60 * slots / service_s)
        results = []
        with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
            for name in args.variants.split(","):
                results.append(run_variant(name, setup, Path(tmp), source))
        figures = evaluate(results, setup)
        print_summary(figures, header, pin_desc)
        label = (f"quota-limited ({setup.quota_rpm} RPM, unlimited slots)" if quota_only
                 else f"{slots} slots")
        if args.ttft_p99_ms is not None:
            label += f", first tokens scattered (p99 {args.ttft_p99_ms:g} ms)"
        if args.ttft_slow_share > 0:
            label += (f", {100 * args.ttft_slow_share:g} % of first tokens "
                      f"{args.ttft_slow_factor:g}x slower")
        if args.json:
            path = Path(args.json)
            if len(args.slots or []) > 1:
                path = path.with_name(f"{path.stem}-{slots}{path.suffix}")
            path.write_text(json.dumps({"figures": figures, "runs": results}, indent=1))
        if args.write_docs:
            heading = f"## Overload: {label}"
            write_docs(bl.REPO / "docs" / "benchmarks.md",
                       docs_section(figures, header, pin_desc, heading), heading)
            print(f"docs/benchmarks.md: {heading} section updated")
    print(f"\n(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
