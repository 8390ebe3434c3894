"""One HTTP attempt against an OpenAI-compatible endpoint, and the SDK-like retry rule.

``send`` posts a prepared body and reads the answer to the end, timing the first content token
of a stream (or the whole answer when not streaming), counting tokens from ``usage`` (or the
content deltas when a stream carries none), and sorting the result into one outcome of
``stats.OUTCOMES``. It never raises for what the server or the network did: that is data.

``retry_delay`` is the official OpenAI/Anthropic SDKs' rule (docs: shared/dependencies.md, 8):
retry connect errors, timeouts, 408, 409, 429 and 5xx; ``x-should-retry`` overrides that list
both ways; ``retry-after-ms``, then ``retry-after`` (seconds or an HTTP date) give the wait,
and one over ``max_retry_after_s`` means do not retry; otherwise back off
``min(0.5 * 2**n, 8) * (1 - 0.25 * random)``. Nothing that failed after the first byte is retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
import orjson
from yarl import URL

from .scenario import Client

__all__ = ["AttemptResult", "classify_error", "parse_retry_after", "retry_delay", "send"]

_ERROR_BODY_LIMIT = 65_536


@dataclass(slots=True)
class AttemptResult:
    """How one attempt ended; times are ``loop.time()`` values."""

    status: int  # 0: no HTTP answer
    outcome: str
    ended_at: float
    first_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_after_s: float | None = None
    should_retry: bool | None = None
    detail: str = ""
    code: str | None = None  # error.code of an error answer (run_budget_exceeded, ...)


def classify_error(status: int, code: str | None) -> str:
    """The outcome of an error answer."""
    if status == 429:
        return "rate_limited"
    if status == 503 and code == "overloaded":
        return "shed"
    if status == 504:
        return "deadline"
    return "upstream_error" if status >= 500 else "client_error"


def parse_retry_after(headers: Mapping[str, str], now_epoch_s: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after``; None when absent or bad."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    now = time.time() if now_epoch_s is None else now_epoch_s
    return max(0.0, when.timestamp() - now)


def retry_delay(policy: Client, result: AttemptResult, retries_done: int,
                rng: random.Random) -> float | None:
    """Seconds to wait before the next attempt, or None to stop (module docstring)."""
    if result.outcome in ("ok", "stream_error", "cancelled") or retries_done >= policy.retries:
        return None
    if result.should_retry is False:
        return None
    if result.should_retry is None and not (
        result.outcome in ("transport", "timeout")
        or result.status in (408, 409, 429) or result.status >= 500
    ):
        return None
    if policy.backoff == "none":
        return 0.0
    wait = result.retry_after_s
    if wait is not None:
        if wait > policy.max_retry_after_s:
            return None
        if wait > 0:
            return wait
    backoff: float = min(0.5 * 2.0 ** retries_done, 8.0)
    return backoff * (1 - 0.25 * rng.random())


def _should_retry(headers: Mapping[str, str]) -> bool | None:
    value = headers.get("x-should-retry")
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def _error_code(raw: bytes) -> str | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return code if isinstance(code, str) else None
    return None


def _usage(result: AttemptResult, usage: object) -> None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            result.prompt_tokens = prompt
        if isinstance(completion, int):
            result.completion_tokens = completion


async def send(session: aiohttp.ClientSession, url: URL, headers: Mapping[str, str],
               body: bytes, stream: bool, timeout: aiohttp.ClientTimeout) -> AttemptResult:
    """One POST, read to the end (see the module docstring)."""
    loop = asyncio.get_running_loop()
    result = AttemptResult(0, "transport", 0.0)
    answered = False
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            answered = True
            result.status = resp.status
            if resp.status >= 400:
                raw = await resp.content.read(_ERROR_BODY_LIMIT)
                result.code = _error_code(raw)
                result.outcome = classify_error(resp.status, result.code)
                result.retry_after_s = parse_retry_after(resp.headers)
                result.should_retry = _should_retry(resp.headers)
                result.detail = f"HTTP {resp.status}"
            elif stream and resp.content_type == "text/event-stream":
                await _read_stream(resp, result, loop)
            else:
                raw = await resp.read()
                result.first_at = loop.time()
                result.outcome = "ok"
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    result.outcome, result.detail = "stream_error", "answer is not JSON"
                else:
                    if isinstance(parsed, dict):
                        _usage(result, parsed.get("usage"))
    except TimeoutError:
        result.outcome, result.detail = "timeout", "client timeout"
    except (aiohttp.ClientError, OSError) as exc:
        result.outcome = "stream_error" if answered else "transport"
        result.detail = type(exc).__name__
    result.ended_at = loop.time()
    return result


async def _read_stream(resp: aiohttp.ClientResponse, result: AttemptResult,
                       loop: asyncio.AbstractEventLoop) -> None:
    """Read an OpenAI-style SSE stream: first token, deltas, usage, [DONE] or an error."""
    buf = b""
    deltas = 0
    done = False
    async for chunk in resp.content.iter_any():
        buf += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
        while (cut := buf.find(b"\n\n")) >= 0:
            event, buf = buf[:cut], buf[cut + 2:]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:
                    result.outcome, result.detail = "stream_error", "error event mid-stream"
                    return
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if isinstance(delta, dict) and delta.get("content"):
                        deltas += 1
                        if result.first_at is None:
                            result.first_at = loop.time()
                if obj.get("usage"):
                    _usage(result, obj["usage"])
    if not done:
        result.outcome, result.detail = "stream_error", "stream ended without [DONE]"
        return
    result.outcome = "ok"
    if result.first_at is None:  # an empty answer: its first token is its end
        result.first_at = loop.time()
    if not result.completion_tokens:
        result.completion_tokens = deltas
