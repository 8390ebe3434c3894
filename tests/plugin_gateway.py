"""Fixtures for a real gateway in front of the real mock upstream, both on loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.mock_upstream import create_mock_app
from gateway.runner import GatewayRunner
from gateway.server import create_app
from gateway.state import StateBackend
from tests.gwtest import policy

MakeGateway = Callable[..., Awaitable[TestClient[Any, Any]]]


class GatewayTestServer(TestServer):
    """aiohttp's test server on the runner ``gateway serve`` uses (its parse-error answers)."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def mock_upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(create_mock_app(seed=7))
    return server


@pytest.fixture
def upstream_url(mock_upstream: TestServer) -> str:
    return str(mock_upstream.make_url("")).rstrip("/")


@pytest.fixture
def make_gateway(aiohttp_client: Any, upstream_url: str) -> MakeGateway:
    async def make(upstream: str | None = None, state: StateBackend | None = None,
                   **overrides: Any) -> TestClient[Any, Any]:
        config = policy(upstream or upstream_url, **overrides)
        client: TestClient[Any, Any] = await aiohttp_client(
            GatewayTestServer(create_app(config, state=state)))
        return client

    return make


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> TestClient[Any, Any]:
    return await make_gateway()


async def settled(client: TestClient[Any, Any]) -> None:
    """Wait until every settlement the gateway started in the background has run."""
    from gateway.server import GATEWAY

    await client.server.app[GATEWAY].policy.limiter.drain()
