"""Pacing by the provider's rate-limit headers, end to end: a gateway with the shipped
admission defaults in front of the mock upstream limited only by its request quota (which
reports it as OpenAI and Anthropic do), driven by the official SDKs with default settings.

Counts are exact (answers the gateway sent, 429s the mock gave); timing bounds are generous.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import anthropic
import openai
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.mock.capacity import Capacity
from gateway.mock.upstream import CAPACITY, create_mock_app
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, chat
from tests.plugin_gateway import GatewayClient, counted_gateway

# 600 requests a minute (one every 100 ms), a bucket of 5: what a burst finds.
QUOTA = Capacity(slots=1000, quota_rpm=600, quota_burst=5)


async def quota_mock(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(create_mock_app(seed=7, capacity=QUOTA))


def rejected_by_quota(mock: TestServer) -> int:
    model = mock.app[CAPACITY]
    assert model is not None
    return model.rejected_quota


async def paced_gateway(aiohttp_client: AiohttpClient, mock: TestServer,
                        **overrides: Any) -> tuple[GatewayClient, collections.Counter[int]]:
    """A gateway in front of ``mock`` (shipped admission defaults unless overridden) whose
    answers are counted by status."""
    return await counted_gateway(aiohttp_client, str(mock.make_url("")).rstrip("/"), **overrides)


async def openai_burst(gw: GatewayClient, calls: int) -> list[str | None]:
    """``calls`` concurrent chat completions by the openai SDK (default settings); the error
    each ended with (None: answered)."""
    async with openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY) as client:
        async def one() -> str | None:
            try:
                await client.chat.completions.create(
                    model="gpt-test", messages=[{"role": "user", "content": "hello"}])
                return None
            except openai.APIError as exc:
                return str(exc)

        return await asyncio.gather(*(one() for _ in range(calls)))


async def test_the_openai_sdk_never_sees_a_429_of_a_quota_the_provider_reports(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer,
) -> None:
    mock = await quota_mock(aiohttp_server)
    gw, answers = await paced_gateway(aiohttp_client, mock)
    assert await openai_burst(gw, 1) == [None]  # the first answer reports the quota
    began = time.monotonic()
    errors = await openai_burst(gw, 20)
    took = time.monotonic() - began
    print(f"20 calls at 600 RPM with a bucket of 4 left: {took:.2f} s, answers {dict(answers)}, "
          f"mock quota 429s {rejected_by_quota(mock)}")
    assert errors == [None] * 20
    assert answers == {200: 21}  # not one retry by the SDK
    assert rejected_by_quota(mock) == 0  # the gateway never sent past the quota
    assert 1.0 <= took < 8.0, took  # 16 waited for the refill (1.6 s at 10 a second)


async def test_without_pacing_the_same_burst_draws_the_providers_429s(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer,
) -> None:
    """What pacing saves: the same burst with it turned off reaches the provider past its
    quota, and the SDK retries what the gateway could not answer."""
    mock = await quota_mock(aiohttp_server)
    gw, answers = await paced_gateway(
        aiohttp_client, mock,
        admission={"concurrency": {"initial_limit": 20, "pace_by_rate_headers": False}})
    await openai_burst(gw, 1)
    await openai_burst(gw, 20)
    print(f"without pacing: answers {dict(answers)}, mock quota 429s {rejected_by_quota(mock)}")
    assert rejected_by_quota(mock) > 0
    assert sum(n for status, n in answers.items() if status != 200) > 0


async def test_a_spent_quota_goes_to_high_priority_first(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer,
) -> None:
    """Low-priority calls (tenant umbrella) fill the quota; high ones arriving behind them
    are sent first as it refills, and none of either meets the provider's 429."""
    mock = await quota_mock(aiohttp_server)
    gw, _ = await paced_gateway(aiohttp_client, mock)
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    done: list[tuple[str, float]] = []
    began = time.monotonic()

    async def call(who: str) -> int:
        headers = auth(UMBRELLA_KEY) if who == "low" else auth(ACME_KEY, **{"X-Priority": "high"})
        resp = await gw.post("/v1/chat/completions", json=chat(), headers=headers)
        await resp.read()
        done.append((who, time.monotonic() - began))
        return resp.status

    lows = [asyncio.create_task(call("low")) for _ in range(12)]
    await asyncio.sleep(0.05)
    highs = [asyncio.create_task(call("high")) for _ in range(4)]
    high_status = await asyncio.gather(*highs)
    low_status = await asyncio.gather(*lows)
    assert high_status == [200] * 4
    assert rejected_by_quota(mock) == 0
    # Low waits in its queue, and is shed (503, Retry-After) once past its queue target;
    # never a provider 429.
    assert set(low_status) <= {200, 503}, low_status
    finished_high = max(t for who, t in done if who == "high")
    lows_before = sum(1 for who, t in done if who == "low" and t < finished_high)
    # The bucket had 4 left for the first lows; every later refill went to high first.
    assert lows_before <= 5, done


