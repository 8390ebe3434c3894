"""Small helpers shared by the fault tests: load loops, usage parsing, Redis reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from gateway.limits.periods import period_keys
from tests.gwtest import auth, chat
from tests.plugin_gateway import GatewayClient

Client = GatewayClient


def budget_key(tenant: str = "acme", prefix: str = "gw:") -> str:
    """The daily token budget counter of ``tenant`` (what accounting is checked against)."""
    _, day, _, _ = period_keys(time.time())[0]
    return f"{prefix}rl:{{t:{tenant}}}:b:tokens:{day}"


def stream_usage(raw: bytes) -> dict[str, int] | None:
    for event in raw.split(b"\n\n"):
        if b'"usage":{' in event:
            data = orjson.loads(event.split(b"data:", 1)[1])
            if data.get("usage"):
                usage: dict[str, int] = data["usage"]
                return usage
    return None


@dataclass
class LoadResult:
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    reported_tokens: int = 0  # what the upstream reported for the 200s
    errors: list[str] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return sorted(self.latencies)[len(self.latencies) // 2] if self.latencies else 0.0


async def chat_load(gw: Client, seconds: float, workers: int = 6,
                    stop: Callable[[], bool] | None = None,
                    headers: dict[str, str] | None = None) -> LoadResult:
    """Closed-loop chat traffic (every third call streamed) for ``seconds``; bounded count."""
    out = LoadResult()
    end = time.monotonic() + seconds

    async def worker(n: int) -> None:
        for i in range(2000):
            if time.monotonic() >= end or (stop is not None and stop()):
                return
            stream = i % 3 == 0
            body = chat(text=f"worker {n} call {i}", stream=stream)
            if stream:
                body["stream_options"] = {"include_usage": True}
            began = time.monotonic()
            resp = await gw.post("/v1/chat/completions", json=body, headers=auth(**{
                "x-mock-chunks": str(1 + i % 5), **(headers or {})}))
            raw = await resp.read()
            out.latencies.append(time.monotonic() - began)
            out.statuses.append(resp.status)
            if resp.status != 200:
                out.errors.append(raw[:200].decode(errors="replace"))
                continue
            usage = stream_usage(raw) if stream else orjson.loads(raw)["usage"]
            assert usage is not None, raw[-300:]
            out.reported_tokens += usage["prompt_tokens"] + usage["completion_tokens"]

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return out


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.05)
