"""Pacing by the provider's own rate-limit headers: spend a quota in priority order.

A provider limited by its quota (requests per minute), not by its slots, gives the concurrency
limit nothing to learn from: its first token does not move with load, only its 429s do. Those
429s land on whichever request comes next, critical ones included, and each cools the
deployment down for its Retry-After. But every answer of OpenAI, Azure OpenAI and Anthropic
already says how much of the quota is left:

- OpenAI: ``x-ratelimit-limit-requests`` / ``x-ratelimit-remaining-requests``;
- Anthropic: ``anthropic-ratelimit-requests-limit`` / ``anthropic-ratelimit-requests-remaining``.

Both providers document their request limits as per minute and replenished continuously (a
token bucket), so the bucket refills at ``limit / 60`` per second. ``ProviderPace`` keeps the
bucket as this replica last heard of it: the remaining count of the newest answer, plus the
refill since, minus the requests this replica sent since. Admission sends a request only while
that level stays above its class's reserve, and queues it otherwise; the priority queues then
hand each refilled request to the highest class waiting, and shedding acts on the queue delay
as it does for a full concurrency limit. The reserve of a class is ``1 - holdback_share`` of
one second of the quota (the share that holdback keeps of the concurrency limit), and never
more than that share of the bucket's size (the largest remaining count heard, so a class is
never asked to wait for more than the bucket holds): a burst of critical calls finds the
quota the lower classes left.

The view is a prediction, and every answer corrects it. A report counts the requests that
reached the provider before the answer's headers went out. Requests this replica sent after the
answered one, within the last ``_TRANSIT_S``, and has not heard back from may still be on their
way, so they are taken off the reported count (a few requests of the bucket are kept unused
while answers race, rather than sending past the quota). Older ones have arrived and are in
the count: a non-streamed answer's headers come seconds after its request, and taking every
request sent since then off would count them twice and, with a bucket smaller than the
requests in flight, stop sending altogether.

Other replicas, and other clients of the same API key, spend from the same bucket unseen: each
replica would count every reported request and the whole refill as its own, and together they
would send past the quota (a simulation of two replicas: a 429 for every tenth request served).
So the spend of others is learned from the bucket's conservation: over a window of at least
``_LEARN_S`` (and ``_LEARN_REQUESTS`` requests of refill, so that counts rounded to whole
requests do not matter), ``reported then + refill - spent by us - reported now`` is what others
spent (our requests answered 429 spent nothing). Its average (``_LEARN_WEIGHT`` per window)
sets this replica's *share*: ``1 - others / refill``, at least ``_MIN_REFILL_SHARE``. A replica
takes only its share of each report as its own (and of the refill until the next report), so
replicas splitting a quota stop racing for the same requests (tests/unit/test_pacing.py: two
and four simulated replicas draw no 429 once they have learned, about ten seconds). Windows in
which the bucket may have been full (refill then overflows, which would look like spend) teach
nothing, and while the bucket stays above half full the learned spend fades (time constant
``_FADE_S``): others who spend that little do not need a share. A share that is still too large
only means a 429 now and then, as without pacing. Answers of one deployment label that come
from several buckets (a proxy in front of several keys or regions) look like others' spend and
shrink the share; turn pacing off for such a deployment. A deployment that has not reported
its quota for ``_FORGET_S`` is not paced (its answers stopped carrying the headers, or nobody
sent for a minute, after which a per-minute bucket is full again). Token quotas are not paced:
each request would cost its prompt estimate plus ``max_tokens`` (OpenAI's charge at arrival;
Anthropic's input-token bucket counts the prompt only), so every count here would need a cost
per request where it now counts one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ProviderPace", "RateReport", "read_rate_headers"]

_FORGET_S = 60.0  # a per-minute bucket unheard of for a minute is full again: stop pacing
_RESERVE_S = 1.0  # reserves are shares of this many seconds of the quota
_LEARN_S = 1.0  # others' spend is measured over windows of at least this many seconds...
_LEARN_REQUESTS = 20.0  # ... and of this many requests of refill
_LEARN_WEIGHT = 0.5  # weight of a new window in the average of others' spend
_MIN_REFILL_SHARE = 0.1  # the refill predicted for this replica never falls below this share
_FADE_S = 10.0  # time constant of the fading of others' spend while the bucket is above half
_TRANSIT_S = 0.25  # a request sent this recently may not have reached the provider yet
_LIMIT_CHANGE = 0.1  # a reported limit that moves by more than this share is a new quota
# (limit, remaining) header pairs by dialect; whichever an answer carries is read.
_HEADERS = (
    ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"),
    ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining"),
)


@dataclass(frozen=True, slots=True)
class RateReport:
    """A provider's request quota as one answer reported it."""

    limit: float  # requests per minute
    remaining: float  # requests the provider would take now


