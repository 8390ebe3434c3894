"""Backpressure as the official SDKs see it (issue 16): default settings, retries counted.

The gateway app gets a counter of the answers it sends (what the SDK really did, retries
included); the mock upstream records every call that reached it. Timing bounds are generous
(these machines are noisy); counts are exact.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app.server import GATEWAY, create_app
from gateway.mock.upstream import RECORDED
from tests.gwtest import ACME_KEY, auth, policy
from tests.plugin_gateway import GatewayClient, counted_gateway, gateway_client

MakeCounted = Callable[..., Awaitable[tuple[GatewayClient, collections.Counter[int]]]]
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
ANTHROPIC_HELLO: list[MessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def make_counted(aiohttp_client: AiohttpClient, upstream_url: str) -> MakeCounted:
    """A gateway whose answers are counted by status: every SDK retry is one more answer."""

    async def make(**overrides: Any) -> tuple[GatewayClient, collections.Counter[int]]:
        return await counted_gateway(aiohttp_client, upstream_url, **overrides)

    return make


def _openai(gw: GatewayClient, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY, **kw)


def _anthropic(gw: GatewayClient, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(gw.make_url("")).rstrip("/"), api_key=ACME_KEY,
                                    **kw)


# A client in its own process, as in production: fifty SDK calls in the gateway's process
# (its loop, or a thread fighting it for the GIL) show up as the gateway's own loop lag,
# which self-protection rightly sheds. Prints {"took": s, "errors": [...]} as JSON.
_CLIENT = """
import asyncio, json, sys, time
import openai
async def main(base, n, latency_ms, rounds):
    async with openai.AsyncOpenAI(base_url=base, api_key=sys.argv[4]) as client:
        async def one():
            errors = []
            for _ in range(rounds):
                try:
                    await client.chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": "hello"}],
                        extra_headers={"x-mock-latency-ms": latency_ms})
                except openai.APIError as exc:
                    errors.append(str(exc))
            return errors
        began = time.monotonic()
        errors = await asyncio.gather(*(one() for _ in range(n)))
        return {"took": time.monotonic() - began, "errors": [e for es in errors for e in es]}
print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                  int(sys.argv[5])))))
"""


async def in_another_process(gw: GatewayClient, calls: int, latency_ms: int = 0,
                             rounds: int = 1) -> dict[str, Any]:
    """``calls`` concurrent clients each making ``rounds`` chat completions in a row, by the
    openai SDK (default settings) from a separate process; how long they took together and
    the errors they ended with."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, str(gw.make_url("/v1")), str(calls), str(latency_ms),
        ACME_KEY, str(rounds), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


def upstream_calls(mock: TestServer) -> int:
    return sum(1 for r in mock.app[RECORDED] if r.path.startswith("/v1/"))


