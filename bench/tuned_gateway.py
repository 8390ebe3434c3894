"""Experiment launcher: the stock gateway CLI with two process-level tunings, nothing else.

- ``--backlog N``: the listen backlog of the gateway's TCPSite (aiohttp's default is 128);
- ``--gc-threshold G0,G1,G2``: ``gc.set_threshold`` after a ``gc.freeze()`` of everything
  allocated at import time, so full collections neither scan start-up objects nor run
  every time the heap grows by a quarter while thousands of streams open.

Used by ``bench/streams.py --tuned-gateway`` to test whether these are what limits the stock
gateway; the gateway's own code is not changed.

    python bench/tuned_gateway.py --backlog 4096 --gc-threshold 50000,50,1000 -- serve --config F
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

try:  # the installed (or PYTHONPATH) gateway package, else the checkout this file is in
    import gateway  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=None)
    parser.add_argument("--gc-threshold", default=None, metavar="G0,G1,G2")
    parser.add_argument("gateway_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.gateway_args[1:] if args.gateway_args[:1] == ["--"] else args.gateway_args

    from aiohttp import web

    from gateway.cli import main as gateway_main

    if args.backlog:
        original = web.TCPSite.__init__
        backlog = args.backlog

        def init(self: web.TCPSite, *a: Any, **kw: Any) -> None:
            kw["backlog"] = backlog
            original(self, *a, **kw)

        web.TCPSite.__init__ = init  # type: ignore[method-assign]
    if args.gc_threshold:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    return int(gateway_main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
