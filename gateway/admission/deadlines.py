"""Request deadlines: where they come from, how they are checked, how they travel upstream.

A deadline is an absolute time on the gateway's monotonic clock by which the client needs the
first byte of the answer (for a non-streaming call, the whole answer). It comes from the tightest
of ``X-Request-Timeout`` and the SDK's own ``x-stainless-read-timeout`` (seconds; the client
gives up after either, so work past the smaller one is wasted), else the class default; it is
capped per tenant and globally (``AdmissionPolicy.deadline_cap_s``).

It is checked at admission, when a request leaves the queue and before each retry against the
deployment's expected time to first byte: a request that cannot make it gets 504
``deadline_exceeded`` at once, with ``x-should-retry: false``, instead of holding a slot for an
answer nobody will read. The remaining budget bounds the upstream timeouts and is passed on as
``x-request-timeout: <seconds>`` (the header this module reads), so a gateway chain shares one
budget.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import AdmissionPolicy, Priority
from gateway.errors import DeadlineExceeded, GatewayError

REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
SDK_READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
UPSTREAM_BUDGET_HEADER = "x-request-timeout"
DeadlineSource = Literal["x-request-timeout", "x-stainless-read-timeout", "default"]

_SECONDS = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")
# The budget sent upstream never reads 0: that would mean "no timeout" to some servers.
_MIN_UPSTREAM_BUDGET_S = 0.001


def deadline_exceeded(left_s: float, expected_ttft_s: float,
                      cause: str = "the request's deadline") -> DeadlineExceeded:
    """504 ``deadline_exceeded`` for a request with ``left_s`` seconds left that expects its
    first byte after ``expected_ttft_s``; the SDK must not retry what cannot finish in time.
    ``cause`` names the deadline (``Deadline.describe``)."""
    return DeadlineExceeded(
        f"{cause[0].upper()}{cause[1:]} cannot be met: {max(0.0, left_s):.3f} s left, the "
        f"first byte is expected after {expected_ttft_s:.3f} s.",
        headers={"x-should-retry": "false"},
    )


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute deadline on the gateway clock, and where it came from."""

    at: float
    source: DeadlineSource
    seconds: float = field(default=0.0, compare=False)  # as asked (or the default), after caps
    capped: bool = field(default=False, compare=False)  # a cap was tighter than the ask

    @property
    def client_set(self) -> bool:
        """The client's own deadline: running out of it is what a client-side timeout would
        have been, and the client may retry it as such."""
        return self.source != "default" and not self.capped

    def describe(self) -> str:
        """The bound in words, with its number: for messages that say which bound ran out."""
        if self.client_set:
            header = "X-Request-Timeout" if self.source == "x-request-timeout" else self.source
            return f"the request's own deadline ({header}: {self.seconds:g} s)"
        if self.capped:
            return f"the gateway's deadline cap ({self.seconds:g} s)"
        return f"the gateway's default deadline for this class of request ({self.seconds:g} s)"

    def remaining(self, now: float) -> float:
        """Seconds left (negative once passed)."""
        return self.at - now

    def feasible(self, now: float, expected_ttft: float) -> bool:
        """Whether the first byte can still arrive in time, expecting it after ``expected_ttft``."""
        return self.at - now >= expected_ttft

    def check(self, now: float, expected_ttft: float) -> None:
        """Raise 504 ``deadline_exceeded`` when not ``feasible``."""
        if not self.feasible(now, expected_ttft):
            raise deadline_exceeded(self.remaining(now), expected_ttft, self.describe())

    def bound(self, now: float, timeout_s: float) -> float:
        """A configured upstream timeout, shortened to the remaining budget (never negative)."""
        return max(0.0, min(timeout_s, self.remaining(now)))

    def upstream_headers(self, now: float) -> dict[str, str]:
        """``{"x-request-timeout": "<seconds left, ms precision>"}`` for the upstream call."""
        left = max(_MIN_UPSTREAM_BUDGET_S, self.remaining(now))
        return {UPSTREAM_BUDGET_HEADER: f"{left:.3f}"}


def parse_timeout(name: str, value: str) -> float:
    """A timeout header in seconds: a plain decimal number above 0; else 400 naming the header."""
    text = value.strip()
    seconds = float(text) if _SECONDS.match(text) else 0.0
    if seconds <= 0:
        raise GatewayError(
            400, f"{name} must be a number of seconds above 0, like 30 or 2.5.", param=name
        )
    return seconds


def request_deadline(
    headers: Mapping[str, str],
    priority: Priority,
    tenant: str,
    now: float,
    policy: AdmissionPolicy,
) -> Deadline:
    """The request's deadline from its headers (case-insensitive ``Mapping``, e.g. aiohttp's
    ``CIMultiDictProxy``), the class default and the caps; 400 for an invalid header."""
    asked: list[tuple[float, DeadlineSource]] = []
    explicit = headers.get(REQUEST_TIMEOUT_HEADER)
    if explicit is not None:
        asked.append((parse_timeout(REQUEST_TIMEOUT_HEADER, explicit), "x-request-timeout"))
    sdk = headers.get(SDK_READ_TIMEOUT_HEADER)
    if sdk is not None:
        asked.append((parse_timeout(SDK_READ_TIMEOUT_HEADER, sdk), "x-stainless-read-timeout"))
    seconds, source = min(asked) if asked else (
        policy.classes.of(priority).default_deadline_s, "default"
    )
    cap = policy.deadline_cap_s(tenant)
    return Deadline(now + min(seconds, cap), source, min(seconds, cap), cap < seconds)