async def test_six_parallel_one_second_calls_at_max_concurrent_three_take_about_two_seconds(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted(tenants={"acme": {"limits": {"max_concurrent": 3}}})
    result = await in_another_process(gw, 6, latency_ms=1000)
    took = result["took"]
    assert result["errors"] == []
    assert upstream_calls(mock_upstream) == 6
    # Two rounds of one second, not a minute's Retry-After (ideal 2.0 s; noisy machines).
    print(f"six 1 s calls at max_concurrent 3: {took:.2f} s, answers {dict(answers)}")
    assert 1.9 <= took < 5.0, took
    assert answers[200] == 6 and answers[429] <= 3


async def test_six_three_second_calls_at_max_concurrent_two_all_succeed_in_three_rounds(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    """Two run, four wait 2 s (``concurrency_wait_s``) and are refused: the first two told
    when the running pair ends, the next two a round later, so the SDK's two retries are
    enough. Before the fix two of them were told 200 ms three times and failed."""
    gw, answers = await make_counted(tenants={"acme": {"limits": {"max_concurrent": 2}}})
    result = await in_another_process(gw, 6, latency_ms=3000)
    took = result["took"]
    print(f"six 3 s calls at max_concurrent 2: {took:.2f} s, answers {dict(answers)}")
    assert result["errors"] == []
    assert upstream_calls(mock_upstream) == 6 and answers[200] == 6
    # three rounds of 3 s (ideal 9 s; the guesses cost about a second more)
    assert 8.5 <= took < 20, took
    assert answers[429] <= 6  # one refusal per waiting call, none spent on a doomed retry


async def test_six_concurrent_anthropic_calls_over_a_request_rate_each_get_their_turn(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    """30 requests/min (burst 3), six calls at once: three pass, the three refused are told
    2, 4 and 6 s (one retry fits every 2 s), so each passes on its first retry. Before,
    all three were told 2 s, met again and one ran out of retries after 4 s."""
    gw, answers = await make_counted(
        tenants={"acme": {"limits": {"requests_per_minute": 30}}})
    an = _anthropic(gw)
    try:
        began = time.monotonic()
        await asyncio.gather(*(an.messages.create(model="claude-test", max_tokens=20,
                                                  messages=ANTHROPIC_HELLO) for _ in range(6)))
        took = time.monotonic() - began
    finally:
        await an.close()
    print(f"six calls at 30 requests/min: {took:.2f} s, answers {dict(answers)}")
    assert answers == {200: 6, 429: 3}  # one refusal each for the three over the burst
    assert upstream_calls(mock_upstream) == 6
    assert 5.5 <= took < 15, took  # the last turn is 6 s after the burst


async def test_fifty_identical_concurrent_calls_on_the_default_policy_all_succeed(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted()
    result = await in_another_process(gw, 50)
    assert result["errors"] == [] and answers == {200: 50}  # no refusal, no SDK retry
    assert upstream_calls(mock_upstream) == 50


async def test_a_fresh_gateway_queues_slow_calls_while_its_limit_grows_instead_of_503(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    """A new gateway in front of an idle provider: its concurrency limit starts at 4 and
    grows as calls succeed. Sixteen SDK clients each making three 1 s calls in a row wait for
    the limit while it grows. Before, a queue of the gateway's own start counted as overload:
    8 calls of 48 in the later rounds were refused 503 "overloaded" after half a second (the
    SDK does not retry a normal-priority overload), with an idle upstream behind it."""
    gw, answers = await make_counted()
    result = await in_another_process(gw, 16, latency_ms=1000, rounds=3)
    print(f"sixteen clients x three 1 s calls, fresh gateway: {result['took']:.2f} s, "
          f"answers {dict(answers)}")
    assert result["errors"] == [] and answers == {200: 48}  # no refusal, no SDK retry
    assert upstream_calls(mock_upstream) == 48


async def test_a_spent_daily_budget_stops_the_sdks_at_once_naming_the_reset(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted(tenants={"acme": {"budget": {"daily_tokens": 150}}})
    oa, an = _openai(gw), _anthropic(gw)
    try:
        await oa.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=120,
                                         extra_headers={"x-mock-chunks": "120"})
        began = time.monotonic()
        # 150 - the first call's ~122 tokens < the ~100 these reserve (and ever could use)
        with pytest.raises(openai.RateLimitError) as spent:
            await oa.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=95)
        with pytest.raises(anthropic.RateLimitError) as spent_too:
            await an.messages.create(model="claude-test", max_tokens=95,
                                     messages=ANTHROPIC_HELLO)
        assert time.monotonic() - began < 3  # neither SDK slept through a backoff
    finally:
        await oa.close()
        await an.close()
    assert answers == {200: 1, 429: 2}  # one answer each: no SDK retry
    assert upstream_calls(mock_upstream) == 1
    for exc in (spent.value, spent_too.value):
        assert "resets at" in str(exc) and "T00:00:00Z" in str(exc)
        to_midnight = 86_400 - time.time() % 86_400
        assert abs(int(exc.response.headers["Retry-After"]) - to_midnight) < 5


async def test_the_clients_own_deadline_on_a_hung_upstream_is_a_retryable_truthful_504(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted()
    client = _openai(gw, timeout=20, max_retries=1)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="gpt-test", messages=HELLO,
                extra_headers={"x-mock-fail": "hang", "X-Request-Timeout": "1.5"})
    finally:
        await client.close()
    exc = info.value
    assert exc.status_code == 504
    assert "request's own deadline (X-Request-Timeout: 1.5 s) ran out" in str(exc)
    assert exc.response.headers["x-should-retry"] == "true"
    # Retryable, as a client-side timeout would have been: the SDK retried once.
    assert answers == {504: 2} and upstream_calls(mock_upstream) == 2


async def test_openai_timeout_against_a_hung_upstream_is_a_retryable_timeout(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, _ = await make_counted()
    client = _openai(gw, timeout=3.0, max_retries=0)  # the OpenAI(timeout=3)
    try:
        with pytest.raises((openai.APITimeoutError, openai.InternalServerError)) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO,
                                                 extra_headers={"x-mock-fail": "hang"})
    finally:
        await client.close()
    # Whichever wins the race (the SDK's own timer or the gateway's 504 on the SDK's
    # x-stainless-read-timeout), it is a timeout the SDK retries, and it names the 3 s bound.
    if isinstance(info.value, openai.InternalServerError):
        assert "x-stainless-read-timeout: 3 s" in str(info.value)
        assert info.value.response.headers.get("x-should-retry", "true") == "true"


async def test_a_deployment_timeout_names_its_configured_number_and_ends_retries(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted(providers={"main": {"timeouts": {"first_byte_s": 0.3}}})
    client = _openai(gw)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO,
                                                 extra_headers={"x-mock-fail": "hang"})
    finally:
        await client.close()
    exc = info.value
    assert "exceeded the deployment's first byte timeout (0.3 s)" in str(exc)
    assert exc.response.headers["x-should-retry"] == "false"
    attempts = int(exc.response.headers["x-gateway-attempts"])
    assert answers == {504: 1} and upstream_calls(mock_upstream) == attempts


async def test_a_cut_whole_answer_is_not_retried_by_the_sdks(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted()
    oa, an = _openai(gw), _anthropic(gw)
    cut = {"x-mock-fail": "midstream-cut"}
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await oa.chat.completions.create(model="gpt-test", messages=HELLO,
                                             extra_headers=cut)
        with pytest.raises(anthropic.InternalServerError) as info_too:
            await an.messages.create(model="claude-test", max_tokens=20,
                                     messages=ANTHROPIC_HELLO,
                                     extra_headers=cut)
    finally:
        await oa.close()
        await an.close()
    for exc in (info.value, info_too.value):
        assert exc.status_code == 502 and "broke off" in str(exc)
        assert exc.response.headers["x-should-retry"] == "false"
    assert answers == {502: 2} and upstream_calls(mock_upstream) == 2  # one call each


async def test_an_upstream_that_drops_the_connection_is_not_retried_on_top_of_the_gateway(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted()
    client = _openai(gw)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO,
                                                 extra_headers={"x-mock-fail": "drop"})
    finally:
        await client.close()
    exc = info.value
    assert exc.status_code == 502 and exc.response.headers["x-should-retry"] == "false"
    attempts = int(exc.response.headers["x-gateway-attempts"])
    assert attempts >= 2  # the gateway retried ...
    assert answers == {502: 1} and upstream_calls(mock_upstream) == attempts  # ... the SDK not


async def test_a_stream_must_start_by_the_deadline_then_flows_past_it(
    make_counted: MakeCounted, mock_upstream: TestServer,
) -> None:
    gw, answers = await make_counted()
    client = _openai(gw, max_retries=0)
    deadline = {"X-Request-Timeout": "1.5"}
    try:
        # chunks 0.6 s apart: 2.4 s in all, past the 1.5 s deadline, never 1.5 s silent
        stream = await client.chat.completions.create(
            model="gpt-test", messages=HELLO, stream=True,
            extra_headers={**deadline, "x-mock-chunks": "4", "x-mock-chunk-gap-ms": "600"})
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert len([p for p in pieces if p]) == 4
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(
                model="gpt-test", messages=HELLO, stream=True,
                extra_headers={**deadline, "x-mock-fail": "hang"})
    finally:
        await client.close()
    assert info.value.status_code == 504
    assert "X-Request-Timeout: 1.5 s) ran out while waiting for the first byte" in str(info.value)
    assert answers == {200: 1, 504: 1}


def _html_page(status: int, text: str) -> tuple[
        Callable[[web.Request], Awaitable[web.Response]], list[str]]:
    """A provider route answering ``status`` with an HTML page, and the paths it was called
    on (one per call)."""
    calls: list[str] = []

    async def page(request: web.Request) -> web.Response:
        calls.append(request.path)
        await request.read()
        return web.Response(status=status, text=text, content_type="text/html")

    return page, calls


async def _gateway_before(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
                          handler: Callable[[web.Request], Awaitable[web.Response]],
                          ) -> GatewayClient:
    """A gateway in front of a provider whose chat and messages routes are ``handler``."""
    broken = web.Application()
    broken.router.add_post("/v1/chat/completions", handler)
    broken.router.add_post("/v1/messages", handler)
    server = await aiohttp_server(broken)
    return await gateway_client(aiohttp_client, create_app(
        policy(str(server.make_url("")).rstrip("/"))))


async def test_an_unusable_error_page_after_the_gateways_retries_is_final_for_the_sdk(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
) -> None:
    html_503, calls = _html_page(503, "<html>upstream down</html>")
    gw = await _gateway_before(aiohttp_server, aiohttp_client, html_503)
    client = _openai(gw)  # default retries
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO)
    finally:
        await client.close()
    exc = info.value
    assert exc.status_code == 502 and "non-JSON" in str(exc)
    assert exc.response.headers["x-should-retry"] == "false"
    assert len(calls) == int(exc.response.headers["x-gateway-attempts"]) >= 2  # no SDK retry


async def test_a_providers_html_413_is_a_413_the_client_can_act_on(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
) -> None:
    """A proxy in front of the provider refusing a body's size answers HTML: it was a 502
    ``upstream_bad_response``, which says the provider broke, not that the request was too
    big. It is a 413 in the client's dialect, final, and each call reaches the provider once."""
    html_413, calls = _html_page(413, "<html>413 Request Entity Too Large</html>")
    gw = await _gateway_before(aiohttp_server, aiohttp_client, html_413)
    client = _openai(gw)  # default retries
    try:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO)
    finally:
        await client.close()
    assert info.value.status_code == 413 and len(calls) == 1
    assert info.value.code == "request_too_large", info.value.body
    resp = await gw.post("/v1/messages", json={"model": "claude-test", "max_tokens": 5,
                                               "messages": HELLO}, headers=auth())
    answer = await resp.json()
    assert resp.status == 413 and answer["type"] == "error", answer
    assert "too large" in answer["error"]["message"] and len(calls) == 2


OK_ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
             "model": "upstream-gpt", "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant",
                                                               "content": "hi"}}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


async def every_other_call_429(aiohttp_server: AiohttpServer, always: bool = False
                               ) -> tuple[str, list[int]]:
    """A provider that answers every other call (``always``: every call) 429 with
    retry-after-ms: 200 (a provider at its rate limit now and then); its statuses in order."""
    statuses: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        status = 429 if always or len(statuses) % 2 == 0 else 200
        statuses.append(status)
        if status == 429:
            return web.json_response(
                {"error": {"message": "Rate limit reached", "type": "requests",
                           "code": "rate_limit_exceeded", "param": None}},
                status=429, headers={"retry-after-ms": "200", "retry-after": "1"})
        return web.json_response(OK_ANSWER)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), statuses


