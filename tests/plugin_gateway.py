"""Fixtures for a real gateway in front of the real mock upstream, both on loopback."""

from __future__ import annotations

import collections
from typing import Any, Protocol, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import create_app
from gateway.mock.upstream import create_mock_app
from gateway.process.runner import GatewayRunner
from gateway.state import StateBackend
from tests.gwtest import policy

GatewayClient = TestClient[web.Request, web.Application]
"""A test client of an app on a ``TestServer``: ``client.app`` is that app."""


class MakeGateway(Protocol):
    """The ``make_gateway`` fixture: a gateway on ``policy(upstream, **overrides)``."""

    async def __call__(self, upstream: str | None = None, state: StateBackend | None = None,
                       **overrides: Any) -> GatewayClient: ...


class GatewayTestServer(TestServer):
    """aiohttp's test server on the runner ``gateway serve`` uses (its parse-error answers)."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def mock_upstream(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(create_mock_app(seed=7))


@pytest.fixture
def upstream_url(mock_upstream: TestServer) -> str:
    return str(mock_upstream.make_url("")).rstrip("/")


@pytest.fixture
def make_gateway(aiohttp_client: AiohttpClient, upstream_url: str) -> MakeGateway:
    async def make(upstream: str | None = None, state: StateBackend | None = None,
                   **overrides: Any) -> GatewayClient:
        config = policy(upstream or upstream_url, **overrides)
        return await gateway_client(aiohttp_client, create_app(config, state=state))

    return make


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> GatewayClient:
    return await make_gateway()


async def gateway_client(aiohttp_client: AiohttpClient, app: web.Application) -> GatewayClient:
    """A client of ``app`` served by ``GatewayTestServer`` (the runner ``gateway serve`` uses)."""
    # aiohttp types a TestClient over a TestServer as TestClient[Request, Application];
    # pytest-aiohttp's factory protocol widens any server to TestClient[_, None].
    return cast(GatewayClient, await aiohttp_client(GatewayTestServer(app)))


async def counted_gateway(aiohttp_client: AiohttpClient, upstream: str, **overrides: Any,
                          ) -> tuple[GatewayClient, collections.Counter[int]]:
    """A gateway on ``policy(upstream, **overrides)`` whose /v1 answers are counted by status:
    every SDK retry is one more answer."""
    app = create_app(policy(upstream, **overrides))
    answers: collections.Counter[int] = collections.Counter()

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/v1/"):
            answers[response.status] += 1

    app.on_response_prepare.append(count)
    return await gateway_client(aiohttp_client, app), answers


async def settled(client: GatewayClient) -> None:
    """Wait until every settlement the gateway started in the background has run."""
    from gateway.app.server import GATEWAY

    await client.app[GATEWAY].policy.limiter.drain()


def token_budget_spent(client: GatewayClient, tenant: str = "acme") -> int:
    """The tenant's daily token budget counter, on a gateway with the memory backend."""
    import time

    from gateway.app.server import GATEWAY
    from gateway.limits.periods import period_keys
    from gateway.state import MemoryBackend

    state = client.app[GATEWAY].state
    assert isinstance(state, MemoryBackend)
    daily = next(p for name, p, _, _ in period_keys(time.time()) if name == "daily")
    return int(state.limits._get(f"rl:{{t:{tenant}}}:b:tokens:{daily}",
                                 state.limits.now_ms()) or 0)