def read_rate_headers(headers: Mapping[str, str]) -> RateReport | None:
    """The request quota an upstream answer reports, or None when it reports none (or
    nonsense: a limit below one, a count that is not a number)."""
    for limit_name, remaining_name in _HEADERS:
        limit_text, remaining_text = headers.get(limit_name), headers.get(remaining_name)
        if limit_text is None or remaining_text is None:
            continue
        try:
            limit, remaining = float(limit_text), float(remaining_text)
        except ValueError:
            return None
        if not (math.isfinite(limit) and math.isfinite(remaining)) or limit < 1:
            return None
        return RateReport(limit, min(max(remaining, 0.0), limit))
    return None


class ProviderPace:
    """One deployment's request bucket at the provider, as this replica predicts it (module
    docstring). No clock of its own: every call passes ``now``."""

    __slots__ = ("_anchor", "_at", "_heard", "_level", "_others", "_rate", "_rejected",
                 "_reported", "_sent", "_sent_at", "_size", "_unheard")

    def __init__(self) -> None:
        self._rate = 0.0  # refill, requests per second; 0: not paced (never heard of)
        self._size = 0.0  # the bucket's size: the largest remaining count heard
        self._level = 0.0  # requests left for this replica at ``_at`` (its slice)
        self._at = 0.0
        self._reported = 0.0  # the last report, less our requests it may not count
        self._heard = -math.inf  # when that report came
        self._sent = 0  # requests taken: the sequence number of the next one
        self._rejected = 0  # of those, answered 429: they spent nothing from the bucket
        self._unheard: list[int] = []  # sequence numbers sent with no answer yet, ascending
        self._sent_at: list[float] = []  # when each of those was sent
        self._others = 0.0  # requests per second others spend from the bucket (learned)
        # Start of the learning window: (when, level reported, requests we had spent then);
        # None when no window is open (never heard, or the bucket may have been full).
        self._anchor: tuple[float, float, int] | None = None

    def observe(self, report: RateReport, now: float, seq: int | None = None) -> None:
        """An answer's report replaces the prediction: it is the provider's own count, less
        the requests that may still be on their way (sent after the answered one, ``seq``
        from ``take``, within ``_TRANSIT_S``, not answered yet)."""
        rate = report.limit / 60.0
        if abs(rate - self._rate) > _LIMIT_CHANGE * self._rate:
            # A new quota: the old bucket size and others' spend say nothing of it. (A limit
            # that moves a little, request by request, is the same quota.)
            self._size, self._others, self._anchor = 0.0, 0.0, None
        self._rate = rate
        self._size = max(self._size, report.remaining)
        later = 0 if seq is None else self._on_their_way(seq, now)
        self._learn(report.remaining - later, now)
        self._reported = report.remaining - later
        # This replica's slice of what is left: its share of the bucket, less its own
        # requests on their way (they will be spent from its slice).
        self._level = self.share() * report.remaining - later
        self._at = self._heard = now

    def _learn(self, level: float, now: float) -> None:
        """Others' spend from the bucket's conservation over the open window (docstring)."""
        # Near full, or refilled to full since the last report at the whole rate: the
        # overflow would count as others' spend. No window.
        if (level > self._size / 2
                or self._reported + (now - self._heard) * self._rate >= self._size):
            self._anchor = None
            if level > self._size / 2:  # others spend too little to keep the bucket low
                self._others *= math.exp(-(now - self._heard) / _FADE_S)
            return
        spent_by_us = self._sent - self._rejected
        if self._anchor is None:
            self._anchor = (now, level, spent_by_us)
            return
        began, level_then, spent_then = self._anchor
        elapsed = now - began
        if elapsed < _LEARN_S or elapsed * self._rate < _LEARN_REQUESTS:
            return
        spent = level_then + elapsed * self._rate - (spent_by_us - spent_then) - level
        others = min(max(spent / elapsed, 0.0), self._rate)
        self._others += _LEARN_WEIGHT * (others - self._others)
        self._anchor = (now, level, spent_by_us)

    def share(self) -> float:
        """This replica's share of the bucket and its refill: what others were not seen to
        spend (1 alone)."""
        if self._rate <= 0:
            return 1.0
        return max(1.0 - self._others / self._rate, _MIN_REFILL_SHARE)

    def level(self, now: float) -> float:
        """Requests predicted left for this replica now: its slice of the last report,
        refilled at its share of the rate, minus what it sent since. At most its share of the
        bucket's size (at least one: a provider always saturated reports 0)."""
        share = self.share()
        return min(self._slice(), self._level + (now - self._at) * share * self._rate)

    def _slice(self) -> float:
        """The most this replica's level reaches: its share of the bucket (at least one)."""
        return max(self.share() * self._size, 1.0)

    def reserve(self, share: float) -> float:
        """Requests a class of this holdback share leaves in the bucket for the classes above."""
        return (1.0 - share) * min(self._size, self._rate * _RESERVE_S)

    def _need(self, share: float) -> float:
        """The level a class of this holdback share needs to send one request: one plus its
        reserve, but never more than the level can reach (or the class would wait forever)."""
        return min(1.0 + self.reserve(share), self._slice())

    def allows(self, share: float, now: float) -> bool:
        """Whether a request of a class with this holdback share may be sent now."""
        if not self._paced(now):
            return True
        return self.level(now) >= self._need(share) - 1e-9

    def spendable(self, share: float, now: float) -> int:
        """Requests a class of this holdback share may send now, one after another."""
        if not self._paced(now):
            return 1 << 30
        return max(0, math.floor(self.level(now) - self._need(share) + 1e-9) + 1)

    def wait_s(self, share: float, now: float) -> float:
        """Seconds until ``allows`` (0 when it does now)."""
        if not self._paced(now):
            return 0.0
        short = self._need(share) - self.level(now)
        return max(0.0, short / (self.share() * self._rate))

    def take(self, now: float) -> int:
        """A request is being sent: one fewer in the bucket. Its sequence number, for
        ``observe`` and ``heard``."""
        seq = self._sent
        self._sent += 1
        self._unheard.append(seq)
        self._sent_at.append(now)
        if self._paced(now):
            self._level = self.level(now) - 1.0
            self._at = now
        return seq

    def heard(self, seq: int) -> None:
        """The request ``seq`` was answered, or will never reach the provider."""
        at = bisect.bisect_left(self._unheard, seq)
        if at < len(self._unheard) and self._unheard[at] == seq:
            del self._unheard[at]
            del self._sent_at[at]

    def rejected(self) -> None:
        """A request of ours was answered 429: it spent nothing from the bucket."""
        self._rejected += 1

    def _on_their_way(self, seq: int, now: float) -> int:
        """Unanswered requests sent after ``seq`` and within ``_TRANSIT_S``: the newest ones
        (both lists ascend), counted from the end."""
        count, since = 0, now - _TRANSIT_S
        for i in range(len(self._unheard) - 1, -1, -1):
            if self._unheard[i] <= seq or self._sent_at[i] <= since:
                break
            count += 1
        return count

    def snapshot(self, now: float) -> dict[str, float] | None:
        """The quota as paced, for /admin/status (None when not paced)."""
        if not self._paced(now):
            return None
        return {"limit_per_minute": self._rate * 60.0, "bucket": self._size,
                "remaining": round(self.level(now), 3),
                "others_per_minute": round(self._others * 60.0, 1)}

    def _paced(self, now: float) -> bool:
        return now - self._heard < _FORGET_S
