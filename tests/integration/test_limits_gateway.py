"""Tenant limits and budgets as a client sees them through the gateway (memory backend)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from aiohttp.test_utils import TestServer

from gateway.mock.upstream import RECORDED, RecordedRequest, estimate_prompt_tokens
from gateway.request.classifier import estimate_prompt_tokens as gateway_estimate
from gateway.state import MemoryBackend
from tests.gwtest import FakeClock, auth, chat
from tests.plugin_gateway import MakeGateway, settled


def limits(**values: Any) -> dict[str, Any]:
    return {"tenants": {"acme": {"limits": values}}}


async def test_request_limit_refuses_with_retry_after_and_ratelimit_headers(
    make_gateway: MakeGateway,
) -> None:
    clock = FakeClock()
    gw = await make_gateway(state=MemoryBackend(clock),
                            **limits(requests_per_minute=60, request_burst=2))
    first = await gw.post("/v1/chat/completions", json=chat(text="a"), headers=auth())
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "60"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await gw.post("/v1/chat/completions", json=chat(text="b"), headers=auth())).status == 200
    refused = await gw.post("/v1/chat/completions", json=chat(text="c"), headers=auth())
    assert refused.status == 429
    err = (await refused.json())["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert "requests per minute of tenant acme" in err["message"]
    assert refused.headers["Retry-After"] == "1"
    assert 900 <= int(refused.headers["retry-after-ms"]) <= 1000
    clock.now += 1.0  # one emission interval later, one more fits
    assert (await gw.post("/v1/chat/completions", json=chat(text="d"), headers=auth())).status == 200


async def test_token_limit_reserves_max_tokens_and_refunds_unused(
    make_gateway: MakeGateway, mock_upstream: TestServer,
) -> None:
    clock = FakeClock()
    gw = await make_gateway(state=MemoryBackend(clock), tenants={"acme": {
        "default_max_tokens": 100, "limits": {"tokens_per_minute": 600, "token_burst": 300}}})
    body = chat(text="hi")
    reserve = gateway_estimate(body) + 100
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**{"x-mock-chunks": "3"}))
    assert resp.status == 200
    # The default cap is reserved, not sent: the body reaches the upstream as the client wrote it.
    forwarded = mock_upstream.app[RECORDED][-1].body
    assert "max_completion_tokens" not in forwarded and "max_tokens" not in forwarded
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 300 - reserve
    await settled(gw)  # the settlement runs just after the response
    # Settled: the unused part of the reservation came back; the next sees it.
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**{"x-mock-chunks": "3"}))
    used = estimate_prompt_tokens(body) + 3
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 300 - used - reserve


async def test_daily_token_budget_refuses_with_should_retry_false(make_gateway: MakeGateway) -> None:
    # Each call reserves ~6 prompt + 50 output tokens and really uses ~7 (2 prompt + 5 out).
    gw = await make_gateway(tenants={"acme": {"default_max_tokens": 50,
                                              "budget": {"daily_tokens": 100,
                                                         "soft_ratio": 0.6}}})
    body = chat(text="hello")
    first = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert first.status == 200 and "x-gateway-budget-warning" not in first.headers
    await settled(gw)
    warned = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert warned.status == 200
    # ~7 spent and ~56 reserved by this very request: about 64 % of 100, used or reserved
    share = warned.headers["x-gateway-budget-warning"]
    assert share.startswith("daily tokens budget ") and share.endswith("% used or reserved")
    assert 60 <= int(share.split()[3].rstrip("%")) <= 70
    await settled(gw)
    spent = await gw.post("/v1/chat/completions", json={**body, "max_tokens": 90},
                          headers=auth())
    assert spent.status == 429
    err = (await spent.json())["error"]
    assert err["code"] == "insufficient_quota" and "daily tokens budget" in err["message"]
    assert spent.headers["x-should-retry"] == "false"
    # The truth, not a placeholder: the budget resets at the next UTC midnight.
    to_midnight = 86_400 - time.time() % 86_400
    assert abs(int(spent.headers["Retry-After"]) - to_midnight) <= 2
    assert "resets at" in err["message"] and "T00:00:00Z" in err["message"]


async def test_cost_budget_uses_the_price_table(make_gateway: MakeGateway) -> None:
    # gpt-test costs 1.0 per million input and 2.0 per million output tokens: 1000 reserved
    # output tokens hold 0.002; the first call really costs about 0.000012.
    gw = await make_gateway(tenants={"acme": {"default_max_tokens": 1000,
                                              "budget": {"daily_cost": 0.0025}}})
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    await settled(gw)
    too_big = await gw.post("/v1/chat/completions", json=chat(max_tokens=1300), headers=auth())
    assert too_big.status == 429
    assert "daily cost budget" in (await too_big.json())["error"]["message"]
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200


async def test_loop_guard_refuses_a_stuck_agent(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tenants={"acme": {"loop_guard": {"max_repeats": 3, "window_s": 60}}})
    run = auth(**{"X-Agent-Session": "run-1"})
    statuses = [
        (await gw.post("/v1/chat/completions", json=chat(text="same"), headers=run)).status
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    resp = await gw.post("/v1/chat/completions", json=chat(text="same"), headers=run)
    err = (await resp.json())["error"]
    assert err["code"] == "loop_detected" and "more than 3 times" in err["message"]
    other = await gw.post("/v1/chat/completions", json=chat(text="different"), headers=run)
    assert other.status == 200
    # Another session, or no session at all (fan-out), is not this run's loop.
    for headers in (auth(**{"X-Agent-Session": "run-2"}), auth()):
        again = await gw.post("/v1/chat/completions", json=chat(text="same"), headers=headers)
        assert again.status == 200


async def test_concurrency_limit_holds_while_a_stream_runs(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**limits(max_concurrent=1, concurrency_wait_s=0))
    slow = await gw.post("/v1/chat/completions", json=chat(stream=True),
                         headers=auth(**{"x-mock-chunks": "3", "x-mock-chunk-gap-ms": "200"}))
    await slow.content.readuntil(b"\n\n")
    busy = await gw.post("/v1/chat/completions", json=chat(text="second"), headers=auth())
    assert busy.status == 429
    assert "concurrent requests" in (await busy.json())["error"]["message"]
    # The slot is expected to free soon (this scope's requests have run ~0 s so far and
    # none finished yet: the first guess, 1 s), not at the lease's 60 s safety expiry.
    assert int(busy.headers["Retry-After"]) == 1
    assert 200 <= int(busy.headers["retry-after-ms"]) <= 1000
    await slow.read()
    await settled(gw)
    assert (await gw.post("/v1/chat/completions", json=chat(text="third"),
                          headers=auth())).status == 200


async def test_session_limits_stop_one_runaway_run_only(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tenants={"acme": {"limits": {"per_session": {
        "requests_per_minute": 60, "request_burst": 1}}}})
    run_a = auth(**{"X-Agent-Session": "run-a"})
    assert (await gw.post("/v1/chat/completions", json=chat(text="1"), headers=run_a)).status == 200
    refused = await gw.post("/v1/chat/completions", json=chat(text="2"), headers=run_a)
    assert refused.status == 429
    assert "agent session" in (await refused.json())["error"]["message"]
    run_b = auth(**{"X-Agent-Session": "run-b"})
    assert (await gw.post("/v1/chat/completions", json=chat(text="3"), headers=run_b)).status == 200


async def test_per_model_limits_apply_to_that_model_only(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tenants={"acme": {"limits": {"per_model": {
        "embed-test": {"requests_per_minute": 60, "request_burst": 1}}}}})
    embed = {"model": "embed-test", "input": "x"}
    assert (await gw.post("/v1/embeddings", json=embed, headers=auth())).status == 200
    assert (await gw.post("/v1/embeddings", json=embed, headers=auth())).status == 429
    assert (await gw.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200


async def test_shadow_limits_report_without_refusing(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(**limits(requests_per_minute=60, request_burst=1, shadow=True))
    first = await gw.post("/v1/chat/completions", json=chat(text="1"), headers=auth())
    assert "x-gateway-shadow" not in first.headers
    second = await gw.post("/v1/chat/completions", json=chat(text="2"), headers=auth())
    assert second.status == 200
    assert second.headers["x-gateway-shadow"] == "requests"


async def test_streams_are_charged_their_real_usage(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(tenants={"acme": {"default_max_tokens": 100,
                                              "budget": {"daily_tokens": 1000}}})
    body = chat(text="stream me", stream=True)
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**{"x-mock-chunks": "7"}))
    await resp.read()
    await settled(gw)
    # 1000 - (real prompt + 7 streamed tokens) is left: a reservation of exactly that fits,
    # one more token does not.
    left = 1000 - estimate_prompt_tokens(body) - 7
    probe_body = chat(text="x" * 4 * 10)  # ~10 prompt tokens + 4 per message part
    cap = left - gateway_estimate(probe_body)
    over = await gw.post("/v1/chat/completions", json={**probe_body, "max_tokens": cap + 1},
                         headers=auth())
    assert over.status == 429
    fits = await gw.post("/v1/chat/completions", json={**probe_body, "max_tokens": cap},
                         headers=auth())
    assert fits.status == 200


async def test_a_request_larger_than_the_token_burst_is_told_not_to_retry(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(**limits(tokens_per_minute=1000, token_burst=500))
    resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=800), headers=auth())
    assert resp.status == 429
    assert resp.headers["x-should-retry"] == "false"
    assert "lower max_tokens" in (await resp.json())["error"]["message"]
    assert (await gw.post("/v1/chat/completions", json=chat(max_tokens=100),
                          headers=auth())).status == 200


async def test_provider_quota_fails_over_then_refuses(
    make_gateway: MakeGateway, mock_upstream: TestServer,
) -> None:
    # upstream-gpt is granted 60 requests/minute (6 at once); the model fails over to "spare".
    models = {"gpt-test": {"deployments": [
        {"provider": "main", "model": "upstream-gpt", "requests_per_minute": 60},
        {"provider": "main", "model": "spare", "requests_per_minute": 60}]}}
    gw = await make_gateway(models=models)
    statuses = [(await gw.post("/v1/chat/completions", json=chat(text=f"{i}"),
                               headers=auth())).status for i in range(12)]
    assert statuses == [200] * 12
    recorded: deque[RecordedRequest] = mock_upstream.app[RECORDED]
    used = [r.body["model"] for r in list(recorded)[-12:]]
    assert used == ["upstream-gpt"] * 6 + ["spare"] * 6
    refused = await gw.post("/v1/chat/completions", json=chat(text="13"), headers=auth())
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_bursts_default_as_documented_and_the_headers_report_the_bucket(
    make_gateway: MakeGateway,
) -> None:
    # docs/configuration.md (from the field descriptions): request_burst defaults to a tenth
    # of requests_per_minute, token_burst to the whole tokens_per_minute; the
    # x-ratelimit-remaining-* headers report what each bucket holds right now.
    from gateway.config.limits import RateLimits

    fields = RateLimits.model_fields
    assert "default: a tenth of requests_per_minute" in (fields["request_burst"].description or "")
    assert "default: tokens_per_minute" in (fields["token_burst"].description or "")
    gw = await make_gateway(state=MemoryBackend(FakeClock()), **limits(
        requests_per_minute=60, tokens_per_minute=6000))
    body = chat(text="hi", max_tokens=5000)  # more than a tenth of the minute: admitted
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    assert resp.headers["x-ratelimit-limit-tokens"] == "6000"
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == \
        6000 - gateway_estimate(body) - 5000
    assert resp.headers["x-ratelimit-limit-requests"] == "60"
    assert resp.headers["x-ratelimit-remaining-requests"] == "5"  # a burst of 6, one used


async def test_a_request_larger_than_the_whole_budget_says_what_it_reserves(
    make_gateway: MakeGateway,
) -> None:
    """Without max_tokens the tenant's default_max_tokens is reserved; a request that needs
    more than the whole budget says so, where the reservation comes from, and the cap that
    fits (it once said only "needs 1030 ... more than the whole budget (300)")."""
    gw = await make_gateway(state=MemoryBackend(FakeClock()), tenants={"acme": {
        "budget": {"daily_tokens": 300}, "default_max_tokens": 1000}})
    body = chat()
    body.pop("max_tokens", None)
    refused = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert refused.status == 429
    err = (await refused.json())["error"]
    assert err["code"] == "insufficient_quota"
    assert "more than the whole budget (300)" in err["message"]
    assert "default_max_tokens 1,000" in err["message"]
    assert "Set max_tokens to " in err["message"], err["message"]
    fits = int(err["message"].split("Set max_tokens to ")[1].split(" ")[0].replace(",", ""))
    served = await gw.post("/v1/chat/completions", json={**body, "max_tokens": fits},
                           headers=auth())
    assert served.status == 200, await served.text()
