"""The mock upstream's capacity model: slots, a FIFO queue that delays the first token, and
429s with Retry-After beyond the queue bound or the requests-per-minute quota."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.cli import _parser
from gateway.mock.capacity import Capacity, CapacityModel, Rejected
from gateway.mock.upstream import CAPACITY, create_mock_app
from tests.gwtest import FakeClock

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _ttft(client: Client, headers: dict[str, str], stream: bool = True) -> float:
    """Seconds from sending to the first content chunk (or to the whole answer)."""
    started = time.monotonic()
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                           headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            await resp.read()
            return time.monotonic() - started
        async for line in resp.content:
            if b'"content":"tok' in line:
                took = time.monotonic() - started
                await resp.read()
                return took
    raise AssertionError("no content chunk")


async def test_requests_beyond_the_slots_queue_and_their_first_token_waits(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(create_mock_app(capacity=Capacity(slots=2)))
    knobs = {"x-mock-ttft-ms": "200", "x-mock-chunks": "2"}
    ttfts = sorted(await asyncio.gather(*(_ttft(client, knobs) for _ in range(4))))
    assert all(0.18 < t < 0.35 for t in ttfts[:2]), ttfts  # got a slot at once
    assert all(0.38 < t < 0.60 for t in ttfts[2:]), ttfts  # waited for one
    stats = (await (await client.get("/_mock/capacity")).json())
    assert stats["enabled"] is True
    assert stats["peak_in_use"] == 2 and stats["peak_queued"] == 2
    assert stats["served"] == 4 and stats["in_use"] == 0 and stats["queued"] == 0
    assert 0.7 < stats["busy_s"] < 1.2  # four answers of ~0.2 s each


async def test_queue_ttft_adds_per_request_waiting_ahead(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_mock_app(
        capacity=Capacity(slots=1, queue_ttft_ms=100)))
    knobs = {"x-mock-ttft-ms": "50", "x-mock-chunks": "1"}
    first = asyncio.create_task(_ttft(client, knobs))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(_ttft(client, knobs))  # 0 ahead: waits for the slot only
    await asyncio.sleep(0.02)
    third = asyncio.create_task(_ttft(client, knobs))  # 1 ahead: +100 ms
    t1, t2, t3 = await asyncio.gather(first, second, third)
    assert t1 < 0.12
    # ~30 ms of wait for the slot + its own 50 ms; the lower bound leaves 10 ms for timers
    # (0.08 failed at 79 ms on a loaded machine: the slot came free a little early)
    assert 0.07 < t2 < 0.2, t2
    # ~65 ms of wait for the slot + 50 ms + 100 ms for the one request ahead of it
    assert 0.18 < t3 < 0.35 and t3 > t2 + 0.08, (t2, t3)


async def test_a_full_queue_answers_429_with_retry_after(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_mock_app(
        capacity=Capacity(slots=1, max_queue=1, queue_retry_after_s=2.5)))
    slow = {"x-mock-latency-ms": "300"}
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=slow))
             for _ in range(2)]
    await asyncio.sleep(0.05)
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=slow)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "3" and resp.headers["retry-after-ms"] == "2500"
    assert resp.headers["x-mock-rejected"] == "queue"
    body = await resp.json()
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert [r.status for r in await asyncio.gather(*tasks)] == [200, 200]
    stats = await (await client.get("/_mock/capacity")).json()
    assert stats["rejected_queue"] == 1 and stats["served"] == 2


async def test_the_quota_answers_429_in_the_provider_shape(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_mock_app(
        capacity=Capacity(slots=4, quota_rpm=60, quota_burst=2)))
    statuses = [(await client.post("/v1/chat/completions", json=CHAT)).status for _ in range(2)]
    assert statuses == [200, 200]
    resp = await client.post("/v1/messages", json={**CHAT, "max_tokens": 5})
    assert resp.status == 429
    assert resp.headers["x-mock-rejected"] == "quota"
    assert resp.headers["Retry-After"] == "1"
    assert 900 <= int(resp.headers["retry-after-ms"]) <= 1000
    assert (await resp.json())["error"]["type"] == "rate_limit_error"  # Anthropic's shape
    # Models and the recorder are outside the capacity model.
    assert (await client.get("/v1/models")).status == 200


async def test_non_streaming_answers_hold_their_slot_for_the_generation_time(
    aiohttp_client: MakeClient,
) -> None:
    client = await aiohttp_client(create_mock_app(capacity=Capacity(slots=1)))
    knobs = {"x-mock-ttft-ms": "100", "x-mock-chunks": "4", "x-mock-chunk-gap-ms": "25"}
    took = sorted(await asyncio.gather(*(_ttft(client, knobs, stream=False) for _ in range(2))))
    assert 0.18 < took[0] < 0.3 and 0.38 < took[1] < 0.55, took


async def test_without_capacity_nothing_changes(aiohttp_client: MakeClient) -> None:
    app = create_mock_app()
    client = await aiohttp_client(app)
    assert app[CAPACITY] is None
    # A TTFT far above any scheduling stall of a loaded machine: non-streaming answers ignore
    # it, as before the capacity model existed.
    knobs = {"x-mock-ttft-ms": "3000"}
    took = await asyncio.gather(*(_ttft(client, knobs, stream=False) for _ in range(20)))
    assert max(took) < 1.5
    assert (await (await client.get("/_mock/capacity")).json()) == {"enabled": False}


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    model = CapacityModel(Capacity(slots=1, max_queue=5))
    held = await model.acquire()
    waiter = asyncio.create_task(model.acquire())
    follower = asyncio.create_task(model.acquire())
    await asyncio.sleep(0)
    assert model.queued == 2
    waiter.cancel()
    await asyncio.sleep(0)
    assert model.queued == 1
    held.release()
    lease = await asyncio.wait_for(follower, 1)
    assert lease.queued_ahead == 1 and model.in_use == 1 and model.queued == 0
    lease.release()
    lease.release()  # idempotent
    assert model.in_use == 0 and model.served == 2


def test_quota_bucket_refills_on_the_injected_clock() -> None:
    clock = FakeClock(100.0)
    model = CapacityModel(Capacity(slots=1, quota_rpm=120, quota_burst=1), clock=clock)
    model.take_quota()
    with pytest.raises(Rejected) as info:
        model.take_quota()
    assert info.value.reason == "quota" and info.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    model.take_quota()
    assert model.rejected_quota == 1
    assert Capacity(slots=1, quota_rpm=600).burst == 60


@pytest.mark.parametrize("kwargs", [{"slots": 0}, {"slots": 1, "max_queue": -1},
                                    {"slots": 1, "quota_rpm": 0},
                                    {"slots": 1, "queue_ttft_ms": -1}])
def test_invalid_capacity_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Capacity(**kwargs)


def test_mock_upstream_cli_takes_the_capacity_flags() -> None:
    args = _parser().parse_args(["mock-upstream", "--port", "9100", "--slots", "8",
                                 "--max-queue", "16", "--queue-ttft-ms", "20",
                                 "--quota-rpm", "600"])
    assert (args.slots, args.max_queue, args.queue_ttft_ms, args.quota_rpm) == (8, 16, 20.0, 600)
    assert _parser().parse_args(["mock-upstream"]).slots is None  # off by default
