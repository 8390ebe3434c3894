"""Security: keys, the upstream boundary, TLS, tenant isolation, and secrets in every output.

Already covered elsewhere and referenced from docs/reliability.md: plaintext keys, inline
secrets and credential forwarding refused by config validation (tests/integration/test_config.py with
tests/config_errors/), the header allow-list (tests/integration/test_proxy.py), the admin key and CORS
off by default (tests/integration/test_observability.py).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import io
import json
import logging
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import create_app
from gateway.mock.upstream import RECORDED
from gateway.observability import logs
from gateway.observability.tracing import Tracing
from gateway.request.auth import hash_key
from gateway.state import RedisBackend, create_backend
from tests.faults.helpers import Client
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, chat, policy
from tests.plugin_gateway import MakeGateway, settled
from tests.redis_server import RedisCluster3, RedisServer, pick_port

ADMIN_KEY = "sk-admin-security-test"


# --- certificates ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=gateway-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            *(["-extfile", "san.ext"] if name == "server" else []))
    return d


# --- keys in memory ---------------------------------------------------------------------------


def _live_strings_containing(needle: str) -> list[str]:
    """Every str/bytes referenced from a live (gc-tracked) object that contains needle
    (the needle itself, held by the test's own frame, excepted)."""
    raw = needle.encode()
    found: list[str] = []
    for obj in gc.get_objects():
        try:
            referents = gc.get_referents(obj)
        except Exception:  # noqa: BLE001, S112 - some extension objects refuse
            continue
        for ref in referents:
            if ref is needle or ref is raw:
                continue
            if isinstance(ref, str) and needle in ref:
                found.append(f"{type(obj).__name__}: {ref[:80]!r}")
            elif isinstance(ref, (bytes, bytearray)) and raw in ref:
                found.append(f"{type(obj).__name__}: {bytes(ref[:80])!r}")
    return found


async def test_no_live_object_holds_a_presented_tenant_key(make_gateway: MakeGateway) -> None:
    key = "sk-live-" + secrets.token_hex(16)  # built here, never a module constant
    gw = await make_gateway(tenants={"acme": {"api_keys": [hash_key(key)]}})

    async def use_it(key: str) -> None:
        # a client session of its own, gone before the scan: only the server side is judged
        async with aiohttp.ClientSession() as session:
            url = str(gw.make_url("/v1/chat/completions"))
            for i in range(5):
                for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                    async with session.post(url, json=chat(text=f"t{i}"),
                                            headers=headers) as resp:
                        assert resp.status == 200
                        await resp.read()
            async with session.post(url, json=chat(stream=True),
                                    headers={"Authorization": f"Bearer {key}"}) as resp:
                await resp.read()

    await use_it(key)
    await settled(gw)
    await asyncio.sleep(0.2)  # the server sees the client's connections close
    needle = key[len("sk-live-"):]
    del key
    gc.collect()
    assert _live_strings_containing(needle) == []


async def test_a_process_dump_does_not_accumulate_tenant_keys(
    tmp_path: Path, upstream_url: str
) -> None:
    """The real `gateway serve` process, read through /proc/<pid>/mem after 100 requests:
    the key is not kept per request. (Freed buffers are not zeroed, so the bytes of the very
    last request can linger until reused: at most one copy is allowed.)"""
    key = "sk-dump-" + secrets.token_hex(16)
    other = "sk-other-" + secrets.token_hex(16)
    port = pick_port()
    config = policy(upstream_url).model_dump(mode="json")
    config["server"] = {"drain_delay_s": 0}
    config["tenants"] = {"acme": {"api_keys": [hash_key(key)], "loop_guard": {"enabled": False}},
                         "umbrella": {"api_keys": [hash_key(other)]}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert key not in path.read_text()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    async with session.get(base + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            for i in range(100):
                async with session.post(base + "/v1/chat/completions",
                                        json=chat(text=f"call {i}"),
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == 200
                    await resp.read()
            for i in range(20):  # other traffic, as a live process would have
                async with session.post(base + "/v1/chat/completions",
                                        json=chat(text=f"other {i}"),
                                        headers={"Authorization": f"Bearer {other}"}) as resp:
                    await resp.read()
        await asyncio.sleep(0.2)
        assert _dump_count(proc.pid, key.encode()) <= 1
        # what it does keep is the digest, as in the file
        assert _dump_count(proc.pid, hashlib.sha256(key.encode()).digest()) >= 1
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


def _dump_count(pid: int, needle: bytes) -> int:
    hits = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                hits += mem.read(end - start).count(needle)
            except (OSError, ValueError, OverflowError):
                continue
    return hits


async def test_keys_are_compared_in_constant_time(make_gateway: MakeGateway,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)]})
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    assert calls == [32]  # sha256 digests, compared with hmac.compare_digest
    calls.clear()
    assert (await gw.get("/admin/status", headers=auth(ADMIN_KEY))).status == 200
    assert calls and set(calls) == {32}
    calls.clear()
    assert (await gw.get("/admin/status", headers=auth("sk-wrong"))).status == 401
    assert calls, "a wrong admin key must still be compared in constant time"


# --- the upstream boundary --------------------------------------------------------------------


async def test_no_request_can_steer_the_upstream_target_or_credentials(
    make_gateway: MakeGateway, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEC_PROVIDER_KEY", "sk-provider-fixed")
    gw = await make_gateway(providers={"main": {"api_key_env": "SEC_PROVIDER_KEY"}})
    recorded = mock_upstream.app[RECORDED]
    recorded.clear()
    hostile_headers = {
        "Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Original-URL": "/admin",
        "X-Rewrite-URL": "/admin", "X-Forwarded-Proto": "https", "Forwarded": "host=evil",
        "X-Api-Key": "sk-client-other", "Api-Key": "sk-client-other", "OpenAI-Organization":
        "org-evil", "OpenAI-Project": "proj-evil", "Proxy-Authorization": "Basic ZXZpbA==",
        "X-HTTP-Method-Override": "DELETE",
    }
    hostile_body = chat(api_base="http://evil.example", base_url="http://evil.example",
                        api_key="sk-body", extra_headers={"Authorization": "Bearer sk-body"},
                        extra_query={"api-version": "x"}, url="http://evil.example")
    resp = await gw.post("/v1/chat/completions", json=hostile_body,
                         headers=auth(**hostile_headers))
    assert resp.status == 200
    # absolute-form request target naming another host, on a raw socket
    body = orjson.dumps(chat())
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(b"POST http://evil.example:9/v1/chat/completions HTTP/1.1\r\nHost: evil.example"
                 b"\r\nAuthorization: Bearer " + ACME_KEY.encode() + b"\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    # paths that try to climb out of the route: never proxied anywhere
    for path in ("/v1/chat/completions/../../admin", "/v1/chat/completions%2F..%2Fx",
                 "/v1/chat/completions/", "/v1/chat/completions;evil"):
        r = await gw.post(path, json=chat(), headers=auth())
        assert r.status in (404, 405), path
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(b"POST //evil.example/v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                 b"Authorization: Bearer " + ACME_KEY.encode() + b"\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.split(b" ")[1] in (b"400", b"404"), head
    mock_host = f"{mock_upstream.host}:{mock_upstream.port}"
    assert len(recorded) == 2
    for seen in recorded:
        assert seen.path == "/v1/chat/completions"
        assert seen.headers["host"] == mock_host
        assert seen.headers["authorization"] == "Bearer sk-provider-fixed"
        for name in ("x-api-key", "api-key", "openai-organization", "openai-project",
                     "proxy-authorization", "x-forwarded-host", "x-original-url",
                     "x-rewrite-url", "forwarded", "x-http-method-override"):
            assert name not in seen.headers, name
        assert ACME_KEY not in json.dumps(seen.headers)


async def test_hop_by_hop_headers_are_dropped_both_ways(aiohttp_server: AiohttpServer,
                                                        make_gateway: MakeGateway) -> None:
    seen: list[dict[str, str]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        body = {"choices": [{"message": {"content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        return web.json_response(body, headers={
            "Set-Cookie": "provider_session=secret", "Keep-Alive": "timeout=99",
            "Proxy-Authenticate": "Basic", "WWW-Authenticate": "Bearer",
            "X-Provider-Internal": "cluster-7", "OpenAI-Organization": "org-provider",
            "Upgrade": "h2c", "Trailer": "X-Checksum", "Alt-Svc": "h3=\":443\"",
            "Strict-Transport-Security": "max-age=1"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    server = await aiohttp_server(app)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"))

    async def chunked() -> AsyncIterator[bytes]:
        yield orjson.dumps(chat())

    resp = await gw.post("/v1/chat/completions", data=chunked(), headers=auth(**{
        "Content-Type": "application/json", "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers", "Trailer": "X-Sum",
        "Upgrade": "websocket", "Proxy-Connection": "keep-alive", "Cookie": "a=b"}))
    assert resp.status == 200
    got = seen[-1]
    for name in ("keep-alive", "te", "trailer", "upgrade", "proxy-connection", "cookie",
                 "x-secret-hop", "transfer-encoding"):
        assert name not in got, name
    assert got.get("connection", "keep-alive").lower() == "keep-alive"
    for name in ("Set-Cookie", "Keep-Alive", "Proxy-Authenticate", "WWW-Authenticate",
                 "X-Provider-Internal", "OpenAI-Organization", "Upgrade", "Trailer",
                 "Alt-Svc", "Strict-Transport-Security"):
        assert name not in resp.headers, name


async def test_cookies_an_upstream_sets_are_never_sent_back(aiohttp_server: AiohttpServer,
                                                            make_gateway: MakeGateway) -> None:
    # One upstream session serves every tenant: a cookie it kept (a provider's load-balancer
    # or bot-management cookie) would ride along on other tenants' calls.
    cookies: list[str | None] = []

    async def upstream(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie"))
        body = {"choices": [{"message": {"content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        return web.json_response(body, headers={"Set-Cookie": "lb=node-7; Path=/"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    server = await aiohttp_server(app)
    # a host name, not 127.0.0.1: cookie jars do not keep cookies for IP addresses
    gw = await make_gateway(upstream=f"http://localhost:{server.port}")
    for _ in range(3):
        assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    assert cookies == [None, None, None]


async def test_upstream_tls_is_verified_by_default(certs: Path, make_gateway: MakeGateway,
                                                   aiohttp_server: AiohttpServer) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1,
                                                            "completion_tokens": 0}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", ok)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    server = await aiohttp_server(app, ssl=context)
    url = f"https://127.0.0.1:{server.port}"
    verified = await make_gateway(upstream=url)  # a CA the system does not trust
    resp = await verified.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert err["code"] == "upstream_connect_error" and "CERTIFICATE_VERIFY_FAILED" in err[
        "message"]
    opted_out = await make_gateway(upstream=url, providers={"main": {"verify_tls": False}})
    assert (await opted_out.post("/v1/chat/completions", json=chat(), headers=auth())).status \
        == 200
    # The private CA, trusted for this provider only: verified, and it answers.
    private = await make_gateway(upstream=url, providers={"main": {"ca_file": str(certs / "ca.pem")}})
    assert (await private.post("/v1/chat/completions", json=chat(), headers=auth())).status \
        == 200
    # ... and another CA file does not vouch for this server.
    other = await make_gateway(upstream=url,
                               providers={"main": {"ca_file": str(certs / "client.pem")}})
    resp = await other.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 502 and "CERTIFICATE_VERIFY_FAILED" in (await resp.text())


def test_a_provider_ca_file_that_cannot_be_used_is_refused_at_load(tmp_path: Path) -> None:
    from gateway.config.model import ConfigError, GatewayConfig
    from gateway.upstream.pool import UpstreamPool

    def config(**provider: Any) -> GatewayConfig:
        return policy("https://127.0.0.1:1", providers={"main": provider})

    with pytest.raises(ConfigError, match="ca_file needs verify_tls: true"):
        config(ca_file=str(tmp_path / "ca.pem"), verify_tls=False)
    (tmp_path / "junk.pem").write_text("not a certificate")
    for path, why in ((tmp_path / "missing.pem", "No such file"),
                      (tmp_path / "junk.pem", "cannot load CA certificates")):
        with pytest.raises(ConfigError) as raised:
            UpstreamPool(config(ca_file=str(path)))
        assert "providers.main.ca_file" in str(raised.value.problems)
        assert why in str(raised.value.problems)


@pytest.mark.redis
async def test_rediss_with_a_private_ca_and_client_certificates(certs: Path) -> None:
    tls_port = pick_port()
    server = RedisServer(extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.pem"),
        "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file",
        str(certs / "ca.pem"), "--tls-auth-clients", "yes"])
    server.start()  # (its plain port only serves the readiness check)
    base = f"rediss://127.0.0.1:{tls_port}"
    tls = (f"ssl_ca_certs={certs / 'ca.pem'}&ssl_certfile={certs / 'client.pem'}"
           f"&ssl_keyfile={certs / 'client.key'}")
    try:
        # REDIS_URL / state.redis_url is all an operator sets: the same path as the config.
        good = create_backend("redis", redis_url=f"{base}?{tls}", timeout_s=0.5, key_prefix="gw:")
        await good.start()
        assert await good.ping()
        await good.set("k", b"v", 10_000)
        assert await good.get("k") == b"v"
        await good.close()
        # kwargs, for embedding
        kw = RedisBackend(base, timeout_s=0.5, ssl_ca_certs=str(certs / "ca.pem"),
                          ssl_certfile=str(certs / "client.pem"),
                          ssl_keyfile=str(certs / "client.key"))
        assert await kw.ping()
        await kw.close()
        for url in (base,  # the system CAs do not know this server: verification fails
                    f"{base}?ssl_ca_certs={certs / 'ca.pem'}",  # no client certificate
                    f"redis://127.0.0.1:{tls_port}"):  # plaintext to a TLS port
            bad = create_backend("redis", redis_url=url, timeout_s=0.5, key_prefix="gw:")
            assert not await bad.ping(), url
            await bad.close()
    finally:
        server.close()


@pytest.mark.redis
async def test_rediss_cluster_with_a_private_ca_and_client_certificates(certs: Path) -> None:
    cluster = RedisCluster3(tls_dir=certs)
    cluster.start()  # clients and the cluster bus on TLS, client certificates required
    tls = (f"ssl_ca_certs={certs / 'ca.pem'}&ssl_certfile={certs / 'client.pem'}"
           f"&ssl_keyfile={certs / 'client.key'}")
    try:
        good = create_backend("redis", redis_url=f"{cluster.tls_url}?{tls}", timeout_s=0.5,
                              key_prefix="gw:")
        await good.start()
        assert await good.ping()
        for i in range(20):  # spread over the three nodes' slots
            await good.set(f"k{i}", b"v%d" % i, 10_000)
        assert [await good.get(f"k{i}") for i in range(20)] == [b"v%d" % i for i in range(20)]
        await good.close()
        for url in (cluster.tls_url,  # the system CAs do not know these nodes
                    f"{cluster.tls_url}?ssl_ca_certs={certs / 'ca.pem'}",  # no client cert
                    cluster.tls_url.replace("rediss+", "redis+")):  # plaintext to TLS ports
            bad = create_backend("redis", redis_url=url, timeout_s=0.5, key_prefix="gw:")
            assert not await bad.ping(), url
            await bad.close()
    finally:
        cluster.close()


# --- tenant isolation -------------------------------------------------------------------------


async def test_a_tenant_cannot_use_or_probe_another_tenants_models(
    gw: Client, mock_upstream: TestServer
) -> None:
    recorded = mock_upstream.app[RECORDED]
    recorded.clear()
    umbrella = auth(UMBRELLA_KEY)  # may use gpt-test only
    cases = [
        ("/v1/messages", {"model": "claude-test", "max_tokens": 5,
                          "messages": [{"role": "user", "content": "x"}]}, 403),
        ("/v1/embeddings", {"model": "embed-test", "input": "x"}, 403),
    ]
    for name in ("claude-test ", "CLAUDE-TEST", "claude-test\u0000", "claude-test/",
                 "gpt-test/../claude-test", "claude-test:gpt-test", "*", "acme/claude-test"):
        cases.append(("/v1/chat/completions", chat(model=name), 404))
    for path, body, status in cases:
        resp = await gw.post(path, json=body, headers=umbrella)
        assert resp.status == status, (path, body)
    assert recorded == type(recorded)(maxlen=recorded.maxlen)  # nothing reached a provider
    # The listing and the lookup give nothing away: a model that exists but is not yours
    # looks exactly like one that does not exist.
    listing = await (await gw.get("/v1/models", headers=umbrella)).json()
    assert [m["id"] for m in listing["data"]] == ["gpt-test"]
    hidden = await gw.get("/v1/models/claude-test", headers=umbrella)
    missing = await gw.get("/v1/models/claude-nope", headers=umbrella)
    assert hidden.status == missing.status == 404
    a, b = (await hidden.json())["error"], (await missing.json())["error"]
    assert a["code"] == b["code"] and a["type"] == b["type"]


@pytest.mark.redis
async def test_a_tenant_cannot_read_or_move_another_tenants_limits(
    make_gateway: MakeGateway, clean_redis: RedisServer
) -> None:
    """acme sends everything a tenant can craft: session ids, step ids and request ids full of
    key separators, other tenants' names, model names with separators, a limit-busting rate.
    umbrella's keys in Redis, its headers and its answers do not move."""
    limits = {"requests_per_minute": 5, "request_burst": 5, "tokens_per_minute": 100_000,
              "max_concurrent": 2,
              "per_session": {"requests_per_minute": 3, "request_burst": 3}}
    gw = await make_gateway(
        state=RedisBackend(clean_redis.url, timeout_s=1.0), admin={"api_keys": [
            hash_key(ADMIN_KEY)]},
        tenants={"acme": {"limits": limits, "budget": {"daily_tokens": 1_000},
                          "default_max_tokens": 20, "loop_guard": {"max_repeats": 2}},
                 "umbrella": {"limits": limits, "budget": {"daily_tokens": 1_000},
                              "default_max_tokens": 20, "loop_guard": {"max_repeats": 2}}})
    # umbrella's baseline: one request, its headers
    first = await gw.post("/v1/chat/completions", json=chat(text="same body"),
                          headers=auth(UMBRELLA_KEY, **{"X-Agent-Session": "shared",
                                                        "X-Request-Id": "req-1"}))
    assert first.status == 200
    baseline = {k: v for k, v in first.headers.items() if k.startswith("x-ratelimit")}
    await settled(gw)
    before = _tenant_keys(clean_redis, "umbrella")
    before_at = time.monotonic()

    crafted_ids = ["shared", "umbrella", "t:umbrella", "rl:umbrella:req", "x:req", "x/../req",
                   "a=b+c@d", "req-1", "s:" + "0" * 16]
    statuses = []
    for i, sid in enumerate(crafted_ids * 2):
        resp = await gw.post("/v1/chat/completions", json=chat(text="same body"),
                             headers=auth(**{"X-Agent-Session": sid, "X-Agent-Step": sid,
                                             "X-Request-Id": sid}))
        statuses.append(resp.status)
        await resp.read()
    for bad in ("{t:umbrella}", "}", "a b", "x" * 200):
        resp = await gw.post("/v1/chat/completions", json=chat(),
                             headers=auth(**{"X-Agent-Session": bad}))
        assert resp.status == 400
    for model in ("gpt-test:req", "gpt-test}:req", "{t:umbrella}", "m:gpt-test"):
        resp = await gw.post("/v1/chat/completions", json=chat(model=model), headers=auth())
        assert resp.status == 404
    assert 429 in statuses  # acme did hit its own limits
    assert (await gw.get("/admin/status", headers=auth())).status == 401
    await settled(gw)
    after = _tenant_keys(clean_redis, "umbrella")
    assert set(after) <= set(before), set(after) - set(before)  # not a key created
    for key in set(before) & set(after):  # nor one changed
        assert after[key][0] == before[key][0], key  # the value; TTLs run down
    for key in set(before) - set(after):  # gone only by its own TTL (a GCRA bucket refilled)
        assert before[key][1] <= (time.monotonic() - before_at) * 1000 + 50, key
    # umbrella is served as if acme did not exist, same session id and body included
    second = await gw.post("/v1/chat/completions", json=chat(text="same body"),
                           headers=auth(UMBRELLA_KEY, **{"X-Agent-Session": "shared"}))
    assert second.status == 200
    remaining = int(second.headers["x-ratelimit-remaining-requests"])
    assert remaining == int(baseline["x-ratelimit-remaining-requests"]) - 1


def _tenant_keys(server: RedisServer, tenant: str) -> dict[str, Any]:
    """Every key of a tenant: (value, PTTL ms), sorted sets as their members: a fingerprint."""
    import redis

    assert server.port is not None
    client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    try:
        out: dict[str, Any] = {}
        for key in client.scan_iter(match=f"*{{t:{tenant}}}*", count=1000):
            kind, ttl_ms = client.type(key), client.pttl(key)
            if kind == "none":
                continue  # expired while we looked
            if kind == "zset":
                value: Any = sorted(client.zrange(key, 0, -1))
            elif kind == "string":
                # GCRA theoretical arrival times move with the clock only when written
                value = client.get(key)
            else:
                value = kind
            out[key] = (value, ttl_ms)
        return out
    finally:
        client.close()


async def test_reusing_a_request_id_does_not_bypass_the_concurrency_limit(
    make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(tenants={"acme": {"limits": {"max_concurrent": 1,
                                                         "concurrency_wait_s": 0},
                                              "loop_guard": {"enabled": False}}})
    headers = auth(**{"X-Request-Id": "same-id", "x-mock-latency-ms": "400"})
    results = await asyncio.gather(*(gw.post("/v1/chat/completions", json=chat(text=f"c{i}"),
                                             headers=headers) for i in range(3)))
    assert sorted(r.status for r in results) == [200, 429, 429]


# --- secrets in logs, metrics, spans and error messages ---------------------------------------


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The production JSON log handler on the root logger at DEBUG, captured; restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logs.configure("DEBUG", stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


async def test_planted_secrets_never_reach_logs_metrics_spans_or_error_messages(
    aiohttp_client: AiohttpClient, upstream_url: str, json_logs: io.StringIO,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    provider_key = "sk-provider-PLANTED-" + secrets.token_hex(8)
    tenant_key = "sk-tenant-PLANTED-" + secrets.token_hex(8)
    admin_key = "sk-admin-PLANTED-" + secrets.token_hex(8)
    redis_password = "redis-PLANTED-" + secrets.token_hex(8)
    prompt = "PROMPT-PLANTED-" + secrets.token_hex(8)
    monkeypatch.setenv("PLANTED_PROVIDER_KEY", provider_key)
    config = policy(upstream_url, admin={"api_keys": [hash_key(admin_key)]},
                    providers={"main": {"api_key_env": "PLANTED_PROVIDER_KEY",
                                        "timeouts": {"first_byte_s": 0.3, "idle_s": 0.5}},
                               "claude": {"api_key_env": "PLANTED_PROVIDER_KEY"}},
                    tenants={"acme": {"api_keys": [hash_key(tenant_key)],
                                      "limits": {"requests_per_minute": 1000},
                                      "loop_guard": {"max_repeats": 3}}})
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # a Redis that is not there, reached with a password: every degraded-mode path logs
    state = RedisBackend(f"redis://:{redis_password}@127.0.0.1:{pick_port()}", timeout_s=0.1)
    gw: Client = await aiohttp_client(create_app(config, state=state,
                                                 tracing=Tracing(provider)))
    key = {"Authorization": f"Bearer {tenant_key}"}
    answers: list[bytes] = []

    async def call(path: str, body: Any, **headers: str) -> None:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        kwargs: dict[str, Any] = {"data": io.BytesIO(raw)}
        headers.setdefault("Content-Type", "application/json")
        resp = await gw.post(path, headers={**key, **headers}, **kwargs)
        answers.append(json.dumps(dict(resp.headers)).encode() + await resp.read())

    text = f"{prompt} and nothing else"
    await call("/v1/chat/completions", chat(text=text))
    await call("/v1/chat/completions", chat(text=text, stream=True))
    await call("/v1/messages", {"model": "claude-test", "max_tokens": 5, "stream": True,
                                "system": prompt, "messages": [{"role": "user", "content": text}]},
               **{"x-api-key": tenant_key})
    await call("/v1/chat/completions", chat(text=text, stream=True),
               **{"x-mock-fail": "midstream-cut"})
    await call("/v1/chat/completions", chat(text=text), **{"x-mock-status": "500"})
    await call("/v1/chat/completions", chat(text=text), **{"x-mock-status": "401"})
    await call("/v1/chat/completions", chat(text=text), **{"x-mock-fail": "hang"})
    await call("/v1/chat/completions", chat(text=text), **{"x-mock-fail": "drop"})
    await call("/v1/embeddings", {"model": "embed-test", "input": text})
    await call("/v1/chat/completions", chat(text=text * 40_000))  # context window
    await call("/v1/chat/completions", b'{"model": "gpt-test", "messages": "' +
               prompt.encode() + b'", broken', **{"Content-Type": "application/json"})
    await call("/v1/chat/completions", chat(text=text, max_tokens=prompt))
    for _ in range(4):  # the loop guard
        await call("/v1/chat/completions", chat(text=text))
    await call("/v1/chat/completions", chat(text=text),
               Authorization=f"Bearer {tenant_key}x")  # almost the key
    await call("/v1/chat/completions", chat(text=text), Authorization=f"Bearer {prompt}")
    await call("/v1/chat/completions", chat(text=text), **{"X-Agent-Session": prompt + " x"})
    await gw.get("/admin/status", headers={"Authorization": f"Bearer {admin_key}"})
    await gw.get("/admin/status", headers={"Authorization": f"Bearer {admin_key}x"})
    await settled(gw)
    metrics = await (await gw.get("/metrics")).read()
    readyz = await (await gw.get("/readyz")).read()
    admin = await (await gw.get("/admin/status", headers={
        "Authorization": f"Bearer {admin_key}"})).read()
    await gw.close()  # shutdown logs too
    spans = "\n".join(s.to_json() for s in exporter.get_finished_spans())
    provider.shutdown()

    logged = json_logs.getvalue()
    assert '"logger":"gateway.access"' in logged and spans and b"gateway_requests" in metrics
    assert "redis" in logged and "degraded" in logged  # the error paths did log
    outputs = {"logs": logged, "metrics": metrics.decode(), "spans": spans,
               "readyz": readyz.decode(), "admin status": admin.decode()}
    for name, output in outputs.items():
        for secret in (provider_key, tenant_key, admin_key, redis_password, prompt,
                       provider_key[-16:], tenant_key[-16:]):
            assert secret not in output, f"{secret[:14]}... found in {name}"
    # Error messages sent to clients carry no credential (the prompt may come back in the
    # provider's own answer: that is the model's output, for the caller who sent it).
    for answer in answers:
        for secret in (provider_key, tenant_key, admin_key, redis_password):
            assert secret.encode() not in answer
