"""Compressed request bodies are refused before a byte is inflated (red team, MEDIUM).

40 parallel ``Content-Encoding: gzip`` bodies of 204 KB that inflate to 200 MiB each: aiohttp
inflated them all as they arrived, before the 413 (RSS 69 -> 1,376 MiB; other tenants got
503s), since ``max_body_bytes`` and the in-flight body-bytes bound saw only the compressed
length. The gateway now never inflates a request body: 415 in the route's dialect, whether the
caller is authenticated or not. The official SDKs do not compress requests.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.mock.upstream import RECORDED
from tests.gwtest import auth, chat
from tests.plugin_gateway import MakeGateway

INFLATED = 64 * 1024 * 1024
BOMB = zlib.compress(b" " * INFLATED, 9)  # ~64 KB: a JSON body of whitespace once inflated


def _upstream_calls(mock_upstream: TestServer) -> int:
    return len([r for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")])


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, identity"])
async def test_an_encoded_body_is_refused_in_the_openai_dialect(
    make_gateway: MakeGateway, mock_upstream: TestServer, encoding: str,
) -> None:
    gw = await make_gateway()
    resp = await gw.post("/v1/chat/completions", data=gzip.compress(orjson.dumps(chat())),
                         headers=auth(**{"Content-Encoding": encoding,
                                         "Content-Type": "application/json"}))
    assert resp.status == 415
    err = (await resp.json())["error"]
    assert err["code"] == "unsupported_content_encoding"
    assert "Content-Encoding" in err["message"]
    assert _upstream_calls(mock_upstream) == 0


async def test_an_encoded_body_is_refused_in_the_anthropic_dialect(
    make_gateway: MakeGateway, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway()
    body = {"model": "claude-test", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    resp = await gw.post("/v1/messages", data=gzip.compress(orjson.dumps(body)),
                         headers=auth(**{"Content-Encoding": "gzip",
                                         "Content-Type": "application/json"}))
    assert resp.status == 415
    data = await resp.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert _upstream_calls(mock_upstream) == 0


async def test_identity_is_accepted(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    resp = await gw.post("/v1/chat/completions", json=chat(),
                         headers=auth(**{"Content-Encoding": "identity"}))
    assert resp.status == 200


@pytest.mark.parametrize("key", ["sk-test-acme", "sk-not-a-tenant"])
async def test_a_gzip_bomb_is_never_inflated(make_gateway: MakeGateway, key: str) -> None:
    """A 64 KB body that inflates to 64 MiB: the gateway's memory never holds the inflated
    bytes, with a valid key (415) or without one (401)."""
    gw = await make_gateway()
    tracemalloc.start()
    try:
        resp = await gw.post("/v1/chat/completions", data=BOMB,
                             headers=auth(key, **{"Content-Encoding": "deflate",
                                                  "Content-Type": "application/json"}))
        await resp.read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status == (415 if key == "sk-test-acme" else 401)
    # Measured: 0.4 MiB either way now; before, 73 MiB with a key and 2.4 MiB without one
    # (aiohttp inflated what arrived before the 401 closed the request).
    assert peak < 1.5 * 2**20, f"{peak / 2**20:.1f} MiB held"