async def test_the_anthropic_sdk_is_paced_by_anthropic_headers(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer,
) -> None:
    mock = await quota_mock(aiohttp_server)
    gw, answers = await paced_gateway(aiohttp_client, mock)
    async with anthropic.AsyncAnthropic(base_url=str(gw.make_url("")).rstrip("/"),
                                        api_key=ACME_KEY) as client:
        async def one() -> None:
            await client.messages.create(model="claude-test", max_tokens=5,
                                         messages=[{"role": "user", "content": "hello"}])

        await one()
        await asyncio.gather(*(one() for _ in range(15)))
    assert answers == {200: 16}
    assert rejected_by_quota(mock) == 0


async def test_two_replicas_share_the_quota_without_drawing_its_429s(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer,
) -> None:
    """Two gateways (replicas, each with its own memory) in front of one quota, each with more
    work than the whole quota: from the bucket's reports each learns what the other spends
    (in windows of 2 s at this quota), and from then on they share the quota without racing
    for the same requests."""
    mock = await quota_mock(aiohttp_server)
    replicas = [(await paced_gateway(aiohttp_client, mock))[0] for _ in range(2)]
    for gw in replicas:
        assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    learn_s, seconds = 5.0, 9.0
    began = time.monotonic()
    served: list[float] = []
    rejected_when_learned = 0

    async def worker(gw: GatewayClient) -> None:
        while time.monotonic() - began < seconds:
            resp = await gw.post("/v1/chat/completions", json=chat(), headers=auth())
            await resp.read()
            if resp.status == 200:
                served.append(time.monotonic() - began)
            else:
                await asyncio.sleep(0.05)

    async def learned() -> None:
        nonlocal rejected_when_learned
        await asyncio.sleep(learn_s)
        rejected_when_learned = rejected_by_quota(mock)

    await asyncio.gather(learned(), *(worker(gw) for gw in replicas for _ in range(6)))
    late_served = sum(1 for t in served if t >= learn_s)
    late_rejected = rejected_by_quota(mock) - rejected_when_learned
    print(f"two replicas at 600 RPM: first {learn_s:.0f} s {len(served) - late_served} served, "
          f"{rejected_when_learned} quota 429s; next {seconds - learn_s:.0f} s {late_served} "
          f"served, {late_rejected} quota 429s")
    assert late_served >= 0.8 * 10 * (seconds - learn_s)  # the quota (10 a second) is spent
    assert late_rejected <= 0.1 * late_served, (late_rejected, late_served)


async def test_one_client_calling_in_a_row_is_paced_not_shed(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer,
) -> None:
    """One caller, one call at a time, against a quota that lets one through every 250 ms:
    each call waits its turn of the quota in the gateway, four queue targets here (as 30
    requests a minute against the shipped 500 ms). Nobody waits behind anybody: that is
    pacing, not an overload, and no call may be shed. New users met 503s with
    ``x-should-retry: false``, which the SDKs did not retry, on 2 to 5 calls of 12; here the
    shed level climbs over the whole class in one CoDel interval, and 3 of 8 were shed."""
    mock = await aiohttp_server(create_mock_app(seed=7, capacity=Capacity(
        slots=1000, quota_rpm=240, quota_burst=2)))
    gw, answers = await paced_gateway(aiohttp_client, mock, admission={
        "classes": {"normal": {"queue_target_ms": 60}}, "codel_interval_ms": 100,
        "cohort_step_up": 128})
    async with openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY) as client:
        for _ in range(8):
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    assert answers == {200: 8}
    assert rejected_by_quota(mock) == 0
