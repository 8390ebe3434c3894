"""An optional capacity model for the mock upstream: generation slots, a queue, an RPM quota.

Real providers do not have infinite capacity: a model server runs a fixed number of sequences
at once, queues the rest (so time to first token grows with the queue), and answers 429 when
the queue is full or the account's requests-per-minute quota is spent. Overload benchmarks need
that behaviour from the mock, so ``create_mock_app(capacity=Capacity(...))`` turns it on
(``gateway mock-upstream --slots N ...`` from the command line). Without it the mock has
unlimited capacity.

With a capacity model, every generating route (chat, completions, responses, messages,
embeddings) goes through, in order:

1. the quota: a token bucket of ``quota_burst`` requests refilled at ``quota_rpm / 60`` per
   second; an empty bucket answers 429 with Retry-After (time until the next token). Every
   answer of a generating route, 429s included, reports the bucket the way the providers do
   (``quota_headers``): OpenAI's ``x-ratelimit-{limit,remaining,reset}-requests`` on its
   routes, Anthropic's ``anthropic-ratelimit-requests-{limit,remaining,reset}`` on
   ``/v1/messages``; the count is the bucket's when the answer's headers are sent;
2. the queue: a free slot is taken at once; otherwise the request waits FIFO for one. A request
   that finds ``max_queue`` already waiting is answered 429 with Retry-After at once;
3. the slot is held for the whole answer: ``x-mock-latency-ms`` (before the headers), then for
   a stream ``x-mock-ttft-ms`` and the chunks ``x-mock-chunk-gap-ms`` apart. A request that had
   to queue also gets ``queue_ttft_ms`` per request that was waiting ahead of it when it
   arrived, added to its time to first token (prefill contention on a busy server).

Decisions use only the clock passed in; asyncio futures carry out the waiting.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Capacity", "CapacityModel", "Lease", "Rejected"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Capacity:
    """How much the mock can serve (see the module docstring)."""

    slots: int
    max_queue: int = 64
    queue_ttft_ms: float = 0.0
    quota_rpm: int | None = None
    quota_burst: int | None = None  # None: a tenth of a minute's quota, at least 1
    queue_retry_after_s: float = 1.0  # Retry-After of a queue-full 429

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.queue_ttft_ms < 0:
            raise ValueError("queue_ttft_ms must be >= 0")
        if self.quota_rpm is not None and self.quota_rpm < 1:
            raise ValueError("quota_rpm must be at least 1")
        if self.quota_burst is not None and self.quota_burst < 1:
            raise ValueError("quota_burst must be at least 1")
        if self.queue_retry_after_s <= 0:
            raise ValueError("queue_retry_after_s must be > 0")

    @property
    def burst(self) -> int:
        """Requests the quota bucket holds when full."""
        if self.quota_burst is not None:
            return self.quota_burst
        return max(1, (self.quota_rpm or 0) // 10)


class Rejected(Exception):
    """Over quota or queue full: answer 429 with ``retry_after_s``; ``reason`` says which."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[Lease]
    arrived: float
    ahead: int  # requests already waiting when this one arrived


class Lease:
    """A generation slot. ``release`` exactly once (later calls do nothing)."""

    __slots__ = ("_model", "_released", "extra_ttft_s", "granted_at", "queued_ahead", "waited_s")

    def __init__(self, model: CapacityModel, granted_at: float, waited_s: float,
                 queued_ahead: int, extra_ttft_s: float) -> None:
        self._model = model
        self._released = False
        self.granted_at = granted_at
        self.waited_s = waited_s
        self.queued_ahead = queued_ahead
        self.extra_ttft_s = extra_ttft_s

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._model._release(self)