async def test_a_provider_429_is_retried_once_its_wait_is_over_even_by_an_early_timer(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
) -> None:
    """The gateway sleeps the provider's Retry-After, then retries. uvloop's timers fire up to
    a millisecond early (they count whole milliseconds from the loop's cached time): woken
    before the cool-down that 429 set, the retry found the deployment unusable and answered
    the 429 with ``x-should-retry: false``, so the SDK gave up too. Here the gateway's clock
    runs 1 % slow, so every timer is early by its reading."""
    url, statuses = await every_other_call_429(aiohttp_server)
    began = time.monotonic()
    app = create_app(policy(url), clock=lambda: began + 0.99 * (time.monotonic() - began))
    answers: collections.Counter[int] = collections.Counter()

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        answers[response.status] += 1

    app.on_response_prepare.append(count)
    gw = await gateway_client(aiohttp_client, app)
    client = _openai(gw)  # default settings
    try:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-test", messages=HELLO)
    finally:
        await client.close()
    assert statuses == [429, 200] * 3 and answers == {200: 3}  # the gateway retried, not the SDK


async def test_a_provider_429_the_gateway_does_not_retry_is_retryable_for_the_sdk(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
) -> None:
    """With its retry budget spent the gateway answers a provider's 429 after one attempt. It
    did not retry, so it does not tell the SDK it did: the SDK waits the provider's
    Retry-After and its retry succeeds (it was told ``x-should-retry: false`` and failed)."""
    url, statuses = await every_other_call_429(aiohttp_server)
    gw, answers = await counted_gateway(aiohttp_client, url, retries={
        "budget_min_tokens": 0, "budget_ratio": 0.01})
    client = _openai(gw)  # default settings: two retries, honouring retry-after-ms
    try:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-test", messages=HELLO)
    finally:
        await client.close()
    assert statuses == [429, 200] * 3 and answers == {429: 3, 200: 3}


