"""The official SDKs, unchanged but for base_url, work through the gateway."""

from __future__ import annotations

import anthropic
import openai

from tests.gwtest import ACME_KEY
from tests.plugin_gateway import GatewayClient


def _base(gw: GatewayClient) -> str:
    return str(gw.make_url("")).rstrip("/")


async def test_openai_sdk_non_streaming_and_streaming(gw: GatewayClient) -> None:
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key=ACME_KEY, max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0

        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}], stream=True,
            extra_headers={"x-mock-chunks": "5"},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert len([p for p in pieces if p]) == 5

        models = await client.models.list()
        assert "gpt-test" in [m.id for m in models.data]
    finally:
        await client.close()


async def test_openai_sdk_sees_gateway_errors_with_their_message(gw: GatewayClient) -> None:
    client = openai.AsyncOpenAI(base_url=_base(gw) + "/v1", api_key="sk-not-a-key", max_retries=0)
    try:
        try:
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hello"}]
            )
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401
            assert "Incorrect API key" in str(exc)
        else:
            raise AssertionError("a wrong key must be refused")
    finally:
        await client.close()


async def test_anthropic_sdk_messages_non_streaming_and_streaming(gw: GatewayClient) -> None:
    client = anthropic.AsyncAnthropic(base_url=_base(gw), api_key=ACME_KEY, max_retries=0)
    try:
        msg = await client.messages.create(
            model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        first = msg.content[0]
        assert isinstance(first, anthropic.types.TextBlock)
        assert first.text and msg.usage.output_tokens > 0
        async with client.messages.stream(
            model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-chunks": "4"},
        ) as stream:
            text = await stream.get_final_text()
            final = await stream.get_final_message()
        assert text and final.usage.output_tokens == 4
    finally:
        await client.close()
