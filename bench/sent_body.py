"""Cost of knowing that an upstream request was sent (upstream/transport.py ``SentBody``): the same
sequential POSTs (a 4 KB JSON body) to a local aiohttp server with the body as plain bytes,
as the gateway's ``SentBody`` payload, and (the alternative not taken) as bytes from a
session with an aiohttp TraceConfig that marks ``on_request_chunk_sent``; alternating rounds
in one process, best round of each.

    .venv/bin/python bench/sent_body.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from aiohttp import web

from gateway.upstream.transport import SentBody


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"{}", content_type="application/json")


def _chunk_trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def on_chunk_sent(*_: object) -> None:
        return None

    trace.on_request_chunk_sent.append(on_chunk_sent)
    return trace


async def _round(session: aiohttp.ClientSession, url: str, body: bytes, n: int,
                 payload: bool = False) -> float:
    began = time.perf_counter()
    for _ in range(n):
        data = SentBody(body) if payload else body
        async with session.post(url, data=data) as resp:
            await resp.read()
    return (time.perf_counter() - began) / n


async def main(requests: int, rounds: int) -> None:
    app = web.Application()
    app.router.add_post("/", _ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/"
    body = b'{"x":"' + b"a" * 4000 + b'"}'
    bare = aiohttp.ClientSession()
    traced = aiohttp.ClientSession(trace_configs=[_chunk_trace()])
    try:
        await _round(bare, url, body, 200)
        await _round(traced, url, body, 200)
        best_bare = best_payload = best_traced = float("inf")
        for _ in range(rounds):
            best_bare = min(best_bare, await _round(bare, url, body, requests))
            best_payload = min(best_payload, await _round(bare, url, body, requests, True))
            best_traced = min(best_traced, await _round(traced, url, body, requests))
    finally:
        await bare.close()
        await traced.close()
        await runner.cleanup()
    print(f"per call: bytes {best_bare * 1e6:.0f} us, SentBody {best_payload * 1e6:.0f} us "
          f"(ratio {best_payload / best_bare:.3f}), chunk trace {best_traced * 1e6:.0f} us "
          f"(ratio {best_traced / best_bare:.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