async def test_a_provider_429_after_the_gateways_own_retry_stays_final_for_the_sdk(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
) -> None:
    """The budget paid for one retry and then ran dry: the gateway did retry, so the SDK is
    told not to multiply the chain (each of its retries would repeat it)."""
    url, statuses = await every_other_call_429(aiohttp_server, always=True)
    gw, answers = await counted_gateway(aiohttp_client, url, retries={
        "budget_min_tokens": 1, "budget_ratio": 0.01})
    client = _openai(gw)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO)
    finally:
        await client.close()
    headers = info.value.response.headers
    assert headers["x-should-retry"] == "false" and headers["x-gateway-attempts"] == "2"
    assert statuses == [429, 429] and answers == {429: 1}


@pytest.mark.parametrize("status, content_type", [
    (401, "application/json"), (403, "application/json"), (400, "text/html")])
async def test_a_provider_answer_no_retry_mends_is_final_for_the_sdks(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, status: int,
    content_type: str,
) -> None:
    """The provider refused the gateway's credential, or refused this request in HTML: a 502
    no retry mends. It said nothing about retrying, so each SDK call reached the provider
    three times; now ``x-should-retry: false``, one call each."""
    calls = 0

    async def refuse(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        text = '{"error": {"message": "no"}}' if content_type.endswith("json") else "<p>no</p>"
        return web.Response(status=status, text=text, content_type=content_type)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    server = await aiohttp_server(app)
    gw, answers = await counted_gateway(aiohttp_client, str(server.make_url("")).rstrip("/"))
    client = _openai(gw)  # default settings: two retries of a 502
    anthropic_client = _anthropic(gw)
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gpt-test", messages=HELLO)
        with pytest.raises(anthropic.InternalServerError):  # translated to the same provider
            await anthropic_client.messages.create(model="gpt-test", max_tokens=5, messages=[
                {"role": "user", "content": "hi"}])
    finally:
        await client.close()
        await anthropic_client.close()
    assert info.value.status_code == 502
    assert info.value.response.headers["x-should-retry"] == "false"
    assert calls == 2 and answers == {502: 2}


async def test_a_provider_429_the_gateway_could_not_retry_in_time_is_retryable_for_the_sdk(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway slept the provider's Retry-After to retry, and woke to a cool-down renewed
    meanwhile (another replica's 429): it had made one attempt only, so the 429 is relayed as
    it came, retryable, and the SDK's own retry succeeds (it was told not to retry, and
    failed)."""
    from gateway.pipeline import attempts
    url, statuses = await every_other_call_429(aiohttp_server)
    gw, answers = await counted_gateway(aiohttp_client, url)
    breakers = gw.app[GATEWAY].services.breakers
    sleep_until = attempts._sleep_until

    async def renewed_meanwhile(clock: Callable[[], float], when: float) -> None:
        await sleep_until(clock, when)  # the 429's 200 ms, and another replica's 429 came
        breakers.cool_down("main/upstream-gpt", 0.25)

    monkeypatch.setattr(attempts, "_sleep_until", renewed_meanwhile)
    client = _openai(gw)  # default settings
    try:
        await client.chat.completions.create(model="gpt-test", messages=HELLO)
    finally:
        await client.close()
    # The provider's 429 relayed, then (the renewed cool-down not yet over when the SDK came
    # back after the 429's 200 ms) a 503 with its own Retry-After, then the answer.
    assert statuses == [429, 200] and answers[429] == 1 and answers[200] == 1
    assert sum(answers.values()) <= 3  # within the SDK's two retries
