"""Per-request knobs of the mock upstream: ``x-mock-*`` request headers parsed into ``Knobs``.

The header contract (names, ranges, defaults) is documented in ``gateway.mock.upstream``.
Parsing is kept apart from the HTTP handlers because it is pure (headers in, a frozen
``Knobs`` or a ``BadRequest`` out), is on the hot path of every request, and is what a
reader checks when a knob is rejected or ignored, without wading through aiohttp plumbing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MAX_CHUNKS = 100_000
MAX_DELAY_MS = 600_000.0
_FAIL_MODES = frozenset({"drop", "hang", "midstream-cut", "midstream-error"})


class BadRequest(Exception):
    """A 400 for the client: bad knob header or bad body field; the message says which."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """What one request's ``x-mock-*`` headers asked for; the defaults are "no knob"."""

    latency_s: float = 0.0
    ttft_s: float = 0.0
    chunks: int = 5
    gap_s: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    fail: str | None = None
    fail_after: int = 2
    fail_rate: float | None = None
    cached_share: float | None = None  # share of the prompt read from cache on a repeat
    reasoning_tokens: int | None = None  # reasoning tokens of a reasoning model's answer


_NO_KNOBS = Knobs()


def _number(headers: Mapping[str, str], name: str, hi: float) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan  # fails the range check below, which gives the one error message
    if not 0 <= value <= hi:
        raise BadRequest(f"header {name} must be a number in [0, {hi:g}], got {raw!r}")
    return value


def _integer(headers: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise BadRequest(f"header {name} must be an integer in [{lo}, {hi}], got {raw!r}")
    return value


def _ms(headers: Mapping[str, str], name: str) -> float:
    value = _number(headers, name, MAX_DELAY_MS)
    return 0.0 if value is None else value / 1000.0


def parse_knobs(headers: Mapping[str, str]) -> Knobs:
    # Benchmarks send no knobs: one scan of the header names skips nine lookups.
    if not any(name[:7].lower() == "x-mock-" for name in headers):
        return _NO_KNOBS
    fail = headers.get("x-mock-fail")
    if fail is not None and fail not in _FAIL_MODES:
        raise BadRequest(f"header x-mock-fail must be one of {sorted(_FAIL_MODES)}, got {fail!r}")
    chunks = _integer(headers, "x-mock-chunks", 0, MAX_CHUNKS)
    fail_after = _integer(headers, "x-mock-fail-after", 0, MAX_CHUNKS)
    retry_after = _number(headers, "x-mock-retry-after", 86_400)
    retry_after_ms = _number(headers, "x-mock-retry-after-ms", 86_400_000)
    return Knobs(
        latency_s=_ms(headers, "x-mock-latency-ms"),
        ttft_s=_ms(headers, "x-mock-ttft-ms"),
        chunks=5 if chunks is None else chunks,
        gap_s=_ms(headers, "x-mock-chunk-gap-ms"),
        status=_integer(headers, "x-mock-status", 400, 599),
        # Validated above, forwarded as the client wrote them.
        retry_after=None if retry_after is None else headers["x-mock-retry-after"].strip(),
        retry_after_ms=None if retry_after_ms is None else headers["x-mock-retry-after-ms"].strip(),
        fail=fail,
        fail_after=2 if fail_after is None else fail_after,
        fail_rate=_number(headers, "x-mock-fail-rate", 1.0),
        cached_share=_number(headers, "x-mock-cached-share", 1.0),
        reasoning_tokens=_integer(headers, "x-mock-reasoning-tokens", 0, MAX_CHUNKS),
    )
