"""Python function calls per proxied request, for the working tree or commits: a cost figure
that does not move with the machine's load.

End-to-end throughput and CPU per request (bench/overhead.py) vary by 10-20 % between runs of
the same code on a shared machine, too much to show a change of a few percent. The number of
Python calls a request makes is deterministic: equal counts mean the request path did not
change; a difference is the change, in calls. Each version runs in its own process (``git
archive REF gateway`` for a commit): an in-process gateway (bench/configs/overhead.yaml: no
limits) in front of the in-process mock upstream, 200 warm-up requests, then ``--requests``
non-streaming chat completions under cProfile. Printed: all calls per request (the aiohttp
client and the mock included, the same for every version) and calls inside gateway/.

    .venv/bin/python bench/call_count.py [--requests 500] [REF ...]   (no REF: working tree)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BODY = {"model": "gpt-4o-mini", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Reply with five words."}]}


async def _count(requests: int) -> tuple[float, float]:
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app.server import create_app
    from gateway.config.model import parse_config
    from gateway.mock.upstream import create_mock_app

    mock = TestServer(create_mock_app())
    await mock.start_server()
    data = yaml.safe_load((BENCH / "configs" / "overhead.yaml").read_text(encoding="utf-8"))
    for provider in data["providers"].values():
        provider["base_url"] = str(mock.make_url("/v1"))
    client = TestClient(TestServer(create_app(parse_config(data))))
    await client.start_server()
    headers = {"Authorization": "Bearer sk-demo-acme"}
    try:
        for _ in range(200):
            resp = await client.post("/v1/chat/completions", json=BODY, headers=headers)
            await resp.read()
            assert resp.status == 200, await resp.text()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(requests):
            resp = await client.post("/v1/chat/completions", json=BODY, headers=headers)
            await resp.read()
        profile.disable()
    finally:
        await client.close()
        await mock.close()
    stats = pstats.Stats(profile)
    ours = sum(v[1] for k, v in stats.stats.items()  # type: ignore[attr-defined]
               if f"{Path('gateway')}/" in k[0] and "site-packages" not in k[0])
    return stats.total_calls / requests, ours / requests  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("refs", nargs="*", help="commits to compare (default: working tree)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a source directory, in a child
    args = parser.parse_args()
    if args.child is not None:
        sys.path.insert(0, args.child)
        import gateway

        assert gateway.__file__ and gateway.__file__.startswith(args.child), gateway.__file__
        total, ours = asyncio.run(_count(args.requests))
        print(f"{total:.1f} {ours:.1f}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp:
        for ref in args.refs or [None]:
            source = str(REPO)
            if ref is not None:
                source = str(Path(tmp) / ref.replace("/", "_"))
                Path(source).mkdir()
                archive = subprocess.run(["git", "archive", ref, "gateway"], cwd=REPO,
                                         capture_output=True, check=True).stdout
                subprocess.run(["tar", "-x", "-C", source], input=archive, check=True)
            out = subprocess.run([sys.executable, __file__, "--child", source, "--requests",
                                  str(args.requests)], capture_output=True, text=True,
                                 check=True).stdout.split()
            print(f"{ref or 'working tree':<14} calls per request: {out[0]:>8} all, "
                  f"{out[1]:>7} in gateway/", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
