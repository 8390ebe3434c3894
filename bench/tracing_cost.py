"""CPU that OpenTelemetry tracing costs per request, in-process, export included.

Drives the gateway's own span code (gateway/observability/tracing.py: a SERVER span, auth/limits/relay
stages, one CLIENT attempt span with traceparent injection, the summary attributes) with the
SDK configured from the same OTEL_* variables `gateway serve` reads, exporting over OTLP/HTTP to
bench/otlp_sink.py (started here). 4,000 requests in bursts of 100 with 20 ms pauses, so the
batch exporter keeps up as it would in a gateway at ~2,000 req/s. Prints CPU time per request
over all threads (the exporter's included) for each sample ratio. Traffic: 127.0.0.1 only.

    .venv/bin/python bench/tracing_cost.py [0 0.01 0.1 1]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import benchlib as bl  # noqa: E402


def measure(ratio: str, port: int) -> float:
    os.environ.update({
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio})
    from gateway.observability.tracing import Tracing
    from gateway.request.record import RequestRecord

    tracing = Tracing.from_env()
    headers = {"content-type": "application/json"}
    record = RequestRecord("r", 0.0, route="/v1/chat/completions", tenant="acme", model="m",
                           priority="normal", status=200)

    def one() -> None:
        with tracing.request_span("POST", "/v1/chat/completions", headers) as span:
            with tracing.stage("auth"):
                pass
            with tracing.stage("limits"):
                pass
            with tracing.attempt_span("mock/x", "openai", "gpt", 1) as attempt:
                upstream_headers: dict[str, str] = {}
                tracing.inject(upstream_headers)
                attempt.finish(None, status=200)
            with tracing.stage("relay"):
                pass
            span.finish(record)
            span.log_fields()

    n, cpu0 = 0, time.process_time()
    for _ in range(40):
        for _ in range(100):
            one()
            n += 1
        time.sleep(0.02)
    asyncio.run(tracing.close())  # flushes: the export of every span is counted
    return (time.process_time() - cpu0) / n * 1e6


def main() -> None:
    ratios = sys.argv[1:] or ["0", "0.01", "0.1", "1"]
    port = bl.free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "bench" / "otlp_sink.py"), "--port",
                             str(port)], stderr=subprocess.DEVNULL)
    try:
        bl.wait_http(f"http://127.0.0.1:{port}/healthz")
        for ratio in ratios:  # one process per ratio: the SDK provider is process-global
            out = subprocess.run([sys.executable, __file__, "--one", ratio, str(port)],
                                 capture_output=True, text=True, check=True, timeout=300)
            print(f"sample ratio {ratio:>5}: {float(out.stdout):6.1f} us of CPU per request "
                  "(all threads, export included)", flush=True)
    finally:
        sink.terminate()
        sink.wait(timeout=10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(measure(sys.argv[2], int(sys.argv[3])))
    else:
        main()
