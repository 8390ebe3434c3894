"""The loop guard finds loops, not fan-out (issue 16 item 3): counted per agent session by
default, and SDK retries, several choices (n > 1) and new seeds of sampled requests are not
repeats. Through the gateway, memory backend."""

from __future__ import annotations

from typing import Any

from tests.gwtest import auth, chat
from tests.plugin_gateway import GatewayClient, MakeGateway

GUARD: dict[str, Any] = {"tenants": {"acme": {"loop_guard": {"max_repeats": 2, "window_s": 60}}}}
RUN = {"X-Agent-Session": "run-1"}


async def statuses(gw: GatewayClient, bodies: list[dict[str, Any]], **headers: str) -> list[int]:
    out = []
    for body in bodies:
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**headers))
        out.append(resp.status)
    return out


async def test_requests_without_a_session_are_not_guarded_by_default(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(**GUARD)
    assert await statuses(gw, [chat(text="same")] * 5) == [200] * 5
    assert await statuses(gw, [chat(text="same")] * 3, **RUN) == [200, 200, 429]


async def test_tenant_scope_counts_across_the_tenant_when_configured(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(tenants={"acme": {"loop_guard": {
        "max_repeats": 2, "window_s": 60, "scope": "tenant"}}})
    assert await statuses(gw, [chat(text="same")] * 3) == [200, 200, 429]


async def test_sdk_retries_are_not_repeats(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**GUARD)
    assert await statuses(gw, [chat(text="same")] * 2, **RUN) == [200, 200]
    retried = await statuses(gw, [chat(text="same")] * 3,
                             **RUN, **{"x-stainless-retry-count": "1"})
    assert retried == [200, 200, 200]
    assert await statuses(gw, [chat(text="same")], **RUN) == [429]  # a fresh one still is


async def test_several_choices_are_not_repeats(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**GUARD)
    assert await statuses(gw, [chat(text="same", n=3)] * 4, **RUN) == [200] * 4


async def test_a_new_seed_is_a_new_request_unless_temperature_is_zero(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(**GUARD)
    sampled = [chat(text="same", temperature=0.8, seed=s) for s in range(4)]
    assert await statuses(gw, sampled, **RUN) == [200] * 4
    default_temperature = [chat(text="other", seed=s) for s in range(4)]
    assert await statuses(gw, default_temperature, **RUN) == [200] * 4
    greedy = [chat(text="greedy", temperature=0, seed=s) for s in range(3)]
    assert await statuses(gw, greedy, **RUN) == [200, 200, 429]
    same_seed = [chat(text="same", temperature=0.8, seed=1)] * 3
    assert await statuses(gw, same_seed, **RUN) == [200, 429, 429]  # seed 1 was sent above
