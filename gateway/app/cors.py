"""CORS for browser clients: off unless ``server.cors_origins`` lists origins.

Only the API's own needs: simple and preflighted requests from the listed origins, never
with credentials (API keys travel in headers a page sets itself, not in cookies). Headers are
added when a response is prepared, so streamed answers get them too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ALLOW_HEADERS = ("Authorization, Content-Type, X-Api-Key, X-Request-Id, X-Priority, "
                  "X-Request-Timeout, X-Agent-Session, X-Agent-Step, anthropic-version, "
                  "anthropic-beta, OpenAI-Beta")
_EXPOSE_HEADERS = ("X-Request-Id, Retry-After, retry-after-ms, x-should-retry, "
                   "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
                   "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
                   "x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")


def setup_cors(app: web.Application, origins: list[str]) -> None:
    """Answer preflights and stamp CORS headers for the listed origins (``*``: any)."""
    any_origin = "*" in origins
    allowed = frozenset(origins)

    def allow_origin(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None or not (any_origin or origin in allowed):
            return None
        return "*" if any_origin else origin

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = allow_origin(request)
            if origin is None:
                return web.Response(status=403)
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        return await handler(request)

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        origin = allow_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS
            response.headers["Vary"] = "Origin"

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(stamp)
