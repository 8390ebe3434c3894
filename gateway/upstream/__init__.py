"""The deployments: pool, one attempt with its timeouts, relay, SSE parsing, retry decisions."""

from __future__ import annotations

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .pool import FORWARDED_REQUEST_HEADERS, Target, UpstreamAttempt, UpstreamPool
from .relay import is_event_stream, relay_stream, relay_whole, upstream_answer
from .retry import AttemptFailure, RetryBudget, decide_retry, gave_up_headers
from .transport import TransportFactory, aiohttp_transport

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "AttemptFailure",
    "RetryBudget",
    "Target",
    "TransportFactory",
    "UpstreamAttempt",
    "UpstreamPool",
    "aiohttp_transport",
    "decide_retry",
    "gave_up_headers",
    "is_event_stream",
    "relay_stream",
    "relay_whole",
    "upstream_answer",
]
