"""Run budgets (issue 22 item 1): caps on one agent run (X-Agent-Session).

Three tiers: the run checks on every backend (memory, Redis, 3-node Cluster), a gateway on
the memory backend (caps, warning, per-model override, metrics), three gateway replicas on one
Redis / one Cluster with 20 concurrent requests of one run, and the openai SDK.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import ClientResponse, web
from pytest_aiohttp import AiohttpClient

from gateway.app.admin import render_table
from gateway.app.server import GATEWAY, create_app
from gateway.limits.runs import session_id
from gateway.request.auth import hash_key
from gateway.request.classifier import estimate_prompt_tokens
from gateway.state import MemoryBackend, RedisBackend, StateBackend
from gateway.state.plan import AdmitPlan, Check, Counter, LocalLimits, SettlePlan, Since
from tests.gwtest import ACME_KEY, FakeClock, auth, chat, log_fields, policy
from tests.integration.test_fleet_limits import Fleet, _wait_ready
from tests.integration.test_fleet_limits import mock_port as fleet_mock  # noqa: F401 (a fixture)
from tests.plugin_gateway import GatewayClient, MakeGateway, gateway_client, settled
from tests.redis_server import RedisServer

ADMIN_KEY = "sk-admin-runs"
T = "{t:acme}"
RUN = f"rl:{T}:r:abc:"


def plan(rid: str, *checks: Check) -> AdmitPlan:
    return AdmitPlan(rid, tuple(checks), f"rl:{T}:hold:{rid}", 60_000)


def settle(rid: str, counters: tuple[tuple[str, int, int, int], ...]) -> SettlePlan:
    return SettlePlan(rid, f"rl:{T}:done:{rid}", f"rl:{T}:hold:{rid}", 60_000, (), counters, ())


# --- the checks, on every backend ------------------------------------------------------------

async def test_in_flight_reservations_count_against_a_run_cap(backend: StateBackend) -> None:
    cap = Counter(RUN + "run-tok", limit=100, cost=60, ttl_ms=60_000, reset_ms=0, idle=True)
    assert (await backend.admit(plan("a", cap))).allowed
    refused = await backend.admit(plan("b", cap))  # "a" is still in flight: 60 + 60 > 100
    assert not refused.allowed and refused.results[0].remaining == 40
    assert await backend.settle(settle("a", ((cap.key, 60, 10, 60_000),)))
    ok = await backend.admit(plan("b", cap))
    assert ok.allowed and ok.results[0].remaining == 30


async def test_concurrent_admissions_never_pass_a_run_cap(backend: StateBackend) -> None:
    cap = Counter(RUN + "run-steps", limit=7, cost=1, ttl_ms=60_000, reset_ms=0, idle=True)
    results = await asyncio.gather(*(backend.admit(plan(f"c{i}", cap)) for i in range(40)))
    assert sum(r.allowed for r in results) == 7


async def test_a_run_older_than_its_age_cap_is_refused(backend: StateBackend) -> None:
    first = await backend.admit(plan("a", Since(RUN + "run-t0", 600_000, 60_000)))
    assert first.allowed and 599_000 <= first.results[0].remaining <= 600_000
    await asyncio.sleep(0.02)  # the run's age only grows: 20 ms is more than a 5 ms cap
    old = await backend.admit(plan("b", Since(RUN + "run-t0", 5, 60_000)))
    assert not old.allowed
    # A cap the run is still inside: the age counts from the first admission, not this one.
    young = await backend.admit(plan("c", Since(RUN + "run-t0", 600_000, 60_000)))
    assert young.allowed and young.results[0].remaining <= 599_980


@pytest.fixture
async def redis_backend(shared_backend_url: str) -> AsyncIterator[RedisBackend]:
    store = RedisBackend(shared_backend_url, timeout_s=1.0)
    await store.start()
    yield store
    await store.close()


# TTLs read from Redis; the memory twin is tested with a fake clock below.
async def test_every_admission_renews_a_runs_keys_on_redis(redis_backend: RedisBackend) -> None:
    backend = redis_backend
    tok = Counter(RUN + "run-tok", 1000, 1, 60_000, 0, idle=True)
    age = Since(RUN + "run-t0", 600_000, 60_000)
    assert (await backend.admit(plan("a", tok, age))).allowed
    assert 0 < (await backend.ttl_ms(tok.key) or 0) <= 60_000
    longer = (Counter(tok.key, 1000, 1, 600_000, 0, idle=True), Since(age.key, 600_000, 600_000))
    assert (await backend.admit(plan("b", *longer))).allowed
    assert (await backend.ttl_ms(tok.key) or 0) > 60_000
    assert (await backend.ttl_ms(age.key) or 0) > 60_000
    # A period budget's TTL is set once, not renewed (the contrast that makes idle matter).
    day = Counter(f"rl:{T}:b:tokens:d", 1000, 1, 60_000, 1000)
    await backend.admit(plan("c", day))
    await backend.admit(plan("d", Counter(day.key, 1000, 1, 600_000, 1000)))
    assert (await backend.ttl_ms(day.key) or 0) <= 60_000


def test_a_run_idle_past_its_ttl_is_forgotten_and_an_active_one_is_not() -> None:
    clock = FakeClock(0.0)
    limits = LocalLimits(clock)
    tok = Counter(RUN + "run-tok", 100, 40, 10_000, 0, idle=True)
    assert limits.admit(plan("a", tok)).allowed
    clock.now = 8.0
    assert limits.admit(plan("b", tok)).allowed  # renews: the key now lives until t=18
    clock.now = 16.0
    assert not limits.admit(plan("c", tok)).allowed  # 80 used: still the same run
    clock.now = 30.0  # idle for 22 s > 10 s: a new run
    assert limits.admit(plan("d", tok)).allowed


# --- a gateway on the memory backend ---------------------------------------------------------

# Loop-lag shedding off in the fleet's own policy file (policy() in tests/gwtest.py turns it off
# for the gateways built in this process): shedding is not what is tested.
CALM = {"admission": {"self_protection": {"max_loop_lag_ms": 600_000}}}


def _run_policy(**caps: Any) -> dict[str, Any]:
    return {"tenants": {"acme": {"loop_guard": {"enabled": False},
                                 "run_budget": caps}}}


async def _chat(gw: GatewayClient, run: str, max_tokens: int = 50,
                text: str = "hello there", model: str = "gpt-test") -> ClientResponse:
    return await gw.post("/v1/chat/completions",
                         json=chat(model, text, max_tokens=max_tokens),
                         headers=auth(**{"X-Agent-Session": run, "x-mock-chunks": "5"}))


async def test_a_run_over_its_token_cap_gets_a_final_429_naming_the_cap(
    make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(**_run_policy(max_tokens=200))
    # Each call reserves ~3 prompt + 50 output and uses ~3 + 5: settled, 8 tokens a step.
    statuses, warnings = [], []
    for _ in range(30):
        resp = await _chat(gw, "run-a")
        statuses.append(resp.status)
        warnings.append(resp.headers.get("x-gateway-run-budget-warning"))
        await settled(gw)
        if resp.status == 429:
            body = await resp.json()
            assert body["error"]["code"] == "run_budget_exceeded"
            assert "tokens cap of 200" in body["error"]["message"]
            assert "run_budget.max_tokens" in body["error"]["message"]
            assert resp.headers["x-should-retry"] == "false"
            assert "Retry-After" not in resp.headers
            break
    assert statuses[-1] == 429 and statuses.count(200) >= 15
    # Past 80 %: what the run spent plus what this request reserves (its 50-token cap).
    warned = [w for w in warnings if w]
    assert warned and all(w.startswith("tokens ") and w.endswith("% used or reserved")
                          for w in warned), warned
    # Another run of the same tenant is untouched.
    assert (await _chat(gw, "run-b")).status == 200
    # So is a request without a session: run caps apply to runs only.
    resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=50), headers=auth())
    assert resp.status == 200


async def test_steps_cap_and_the_soft_warning(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**_run_policy(max_steps=5, soft_ratio=0.6))
    warnings = []
    for _ in range(5):
        resp = await _chat(gw, "run-s")
        assert resp.status == 200
        warnings.append(resp.headers.get("x-gateway-run-budget-warning"))
    assert warnings[:2] == [None, None]  # 1/5, 2/5 used
    assert warnings[2] == "steps 60% used" and warnings[4] == "steps 100% used"
    refused = await _chat(gw, "run-s")
    assert refused.status == 429
    assert "steps cap of 5" in (await refused.json())["error"]["message"]


async def test_cost_cap_counts_micro_units_and_per_model_overrides(
    make_gateway: MakeGateway
) -> None:
    # gpt-test: 1.0 in / 2.0 out per million; a call reserves ~3 x 1 + 50 x 2 = 103 micro.
    gw = await make_gateway(**_run_policy(
        max_cost=0.01, per_model={"gpt-test": {"max_cost": 0.0002}}))
    for _ in range(2):  # each reserves ~103 micro-units, settles to ~3 + 10
        assert (await _chat(gw, "run-c")).status == 200
        await settled(gw)
    # ~26 spent + ~183 reserved > 200: refused at the model's cap, not the tenant-wide 0.01.
    refused = await _chat(gw, "run-c", max_tokens=90)
    assert refused.status == 429
    assert "cost cap of 0.0002" in (await refused.json())["error"]["message"]
    assert (await _chat(gw, "run-c", max_tokens=50)).status == 200  # 26 + 103 still fits


async def test_a_run_past_its_age_cap_is_stopped_and_a_new_run_is_not(
    make_gateway: MakeGateway
) -> None:
    clock = FakeClock(100.0)  # the store's clock: the run's age is measured there
    gw = await make_gateway(state=MemoryBackend(clock), **_run_policy(max_age_s=60))
    assert (await _chat(gw, "run-old")).status == 200
    clock.now += 59.5
    assert (await _chat(gw, "run-old")).status == 200
    clock.now += 1.0  # 60.5 s after the run's first request
    refused = await _chat(gw, "run-old")
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "run_budget_exceeded"
    assert "older than its age cap of 60 s" in body["error"]["message"]
    assert "run_budget.max_age_s" in body["error"]["message"]
    assert (await _chat(gw, "run-new")).status == 200


async def test_a_request_refused_before_any_model_call_gives_its_step_back(
    make_gateway: MakeGateway
) -> None:
    # The deployment's provider quota (1 request a minute, fleet-wide) refuses the second
    # call after admission but before any upstream attempt: no model call, no step.
    gw = await make_gateway(**_run_policy(max_steps=2), models={"gpt-test": {"deployments": [
        {"provider": "main", "model": "upstream-gpt", "requests_per_minute": 1}]}})
    assert (await _chat(gw, "run-q")).status == 200
    for _ in range(3):
        refused = await _chat(gw, "run-q")  # 503: no deployment has quota left
        assert refused.status in (429, 503)
        # Counted as steps, the third of them would be refused by max_steps instead.
        assert (await refused.json())["error"]["code"] != "run_budget_exceeded"
        await settled(gw)
    runs = gw.app[GATEWAY].inflight.runs.snapshot(lambda _: 3600)["acme"]
    assert runs[0]["steps"] == 1 and runs[0]["stopped_by"] is None


async def test_a_run_refused_by_a_cap_counts_in_metrics_and_status(
    make_gateway: MakeGateway
) -> None:
    gw = await make_gateway(**_run_policy(max_steps=2))
    for _ in range(3):
        await _chat(gw, "run-m")
    await settled(gw)
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_run_budget_stops_total{cap="steps",tenant="acme"} 1.0' in metrics
    assert "run-m" not in metrics  # session ids never become labels


async def test_twenty_concurrent_requests_of_one_run_on_three_replicas_stay_under_the_cap(
    make_gateway: MakeGateway, shared_backend_url: str
) -> None:
    backend_url = shared_backend_url  # replicas share Redis or the Cluster
    cap = 500
    policy = _run_policy(max_tokens=cap)
    replicas = [await make_gateway(state=RedisBackend(backend_url, timeout_s=1.0), **policy)
                for _ in range(3)]

    async def one(i: int) -> tuple[int, int, str]:
        resp = await replicas[i % 3].post(
            "/v1/chat/completions", json=chat(text="step", max_tokens=40),
            headers=auth(**{"X-Agent-Session": "one-run", "x-mock-chunks": "40"}))
        body = await resp.json()
        code = body.get("error", {}).get("code", "")
        return resp.status, body.get("usage", {}).get("total_tokens", 0), code

    results = await asyncio.gather(*(one(i) for i in range(20)))
    for gw in replicas:
        await settled(gw)
    used = sum(tokens for status, tokens, _ in results if status == 200)
    admitted = sum(status == 200 for status, _, _ in results)
    refused = [code for status, _, code in results if status != 200]
    # Each request reserves its prompt estimate + 40 and uses a little less: the cap admits
    # cap // reservation of 20 at once, whatever replica they hit and however they interleave,
    # and more when early answers settled (gave back their unused part) before the last
    # admissions; what holds always is that real usage never passes the cap (below).
    reservation = estimate_prompt_tokens(chat(text="step", max_tokens=40)) + 40
    assert admitted >= cap // reservation, results
    assert set(refused) == {"run_budget_exceeded"}
    assert used <= cap  # real usage never above the reservations, which never pass the cap
    store = RedisBackend(backend_url, timeout_s=1.0)
    await store.start()
    try:
        run_keys = [k for k in await _keys(store) if k.endswith(":run-tok")]
        assert len(run_keys) == 1
        assert int(await store.get(run_keys[0]) or 0) == used  # settled to the real usage
    finally:
        await store.close()


async def _keys(store: RedisBackend) -> list[str]:
    prefix = store.key_prefix
    client: Any = store.client
    if store.cluster:
        found = await client.keys(f"{prefix}rl:*", target_nodes="all")
    else:
        found = await client.keys(f"{prefix}rl:*")
    return [k.decode()[len(prefix):] for k in found]


# --- the openai SDK --------------------------------------------------------------------------

async def test_openai_sdk_a_run_over_its_token_cap_is_refused_once_while_another_run_works(
    aiohttp_client: AiohttpClient, upstream_url: str
) -> None:
    app = create_app(policy(upstream_url, **_run_policy(max_tokens=120)))
    answers: list[tuple[str, int]] = []  # (run, status) of every answer: SDK retries included

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/v1/"):
            answers.append((request.headers.get("X-Agent-Session", ""), response.status))

    app.on_response_prepare.append(count)
    gw: GatewayClient = await gateway_client(aiohttp_client, app)

    def client(run: str) -> openai.AsyncOpenAI:  # default settings: max_retries 2
        return openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY,
                                  default_headers={"X-Agent-Session": run,
                                                   "x-mock-chunks": "5"})

    async with client("runaway") as runaway, client("other") as other:
        with pytest.raises(openai.RateLimitError) as info:
            for _ in range(40):
                await runaway.chat.completions.create(
                    model="gpt-test", max_tokens=50,
                    messages=[{"role": "user", "content": "again"}])
                await settled(gw)
        assert info.value.code == "run_budget_exceeded"
        # x-should-retry: false: the SDK gave up at once, without retrying the refused call.
        assert answers[-1] == ("runaway", 429) and answers.count(("runaway", 429)) == 1
        assert answers.count(("runaway", 200)) >= 5
        answer = await other.chat.completions.create(
            model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        with pytest.raises(openai.RateLimitError):
            await runaway.chat.completions.create(
                model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": "x"}])
    assert answers[-2:] == [("other", 200), ("runaway", 429)]
    status = app[GATEWAY].inflight.runs.snapshot(lambda _: 3600)
    stopped = [r["stopped_by"] for r in status["acme"]]
    assert stopped.count("tokens") == 1 and stopped.count(None) == 1


# --- runs visible: /admin/status, gateway status, the access log -----------------------------

async def test_status_lists_the_biggest_runs_and_the_access_log_their_totals(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = await make_gateway(**_run_policy(max_steps=3, max_tokens=100_000),
                            admin={"api_keys": [hash_key(ADMIN_KEY)]})
    for _ in range(4):  # the 4th is refused by the steps cap
        await _chat(gw, "big-run-secret-id")
    await settled(gw)
    await _chat(gw, "small-run")
    await settled(gw)
    lines = [log_fields(r) for r in caplog.records if r.name == "gateway.access"]
    assert [line["run"]["steps"] for line in lines[:3]] == [1, 2, 3]
    assert lines[2]["run"]["tokens"] > lines[1]["run"]["tokens"] > 0
    assert lines[3]["run"] is None and lines[3]["error_code"] == "run_budget_exceeded"
    resp = await gw.get("/admin/status", headers=auth(ADMIN_KEY))
    data = await resp.json()
    runs = data["tenants"]["acme"]["runs"]
    assert [r["steps"] for r in runs] == [3, 1]
    assert runs[0]["stopped_by"] == "steps" and runs[1]["stopped_by"] is None
    assert runs[0]["tokens"] == 3 * lines[0]["tokens_in"] + 3 * 5  # settled to real usage
    assert data["tenants"]["acme"]["run_budget"]["max_steps"] == 3
    text = json.dumps(data) + render_table(data)
    assert "secret" not in text and "small-run" not in text  # hashed ids only
    assert runs[0]["run"] in render_table(data)


@pytest.mark.redis
async def test_twenty_concurrent_requests_of_one_run_on_three_gateway_processes(
    tmp_path: Path, fleet_mock: int, clean_redis: RedisServer  # noqa: F811 (the fixture)
) -> None:
    """The same as above with three `gateway serve` processes (as tests/integration/test_fleet_limits.py
    builds them): nothing is shared but the Redis."""
    cap = 500
    config = tmp_path / "policy.yaml"
    config.write_text(yaml.safe_dump({
        "state": {"backend": "redis", "timeout_s": 1.0},
        "providers": {"mock": {"kind": "openai", "forward_headers": ["x-mock-*"],
                               "base_url": f"http://127.0.0.1:{fleet_mock}/v1"}},
        "models": {"m": {"deployments": [{"provider": "mock", "model": "m"}]}},
        "tenants": {"t": {"api_keys": [hash_key("sk-run")], "loop_guard": {"enabled": False},
                          "run_budget": {"max_tokens": cap}}},
        **CALM,
    }))
    fleet = Fleet(config, clean_redis.url)
    try:
        urls = fleet.urls()
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, urls)

            async def one(i: int) -> tuple[int, int, str]:
                async with session.post(
                    urls[i % 3] + "/v1/chat/completions",
                    json={"model": "m", "max_tokens": 40,
                          "messages": [{"role": "user", "content": "step"}]},
                    headers={"Authorization": "Bearer sk-run", "X-Agent-Session": "one-run",
                             "x-mock-chunks": "40"},
                ) as resp:
                    body = await resp.json()
                    return (resp.status, body.get("usage", {}).get("total_tokens", 0),
                            body.get("error", {}).get("code", ""))

            results = await asyncio.gather(*(one(i) for i in range(20)))
    finally:
        fleet.close()  # SIGTERM drains pending settlements before exit
    admitted = [tokens for status, tokens, _ in results if status == 200]
    reservation = estimate_prompt_tokens(
        {"model": "m", "max_tokens": 40, "messages": [{"role": "user", "content": "step"}]}) + 40
    # prompt estimate + 40 output each; more when early answers settled first
    assert len(admitted) >= cap // reservation, results
    assert {code for status, _, code in results if status != 200} == {"run_budget_exceeded"}
    assert sum(admitted) <= cap
    key = f"gw:rl:{{t:t}}:r:{session_id('one-run')}:run-tok"
    assert int(clean_redis.command("GET", key)) == sum(admitted)  # type: ignore[arg-type]
