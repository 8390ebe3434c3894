"""The mock upstream app (gateway.mock.upstream) served for heavy benchmarks.

Same app as ``gateway mock-upstream``, with two serving changes so the mock is not what
limits a 10,000-stream run: a listen backlog of ``--backlog`` (aiohttp's default is 128,
which overflows on a connection burst) and the cyclic garbage collector frozen and off
(a full collection over 10,000 open streams stops the loop for up to a second). The process
is short-lived, so memory held by uncollected cycles is bounded.

    python bench/mockserver.py --port 9000 [--backlog 4096] [--keep-gc]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from pathlib import Path

from aiohttp import web

try:  # the installed (or PYTHONPATH) gateway package, else the checkout this file is in
    import gateway  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.mock.upstream import create_mock_app


async def serve(host: str, port: int, backlog: int) -> None:
    runner = web.AppRunner(create_mock_app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=backlog).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--keep-gc", action="store_true", help="leave the garbage collector on")
    args = parser.parse_args()
    if not args.keep_gc:
        gc.collect()
        gc.freeze()
        gc.disable()
    asyncio.run(serve(args.host, args.port, args.backlog))


if __name__ == "__main__":
    main()
