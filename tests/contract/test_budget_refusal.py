"""A budget refusal tells the truth (fix-limits item 2), on every backend (memory, Redis, the
3-node Cluster): "spent" only when it is; with room left it says how much, what this request
reserves and why, and the cap that fits, and a request with that cap passes right after.

The remaining amount comes from the admit script (Lua) or LocalLimits: the same numbers on
every backend. The real reset stays in the message and the headers (x-should-retry false).
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from gateway.config.model import GatewayConfig
from gateway.errors import GatewayError
from gateway.limits.degraded import DegradedMode
from gateway.limits.limiter import Hold, InFlight, Limiter
from gateway.request.auth import Authenticator
from gateway.request.classifier import ROUTES, classify
from gateway.state import StateBackend
from gateway.upstream.sse import Usage
from tests.gwtest import auth, chat, policy


def limiter_for(backend: StateBackend, **tenant: Any) -> tuple[Limiter, GatewayConfig]:
    config = policy("http://127.0.0.1:9", tenants={"acme": tenant})
    degraded = DegradedMode(config.state.degraded, backend, time.monotonic, "r")
    return Limiter(config, backend, degraded, time.time, InFlight()), config


async def admit(limiter: Limiter, config: GatewayConfig, rid: str, route: str = "/v1/chat/completions",
                **body: Any) -> Hold:
    tenant = Authenticator(config).authenticate(auth())
    call = classify(ROUTES[route], tenant, body or chat(), {}, config)
    return await limiter.admit(call, rid)


async def refused(limiter: Limiter, config: GatewayConfig, rid: str, **body: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await admit(limiter, config, rid, **body)
    error = info.value
    assert error.status == 429 and error.code == "insufficient_quota"
    # the same request cannot fit before the reset: final for the SDKs, with the real reset
    assert error.headers["x-should-retry"] == "false"
    to_midnight = 86_400 - time.time() % 86_400
    assert abs(int(error.headers["Retry-After"]) - to_midnight) <= 2
    assert "resets at" in error.message and "T00:00:00Z" in error.message
    return error


async def test_room_left_but_not_for_the_default_reservation(backend: StateBackend) -> None:
    # The user's case: daily_tokens 20,000 with ~955 left; a request without max_tokens
    # reserves its prompt + default_max_tokens 1024.
    limiter, config = limiter_for(backend, budget={"daily_tokens": 20_000})
    first = await admit(limiter, config, "a", **chat(max_tokens=19_000))
    await limiter.settle(first, Usage(input_tokens=45, output_tokens=19_000, reported=True), 0)
    error = await refused(limiter, config, "b", **chat())
    message = error.message
    assert "is spent" not in message
    assert "has 955 tokens left" in message
    prompt = int(re.search(r"its prompt \(about (\d+) tokens\)", message).group(1))  # type: ignore[union-attr]
    assert f"reserves {prompt + 1024:,} tokens" in message
    assert "default_max_tokens 1,024" in message and "sets no max_tokens" in message
    fits = 955 - prompt
    assert f"Set max_tokens to {fits:,} or less" in message
    assert "requests still running" in message  # the only way it fits before the reset
    # ...and that is true: the cap it names passes right after, one more token does not
    with pytest.raises(GatewayError):
        await admit(limiter, config, "c", **chat(max_tokens=fits + 1))
    hold = await admit(limiter, config, "d", **chat(max_tokens=fits))
    await limiter.settle(hold, Usage(), 0)


async def test_a_capped_request_is_told_its_own_cap_and_choices(backend: StateBackend) -> None:
    limiter, config = limiter_for(backend, budget={"daily_tokens": 2_000})
    first = await admit(limiter, config, "z", **chat(max_tokens=990))
    await limiter.settle(first, Usage(input_tokens=10, output_tokens=990, reported=True), 0)
    error = await refused(limiter, config, "a", **chat(max_completion_tokens=400, n=3))
    assert "has 1,000 tokens left" in error.message
    assert "its max_completion_tokens 400 x 3 choices" in error.message
    prompt = int(re.search(r"about (\d+) tokens", error.message).group(1))  # type: ignore[union-attr]
    fits = (1_000 - prompt) // 3
    assert f"Set max_completion_tokens to {fits:,} or less" in error.message
    hold = await admit(limiter, config, "b", **chat(max_completion_tokens=fits, n=3))
    await limiter.settle(hold, Usage(), 0)


async def test_spent_is_said_only_when_it_is(backend: StateBackend) -> None:
    limiter, config = limiter_for(backend, budget={"daily_tokens": 100})
    first = await admit(limiter, config, "a", **chat(max_tokens=50))
    await limiter.settle(first, Usage(input_tokens=40, output_tokens=60, reported=True), 0)
    error = await refused(limiter, config, "b", **chat(max_tokens=1))
    assert "daily tokens budget of tenant acme is spent; it resets at" in error.message


async def test_a_cost_budget_names_the_cap_whose_price_fits(backend: StateBackend) -> None:
    # gpt-test: 1.0 per million input, 2.0 per million output tokens; 0.001 buys ~500 output
    limiter, config = limiter_for(backend, budget={"daily_cost": 0.003})
    first = await admit(limiter, config, "z", **chat(max_tokens=900))
    await limiter.settle(first, Usage(input_tokens=10, output_tokens=900, reported=True), 2_000)
    error = await refused(limiter, config, "a", **chat())  # default_max_tokens 1024: 0.002+
    assert "daily cost budget" in error.message and "has 0.001 left" in error.message
    fits = int(re.search(r"Set max_tokens to ([\d,]+) or less", error.message)  # type: ignore[union-attr]
               .group(1).replace(",", ""))
    assert 480 < fits < 500
    with pytest.raises(GatewayError):
        await admit(limiter, config, "b", **chat(max_tokens=fits + 1))
    hold = await admit(limiter, config, "c", **chat(max_tokens=fits))
    await limiter.settle(hold, Usage(), 0)
