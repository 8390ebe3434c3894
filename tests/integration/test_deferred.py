"""Deferred requests end to end: Prefer: respond-async through a real gateway, a real Redis and a
deterministic upstream on 127.0.0.1 (gateway/deferred/service.py, gateway/app/deferred_api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.app.server import GATEWAY
from gateway.limits.periods import period_keys
from gateway.state import RedisBackend
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, chat
from tests.plugin_gateway import GatewayClient, MakeGateway, settled
from tests.redis_server import RedisServer

ASYNC = {"Prefer": "respond-async"}
DEFERRED = {"enabled": True, "visibility_timeout_s": 1.0, "poll_interval_s": 0.1,
            "sweep_interval_s": 0.2, "retry_backoff_s": 0.1}
ANSWER = {"id": "chatcmpl-fixed", "object": "chat.completion", "created": 1700000000,
          "model": "upstream-gpt",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
BAD = {"error": {"message": "bad thing", "type": "invalid_request_error", "code": "nope",
                 "param": None}}


class Upstream:
    """Always the same answer; x-mock-answer: bad -> 400, flaky -> 503 for the first
    x-mock-fails calls; x-mock-delay: seconds before answering. Records calls in order."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.calls.append(headers)
            await asyncio.sleep(float(headers.get("x-mock-delay", "0")))
            mode = headers.get("x-mock-answer", "ok")
            if mode == "bad":
                return web.json_response(BAD, status=400)
            if mode == "flaky" and len(self.calls) <= int(headers.get("x-mock-fails", "0")):
                return web.json_response({"error": {"message": "busy"}}, status=503)
            return web.Response(body=orjson.dumps(ANSWER), content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        return app


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> tuple[Upstream, str]:
    mock = Upstream()
    server = await aiohttp_server(mock.app())
    return mock, str(server.make_url("")).rstrip("/")


Gw = GatewayClient


def redis_gateway(make_gateway: MakeGateway, url: str, redis: RedisServer, **overrides: Any
                  ) -> Awaitable[GatewayClient]:
    deferred = {**DEFERRED, **overrides.pop("deferred", {})}
    return make_gateway(upstream=url, state=RedisBackend(redis.url, timeout_s=1.0),
                        deferred=deferred, **overrides)


def budget_used(redis: RedisServer, tenant: str = "acme") -> int:
    part = period_keys(time.time())[0][1]
    value = redis.command("GET", f"gw:rl:{{t:{tenant}}}:b:tokens:{part}")
    return int(value) if isinstance(value, bytes) else 0


async def eventually(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    until = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < until, "condition not met in time"
        await asyncio.sleep(0.02)


async def submit(gw: Gw, key: str | None = None, **headers: str) -> dict[str, Any]:
    resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=100),
                         headers=auth(key or ACME_KEY, **ASYNC, **headers))
    body: dict[str, Any] = await resp.json()
    assert resp.status == 202, body
    assert resp.headers["Location"] == f"/v1/deferred/{body['id']}"
    assert resp.headers["Preference-Applied"] == "respond-async"
    return body


async def result(gw: Gw, entry_id: str, key: str | None = None, wait: float = 8.0
                 ) -> dict[str, Any]:
    resp = await gw.get(f"/v1/deferred/{entry_id}?wait={wait}", headers=auth(key or ACME_KEY))
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