class CapacityModel:
    """Slots, FIFO queue and quota bucket of one mock app, with counters for ``stats``."""

    def __init__(self, capacity: Capacity, clock: Clock = time.monotonic) -> None:
        self.capacity = capacity
        self._clock = clock
        self._in_use = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._tokens = float(capacity.burst)
        self._refilled_at = clock()
        self.served = 0
        self.rejected_quota = 0
        self.rejected_queue = 0
        self.peak_queued = 0
        self.peak_in_use = 0
        self.busy_s = 0.0  # slot-seconds held by released leases

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _refill(self, rpm: int) -> None:
        now = self._clock()
        self._tokens = min(float(self.capacity.burst),
                           self._tokens + (now - self._refilled_at) * rpm / 60.0)
        self._refilled_at = now

    def take_quota(self) -> None:
        """Spend one request of the quota, or raise ``Rejected("quota", wait)``."""
        rpm = self.capacity.quota_rpm
        if rpm is None:
            return
        self._refill(rpm)
        per_s = rpm / 60.0
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return
        self.rejected_quota += 1
        raise Rejected("quota", (1.0 - self._tokens) / per_s)

    def quota_headers(self, provider: str) -> dict[str, str]:
        """The quota as the providers report it (see the module docstring); empty without a
        quota. ``provider``: ``openai`` or ``anthropic``."""
        rpm = self.capacity.quota_rpm
        if rpm is None:
            return {}
        self._refill(rpm)
        remaining = math.floor(self._tokens)
        full_in_s = (self.capacity.burst - self._tokens) * 60.0 / rpm
        if provider == "anthropic":
            reset = datetime.datetime.fromtimestamp(time.time() + full_in_s, datetime.UTC)
            return {"anthropic-ratelimit-requests-limit": str(rpm),
                    "anthropic-ratelimit-requests-remaining": str(remaining),
                    "anthropic-ratelimit-requests-reset": reset.isoformat(
                        timespec="seconds").replace("+00:00", "Z")}
        reset_ms = math.ceil(full_in_s * 1000)
        return {"x-ratelimit-limit-requests": str(rpm),
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": (f"{reset_ms}ms" if reset_ms < 1000
                                               else f"{reset_ms / 1000:g}s")}

    async def acquire(self) -> Lease:
        """A slot now, or after waiting in the FIFO queue; ``Rejected("queue", ...)`` when the
        queue is full. Cancellation-safe: a cancelled waiter leaves the queue, and a slot
        granted at the moment of cancellation is handed on."""
        now = self._clock()
        if self._in_use < self.capacity.slots and not self._waiters:
            return self._grant(now, now, 0)
        ahead = len(self._waiters)
        if ahead >= self.capacity.max_queue:
            self.rejected_queue += 1
            raise Rejected("queue", self.capacity.queue_retry_after_s)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), now, ahead)
        self._waiters.append(waiter)
        self.peak_queued = max(self.peak_queued, len(self._waiters))
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled():
                future.result().release()  # granted as we were cancelled: hand it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def stats(self) -> dict[str, Any]:
        """Counters and settings for ``GET /_mock/capacity`` (JSON-serialisable)."""
        c = self.capacity
        return {
            "slots": c.slots, "max_queue": c.max_queue, "queue_ttft_ms": c.queue_ttft_ms,
            "quota_rpm": c.quota_rpm, "quota_burst": c.burst if c.quota_rpm else None,
            "in_use": self._in_use, "queued": len(self._waiters),
            "peak_in_use": self.peak_in_use, "peak_queued": self.peak_queued,
            "served": self.served, "busy_s": round(self.busy_s, 6),
            "rejected_quota": self.rejected_quota, "rejected_queue": self.rejected_queue,
        }

    # -- internals ----------------------------------------------------------------------------

    def _grant(self, now: float, arrived: float, ahead: int) -> Lease:
        self._in_use += 1
        self.peak_in_use = max(self.peak_in_use, self._in_use)
        extra = ahead * self.capacity.queue_ttft_ms / 1000.0
        return Lease(self, now, now - arrived, ahead, extra)

    def _release(self, lease: Lease) -> None:
        now = self._clock()
        self._in_use -= 1
        self.served += 1
        self.busy_s += now - lease.granted_at
        while self._waiters and self._in_use < self.capacity.slots:
            waiter = self._waiters.popleft()
            if waiter.future.done():  # cancelled; its task has not run its handler yet
                continue
            waiter.future.set_result(self._grant(now, waiter.arrived, waiter.ahead))
