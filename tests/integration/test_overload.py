"""Overload control end to end: an upstream with fixed capacity offered 3x what it can do."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpServer

from gateway.request.auth import hash_key
from tests.gwtest import auth, chat
from tests.plugin_gateway import MakeGateway

SLOTS, SERVICE_S = 4, 0.2  # capacity: 20 requests/s
ADMIN_KEY = "sk-admin-test"
DEADLINE_S = 2.0


def capacity_upstream() -> web.Application:
    """Serves SLOTS calls at a time; the rest wait in its queue (their first byte is late)."""
    slots = asyncio.Semaphore(SLOTS)

    async def handle(request: web.Request) -> web.Response:
        async with slots:
            await asyncio.sleep(SERVICE_S)
        return web.json_response({"choices": [{"message": {"content": "ok"}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    return app


async def test_at_3x_critical_all_succeed_low_is_shed_first_and_no_one_waits_past_deadline(
    aiohttp_server: AiohttpServer, make_gateway: MakeGateway
) -> None:
    upstream = await aiohttp_server(capacity_upstream())
    gw = await make_gateway(
        upstream=str(upstream.make_url("")).rstrip("/"),
        tenants={"acme": {"max_priority": "critical", "loop_guard": {"enabled": False}}},
        admission={"concurrency": {"min_limit": SLOTS, "initial_limit": SLOTS,
                                   "max_limit": SLOTS}},
    )
    rng = random.Random(4)
    mix = ["critical"] * 1 + ["high"] * 3 + ["normal"] * 3 + ["low"] * 3
    rate, duration = 3 * SLOTS / SERVICE_S, 3.0  # 60/s for 3 s: 180 requests
    results: list[tuple[str, int, float]] = []

    async def one(i: int, cls: str) -> None:
        started = time.monotonic()
        resp = await gw.post("/v1/chat/completions", json=chat(text=f"{i}"), headers=auth(**{
            "X-Priority": cls, "X-Request-Timeout": str(DEADLINE_S),
            "X-Agent-Session": f"run-{i % 30}"}))
        await resp.read()
        results.append((cls, resp.status, time.monotonic() - started))

    tasks = []
    begin = time.monotonic()
    for i in range(int(rate * duration)):
        await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(i, rng.choice(mix))))
    await asyncio.gather(*tasks)

    by_class = {cls: Counter(status for c, status, _ in results if c == cls) for cls in set(mix)}
    success = {cls: counts[200] / sum(counts.values()) for cls, counts in by_class.items()}
    assert success["critical"] == 1.0, by_class
    assert success["low"] <= success["normal"] <= success["high"] <= 1.0, by_class
    assert success["low"] < 0.6, by_class  # overload was real and landed on the lowest class
    assert {s for c in by_class.values() for s in c} <= {200, 503, 504}
    # Nobody waited past the deadline: answers in time, refusals at once.
    assert max(t for _, _, t in results) <= DEADLINE_S + 0.3
    # A queued request leaves as soon as its deadline cannot be met (504, never later); a
    # shed one (503) is told at once.
    shed = sorted(t for _, status, t in results if status == 503)
    assert not shed or shed[int(len(shed) * 0.99) - 1] < 0.5
    # Every shed is on the tenant's rejections and on the shed reasons (it was once counted
    # under tenant "none", so sheds could not be told apart by tenant).
    families = {f.name: f for f in text_string_to_metric_families(
        await (await gw.get("/metrics")).text())}
    rejected = [s for s in families["gateway_rejections"].samples
                if s.name.endswith("_total") and s.labels["reason"] == "overloaded"]
    assert {s.labels["tenant"] for s in rejected} == {"acme"}
    assert sum(s.value for s in rejected) == len(shed) > 0
    assert sum(s.value for s in families["gateway_sheds"].samples
               if s.name.endswith("_total")) == len(shed)


async def test_a_streamed_first_token_reaches_admission_before_the_answer_ends(
    make_gateway: MakeGateway
) -> None:
    """Answers stream for seconds to minutes: the concurrency limit and the deadline estimate
    hear of a first token when the relay passes it on, not when the stream ends."""
    gw = await make_gateway(admin={"api_keys": [hash_key(ADMIN_KEY)]})

    async def estimate() -> float:
        status = await (await gw.get("/admin/status", headers=auth(ADMIN_KEY))).json()
        value: float = status["admission"]["deployments"]["main/upstream-gpt"][
            "ttft_estimate_s"]
        return value

    # A whole answer first: it has no first token, so the estimate stays ttft_prior_s.
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    prior = await estimate()
    resp = await gw.post("/v1/chat/completions", json=chat(stream=True), headers=auth(**{
        "x-mock-ttft-ms": "20", "x-mock-chunks": "20", "x-mock-chunk-gap-ms": "100"}))
    assert resp.status == 200
    first = await resp.content.readline()  # the first event: the stream has 2 s to go
    assert first.startswith(b"data: ")
    during = await estimate()
    rest = await resp.read()
    assert b"[DONE]" in rest
    assert during < prior, (prior, during)  # heard at the first token, 2 s before the end
    assert await estimate() == during  # and counted once
