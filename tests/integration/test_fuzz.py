"""Property-based fuzzing of every route: bodies and headers that are wrong in every way.

The properties, for whatever hypothesis sends:
- never a 5xx and never a crash: the gateway answers a 4xx in the route's error shape (OpenAI's
  ``{"error": {"message", "type", "code", "param"}}``; Anthropic's on /v1/messages), or a 200
  when the input happened to be valid;
- the gateway keeps serving afterwards, and its memory stays bounded (the body size limit holds
  for chunked bodies too; deep nesting and huge numbers are refused by the parser, not walked).

HTTP framing errors (request line, header count and size, Content-Length, chunk sizes) are
refused by aiohttp's parser before any route runs; ``gateway/process/runner.py`` answers them in the same
OpenAI shape, without quoting the refused bytes (to the client or the log). Hand-picked cases that already have
tests (malformed JSON, 413, 415, wrong field types) are in tests/integration/test_proxy.py.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mock.upstream import RECORDED
from gateway.request.classifier import ROUTES
from tests.faults.helpers import Client
from tests.gwtest import ACME_KEY, NO_LAG_SHEDDING, UMBRELLA_KEY
from tests.plugin_gateway import MakeGateway

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
POST_ROUTES = sorted(ROUTES)
MODELS = ["gpt-test", "embed-test", "claude-test"]
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "gpt-test", "messages": [{"role": "user",
                                                                "content": "hi"}]},
    "/v1/completions": {"model": "gpt-test", "prompt": "hi"},
    "/v1/embeddings": {"model": "embed-test", "input": "hi"},
    "/v1/responses": {"model": "gpt-test", "input": "hi"},
    "/v1/messages": {"model": "claude-test", "max_tokens": 5,
                     "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "claude-test",
                                  "messages": [{"role": "user", "content": "hi"}]},
    "/v1/responses/input_tokens": {"model": "gpt-test", "input": "hi"},
}
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens",
          "max_completion_tokens", "max_output_tokens", "system", "tools", "n", "temperature"]

huge_ints = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
                      st.integers(max_value=-(2**63) + 2, min_value=-(2**64)))
scalars = st.one_of(st.none(), st.booleans(), huge_ints,
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=25)


def _dumps(value: Any) -> bytes:
    # the stdlib, not orjson: integers beyond 64 bits must reach the gateway as written
    return json.dumps(value).encode()


@st.composite
def bodies(draw: st.DrawFn, route: str) -> bytes:
    """Raw request bodies: mutated valid bodies, arbitrary JSON, or hostile bytes."""
    kind = draw(st.sampled_from(["mutated", "mutated", "any-json", "hostile"]))
    if kind == "mutated":
        body = dict(VALID[route])
        for _ in range(draw(st.integers(1, 3))):
            field = draw(st.sampled_from(FIELDS))
            if draw(st.booleans()):
                body[field] = draw(json_values)
            else:
                body.pop(field, None)
        if draw(st.booleans()):
            body["model"] = draw(st.sampled_from([*MODELS, "nope", "", "gpt-test:req",
                                                  "rl:{t:umbrella}:req", "../../admin"]))
        return _dumps(body)
    if kind == "any-json":
        return _dumps(draw(json_values))
    depth = draw(st.integers(1, 100_000))
    return draw(st.sampled_from([
        b"[" * depth + b"]" * depth,  # deep nesting
        b'{"a":' * min(depth, 5000) + b"1" + b"}" * min(depth, 5000),
        b'{"model": "gpt-test", "model": 5, "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "gpt-test", "max_tokens": 1e999, "messages": [{"content": "x"}]}',
        b'{"model": "gpt-test", "max_tokens": 123456789012345678901234567890}',
        b'{"model": "gpt-test", "max_tokens": NaN, "messages": []}',
        b'{"model": "gpt-\xff\xfe", "messages": [{"content": "\xed\xa0\x80"}]}',  # bad UTF-8
        b'{"model": "gpt-test", "messages": [{"content": "\\ud800"}]}',  # lone surrogate
        b"\xef\xbb\xbf" + orjson.dumps(VALID[route]),  # BOM
        b"\x00" * depth,
        orjson.dumps(VALID[route])[:-1],  # truncated
    ]))


header_names = st.sampled_from([
    "X-Priority", "X-Agent-Session", "X-Agent-Step", "X-Request-Id", "X-Request-Timeout",
    "x-stainless-read-timeout", "x-stainless-retry-count", "anthropic-version", "OpenAI-Beta",
    "Idempotency-Key", "Content-Type", "Accept", "traceparent", "tracestate", "x-api-key",
    "Accept-Encoding", "X-Forwarded-For", "Origin",
])
# Values aiohttp's client will send: no CR/LF; latin-1 and UTF-8 text both get through.
header_values = st.one_of(
    st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=60),
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=20),
    st.sampled_from(["1e999", "nan", "-1", "0", "²", "٣", "99999999999999999999", "",
                     " critical ", "application/json; charset=latin-1", "text/plain", "*/*"]),
)
auth_headers = st.sampled_from([
    {"Authorization": f"Bearer {ACME_KEY}"}, {"x-api-key": ACME_KEY},
    {"Authorization": f"Bearer {UMBRELLA_KEY}"}, {"Authorization": "Bearer "},
    {"Authorization": f"bearer   {ACME_KEY}  "}, {"Authorization": f"Basic {ACME_KEY}"}, {},
])


def _encode_headers(headers: dict[str, str]) -> dict[str, str]:
    # aiohttp's client encodes header values as UTF-8; fine for any str without CR/LF.
    return headers


def check_answer(route: str, status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:300])
    if status < 400:
        return
    data = orjson.loads(raw)
    if route == "/v1/messages":
        assert data["type"] == "error" and data["error"]["message"], data
    else:
        err = data["error"]
        assert isinstance(err, dict) and err.get("message"), data
        if "param" in err:  # the gateway's own errors carry all four keys
            assert set(err) == {"message", "type", "code", "param"}, err


@pytest.fixture
async def fuzz_gw(make_gateway: MakeGateway) -> Client:
    # The loop guard would turn hypothesis' repeats into 429s; they are fine, but noise.
    return await make_gateway(tenants={"acme": {"loop_guard": {"enabled": False}}},
                              admission=NO_LAG_SHEDDING)


# These gateways run in the test's own event loop, which hypothesis and megabyte bodies keep
# busy: the loop lag self-protection measures is the test's, and its 503 sheds are correct
# behaviour, not what these tests are about.


@FUZZ
@given(data=st.data())
async def test_fuzzed_bodies_on_every_api_route_never_get_a_5xx(fuzz_gw: Client,
                                                                data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(POST_ROUTES))
    raw = data.draw(bodies(route))
    headers = {**data.draw(auth_headers), "Content-Type": "application/json"}
    resp = await fuzz_gw.post(route, data=raw, headers=headers)
    check_answer(route, resp.status, await resp.read())


@FUZZ
@given(data=st.data())
async def test_fuzzed_headers_on_every_route_never_get_a_5xx(fuzz_gw: Client,
                                                            data: st.DataObject) -> None:
    route = data.draw(st.sampled_from([*POST_ROUTES, "/v1/models", "/v1/models/gpt-test",
                                       "/healthz", "/readyz", "/metrics", "/admin/status"]))
    headers = dict(data.draw(auth_headers))
    extra = data.draw(st.dictionaries(header_names, header_values, max_size=6))
    headers.update(extra)
    if route in ROUTES:
        resp = await fuzz_gw.post(route, data=orjson.dumps(VALID[route]),
                                  headers=_encode_headers(headers))
    else:
        resp = await fuzz_gw.get(route, headers=_encode_headers(headers))
    check_answer(route, resp.status, await resp.read())


@FUZZ
@given(path=st.text(st.characters(codec="ascii", exclude_characters="?#% \r\n\x00"),
                    max_size=40),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
async def test_fuzzed_paths_and_methods_get_openai_shaped_4xx(fuzz_gw: Client, path: str,
                                                             method: str) -> None:
    resp = await fuzz_gw.request(method, "/" + path.lstrip("/"),
                                 headers={"Authorization": f"Bearer {ACME_KEY}"})
    raw = await resp.read()
    assert resp.status < 500, (method, path, resp.status, raw[:200])
    if resp.status >= 400 and method != "HEAD":
        err = orjson.loads(raw)["error"]
        assert err["message"] or err["type"]


# --- framing-level abuse, on a raw socket ------------------------------------------------


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


def _request(head: bytes, body: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + ACME_KEY.encode() + b"\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body)
            + body)


BODY = orjson.dumps(VALID["/v1/chat/completions"])
FRAMING = {
    "1000 headers": _request(b"".join(b"X-H%d: v\r\n" % i for i in range(1000)), BODY),
    "one 100 KB header": _request(b"X-Big: " + b"a" * 100_000 + b"\r\n", BODY),
    "garbage request line": b"\x00\x01GARBAGE\r\n\r\n",
    "bad Content-Length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                          b"Content-Length: abc\r\n\r\n",
    "bad chunk size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "invalid byte in path": b"POST /v1/chat/\xff HTTP/1.1\r\nHost: gw\r\n\r\n",
    "both CL and TE": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "control byte in the key": _request(b"", BODY).replace(ACME_KEY.encode(),
                                                           ACME_KEY.encode() + b"\x01"),
    "header line without a colon": _request(b"Bearer " + ACME_KEY.encode() + b"\r\n", BODY),
}
SHAPED = {
    "invalid UTF-8 header": _request(b"X-Agent-Session: \xff\xfe\r\n", BODY),
    "invalid UTF-8 key": _request(b"x-api-key: \xff\xfe\x80\r\n", BODY).replace(
        b"Authorization: Bearer " + ACME_KEY.encode() + b"\r\n", b""),
    "latin-1 priority": _request(b"X-Priority: \xe9\r\n", BODY),
    "superscript retry count": _request("x-stainless-retry-count: ²\r\n".encode(), BODY),
    "huge timeout": _request(b"X-Request-Timeout: " + b"9" * 400 + b"\r\n", BODY),
}


@pytest.mark.parametrize("name", list(FRAMING))
async def test_framing_abuse_gets_an_openai_shaped_4xx_and_the_gateway_keeps_serving(
        gw: Client, name: str, caplog: pytest.LogCaptureFixture) -> None:
    assert gw.server.port is not None
    with caplog.at_level(logging.DEBUG):
        answer = await _raw(gw.server.port, FRAMING[name])
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    assert b"application/json" in head.lower(), head
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"].startswith("malformed HTTP request: ")
    assert error["type"] == "invalid_request_error"
    assert ACME_KEY.encode() not in answer
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) + str(r.exc_info)
                       for r in caplog.records)
    assert ACME_KEY not in logged
    ok = await gw.post("/v1/chat/completions", data=BODY,
                       headers={"Authorization": f"Bearer {ACME_KEY}",
                                "Content-Type": "application/json"})
    assert ok.status == 200


@pytest.mark.parametrize("name", list(SHAPED))
async def test_bad_header_bytes_get_an_openai_shaped_answer(gw: Client, name: str) -> None:
    assert gw.server.port is not None
    answer = await _raw(gw.server.port, SHAPED[name])
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status < 500, answer[:300]
    if status >= 400:
        assert set(orjson.loads(body)["error"]) == {"message", "type", "code", "param"}


# --- memory -------------------------------------------------------------------------------


async def test_hostile_bodies_do_not_grow_memory(make_gateway: MakeGateway,
                                                 mock_upstream: TestServer) -> None:
    gw = await make_gateway(server={"max_body_bytes": 1024 * 1024},
                            tenants={"acme": {"loop_guard": {"enabled": False}}},
                            admission=NO_LAG_SHEDDING)
    headers = {"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"}
    hostile = [
        b"[" * 500_000 + b"]" * 500_000,  # within the size limit, 500k levels deep
        b'{"model": "gpt-test", "messages": [' + b'{"content": "x"},' * 10_000 + b"{}]}",
        b'{"model": "gpt-test", "messages": [{"content": "' + b"x" * 900_000 + b'"}]}',
        b"x" * 5_000_000,  # over the limit
    ]

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    async def round_() -> None:
        for body in hostile:
            resp = await gw.post("/v1/chat/completions", data=io.BytesIO(body),
                                 headers=headers)
            assert resp.status < 500
            await resp.read()
            resp = await gw.post("/v1/chat/completions", data=chunked(body), headers=headers)
            assert resp.status < 500
            await resp.read()

    await round_()  # warm-up: caches, pools, interned strings
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2):
            await round_()
        mock_upstream.app[RECORDED].clear()  # the mock keeps what it saw; the gateway must not
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Nothing kept per request, and no request ever held more than a few bodies' worth
    # (the test client's own copies included).
    assert after - before < 2 * 1024 * 1024, after - before
    assert peak - before < 64 * 1024 * 1024, peak - before


# --- the admin API against its OpenAPI document (schemathesis) ----------------------------

try:
    import schemathesis
except ImportError:  # a test extra: pyproject's [test] must list it
    schemathesis = None  # type: ignore[assignment]

ADMIN_KEY = "sk-fuzz-admin"
OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "admin-openapi.yaml"


@pytest.fixture(scope="module")
def served_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gateway serve` in its own process: schemathesis calls it synchronously."""
    from gateway.request.auth import hash_key
    from tests.gwtest import policy_dict
    from tests.redis_server import pick_port

    port = pick_port()
    path = tmp_path_factory.mktemp("openapi") / "policy.yaml"
    config = policy_dict("http://127.0.0.1:9", admin={"api_keys": [hash_key(ADMIN_KEY)]},
                         server={"drain_delay_s": 0},
                         tenants={"acme": {"budget": {"daily_tokens": 1000}}})
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                             str(path), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "gateway serve never became ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)


if schemathesis is None:
    def test_admin_api_conforms_to_its_openapi_document() -> None:
        pytest.skip("schemathesis is not installed (add it to pyproject's [test] extra)")
else:
    admin_schema = schemathesis.openapi.from_path(str(OPENAPI))

    @admin_schema.parametrize()
    @settings(max_examples=15, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def test_admin_api_conforms_to_its_openapi_document(case: schemathesis.Case[Any],
                                                        served_gateway: str) -> None:
        """Status codes, content types, headers and bodies match docs/admin-openapi.yaml,
        with the admin key and with what schemathesis sends instead of it; never a 5xx."""
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if case.path == "/admin/status" \
            else {}
        if case.headers and "Authorization" in case.headers:
            headers = {}  # schemathesis' own (wrong) credentials: a documented 401
        case.call_and_validate(base_url=served_gateway, headers=headers)
