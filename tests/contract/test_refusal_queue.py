"""Concurrent refusals of one limit queue instead of herding (fix-limits item 3), on every
backend (memory, Redis, the 3-node Cluster): the store tells each refusal the same earliest
retry, this replica's promises (gateway/limits/promises.py) give each its own turn.
Real clock with generous tolerances for the backends; a fake clock for the bounds."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.limits import promises
from gateway.limits.degraded import DegradedMode
from gateway.limits.limiter import InFlight, Limiter
from gateway.limits.promises import PromiseBook
from gateway.request.auth import Authenticator
from gateway.request.classifier import ROUTES, classify
from gateway.state import StateBackend
from tests.gwtest import FakeClock, auth, chat, policy


async def told(backend: StateBackend, limits: dict[str, Any], admitted: int, refused: int,
               **body: Any) -> list[int]:
    """Admit ``admitted`` requests, then the retry-after-ms of ``refused`` more, at once."""
    config = policy("http://127.0.0.1:9", tenants={"acme": {"limits": limits}})
    degraded = DegradedMode(config.state.degraded, backend, time.monotonic, "r")
    limiter = Limiter(config, backend, degraded, time.time, InFlight())
    tenant = Authenticator(config).authenticate(auth())
    waits: list[int] = []
    for i in range(admitted + refused):
        call = classify(ROUTES["/v1/chat/completions"], tenant, chat(text=f"{i}", **body), {},
                        config)
        if i < admitted:
            await limiter.admit(call, f"r{i}")
            continue
        with pytest.raises(GatewayError) as info:
            await limiter.admit(call, f"r{i}")
        waits.append(int(info.value.headers["retry-after-ms"]))
    return waits


async def test_request_rate_refusals_get_one_interval_each(backend: StateBackend) -> None:
    # 30/min, burst 3: one request every 2 s once the burst is used
    waits = await told(backend, {"requests_per_minute": 30}, 3, 3)
    for k, wait in enumerate(waits, 1):
        assert 2000 * k - 500 <= wait <= 2000 * k, waits


async def test_token_rate_refusals_get_one_reservation_each(backend: StateBackend) -> None:
    # 6,000 tokens/min (10 ms a token), a burst of 150; each request reserves ~107 tokens
    waits = await told(backend, {"tokens_per_minute": 6000, "token_burst": 150}, 1, 3,
                       max_tokens=100)
    step = waits[1] - waits[0]
    assert 1000 <= step <= 1100 and abs((waits[2] - waits[1]) - step) <= 50, waits


def test_promises_are_bounded_and_forgotten_once_due() -> None:
    clock = FakeClock(0.0)
    book = PromiseBook(clock)
    for i in range(promises.MAX_PER_KEY + 10):
        book.promise("k", 1.0 + i)
    assert len(book.outstanding("k")) == promises.MAX_PER_KEY
    for i in range(promises.MAX_KEYS + 5):
        book.promise(f"key{i}", 5.0)
    assert book.outstanding("k") == []  # least recently refused key went first
    assert len(book._by_key) == promises.MAX_KEYS
    clock.now = 5.0
    assert book.last("key10") is None and "key10" not in book._by_key  # due: dropped
