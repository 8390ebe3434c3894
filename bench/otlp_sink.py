"""An OTLP/HTTP trace endpoint that accepts span batches and drops them, for benchmarks.

It answers like a collector (200, empty protobuf body) so the gateway's exporter does all
of its real work (encoding, HTTP) while nothing is stored. Prints the batch count on exit.

    python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import signal
import sys

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    batches = 0

    async def traces(request: web.Request) -> web.Response:
        nonlocal batches
        await request.read()
        batches += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    def stop(*_: object) -> None:
        print(f"otlp sink: {batches} span batches", file=sys.stderr)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
