"""What tracing costs: the gateway with OpenTelemetry tracing on (every request sampled,
exported over OTLP/HTTP to a collector stub; --sample-ratio to sample a share) vs the same gateway with tracing off, measured
alternately in one run. Metrics cannot be switched off (they are the gateway's own
instruments); their per-request cost is measured in-process with timeit and printed beside.

Run: .venv/bin/python bench/observability.py [--rounds 3] [--duration 4] [--rate 200]
Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import ROOT, alternate, free_port, start, wait_http  # noqa: E402


async def collector(port: int) -> tuple[web.AppRunner, list[int]]:
    """An OTLP/HTTP endpoint that accepts and counts span batches."""
    batches = [0]

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        batches[0] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, batches


def metrics_cost_us() -> float:
    """observe_request for one full record, in microseconds (best of 5)."""
    from gateway.config import load_config
    from gateway.context import AttemptRecord, RequestRecord
    from gateway.metrics import GatewayMetrics

    config = load_config(ROOT / "config/example.yaml")
    metrics = GatewayMetrics(config)
    record = RequestRecord("r", 0.0, route="/v1/chat/completions", tenant="acme",
                           model="gpt-4o-mini", deployment="mock/gpt-4o-mini-2024-07-18",
                           priority="normal", status=200, attempts=1, limits_s=0.0002,
                           queue_s=0.0, first_byte_s=0.01, ttft_s=0.01, upstream_s=0.02,
                           total_s=0.021, prompt_tokens_estimate=10, context_window=128000)
    record.attempt_log.append(AttemptRecord("mock/gpt-4o-mini-2024-07-18", "success", 0.02,
                                            0.01))
    n = 20_000
    return min(timeit.repeat(lambda: metrics.observe_request(record), number=n, repeat=5)) \
        / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--sample-ratio", type=float, default=1.0,
                        help="OTEL_TRACES_SAMPLER=parentbased_traceidratio with this ratio")
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    otlp_port, mock_port = free_port(), free_port()
    runner, batches = await collector(otlp_port)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            procs.append(start([sys.executable, "-m", "gateway.cli", "mock-upstream",
                                "--port", str(mock_port)]))
            policy = yaml.safe_load((ROOT / "bench/configs/overhead.yaml").read_text())
            policy["providers"]["mock"]["base_url"] = f"http://127.0.0.1:{mock_port}/v1"
            policy.setdefault("server", {})["drain_delay_s"] = 0
            path = Path(tmp) / "policy.yaml"
            path.write_text(yaml.safe_dump(policy))
            traced_env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp",
                          "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                          "OTEL_SERVICE_NAME": "gateway-bench", "GATEWAY_LOG_LEVEL": "WARNING",
                          "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                          "OTEL_TRACES_SAMPLER_ARG": str(args.sample_ratio)}
            ports = {"off": free_port(), "tracing": free_port()}
            procs.append(start([sys.executable, "-m", "gateway.cli", "serve", "--config",
                                str(path), "--port", str(ports["off"])]))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port",
                 str(ports["tracing"])], env=traced_env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            for port in ports.values():
                await wait_http(f"http://127.0.0.1:{port}/readyz")
            urls = {n: f"http://127.0.0.1:{p}/v1/chat/completions" for n, p in ports.items()}
            rps, lat = await alternate(urls, args)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            await runner.cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"# bench/observability.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"commit {commit}  {' '.join(sys.argv[1:]) or '(defaults)'}")
    med = {n: statistics.median(v) for n, v in rps.items()}
    for n in urls:
        p50 = statistics.median(x[0] for x in lat[n])
        p99 = statistics.median(x[1] for x in lat[n])
        rounds = ", ".join(f"{x:.0f}" for x in rps[n])
        print(f"{n:<8} req/s {rounds:<24} median {med[n]:>6.0f} ({med[n] / med['off']:.2f}x)"
              f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    print(f"span batches received by the collector: {batches[0]}")
    print(f"tracing (sample ratio {args.sample_ratio:g}) costs "
          f"{1 - med['tracing'] / med['off']:.1%} of throughput (target < 10 %); "
          f"metrics: observe_request {metrics_cost_us():.1f} us per request")


if __name__ == "__main__":
    asyncio.run(main())
