"""A bare aiohttp pass-through proxy: the ceiling the gateway is compared against.

It does the least a proxy can do: read the body, forward it with the request's headers
(hop-by-hop ones dropped) to the same path on the upstream through one shared ClientSession,
and answer with the upstream's status and body; event streams are relayed with iter_any().
No auth, no parsing, no logging.

    python bench/passthrough.py --port 8081 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

_DROP = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                   "te", "trailer", "upgrade", "proxy-connection", "accept-encoding"})
SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str, pool_size: int = 100) -> web.Application:
    upstream = upstream.rstrip("/")

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as up:
            ctype = up.headers.get("Content-Type", "application/octet-stream")
            if up.content_type != "text/event-stream":
                return web.Response(status=up.status, body=await up.read(),
                                    headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--pool-size", type=int, default=100,
                        help="max upstream connections (the gateway's pool_size default)")
    args = parser.parse_args()
    web.run_app(create_app(args.upstream, args.pool_size), host=args.host, port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