@pytest.mark.redis
async def test_submit_long_poll_and_the_answer_is_the_synchronous_one(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    mock, url = upstream
    gw = await redis_gateway(make_gateway, url, clean_redis,
                             tenants={"acme": {"budget": {"daily_tokens": 1_000_000}}})
    for answer, status in (("ok", 200), ("bad", 400)):
        sync = await gw.post("/v1/chat/completions", json=chat(max_tokens=100),
                             headers=auth(**{"x-mock-answer": answer}))
        sync_body = await sync.read()
        assert sync.status == status
        sub = await submit(gw, **{"x-mock-answer": answer})
        assert sub["status"] == "queued" and sub["queue_position"] >= 1
        assert sub["expires_at"] - sub["created_at"] == 86_400
        done = await result(gw, sub["id"])
        assert done["status"] == ("succeeded" if status == 200 else "failed"), done
        assert done["response"]["status_code"] == status
        assert done["response"]["body"] == orjson.loads(sync_body)
        assert done["runs"] == 1 and done["run_log"][0]["outcome"] in ("success", "http_400")
        raw = await gw.get(f"/v1/deferred/{sub['id']}/response", headers=auth())
        assert (raw.status, await raw.read()) == (status, sync_body)
        assert raw.headers["Content-Type"] == sync.headers["Content-Type"]
    # the upstream saw the same request both ways, and never the client's key or Prefer
    assert len(mock.calls) == 4
    assert all("prefer" not in c and "sk-test" not in c.get("authorization", "")
               for c in mock.calls)
    # charged the real usage (12 tokens) per call, the reservations all refunded
    await settled(gw)
    await eventually(lambda: budget_used(clean_redis) == 24)
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_deferred_submitted_total{tenant="acme",via="prefer"} 2.0' in metrics
    assert 'gateway_deferred_finished_total{outcome="succeeded",tenant="acme"} 1.0' in metrics
    assert 'gateway_deferred_finished_total{outcome="failed",tenant="acme"} 1.0' in metrics
    assert 'gateway_deferred_queue_depth{tenant="acme"}' in metrics
    # What status and metrics show left of the budget is the store's: a run's charge is its
    # usage alone (it once counted as a refund too: more left than before anything was spent)
    assert 'gateway_budget_remaining{budget="daily_tokens",tenant="acme"} 999976.0' in metrics


@pytest.mark.redis
async def test_cancel_refunds_the_reservation(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    _, url = upstream
    # the budget holds one reservation (~107 tokens) but not two; no workers: entries wait
    gw = await redis_gateway(make_gateway, url, clean_redis, deferred={"workers": 0},
                             tenants={"acme": {"budget": {"daily_tokens": 150}}})
    first = await submit(gw)
    reserved = budget_used(clean_redis)
    assert 100 < reserved <= 150
    over = await gw.post("/v1/chat/completions", json=chat(max_tokens=100),
                         headers=auth(**ASYNC))
    assert over.status == 429 and (await over.json())["error"]["code"] == "insufficient_quota"
    resp = await gw.delete(f"/v1/deferred/{first['id']}", headers=auth())
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    assert budget_used(clean_redis) == 0
    again = await gw.delete(f"/v1/deferred/{first['id']}", headers=auth())
    assert again.status == 200 and budget_used(clean_redis) == 0  # refunded once only
    assert (await result(gw, first["id"], wait=0))["status"] == "cancelled"
    raw = await gw.get(f"/v1/deferred/{first['id']}/response", headers=auth())
    assert raw.status == 409
    await submit(gw)  # the refunded budget takes a new one


@pytest.mark.redis
async def test_limits_and_queue_bound_are_enforced_at_submit(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    _, url = upstream
    gw = await redis_gateway(
        make_gateway, url, clean_redis,
        deferred={"workers": 0, "tenants": {"umbrella": {"max_queued": 1}}},
        tenants={"acme": {"limits": {"requests_per_minute": 60, "request_burst": 1}}})
    await submit(gw)
    limited = await gw.post("/v1/chat/completions", json=chat(), headers=auth(**ASYNC))
    assert limited.status == 429 and "Retry-After" in limited.headers
    assert (await limited.json())["error"]["code"] == "rate_limit_exceeded"
    await submit(gw, UMBRELLA_KEY)
    full = await gw.post("/v1/chat/completions", json=chat(), headers=auth(UMBRELLA_KEY, **ASYNC))
    assert full.status == 429 and (await full.json())["error"]["code"] == "deferred_queue_full"
    bad = await gw.post("/v1/chat/completions", json={"model": "gpt-test"}, headers=auth(**ASYNC))
    assert bad.status == 400  # validated before anything is stored


@pytest.mark.redis
async def test_only_the_submitting_tenant_can_see_or_cancel(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    _, url = upstream
    gw = await redis_gateway(make_gateway, url, clean_redis, deferred={"workers": 0})
    entry = (await submit(gw))["id"]
    for method, path in (("GET", ""), ("GET", "/response"), ("DELETE", "")):
        resp = await gw.request(method, f"/v1/deferred/{entry}{path}",
                                headers=auth(UMBRELLA_KEY))
        assert resp.status == 404, (method, path)
        assert (await resp.json())["error"]["code"] == "deferred_not_found"
        anonymous = await gw.request(method, f"/v1/deferred/{entry}{path}")
        assert anonymous.status == 401
    assert (await gw.get("/v1/deferred/dfr_nothere", headers=auth())).status == 404
    assert (await gw.get(f"/v1/deferred/{entry}?wait=x", headers=auth())).status == 400
    assert (await result(gw, entry, wait=0))["status"] == "queued"  # untouched


@pytest.mark.redis
async def test_expiry_refunds_and_is_final(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    _, url = upstream
    gw = await redis_gateway(
        make_gateway, url, clean_redis,
        deferred={"workers": 0, "tenants": {"acme": {"ttl_s": 1}}},
        tenants={"acme": {"budget": {"daily_tokens": 150}}})
    entry = (await submit(gw))["id"]
    assert budget_used(clean_redis) > 100
    began = time.monotonic()
    done = await result(gw, entry, wait=5)
    assert done["status"] == "expired" and done["response"] is None
    assert 0.9 < time.monotonic() - began < 3.0
    assert budget_used(clean_redis) == 0
    cancel = await gw.delete(f"/v1/deferred/{entry}", headers=auth())
    assert cancel.status == 409
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_deferred_finished_total{outcome="expired",tenant="acme"} 1.0' in metrics


@pytest.mark.redis
async def test_retryable_failures_run_again_and_every_run_shows(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    mock, url = upstream
    gw = await redis_gateway(make_gateway, url, clean_redis, retries={"max_attempts": 1})
    entry = (await submit(gw, **{"x-mock-answer": "flaky", "x-mock-fails": "2"}))["id"]
    done = await result(gw, entry)
    assert done["status"] == "succeeded" and done["runs"] == 3, done
    assert [r["outcome"] for r in done["run_log"]] == ["http_503", "http_503", "success"]
    assert [r["charged"] for r in done["run_log"]] == ["actual"] * 3
    assert len(mock.calls) == 3


@pytest.mark.redis
async def test_on_shed_defers_a_would_be_shed_low_request(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    mock, url = upstream
    gw = await redis_gateway(
        make_gateway, url, clean_redis,
        deferred={"tenants": {"umbrella": {"mode": "on_shed"}}},
        admission={"concurrency": {"min_limit": 1, "initial_limit": 1, "max_limit": 1},
                   "classes": {"low": {"max_queue": 0, "queue_target_ms": 2000,
                                       "holdback_share": 0.7, "default_deadline_s": 600}}})
    # with a free slot, on_shed runs the request at once
    now = await gw.post("/v1/chat/completions", json=chat(), headers=auth(UMBRELLA_KEY, **ASYNC))
    assert now.status == 200
    slow = asyncio.create_task(gw.post("/v1/chat/completions", json=chat(text="slow"),
                                       headers=auth(**{"x-mock-delay": "0.5"})))
    await eventually(lambda: len(mock.calls) == 2)
    shed = await gw.post("/v1/chat/completions", json=chat(text="a"),
                         headers=auth(UMBRELLA_KEY))
    assert shed.status == 503
    entry = (await submit(gw, UMBRELLA_KEY))["id"]
    assert (await slow).status == 200
    done = await result(gw, entry, UMBRELLA_KEY)
    assert done["status"] == "succeeded" and done["response"]["body"] == ANSWER
    metrics = await (await gw.get("/metrics")).text()
    assert 'gateway_deferred_submitted_total{tenant="umbrella",via="shed"} 1.0' in metrics


@pytest.mark.redis
async def test_deferred_work_waits_for_interactive_requests_in_the_queue(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    mock, url = upstream
    gw = await redis_gateway(
        make_gateway, url, clean_redis,
        admission={"concurrency": {"min_limit": 1, "initial_limit": 1, "max_limit": 1}})

    def post(tag: str) -> asyncio.Task[Any]:
        return asyncio.create_task(gw.post(
            "/v1/chat/completions", json=chat(text=tag),
            headers=auth(**{"x-mock-delay": "0.3", "x-mock-tag": tag, "X-Priority": "normal"})))

    first = post("first")
    await eventually(lambda: len(mock.calls) == 1)
    second = post("second")  # queued behind the first
    await asyncio.sleep(0.05)
    entry = (await submit(gw, **{"x-mock-tag": "deferred"}))["id"]
    await asyncio.sleep(0.2)
    assert (await result(gw, entry, wait=0))["status"] == "queued"  # no slot taken
    assert [(await t).status for t in (first, second)] == [200, 200]
    assert (await result(gw, entry))["status"] == "succeeded"
    assert [c["x-mock-tag"] for c in mock.calls] == ["first", "second", "deferred"]


async def test_an_entry_waiting_for_a_slot_is_not_read_again_and_again(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that finds no slot is tried again every quarter second; it parsed its stored
    body each time first, uncharged: 13 entries of 9.6 MB bodies took the event loop from
    every tenant while slow calls held the slots. The stored model's deployments are checked
    before the body is read; what is read is charged to the tenant's work budget."""
    import gateway.deferred.run as deferred_run
    from gateway.request import parse_json_body as parse
    reads = 0

    def counted(raw: bytes, max_values: int) -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return parse(raw, max_values)

    monkeypatch.setattr(deferred_run, "parse_json_body", counted)
    mock, url = upstream
    gw = await redis_gateway(
        make_gateway, url, clean_redis,
        admission={"concurrency": {"min_limit": 1, "initial_limit": 1, "max_limit": 1}})
    busy = asyncio.create_task(gw.post(
        "/v1/chat/completions", json=chat(), headers=auth(**{"x-mock-delay": "2.0"})))
    await eventually(lambda: len(mock.calls) == 1)
    entry = (await submit(gw))["id"]
    await asyncio.sleep(0.8)  # three or four tries, every one without a slot
    assert (await result(gw, entry, wait=0))["status"] == "queued"
    assert reads == 0
    assert (await busy).status == 200
    assert (await result(gw, entry))["status"] == "succeeded"
    assert reads == 1


async def test_memory_backend_runs_deferred_requests_in_process(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str]) -> None:
    _, url = upstream
    gw = await make_gateway(upstream=url, deferred=DEFERRED)
    app = gw.app
    assert app[GATEWAY].deferred.store.name == "memory"
    entry = (await submit(gw))["id"]
    done = await result(gw, entry)
    assert done["status"] == "succeeded" and done["response"]["body"] == ANSWER


async def test_the_preference_is_ignored_when_deferral_is_off_or_the_call_streams(
        make_gateway: MakeGateway, upstream_url: str) -> None:
    off = await make_gateway()
    resp = await off.post("/v1/chat/completions", json=chat(), headers=auth(**ASYNC))
    assert resp.status == 200 and "Preference-Applied" not in resp.headers
    on = await make_gateway(deferred=DEFERRED)
    stream = await on.post("/v1/chat/completions", json=chat(stream=True),
                           headers=auth(Prefer="wait=5, respond-async"))
    assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    await stream.read()
    combined = await on.post("/v1/chat/completions", json=chat(),
                             headers=auth(Prefer="return=minimal; x=1, Respond-Async"))
    assert combined.status == 202


@pytest.mark.redis
async def test_redis_down_refuses_submit_and_lookups_with_503(
        make_gateway: MakeGateway, upstream: tuple[Upstream, str], clean_redis: RedisServer
) -> None:
    _, url = upstream
    gw = await redis_gateway(make_gateway, url, clean_redis, deferred={"workers": 0},
                             tenants={"acme": {"limits": {"requests_per_minute": 600}}})
    entry = (await submit(gw))["id"]
    clean_redis.stop()  # the next test's clean_redis starts it again
    for resp in (
        await gw.post("/v1/chat/completions", json=chat(), headers=auth(**ASYNC)),
        await gw.get(f"/v1/deferred/{entry}", headers=auth()),
        await gw.delete(f"/v1/deferred/{entry}", headers=auth()),
    ):
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"]["code"] == "deferred_unavailable"
        # the store is probed again within state.degraded.probe_interval_s (0.5 s)
        assert resp.headers["retry-after-ms"] == "500" and resp.headers["Retry-After"] == "1"
