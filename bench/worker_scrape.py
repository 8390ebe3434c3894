"""What a /metrics scrape costs when it covers every worker (``gateway serve --workers N``).

Starts the mock upstream and ``gateway serve --workers N`` (memory backend,
bench/configs/overhead.yaml) for each N given, sends ``--requests`` chat completions on fresh
connections (so every worker has series), then times ``--scrapes`` scrapes of /metrics, each on
a fresh connection (the kernel picks the worker), and checks that every scrape reports the same
request total. Prints per N: scrape latency p50/p90/max, body size, and how many distinct
workers served the scrapes. N = 1 is the single-process baseline (no merge).

    .venv/bin/python bench/worker_scrape.py [--workers 1 2 4] [--requests 400] [--scrapes 60]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchlib as bl
import yaml
from prometheus_client.parser import text_string_to_metric_families

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
HEADERS = {"Authorization": f"Bearer {bl.DEMO_KEY}", "Content-Type": "application/json"}


def _requests_total(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "gateway_requests_total")


def measure(workers: int, args: argparse.Namespace, tmpdir: Path, mock_port: int) -> str:
    port = bl.free_port()
    config = bl.gateway_config(bl.BENCH / "configs" / "overhead.yaml", tmpdir, mock_port)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data.setdefault("server", {})["drain_delay_s"] = 0  # stop at once between runs
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    procs = bl.Procs()
    log = open(tmpdir / f"gateway-{workers}.log", "wb")  # noqa: SIM115 (the child writes it)
    try:
        procs.start("gateway", [bl.PYTHON, "-m", "gateway.cli", "serve", "--config",
                                str(config), "--host", "127.0.0.1", "--port", str(port),
                                "--workers", str(workers)], stderr=log)
        base = f"http://127.0.0.1:{port}"
        bl.wait_http(base + "/readyz", procs=procs)
        time.sleep(1.0)  # every worker listening (readyz answers from the first)
        for _ in range(args.requests):
            status, _text = bl.post(base + "/v1/chat/completions", BODY, HEADERS)
            if status != 200:
                raise RuntimeError(f"request failed: HTTP {status}")
        latencies, sizes, totals, served = [], [], set(), set()
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
                body = resp.read()
                served.add(resp.headers.get("x-gateway-worker", "-"))
            latencies.append((time.perf_counter() - t0) * 1000)
            sizes.append(len(body))
            totals.add(_requests_total(body.decode()))
        latencies.sort()
        p90 = latencies[int(0.9 * (len(latencies) - 1))]
        return (f"  workers {workers}: scrape p50 {statistics.median(latencies):6.2f} ms  "
                f"p90 {p90:6.2f} ms  max {latencies[-1]:6.2f} ms  body {statistics.median(sizes):,.0f} B  "
                f"served by {len(served)} worker(s)  request totals seen {sorted(totals)}")
    finally:
        procs.stop_all()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--scrapes", type=int, default=60)
    args = parser.parse_args()
    bl.exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="bench-scrape-") as tmp:
        tmpdir = Path(tmp)
        source = bl.GatewaySource(None, tmpdir)
        print("\n".join(["/metrics scrape cost with --workers N", *bl.run_header(sys.argv, source),
                         (f"traffic: {args.requests} chat completions, then {args.scrapes} "
                          "scrapes, each on a fresh connection")]), flush=True)
        mock_port = bl.free_port()
        procs = bl.Procs()
        try:
            procs.start("mock", [bl.PYTHON, "-m", "gateway.cli", "mock-upstream", "--host",
                                 "127.0.0.1", "--port", str(mock_port)],
                        stderr=subprocess.DEVNULL)
            bl.wait_http(f"http://127.0.0.1:{mock_port}/v1/models", procs=procs)
            for workers in args.workers:
                print(measure(workers, args, tmpdir, mock_port), flush=True)
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
