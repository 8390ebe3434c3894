"""Token reservations a tenant cannot talk its way around (issue 15 items 1-3, issue 16 item 4).

The reservation is what the upstream will honour: the largest output cap the body carries for
its API, times the generations the provider makes (``n``; ``best_of`` and batched prompts on
legacy completions). A cap above the model's ``max_output_tokens`` is refused (or clamped in
the forwarded body, when the model says ``over_max_tokens: clamp``). A body without a cap is
reserved from ``default_max_tokens`` and forwarded unchanged unless ``inject_max_tokens``.

The attacks are the red team's, on every state backend; the property test checks, for any mix
of cap fields, that the forwarded body cannot make the upstream generate more than reserved.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestServer
from anthropic.types import MessageParam
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

from gateway.app.server import GATEWAY
from gateway.mock.upstream import RECORDED
from gateway.request.classifier import estimate_prompt_tokens
from gateway.state import StateBackend
from gateway.upstream.relay import model_renamer
from tests.gwtest import ACME_KEY, UMBRELLA_KEY, auth, chat
from tests.plugin_gateway import GatewayClient, MakeGateway, settled

Client = GatewayClient
MAX_OUT = 4096  # the models' max_output_tokens (set here: unset, the gateway knows no maximum)
MAX_CHOICES = 128  # OpenAI refuses n above this
MAX_TOKEN_FIELD = 2**31 - 1  # a cap above this is malformed, not clamped
MAXED = {"gpt-test": {"max_output_tokens": MAX_OUT}, "claude-test": {"max_output_tokens": MAX_OUT}}
CLAMPED = {"models": {
    "gpt-test": {"over_max_tokens": "clamp", "max_output_tokens": MAX_OUT},
    "claude-test": {"over_max_tokens": "clamp", "max_output_tokens": MAX_OUT},
}}




def tenant(**acme: Any) -> dict[str, Any]:
    return {"tenants": {"acme": acme}, "models": MAXED}


@pytest.fixture
async def gw(make_gateway: MakeGateway) -> Client:
    return await make_gateway()


def _base(gw: Client) -> str:
    return str(gw.make_url("")).rstrip("/")


def _forwarded(mock_upstream: TestServer) -> list[dict[str, Any]]:
    return [r.body for r in mock_upstream.app[RECORDED] if r.path.startswith("/v1/")]


async def _used(resp: ClientResponse) -> int:
    """Tokens the upstream really spent on one answer (0 for a refusal)."""
    if resp.status != 200:
        return 0
    usage = (await resp.json())["usage"]
    return int(usage.get("total_tokens", usage.get("input_tokens", 0)
                         + usage.get("output_tokens", 0)))


# --- the red team's attacks, on every backend -----------------------------------------------


async def test_both_token_fields_cannot_overspend_a_daily_budget(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    # Six requests with max_tokens 1 and max_completion_tokens 2000 spent 12,212 tokens of a
    # 5,000-token budget when the gateway reserved the smaller field.
    gw = await make_gateway(state=backend, **tenant(budget={"daily_tokens": 5000}))
    knobs = auth(**{"x-mock-chunks": "2000"})  # the mock honours max_completion_tokens

    def attack(i: int) -> dict[str, Any]:
        return chat(text=f"attack {i}", max_tokens=1, max_completion_tokens=2000)

    answers = await asyncio.gather(*(gw.post("/v1/chat/completions", json=attack(i),
                                             headers=knobs) for i in range(6)))
    spent = sum([await _used(r) for r in answers])
    await settled(gw)
    for i in range(6, 12):  # and one after another, each after the last one settled
        resp = await gw.post("/v1/chat/completions", json=attack(i), headers=knobs)
        spent += await _used(resp)
        await settled(gw)
        if resp.status == 429:
            assert (await resp.json())["error"]["code"] == "insufficient_quota"
    served = [r for r in answers if r.status == 200]
    assert len(served) == 2  # 5000 // (2000 + prompt): the reservation is the larger field
    assert 4000 < spent <= 5000


async def test_both_token_fields_cannot_overspend_tokens_per_minute(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    gw = await make_gateway(state=backend, **tenant(
        limits={"tokens_per_minute": 5000, "token_burst": 5000}))
    knobs = auth(**{"x-mock-chunks": "2000"})
    began = time.monotonic()
    answers = await asyncio.gather(*(gw.post(
        "/v1/chat/completions", json=chat(text=f"attack {i}", max_tokens=1,
                                          max_completion_tokens=2000), headers=knobs)
        for i in range(6)))
    elapsed = time.monotonic() - began
    spent = sum([await _used(r) for r in answers])
    refill = 5000 / 60 * elapsed  # the bucket refills while the requests run
    assert spent <= 5000 + refill
    assert sum(r.status == 429 for r in answers) >= 3


async def test_max_tokens_above_the_models_maximum_is_refused_in_each_dialect(
    make_gateway: MakeGateway, backend: StateBackend, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway(state=backend, **tenant(budget={"daily_tokens": 20_000}))
    resp = await gw.post("/v1/chat/completions", json=chat(max_tokens=60_000), headers=auth())
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    assert "60000" in err["message"] and str(MAX_OUT) in err["message"]
    resp = await gw.post("/v1/messages", headers=auth(), json={
        "model": "claude-test", "max_tokens": 60_000,
        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 400
    data = await resp.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in data["error"]["message"]
    resp = await gw.post("/v1/responses", headers=auth(), json={
        "model": "gpt-test", "input": "hi", "max_output_tokens": MAX_OUT + 1})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "max_output_tokens"
    assert _forwarded(mock_upstream) == []  # nothing reached the upstream
    # exactly the maximum is fine
    assert (await gw.post("/v1/chat/completions", json=chat(max_tokens=MAX_OUT),
                          headers=auth())).status == 200


async def test_a_model_without_a_known_maximum_refuses_nothing_and_reserves_what_is_asked(
    make_gateway: MakeGateway, backend: StateBackend, mock_upstream: TestServer,
) -> None:
    # Shipped default: max_output_tokens unset. The gateway cannot know the provider's maximum,
    # so it must not refuse a cap the provider may accept; it reserves the cap in full instead.
    gw = await make_gateway(state=backend, tenants={"acme": {
        "budget": {"daily_tokens": 100_000},
        "limits": {"tokens_per_minute": 60, "token_burst": 100_000}}})
    body = chat(text="long essay", max_tokens=60_000)
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    assert _forwarded(mock_upstream)[-1]["max_tokens"] == 60_000  # unchanged
    reserved = estimate_prompt_tokens(body) + 60_000
    assert abs(int(resp.headers["x-ratelimit-remaining-tokens"]) - (100_000 - reserved)) <= 1
    # a cap larger than the whole budget is refused as such, never forwarded
    too_big = await gw.post("/v1/chat/completions", json=chat(max_tokens=100_001), headers=auth())
    assert too_big.status == 429
    assert len(_forwarded(mock_upstream)) == 1


async def test_clamped_max_tokens_cannot_overspend_a_budget(
    make_gateway: MakeGateway, backend: StateBackend, mock_upstream: TestServer,
) -> None:
    # One request with max_tokens 60000 spent 60,001 tokens of a 20,000-token budget.
    gw = await make_gateway(state=backend, **{**tenant(budget={"daily_tokens": 20_000}),
                                              **CLAMPED})
    knobs = auth(**{"x-mock-chunks": "60000"})
    answers = await asyncio.gather(*(gw.post(
        "/v1/chat/completions", json=chat(text=f"big {i}", max_tokens=60_000,
                                          max_completion_tokens=50_000), headers=knobs)
        for i in range(6)))
    spent = sum([await _used(r) for r in answers])
    assert sum(r.status == 200 for r in answers) == 4  # 20000 // (4096 + prompt)
    assert spent <= 20_000
    for body in _forwarded(mock_upstream):
        assert body["max_tokens"] == MAX_OUT and body["max_completion_tokens"] == MAX_OUT


async def test_n_reserves_each_choice(make_gateway: MakeGateway, backend: StateBackend) -> None:
    gw = await make_gateway(state=backend, **tenant(
        limits={"tokens_per_minute": 60, "token_burst": 100_000},
        budget={"daily_tokens": 5000}))
    body = chat(text="eight please", n=8, max_tokens=100)
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    reserved = estimate_prompt_tokens(body) + 8 * 100
    # (one token of slack: the bucket refills one token a second while the request runs)
    assert abs(int(resp.headers["x-ratelimit-remaining-tokens"]) - (100_000 - reserved)) <= 1
    # 8 x 700 = 5600 output tokens cannot fit a 5,000-token budget, however n=1 would
    too_many = await gw.post("/v1/chat/completions", json=chat(n=8, max_tokens=700),
                             headers=auth())
    assert too_many.status == 429
    assert (await too_many.json())["error"]["code"] == "insufficient_quota"


async def test_best_of_and_batched_prompts_reserve_every_generation(
    make_gateway: MakeGateway, backend: StateBackend,
) -> None:
    gw = await make_gateway(state=backend, **tenant(
        limits={"tokens_per_minute": 60, "token_burst": 100_000}))
    # three prompts, each best_of 4 (n 2 returned): the provider generates 12 completions
    body = {"model": "gpt-test", "prompt": ["a", "b", "c"], "n": 2, "best_of": 4,
            "max_tokens": 50}
    resp = await gw.post("/v1/completions", json=body, headers=auth())
    assert resp.status == 200
    reserved = estimate_prompt_tokens(body) + 12 * 50
    # (one token of slack: the bucket refills one token a second while the request runs)
    assert abs(int(resp.headers["x-ratelimit-remaining-tokens"]) - (100_000 - reserved)) <= 1


# --- malformed values: a clear 400 in the client's dialect ---------------------------------

BAD_VALUES = [-1, 0, 1.5, True, "100", [5], {"v": 5}, MAX_TOKEN_FIELD + 1]


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("route,body,name", [
    ("/v1/chat/completions", chat(), "max_tokens"),
    ("/v1/chat/completions", chat(), "max_completion_tokens"),
    ("/v1/chat/completions", chat(), "n"),
    ("/v1/completions", {"model": "gpt-test", "prompt": "hi"}, "best_of"),
    ("/v1/responses", {"model": "gpt-test", "input": "hi"}, "max_output_tokens"),
])
async def test_malformed_token_fields_get_an_openai_400(gw: Client, route: str,
                                                        body: dict[str, Any], name: str,
                                                        value: Any) -> None:
    resp = await gw.post(route, json={**body, name: value}, headers=auth())
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == name and err["type"] == "invalid_request_error"
    assert name in err["message"] and "integer" in err["message"]


@pytest.mark.parametrize("value", BAD_VALUES)
async def test_malformed_max_tokens_gets_an_anthropic_400(gw: Client, value: Any) -> None:
    resp = await gw.post("/v1/messages", headers=auth(), json={
        "model": "claude-test", "max_tokens": value,
        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 400
    data = await resp.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in data["error"]["message"]


async def test_n_above_the_maximum_is_refused(gw: Client) -> None:
    resp = await gw.post("/v1/chat/completions", json=chat(n=MAX_CHOICES + 1), headers=auth())
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "n"


# --- property: the forwarded body never lets the upstream outgrow the reservation ----------

PROPERTY = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
TOKEN_VALUES = st.one_of(  # mostly valid caps, below and above the models' maximum
    st.integers(1, 1200), st.integers(1, 5000), st.none(), st.integers(-3, 3),
    st.integers(4000, 2**40),
    st.sampled_from([True, False, 1.5, 100.0, "100", MAX_TOKEN_FIELD, MAX_OUT, MAX_OUT + 1]),
)
CHOICE_VALUES = st.one_of(st.integers(1, 12), st.none(), st.integers(-1, 12), st.integers(120, 140),
                          st.sampled_from([True, 2.0, "3"]))
CAP_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": chat(),
    "/v1/completions": {"model": "gpt-test", "prompt": "hi"},
    "/v1/responses": {"model": "gpt-test", "input": "hi"},
    "/v1/messages": {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]},
}


def upstream_may_generate(route: str, body: dict[str, Any]) -> int | None:
    """The most output tokens a provider could generate for this forwarded body: whichever cap
    field of its API it reads (assume the largest), times every generation it makes. None: the
    body sets no cap."""
    fields = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
              "/v1/completions": ("max_tokens",), "/v1/responses": ("max_output_tokens",),
              "/v1/messages": ("max_tokens",)}[route]
    caps = [body[f] for f in fields if body.get(f) is not None]
    if not caps:
        return None
    generations = 1
    if route == "/v1/chat/completions":
        generations = body.get("n") or 1
    elif route == "/v1/completions":
        prompt = body["prompt"]
        prompts = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) \
            else 1
        generations = max(body.get("n") or 1, body.get("best_of") or 1) * prompts
    return int(max(caps)) * int(generations)


@pytest.fixture
async def spy_gw(make_gateway: MakeGateway) -> tuple[Client, list[int]]:
    """A gateway whose models clamp or refuse, recording each admitted reservation."""
    gw = await make_gateway(
        models={"gpt-test": {"max_output_tokens": 1000},
                "gpt-clamp": {"deployments": [{"provider": "main", "model": "upstream-gpt"}],
                              "max_output_tokens": 1000, "over_max_tokens": "clamp"},
                "claude-clamp": {"deployments": [{"provider": "claude",
                                                  "model": "upstream-claude"}],
                                 "max_output_tokens": MAX_OUT, "over_max_tokens": "clamp"}},
        tenants={"acme": {"loop_guard": {"enabled": False}, "default_max_tokens": 300},
                 # this one opts in to injection: its uncapped requests get the estimate as cap
                 "umbrella": {"loop_guard": {"enabled": False}, "default_max_tokens": 300,
                              "inject_max_tokens": True, "models": ["*"]}},
    )
    reserved: list[int] = []
    limiter = gw.app[GATEWAY].policy.limiter
    admit = limiter.admit

    async def spying_admit(call: Any, request_id: str, **kw: Any) -> Any:
        hold = await admit(call, request_id, **kw)
        reserved.append(hold.reserved_tokens - call.prompt_tokens_estimate)
        return hold

    limiter.admit = spying_admit  # type: ignore[method-assign]
    return gw, reserved


@PROPERTY
@given(data=st.data())
async def test_forwarded_body_never_outgrows_the_reservation(
    spy_gw: tuple[Client, list[int]], mock_upstream: TestServer, data: st.DataObject,
) -> None:
    gw, reserved = spy_gw
    route = data.draw(st.sampled_from(sorted(BASES)))
    body = dict(BASES[route])
    if route != "/v1/messages":
        body["model"] = data.draw(st.sampled_from(["gpt-test", "gpt-clamp"]))
    else:
        body["model"] = data.draw(st.sampled_from(["claude-test", "claude-clamp"]))
    for name in CAP_FIELDS:
        if data.draw(st.booleans()):
            body[name] = data.draw(TOKEN_VALUES)
    for name in ("n", "best_of"):
        if data.draw(st.booleans()):
            body[name] = data.draw(CHOICE_VALUES)
    if route == "/v1/completions":
        body["prompt"] = data.draw(st.one_of(
            st.just("hi"), st.lists(st.sampled_from(["a", "bb"]), min_size=1, max_size=4),
            st.lists(st.integers(0, 50), min_size=1, max_size=4),
            st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=3), min_size=1,
                     max_size=3)))
    key = data.draw(st.sampled_from([ACME_KEY, UMBRELLA_KEY]))
    before, admitted = len(_forwarded(mock_upstream)), len(reserved)
    resp = await gw.post(route, json=body, headers=auth(key))
    raw = await resp.json()
    event(f"{route} {resp.status}")
    if resp.status == 400:  # refused: a clear error in the route's dialect, nothing forwarded
        message = raw["error"]["message"]
        assert message and (raw["type"] == "error" if route == "/v1/messages"
                            else raw["error"]["param"])
        assert len(_forwarded(mock_upstream)) == before and len(reserved) == admitted
        return
    assert len(reserved) == admitted + 1, (resp.status, raw)
    forwarded = _forwarded(mock_upstream)[-1]
    may_generate = upstream_may_generate(route, forwarded)
    event("capped" if may_generate is not None else "uncapped")
    if may_generate is None:
        # no cap, nothing injected: reserved from the tenant's estimate (the documented bound)
        assert key == ACME_KEY
        assert {f: forwarded.get(f) for f in CAP_FIELDS} == {f: body.get(f) for f in CAP_FIELDS}
        assert reserved[-1] % 300 == 0
        return
    assert may_generate <= reserved[-1], (body, forwarded, reserved[-1])


# --- no silent changes: what the official SDK sends is what the upstream gets ---------------


async def test_openai_sdk_request_without_max_tokens_is_forwarded_unchanged(
    gw: Client, mock_upstream: TestServer,
) -> None:
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-mock-chunks": "1500"})
        answer = await client.responses.create(model="gpt-test", input="hello")
    finally:
        await client.close()
    # longer than default_max_tokens (1024): the reservation was an estimate, not a cut
    assert reply.usage is not None and reply.usage.completion_tokens == 1500
    assert reply.choices[0].finish_reason == "stop"
    assert answer.output_text
    chat_body, responses_body = _forwarded(mock_upstream)[-2:]
    assert not {"max_tokens", "max_completion_tokens"} & set(chat_body)
    assert "max_output_tokens" not in responses_body


async def test_openai_sdk_request_gets_the_estimate_injected_when_opted_in(
    make_gateway: MakeGateway, mock_upstream: TestServer,
) -> None:
    gw = await make_gateway(**tenant(inject_max_tokens=True, default_max_tokens=300))
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-mock-chunks": "1500"})
        await client.responses.create(model="gpt-test", input="hello")
        await client.chat.completions.create(  # a cap of its own is left alone
            model="gpt-test", messages=[{"role": "user", "content": "hello"}], max_tokens=7)
    finally:
        await client.close()
    assert reply.usage is not None and reply.usage.completion_tokens == 300
    assert reply.choices[0].finish_reason == "length"
    chat_body, responses_body, own_cap = _forwarded(mock_upstream)[-3:]
    assert chat_body["max_completion_tokens"] == 300 and "max_tokens" not in chat_body
    assert responses_body["max_output_tokens"] == 300
    assert own_cap["max_tokens"] == 7 and "max_completion_tokens" not in own_cap


# --- the answer's model field -----------------------------------------------------------------


async def test_answer_model_is_the_upstreams_by_default(gw: Client) -> None:
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}])
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}], stream=True)
        models = {chunk.model async for chunk in stream}
    finally:
        await client.close()
    assert reply.model == "upstream-gpt" and models == {"upstream-gpt"}


async def test_answer_model_alias_names_the_public_model_in_every_dialect(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(models={"gpt-test": {"answer_model": "alias"},
                                    "claude-test": {"answer_model": "alias"}})
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    claude = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY, max_retries=0)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    claude_hello: list[MessageParam] = [{"role": "user", "content": "hello"}]
    try:
        reply = await client.chat.completions.create(model="gpt-test", messages=hello)
        assert reply.model == "gpt-test" and reply.usage is not None
        stream = await client.chat.completions.create(model="gpt-test", messages=hello,
                                                      stream=True)
        assert {chunk.model async for chunk in stream} == {"gpt-test"}
        answer = await client.responses.create(model="gpt-test", input="hello")
        assert answer.model == "gpt-test"
        async with client.responses.stream(model="gpt-test", input="hello") as events:
            final = await events.get_final_response()
        assert final.model == "gpt-test"
        text = await client.completions.create(model="gpt-test", prompt="hi")
        assert text.model == "gpt-test"
        msg = await claude.messages.create(model="claude-test", max_tokens=20,
                                           messages=claude_hello)
        assert msg.model == "claude-test" and msg.usage.output_tokens > 0
        async with claude.messages.stream(model="claude-test", max_tokens=20,
                                          messages=claude_hello) as claude_stream:
            streamed = await claude_stream.get_final_message()
        assert streamed.model == "claude-test"
    finally:
        await client.close()
        await claude.close()


def test_model_renamer_rewrites_the_answers_model_only() -> None:
    # Events as the providers send them: the served name is a dated snapshot, not the
    # deployment's configured name, and a Responses object carries user metadata after it.
    rename = model_renamer("gpt-public")
    chunk = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,'
             b'"model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":'
             b'"say \\"model\\":\\"x\\""}}]}\n\n')
    created = (b'event: response.created\ndata: {"type":"response.created","response":{'
               b'"id":"r1","instructions":"a \\"model\\": \\"y\\"","model": "gpt-4o-2024-08-06",'
               b'"output":[],"metadata":{"model":"mine"}}}\n\n')
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1",'
             b'"type":"message","role":"assistant","model":"claude-x-20250101","content":[]}}'
             b'\n\n')
    delta = b'data: {"type":"content_block_delta","delta":{"text":"model"}}\n\n'
    out = rename(chunk + created + start + delta)
    assert out == (chunk.replace(b'"gpt-4o-2024-08-06"', b'"gpt-public"')
                   + created.replace(b'"gpt-4o-2024-08-06"', b'"gpt-public"')
                   + start.replace(b'"claude-x-20250101"', b'"gpt-public"') + delta)
    assert model_renamer(None)(chunk) == chunk
