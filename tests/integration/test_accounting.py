"""Accounting by billed dimension: parsing every dialect's usage, the price table in integer
micro-units, cache reads counted or not by token limits, and a 10-step agent run with 90 %
cached input charged what the price table says (and finishing under a cost budget)."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.config.model import Price, load_config
from gateway.request.auth import hash_key
from gateway.usage import Rates, Usage, cost_micros, micros
from tests.gwtest import ACME_KEY, auth, log_fields, policy_dict
from tests.plugin_gateway import GatewayClient, MakeGateway, settled, token_budget_spent

ADMIN_KEY = "sk-admin-accounting"


def merged(*objs: Any) -> Usage:
    usage = Usage()
    for obj in objs:
        usage.merge(obj)
    return usage


def test_openai_chat_usage_splits_cached_and_reasoning() -> None:
    u = merged({"usage": {"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
                          "prompt_tokens_details": {"cached_tokens": 900, "audio_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 256,
                                                        "accepted_prediction_tokens": 3,
                                                        "rejected_prediction_tokens": 4}}})
    assert (u.input_tokens, u.uncached_input_tokens, u.cache_read_tokens) == (1000, 100, 900)
    assert (u.output_tokens, u.reasoning_tokens) == (300, 256)
    assert (u.accepted_prediction_tokens, u.rejected_prediction_tokens) == (3, 4)
    assert u.reported


def test_responses_usage_inside_response_completed() -> None:
    u = merged({"type": "response.completed", "response": {"usage": {
        "input_tokens": 500, "input_tokens_details": {"cached_tokens": 400,
                                                      "cache_write_tokens": 50},
        "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 8}}}})
    assert u.dimensions() == {"input": 50, "cache_read": 400, "cache_write_5m": 50,
                              "cache_write_1h": 0, "output": 20, "reasoning": 8,
                              "accepted_prediction": 0, "rejected_prediction": 0}


def test_anthropic_stream_usage_is_cumulative_and_input_excludes_cache() -> None:
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 10, "cache_read_input_tokens": 5000, "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 1}}}
    u = merged(start)
    assert (u.input_tokens, u.uncached_input_tokens, u.output_tokens) == (5310, 10, 1)
    # message_delta: cumulative output; the input side repeated without the TTL split
    u.merge({"type": "message_delta", "usage": {
        "output_tokens": 42, "input_tokens": 10, "cache_read_input_tokens": 5000,
        "cache_creation_input_tokens": 300}})
    assert (u.cache_write_5m_tokens, u.cache_write_1h_tokens) == (100, 200)
    assert (u.output_tokens, u.input_tokens) == (42, 5310)
    # an older API's delta: only the output count; the input side stays
    u.merge({"type": "message_delta", "usage": {"output_tokens": 50}})
    assert (u.output_tokens, u.input_tokens, u.cache_read_tokens) == (50, 5310, 5000)


def test_anthropic_body_without_cache_fields_and_embeddings() -> None:
    body = merged({"type": "message", "usage": {"input_tokens": 7, "output_tokens": 3}})
    assert (body.input_tokens, body.output_tokens, body.cache_read_tokens) == (7, 3, 0)
    emb = merged({"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 8}})
    assert (emb.input_tokens, emb.output_tokens) == (8, 0)


@pytest.mark.parametrize("junk", [
    {"usage": {"prompt_tokens": "12", "completion_tokens": -1}},
    {"usage": {"prompt_tokens": True, "completion_tokens": 1.5}},
    {"usage": {"future_field": {"x": 1}}},
    {"usage": None}, {"usage": []}, {"choices": []}, [], "text",
])
def test_odd_usage_values_are_ignored_never_an_error(junk: Any) -> None:
    u = merged(junk)
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens) == (0, 0, 0)


def test_a_detail_larger_than_its_total_is_clamped() -> None:
    u = merged({"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                          "prompt_tokens_details": {"cached_tokens": 99},
                          "completion_tokens_details": {"reasoning_tokens": 99}}})
    assert (u.uncached_input_tokens, u.cache_read_tokens, u.reasoning_tokens) == (0, 10, 5)
    assert cost_micros(u, Rates(input=1, cache_read=1, output=1)) >= 0


def test_prices_are_exact_integers_and_cost_rounds_up_once() -> None:
    assert [micros(x) for x in (0.3, 0.1 + 0.2, 2.5, 0.075, 3.75, 1e-7)] == \
        [300_000, 300_000, 2_500_000, 75_000, 3_750_000, 0]
    rates = Price(input_per_million=3, cached_input_per_million=0.3,
                  cache_write_per_million=3.75, cache_write_1h_per_million=6,
                  output_per_million=15).rates
    u = Usage(input_tokens=1 + 1 + 1 + 1, output_tokens=1, cache_read_tokens=1,
              cache_write_5m_tokens=1, cache_write_1h_tokens=1)
    # 3 + 0.3 + 3.75 + 6 + 15 = 28.05 micro-units: one rounding, not five
    assert cost_micros(u, rates) == 29
    assert cost_micros(Usage(), rates) == 0


def test_unset_prices_fall_back_to_input_and_1h_to_the_5m_write() -> None:
    rates = Price(input_per_million=3, cache_write_per_million=3.75).rates
    assert (rates.cache_read, rates.cache_write_5m, rates.cache_write_1h) == \
        (3_000_000, 3_750_000, 3_750_000)


def test_load_warns_about_dimensions_the_provider_discounts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    data = policy_dict("http://127.0.0.1:9", models={
        "claude-test": {"price": {"input_per_million": 3, "output_per_million": 15}},
        "gpt-test": {"price": {"input_per_million": 1, "cached_input_per_million": 0.5,
                               "output_per_million": 2}},
    })
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        config = load_config(path)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.config"]
    assert len(warnings) == 1, warnings
    assert "models.claude-test.price: cache_write_1h_per_million, cache_write_per_million, " \
        "cached_input_per_million not set" in warnings[0]
    assert config.models["claude-test"].price.rates.cache_read == 3_000_000  # still priced


def _anthropic_cached(text: str) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 20,
            "system": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("setting", "counts_reads"),
                         [("auto", False), ("exclude", False), ("count", True)])
async def test_token_budget_counts_cache_reads_as_configured(
    make_gateway: MakeGateway, setting: str, counts_reads: bool,
) -> None:
    gw = await make_gateway(tenants={"acme": {"budget": {"daily_tokens": 10**9,
                                                         "cache_reads": setting}}})
    body = _anthropic_cached("Long instructions. " * 200)
    first = await (await gw.post("/v1/messages", json=body, headers=auth())).json()
    await settled(gw)
    before = token_budget_spent(gw)
    second = await (await gw.post("/v1/messages", json=body, headers=auth())).json()
    await settled(gw)
    read = second["usage"]["cache_read_input_tokens"]
    assert read == first["usage"]["cache_creation_input_tokens"] > 0
    charged = token_budget_spent(gw) - before
    expected = second["usage"]["input_tokens"] + second["usage"]["output_tokens"] + \
        second["usage"]["cache_creation_input_tokens"] + (read if counts_reads else 0)
    assert charged == expected


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
async def test_cache_reads_count_as_the_provider_that_served_them_counts_them(
    make_gateway: MakeGateway, route: str,
) -> None:
    """``cache_reads: auto`` follows the provider's own rule: an OpenAI deployment's cache
    reads count. They were counted by the client's dialect instead, so the same deployment's
    9,000 cached tokens were charged on /v1/chat/completions and free on /v1/messages."""
    gw = await make_gateway(tenants={"acme": {"budget": {"daily_tokens": 10**9}}})
    body: dict[str, Any] = {"model": "gpt-test", "max_tokens": 5, "messages": [
        {"role": "user", "content": "A long shared prefix. " * 300}]}
    headers = auth(**{"x-mock-cached-share": "0.9"})
    await (await gw.post(route, json=body, headers=headers)).read()
    await settled(gw)
    before = token_budget_spent(gw)
    answer = await (await gw.post(route, json=body, headers=headers)).json()
    await settled(gw)
    usage = answer["usage"]
    if route == "/v1/messages":  # translated back: input_tokens excludes the cache reads
        read = usage["cache_read_input_tokens"]
        total = usage["input_tokens"] + read + usage["output_tokens"]
    else:
        read = usage["prompt_tokens_details"]["cached_tokens"]
        total = usage["prompt_tokens"] + usage["completion_tokens"]
    assert read > 0.8 * total
    assert token_budget_spent(gw) - before == total


async def test_ten_step_agent_with_90_percent_cached_input_is_charged_the_price_table(
    make_gateway: MakeGateway,
) -> None:
    price = {"input_per_million": 2.0, "cached_input_per_million": 0.2, "output_per_million": 8.0}
    rates = Price.model_validate(price).rates

    async def run(gw: GatewayClient, label: str) -> list[Any]:
        client = openai.AsyncOpenAI(base_url=str(gw.make_url("/v1")), api_key=ACME_KEY)
        messages: list[Any] = [{"role": "system", "content": f"{label} " + "rules " * 700}]
        usages = []
        try:
            for step in range(10):
                messages.append({"role": "user", "content": f"step {step}: " + "obs " * 40})
                reply = await client.chat.completions.create(
                    model="gpt-agent", messages=messages, max_tokens=50,
                    extra_headers={"x-mock-cached-share": "0.9", "x-mock-chunks": "20",
                                   "X-Agent-Session": label})
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
                usages.append(reply.usage)
        finally:
            await client.close()
        return usages

    def bill(usages: list[Any], cached_price: int) -> int:
        return sum(math.ceil(((u.prompt_tokens - u.prompt_tokens_details.cached_tokens)
                              * rates.input + u.prompt_tokens_details.cached_tokens * cached_price
                              + u.completion_tokens * rates.output) / 1_000_000) for u in usages)

    models = {"gpt-agent": {"deployments": [{"provider": "main", "model": "upstream-agent"}],
                            "price": price}}
    # a first run, unlimited, to learn what the run costs
    probe = await run(await make_gateway(models=models), "probe")
    expected = bill(probe, rates.cache_read)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in probe[1:])
    assert cached / sum(u.prompt_tokens for u in probe[1:]) >= 0.89  # steps 2-10: 90 % cached
    # the budget: the run's bill plus room for the last step's reservation (prompt at the
    # uncached price + max_tokens), well below what the same run cost when every input token
    # was charged the full input price
    last = probe[-1]
    room = 2 * math.ceil((last.prompt_tokens * rates.input + 50 * rates.output) / 1_000_000)
    budget_micros = expected + room
    assert budget_micros < bill(probe, rates.input)
    gw = await make_gateway(models=models, admin={"api_keys": [hash_key(ADMIN_KEY)]},
                            tenants={"acme": {"budget": {"daily_cost": budget_micros / 1e6}}})
    usages = await run(gw, "agent")  # a fresh prefix: the same token counts as the probe
    assert [(u.prompt_tokens, u.prompt_tokens_details.cached_tokens) for u in usages] == \
        [(u.prompt_tokens, u.prompt_tokens_details.cached_tokens) for u in probe]
    await settled(gw)
    status = await (await gw.get("/admin/status", headers=auth(ADMIN_KEY))).json()
    usage = status["tenants"]["acme"]["usage"]
    assert usage["cost_micros"] == bill(usages, rates.cache_read) == expected
    assert usage["tokens"]["cache_read"] == sum(u.prompt_tokens_details.cached_tokens
                                                for u in usages)
    remaining = status["tenants"]["acme"]["budget_remaining"]["daily_cost"]["remaining"]
    assert remaining > 0


def test_settlement_counts_cache_reads_per_limit_as_the_hold_says() -> None:
    from gateway.limits.limiter import Counting, Hold, _with_actuals
    from gateway.state.plan import Kind, SettlePlan

    plan = SettlePlan("r", "done", "hold", 1000, (("rl:{t:a}:tok", Fraction(60), 500, 500),),
                      (("rl:{t:a}:b:tokens:d:1", 500, 500, 1), ("rl:{t:a}:b:cost:d:1", 9, 9, 1)),
                      ())
    usage = Usage(input_tokens=1000, output_tokens=10, cache_read_tokens=900)
    hold = Hold("r", "global", 500, 9, plan, counting=Counting(rate_cache_reads=False,
                                                                 budget_cache_reads=True))
    c = hold.counting
    kinds = (Kind.budget_tokens, Kind.budget_cost)
    settled_plan = _with_actuals(plan, kinds, usage.limit_tokens(c.rate_cache_reads),
                                 usage.limit_tokens(c.budget_cache_reads), 7)
    assert settled_plan.gcra[0][3] == 110  # TPM: 100 uncached + 10 output
    assert [a for _, _, a, _ in settled_plan.counters] == [1010, 7]


async def test_access_log_has_tokens_by_dimension_and_exact_cost(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway()
    caplog.set_level(logging.INFO, logger="gateway.access")
    messages: list[Any] = [{"role": "user", "content": "hello " * 100}]
    for _ in range(2):  # the second repeats the prefix: the mock reports it cached
        body = {"model": "gpt-test", "messages": messages}
        assert (await gw.post("/v1/chat/completions", json=body, headers=auth())).status == 200
        messages = [*messages, {"role": "user", "content": "and again"}]
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    prompt = line["tokens_in"]
    assert line["tokens"] == {"cache_read": 150, "input": prompt - 150, "output": 5}
    # gpt-test: 1.0 input (cached unset: priced as input), 2.0 output per million
    assert line["cost_micros"] == prompt * 1 + 5 * 2 and line["cost"] == line["cost_micros"] / 1e6


async def test_a_finished_stream_without_usage_is_charged_the_prompt_estimate(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """An OpenAI-compatible server that ignores stream_options: the stream ends cleanly with
    no usage, and the gateway charges its estimates rather than zero input."""

    async def no_usage(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("Hello", " world"):
            await resp.write(b'data: {"id":"c","object":"chat.completion.chunk","choices":'
                             b'[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", no_usage)
    upstream = await aiohttp_server(app)
    gw = await make_gateway(str(upstream.make_url("")).rstrip("/"))
    caplog.set_level(logging.INFO, logger="gateway.access")
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user",
                                                               "content": "hello " * 40}]}
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200 and b"[DONE]" in await resp.read()
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    assert line["usage_reported"] is False
    # "Hello world": 11 characters / 4, rounded up, as a whole answer's text (>= a token a delta)
    assert line["tokens_in"] > 0 and line["tokens_out"] == 3


ODD_USAGE = [
    ({}, "both"),
    ({"completion_tokens": 3}, "input"),
    ({"prompt_tokens": -1000, "completion_tokens": 3}, "input"),
    ({"prompt_tokens": 1000.0, "completion_tokens": 3.0}, "both"),
    ({"prompt_tokens": "1000", "completion_tokens": "3"}, "both"),
    ({"prompt_tokens": 0, "completion_tokens": 3}, "input"),
]


@pytest.mark.parametrize(("usage", "estimated"), ODD_USAGE,
                         ids=["empty", "no-input", "negative", "floats", "strings", "zero-input"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_usage_object_with_a_side_missing_or_unreadable_is_estimated_not_free(
    make_gateway: MakeGateway, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture,
    usage: dict[str, Any], estimated: str, stream: bool,
) -> None:
    """A usage object that came but whose input (or output) count is missing, negative, not
    an integer, or an input of 0 is estimated on that side, as if no usage had come: the
    request was charged 0 input (``{}``: nothing at all)."""
    import orjson

    text = "word " * 800  # about 1,000 prompt tokens estimated

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not stream:
            return web.json_response({
                "id": "c", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "one two three"}}],
                "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in ({"choices": [{"index": 0, "delta": {"content": "one"}}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": usage}):
            await resp.write(b"data: " + orjson.dumps({"id": "c", "object":
                                                       "chat.completion.chunk", "created": 1,
                                                       "model": "m", **chunk}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = await aiohttp_server(app)
    gw = await make_gateway(upstream=str(server.make_url("")).rstrip("/"))
    caplog.set_level(logging.INFO, logger="gateway.access")
    resp = await gw.post("/v1/chat/completions", headers=auth(), json={
        "model": "gpt-test", "stream": stream, "max_tokens": 100,
        "messages": [{"role": "user", "content": text}]})
    assert resp.status == 200
    await resp.read()
    await settled(gw)
    line = log_fields([r for r in caplog.records if r.name == "gateway.access"][-1])
    assert line["tokens_in"] >= 900, line  # the prompt estimate, not 0
    if estimated == "both":
        assert line["tokens_out"] >= 1  # the answer's estimate (or deltas), not 0
    else:
        assert line["tokens_out"] == 3  # the output the upstream did report
    assert line["cost_micros"] > 0


def test_an_anthropic_stream_that_reports_only_its_output_has_its_input_estimated() -> None:
    usage = Usage()
    usage.merge({"type": "message_start", "message": {"id": "m", "type": "message"}})
    usage.merge({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 3}})
    usage.fill_in(1000, 1)
    assert (usage.input_tokens, usage.output_tokens) == (1000, 3)
    reported = Usage()
    reported.merge({"type": "message_delta", "usage": {"input_tokens": 0, "output_tokens": 3,
                                                       "cache_read_input_tokens": 40}})
    reported.fill_in(1000, 1)  # 40 cache reads are input the upstream reported
    assert (reported.input_tokens, reported.output_tokens) == (40, 3)
