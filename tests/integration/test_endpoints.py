"""Every route is limited (issue 23): the route table, request limits on every authenticated
route (memory and Redis), long-poll cap, failed-authentication limit per client address, the
admin limit, and the token-counting routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, get_args

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import ClientResponse, web

from gateway.app.endpoints import AUTH_GUARD, ROUTE_TABLE, address_key, client_address
from gateway.app.server import GATEWAY
from gateway.config.limits import ExemptRoute
from gateway.mock.upstream import estimate_prompt_tokens
from gateway.request.auth import TenantPolicy, hash_key
from gateway.request.classifier import ROUTES
from gateway.state import MemoryBackend, RedisBackend, StateBackend
from gateway.state.plan import AdmitPlan, AdmitResult, SettlePlan
from tests.gwtest import ACME_KEY, NO_LAG_SHEDDING, UMBRELLA_KEY, FakeClock, auth, chat, log_fields
from tests.plugin_gateway import GatewayClient, MakeGateway, settled
from tests.redis_server import RedisCluster3, RedisServer

Gw = GatewayClient
ADMIN_KEY = "sk-admin-test"
PUBLIC = {"GET /healthz", "GET /readyz", "GET /metrics"}
MISSING_ID = "dfr_" + "0" * 32
# A request for each authenticated route (path parameters filled in, a body where needed).
REQUESTS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "POST /v1/chat/completions": ("POST", "/v1/chat/completions", chat()),
    "POST /v1/completions": ("POST", "/v1/completions", {"model": "gpt-test", "prompt": "hi"}),
    "POST /v1/embeddings": ("POST", "/v1/embeddings", {"model": "embed-test", "input": "hi"}),
    "POST /v1/responses": ("POST", "/v1/responses", {"model": "gpt-test", "input": "hi"}),
    "POST /v1/messages": ("POST", "/v1/messages", {
        "model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    "POST /v1/messages/count_tokens": ("POST", "/v1/messages/count_tokens", {
        "model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}),
    "POST /v1/responses/input_tokens": ("POST", "/v1/responses/input_tokens",
                                        {"model": "gpt-test", "input": "hi"}),
    "GET /v1/models": ("GET", "/v1/models", None),
    "GET /v1/models/{model}": ("GET", "/v1/models/gpt-test", None),
    "GET /v1/deferred/{id}": ("GET", f"/v1/deferred/{MISSING_ID}", None),
    "GET /v1/deferred/{id}/response": ("GET", f"/v1/deferred/{MISSING_ID}/response", None),
    "DELETE /v1/deferred/{id}": ("DELETE", f"/v1/deferred/{MISSING_ID}", None),
}


def _rpm(burst: int, **extra: Any) -> dict[str, Any]:
    # 6/min: one more request every 10 s, so a slow machine never sees one refill mid-test
    return {"tenants": {"acme": {"limits": {"requests_per_minute": 6, "request_burst": burst,
                                            **extra}}}}


async def _send(gw: Gw, name: str, headers: dict[str, str] | None = None) -> ClientResponse:
    method, path, body = REQUESTS[name]
    return await gw.request(method, path, json=body, headers=headers or auth())


def _walk(gw: Gw) -> dict[str, str]:
    """Every route of the app's router, by ``METHOD /template``, with its kind in the table;
    a route registered around ``Routes`` has kind ``unregistered``."""
    table = gw.app[ROUTE_TABLE]
    found: dict[str, str] = {}
    for route in gw.app.router.routes():
        if route.method == "HEAD":
            continue
        resource = route.resource
        assert resource is not None
        name = f"{route.method} {resource.canonical}"
        info = table.get(name)
        found[name] = info.kind if info is not None and info.handler is route.handler \
            else "unregistered"
    return found


# --- the route table --------------------------------------------------------------------


async def test_every_route_in_the_router_went_through_routes(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)]},
                            server={"metrics_need_admin_key": True})
    kinds = _walk(gw)
    assert "unregistered" not in kinds.values(), kinds
    assert {n for n, k in kinds.items() if k == "public"} == {"GET /healthz", "GET /readyz"}
    assert {n for n, k in kinds.items() if k == "admin"} == {"GET /admin/status", "GET /metrics"}
    authenticated = {n for n, k in kinds.items() if k in ("proxied", "tenant")}
    assert authenticated == set(REQUESTS)  # every one is exercised by the tests below
    # exempt_routes names exactly the request-only routes: tenant routes and token counting
    request_only = {f"POST {r.path}" for r in ROUTES.values() if r.request_only}
    assert set(get_args(ExemptRoute)) == {n for n, k in kinds.items() if k == "tenant"} \
        | request_only


async def test_a_route_added_around_routes_is_caught(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()

    async def sneaky(request: web.Request) -> web.Response:
        raise AssertionError

    gw.app.router._frozen = False  # the test adds a route the way a mistake would
    gw.app.router.add_get("/v1/sneaky", sneaky)
    assert _walk(gw)["GET /v1/sneaky"] == "unregistered"


# --- every authenticated route counts against requests_per_minute ------------------------


async def _backend(kind: str, request: pytest.FixtureRequest) -> StateBackend:
    if kind == "memory":
        return MemoryBackend(FakeClock())
    if kind == "cluster":
        cluster: RedisCluster3 = request.getfixturevalue("clean_redis_cluster")
        return RedisBackend(cluster.url, timeout_s=1.0)
    redis: RedisServer = request.getfixturevalue("clean_redis")
    redis.command("FLUSHALL")
    return RedisBackend(redis.url, timeout_s=1.0)


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
@pytest.mark.parametrize("name", sorted(REQUESTS))
async def test_each_route_is_counted_and_refused_over_the_limit(
    make_gateway: MakeGateway, request: pytest.FixtureRequest, kind: str, name: str,
) -> None:
    gw = await make_gateway(state=await _backend(kind, request),
                            deferred={"enabled": True, "workers": 0}, **_rpm(3))
    answered = [await _send(gw, name) for _ in range(3)]
    assert [r.status for r in answered if r.status == 429] == []
    refused = await _send(gw, name)
    assert refused.status == 429, (name, await refused.text())
    assert refused.headers["x-ratelimit-limit-requests"] == "6"
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    assert 1 <= int(refused.headers["retry-after-ms"]) <= 10_000
    body = await refused.json()
    if ROUTES.get(REQUESTS[name][1]) is not None and ROUTES[REQUESTS[name][1]].dialect \
            == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    else:
        assert body["error"]["code"] == "rate_limit_exceeded"
    # another tenant is not affected
    other = await _send(gw, "GET /v1/models", headers=auth(UMBRELLA_KEY))
    assert other.status == 200


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis),
                                  pytest.param("cluster", marks=pytest.mark.redis)])
async def test_cheap_routes_share_the_bucket_of_the_proxied_ones(
    make_gateway: MakeGateway, request: pytest.FixtureRequest, kind: str,
) -> None:
    # The scenario: 5 per minute, chat and the cheap routes draw on the same requests.
    gw = await make_gateway(state=await _backend(kind, request), **_rpm(5))
    statuses = [(await _send(gw, "POST /v1/chat/completions")).status for _ in range(2)]
    for _ in range(10):
        statuses.append((await _send(gw, "GET /v1/models")).status)
        statuses.append((await _send(gw, "GET /v1/models/{model}")).status)
        statuses.append((await _send(gw, "GET /v1/deferred/{id}")).status)
    assert len([s for s in statuses if s != 429]) == 5
    assert (await _send(gw, "POST /v1/chat/completions")).status == 429


async def test_tenant_routes_make_one_admit_call_and_no_settlement(
    make_gateway: MakeGateway,
) -> None:
    state = MemoryBackend(FakeClock())
    calls: list[str] = []
    admit, settle_many = state.admit, state.settle_many

    async def counting_admit(plan: AdmitPlan) -> AdmitResult:
        calls.append("admit")
        return await admit(plan)

    async def counting_settle(plans: Sequence[SettlePlan]) -> list[bool]:
        calls.append("settle")
        return await settle_many(plans)

    state.admit = counting_admit  # type: ignore[method-assign]
    state.settle_many = counting_settle  # type: ignore[method-assign]
    gw = await make_gateway(state=state, deferred={"enabled": True, "workers": 0}, **_rpm(50))
    for name in ("GET /v1/models", "GET /v1/models/{model}", "GET /v1/deferred/{id}",
                 "POST /v1/messages/count_tokens", "POST /v1/responses/input_tokens"):
        calls.clear()
        resp = await _send(gw, name)
        await asyncio.sleep(0.05)  # a settlement would have been scheduled by now
        assert resp.status != 429
        assert calls == ["admit"], name
        assert resp.headers["x-ratelimit-remaining-requests"].isdigit()


async def test_exempt_routes_are_not_counted_and_the_rest_still_are(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(state=MemoryBackend(FakeClock()),
                            **_rpm(2, exempt_routes=["GET /v1/models",
                                                     "POST /v1/messages/count_tokens"]))
    for _ in range(10):
        assert (await _send(gw, "GET /v1/models")).status == 200
        assert (await _send(gw, "POST /v1/messages/count_tokens")).status == 200
    assert (await _send(gw, "GET /v1/models/{model}")).status == 200
    assert (await _send(gw, "GET /v1/models/{model}")).status == 200
    assert (await _send(gw, "GET /v1/models/{model}")).status == 429


async def test_session_limits_count_the_cheap_routes_of_that_session(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(state=MemoryBackend(FakeClock()), tenants={"acme": {"limits": {
        "per_session": {"requests_per_minute": 6, "request_burst": 2}}}})
    session = auth(**{"X-Agent-Session": "run-1"})
    assert (await _send(gw, "GET /v1/models", session)).status == 200
    assert (await _send(gw, "POST /v1/messages/count_tokens", session)).status == 200
    refused = await _send(gw, "GET /v1/models", session)
    assert refused.status == 429
    assert "this agent session" in (await refused.json())["error"]["message"]
    other = auth(**{"X-Agent-Session": "run-2"})
    assert (await _send(gw, "GET /v1/models", other)).status == 200


async def test_no_limits_configured_means_nothing_is_refused(gw: Gw) -> None:
    for _ in range(30):
        assert (await _send(gw, "GET /v1/models")).status == 200


async def test_tenant_routes_follow_the_degraded_mode_when_redis_is_down(
    make_gateway: MakeGateway,
) -> None:
    # Nothing listens on port 1: the first admit fails, limits go local (the default action).
    gw = await make_gateway(state=RedisBackend("redis://127.0.0.1:1", timeout_s=0.1),
                            **_rpm(2))
    statuses = [(await _send(gw, "GET /v1/models")).status for _ in range(6)]
    assert 500 not in statuses and statuses[0] == 200
    assert gw.app[GATEWAY].degraded.active


# --- long polls ---------------------------------------------------------------------------


async def _queued_entry(gw: Gw) -> str:
    resp = await gw.post("/v1/chat/completions", json=chat(),
                         headers=auth(Prefer="respond-async"))
    assert resp.status == 202
    return str((await resp.json())["id"])


async def test_long_polls_are_capped_per_tenant_and_freed_when_the_client_leaves(
    make_gateway: MakeGateway,
) -> None:
    # aiohttp's TestServer, like `gateway serve`, cancels the handler of a closed connection
    gw = await make_gateway(deferred={"enabled": True, "workers": 0, "max_open_polls": 2})
    entry = await _queued_entry(gw)
    url = str(gw.make_url(f"/v1/deferred/{entry}?wait=30"))
    sessions = [aiohttp.ClientSession() for _ in range(2)]
    polls = [asyncio.create_task(s.get(url, headers=auth())) for s in sessions]
    try:
        for _ in range(100):  # until both polls are open (a probe may race one: relaunch it)
            for i, poll in enumerate(polls):
                if poll.done():
                    polls[i] = asyncio.create_task(sessions[i].get(url, headers=auth()))
            await asyncio.sleep(0.05)
            probe = await gw.get(f"/v1/deferred/{entry}?wait=0.01", headers=auth())
            if "x-gateway-wait-skipped" in probe.headers and not any(p.done() for p in polls):
                break
        # over the cap: answered at once with the current status, never an error
        over = await asyncio.wait_for(
            gw.get(f"/v1/deferred/{entry}?wait=30", headers=auth()), 10)
        assert over.status == 200 and (await over.json())["status"] == "queued"
        assert "x-gateway-wait-skipped" in over.headers
        assert not any(p.done() for p in polls)
        # the client of one poll goes away: its slot is released
        polls[0].cancel()
        await sessions[0].close()
        for _ in range(100):
            again = await gw.get(f"/v1/deferred/{entry}?wait=0.01", headers=auth())
            if "x-gateway-wait-skipped" not in again.headers:
                break
            await asyncio.sleep(0.05)
        assert "x-gateway-wait-skipped" not in again.headers
    finally:
        for poll in polls:
            poll.cancel()
        for session in sessions:
            await session.close()


# --- failed authentication per client address -------------------------------------------


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    import ipaddress

    lb = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("192.0.2.1", "203.0.113.9", ()) == "192.0.2.1"  # nothing trusted
    assert client_address("192.0.2.1", "203.0.113.9", lb) == "192.0.2.1"  # peer not trusted
    assert client_address("10.0.0.5", "203.0.113.9", lb) == "203.0.113.9"
    # a client-written hop left of the first untrusted one is never believed
    assert client_address("10.0.0.5", "1.2.3.4, 203.0.113.9, 10.0.0.7", lb) == "203.0.113.9"
    assert client_address("10.0.0.5", "", lb) == "10.0.0.5"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


def _xff(address: str, key: str = "sk-guess") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Forwarded-For": address}


async def test_failed_auth_refuses_the_address_before_comparing_keys(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(server={"trusted_proxies": ["127.0.0.1"],
                                    "auth_failures": {"max_failures": 5, "window_s": 60}})
    clock = FakeClock()
    gw.app[AUTH_GUARD].clock = clock
    policy = gw.app[GATEWAY].policy
    compared: list[int] = []
    authenticate = policy.auth.authenticate

    def counting(headers: Mapping[str, str]) -> TenantPolicy:
        compared.append(1)
        return authenticate(headers)

    policy.auth.authenticate = counting  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG)
    attacker = "203.0.113.7"
    for i in range(5):
        assert (await gw.get("/v1/models", headers=_xff(attacker, f"sk-guess-{i}"))).status == 401
    compared.clear()
    # the right key from that address is refused too, without being looked at
    blocked = await gw.post("/v1/chat/completions", json=chat(),
                            headers=_xff(attacker, ACME_KEY))
    assert blocked.status == 429 and compared == []
    assert (await blocked.json())["error"]["code"] == "too_many_auth_failures"
    assert blocked.headers["Retry-After"] == "12"  # 60 s / 5 failures
    assert int(blocked.headers["retry-after-ms"]) == 12_000
    # other clients are not slowed; successes do not count
    for _ in range(10):
        assert (await gw.get("/v1/models", headers=_xff("198.51.100.2", ACME_KEY))).status == 200
    # the Retry-After was true: 12 s later one more key is compared
    clock.now += 12
    assert (await gw.get("/v1/models", headers=_xff(attacker, ACME_KEY))).status == 200
    assert (await gw.get("/v1/models", headers=_xff(attacker, "sk-again"))).status == 401
    assert (await gw.get("/v1/models", headers=_xff(attacker, ACME_KEY))).status == 429
    # anthropic routes answer in their dialect; the admin routes share the guard
    msg = await gw.post("/v1/messages", json=REQUESTS["POST /v1/messages"][2],
                        headers=_xff(attacker, ACME_KEY))
    assert msg.status == 429 and (await msg.json())["type"] == "error"
    assert (await gw.get("/admin/status", headers=_xff(attacker, ACME_KEY))).status == 429
    metrics = gw.app[GATEWAY].metrics
    refused = metrics.registry.get_sample_value(
        "gateway_rejections_total", {"reason": "auth_failures", "priority": "none",
                                     "tenant": "none"})
    assert refused == 4
    access = [log_fields(r) for r in caplog.records if r.name == "gateway.access"]
    assert [f["status"] for f in access].count(401) == 6  # the lines exist, and hold no key:
    assert [f["error_code"] for f in access].count("too_many_auth_failures") == 3
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert "sk-guess" not in logged and ACME_KEY not in logged


async def test_forwarded_for_is_ignored_without_trusted_proxies(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(server={"auth_failures": {"max_failures": 3, "window_s": 60}})
    for i in range(3):  # a guesser rotating X-Forwarded-For: all one peer address
        assert (await gw.get("/v1/models", headers=_xff(f"203.0.113.{i}"))).status == 401
    assert (await gw.get("/v1/models", headers=_xff("203.0.113.99"))).status == 429


async def test_a_key_guessing_burst_does_not_slow_other_clients(make_gateway: MakeGateway) -> None:
    # no shedding for loop lag: this machine is shared, and the test is about the auth limit
    gw = await make_gateway(server={"trusted_proxies": ["127.0.0.0/8"],
                                    "auth_failures": {"max_failures": 10, "window_s": 60}},
                            admission=NO_LAG_SHEDDING)

    async def guess(i: int) -> int:
        return (await gw.get("/v1/models", headers=_xff("203.0.113.7", f"sk-{i}"))).status

    async def honest(i: int) -> int:
        body = chat(text=f"question {i}")
        resp = await gw.post("/v1/chat/completions", json=body,
                             headers=_xff(f"198.51.100.{i % 4}", ACME_KEY))
        return resp.status

    results = await asyncio.gather(*[guess(i) for i in range(200)],
                                   *[honest(i) for i in range(20)])
    guesses, honest_ones = results[:200], results[200:]
    assert guesses.count(401) == 10 and guesses.count(429) == 190
    assert honest_ones == [200] * 20


# --- admin routes -------------------------------------------------------------------------


async def test_admin_routes_have_their_own_limit(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)], "requests_per_minute": 6,
                                   "burst": 2},
                            server={"metrics_need_admin_key": True},
                            **_rpm(1))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await gw.get("/admin/status", headers=admin)).status == 200
    assert (await gw.get("/metrics", headers=admin)).status == 200
    refused = await gw.get("/admin/status", headers=admin)
    assert refused.status == 429 and 1 <= int(refused.headers["Retry-After"]) <= 10
    assert (await gw.get("/metrics", headers=admin)).status == 429
    # the admin limit is not the tenant's and the tenant's is not the admin's
    assert (await _send(gw, "GET /v1/models")).status == 200
    # a wrong admin key is a failed authentication (401), not a use of the admin limit
    assert (await gw.get("/admin/status",
                         headers={"Authorization": "Bearer nope"})).status == 401
    assert (await gw.get("/healthz")).status == 200
    metrics = gw.app[GATEWAY].metrics
    assert metrics.registry.get_sample_value("gateway_rejections_total", {
        "reason": "rate_limited", "priority": "none", "tenant": "none"}) == 2


# --- token counting -----------------------------------------------------------------------


async def test_count_tokens_reserves_no_tokens_and_spends_no_budget(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(state=MemoryBackend(FakeClock()), tenants={"acme": {"limits": {
        "tokens_per_minute": 20, "max_concurrent": 1}, "budget": {"daily_tokens": 20}}})
    big = {"model": "claude-test", "messages": [{"role": "user", "content": "word " * 400}]}
    for _ in range(5):
        resp = await gw.post("/v1/messages/count_tokens", json=big, headers=auth())
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["input_tokens"] > 400
    # a real request of that size is still refused by the token limit
    refused = await gw.post("/v1/messages", json={**big, "max_tokens": 5}, headers=auth())
    assert refused.status == 429


@pytest.mark.parametrize("exempt", [False, True])
async def test_count_tokens_calls_hold_a_concurrency_lease(make_gateway: MakeGateway,
                                                           exempt: bool) -> None:
    """A counting call is a call to the provider for as long as it takes: it holds one of the
    tenant's max_concurrent like any request, and gives it back when it ends (a tenant once
    held five slow counting calls at once under max_concurrent: 2; red team). Exempting the
    route from the request rate keeps the lease."""
    gw = await make_gateway(tenants={"acme": {"limits": {
        "max_concurrent": 2, "concurrency_wait_s": 0, "requests_per_minute": 600,
        "exempt_routes": ["POST /v1/messages/count_tokens"] if exempt else []}}})
    body = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]}
    slow = auth(**{"x-mock-latency-ms": "500"})
    answers = await asyncio.gather(*(gw.post("/v1/messages/count_tokens", json=body,
                                             headers=slow) for _ in range(5)))
    statuses = sorted(r.status for r in answers)
    assert statuses == [200, 200, 429, 429, 429], statuses
    refused = next(r for r in answers if r.status == 429)
    assert (await refused.json())["type"] == "error"  # in the Anthropic dialect
    assert "concurrent" in (await refused.json())["error"]["message"]
    await settled(gw)
    # the leases came back: the next ones pass
    for _ in range(2):
        resp = await gw.post("/v1/messages/count_tokens", json=body, headers=auth())
        assert resp.status == 200, await resp.text()


async def test_count_tokens_speaks_anthropic_errors(gw: Gw) -> None:
    resp = await gw.post("/v1/messages/count_tokens", json={"model": "claude-test"},
                         headers=auth())
    assert resp.status == 400
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    forbidden = await gw.post("/v1/messages/count_tokens", json=REQUESTS[
        "POST /v1/messages/count_tokens"][2], headers=auth(UMBRELLA_KEY))
    assert forbidden.status == 403 and (await forbidden.json())["type"] == "error"
    openai_route = await gw.post("/v1/messages/count_tokens", json={
        "model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}, headers=auth())
    assert openai_route.status == 400  # gpt-test has no kind: anthropic deployment


async def test_sdks_count_tokens_through_the_gateway(make_gateway: MakeGateway) -> None:
    # The SDKs build their types lazily on first use, blocking the loop the gateway shares
    # in this test: no shedding for loop lag here (test_fuzz does the same).
    gw = await make_gateway(admission=NO_LAG_SHEDDING)
    base = str(gw.make_url("")).rstrip("/")
    messages: list[Any] = [{"role": "user", "content": "How many tokens is this?"}]
    claude = anthropic.AsyncAnthropic(base_url=base, api_key=ACME_KEY)
    gpt = openai.AsyncOpenAI(base_url=base + "/v1", api_key=ACME_KEY)
    try:
        counted = await claude.messages.count_tokens(model="claude-test", messages=messages)
        assert counted.input_tokens == estimate_prompt_tokens({"messages": messages})
        async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-wrong") as wrong:
            with pytest.raises(anthropic.AuthenticationError):
                await wrong.messages.count_tokens(model="claude-test", messages=messages)
        tokens = await gpt.responses.input_tokens.count(model="gpt-test", input="hello there")
        assert tokens.input_tokens == estimate_prompt_tokens({"input": "hello there"})
        # the models routes answer each SDK in its own shape (anthropic-version tells them apart)
        page = await claude.models.list()
        assert "claude-test" in [m.id for m in page.data] and page.has_more is False
        assert (await claude.models.retrieve("claude-test")).type == "model"
        with pytest.raises(anthropic.NotFoundError):
            await claude.models.retrieve("nope")
        assert (await gpt.models.retrieve("gpt-test")).object == "model"
    finally:
        await claude.close()
        await gpt.close()
