"""Shedding decisions: CoDel per class, the cohort shed level, drain rate and Retry-After.

All of it is plain state driven by the ``now`` passed in, so every transition is testable with
a fake clock.

**CoDel per class.** Each class has a queue target. Queueing delays are observed when a request
leaves the queue (and as 0 when one is admitted without waiting). Once per interval the minimum
delay of the interval, together with the current wait of the oldest queued request (0 when the
queue is empty), is compared with the target: above it, the class is *overloaded* for the next
interval. A class is in drop mode when it, or any class above it, is overloaded.

**Cohort level.** Requests are placed on one scale from the bottom: ``low`` cohorts
``0..B-1``, then ``normal`` ``B..2B-1``, ``high``, ``critical`` (B = cohort buckets). A request
that would have to queue is shed when its position is below the level. While some class is
overloaded, every class below the most important overloaded one is shed whole (strict priority
gives them no slot while it queues anyway), and the level climbs ``cohort_step_up`` per interval
up to the top of that class, so inside a class the same cohorts (hashes of the agent session,
keyed with the providers' credentials so that no tenant can compute offline which sessions
are shed last) go first on every replica. Without overload it falls ``cohort_step_down`` per
interval: slower than it climbs, so the shed share settles instead of flapping. Classes it
jumped over whole come back whole once it is down at their top: they were shed for the class
above, and a few seconds of critical overload must not keep low shed for a minute and a half
(512 cohorts at 4 a second). Retries
(``x-stainless-retry-count`` > 0) of a class are shed as soon as the level reaches into the
class, before any of its first attempts.

**Runs in progress.** A later step of an agent run (a session this replica admitted within
``run_memory_s``; never the client's own X-Agent-Step, which would let any tenant exempt
itself) is not shed by cohort while the level is inside its class: only new runs are. A run
is worth something only when all its steps complete, so under overload the gateway stops
starting runs of a class instead of cutting runs half-way; the queue bound and deadlines still
apply to continuing steps, and once the level passes the top of the class (the class above is
overloaded too) they are shed like the rest.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from gateway.config import AdmissionPolicy, Priority
from gateway.errors import Overloaded

ShedReason = Literal["queue_full", "cohort", "retry", "loop_lag", "open_streams", "memory"]
N_CLASSES = len(Priority)


def cohort_bucket(tenant: str, session: str | None, buckets: int, rng: random.Random,
                  key: bytes = b"") -> int:
    """The cohort of an agent session: blake2b-64 of ``tenant NUL session`` keyed with ``key``
    (``cohort_key``), mod ``buckets``.

    Stable across processes and replicas (Python's ``hash()`` is salted per process). The tenant
    is part of the input so two tenants that name sessions alike do not share a fate. The key
    keeps a tenant from choosing its cohort: the highest cohorts of a class are shed last, and
    without a secret in the hash a tenant could compute offline which session ids land there
    (a red team's top-cohort ids got 20 of 50 answered where the bottom's got 4). A request
    without a session gets a random cohort: it has no run to keep alive.
    """
    if session is None:
        return rng.randrange(buckets)
    digest = hashlib.blake2b(f"{tenant}\0{session}".encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") % buckets


def cohort_key(secrets: Iterable[str]) -> bytes:
    """The cohort hash's key from secrets every replica holds and no tenant knows (the app
    passes the providers' API keys and the policy's key hashes). The same policy and
    credentials give the same key on every replica. (A change of keys reshuffles the cohorts
    once: a run in progress is spared by the replica that admitted it anyway.) It stops a
    tenant from computing good session ids offline; probing them online costs requests under
    its rate limits, and every id it probes while not shed becomes a run in progress anyway."""
    return hashlib.blake2b("\0".join(sorted(secrets)).encode(), digest_size=32).digest()


class ShedState:
    """CoDel state of each class and the cohort level of one deployment (module docstring)."""

    def __init__(self, policy: AdmissionPolicy, now: float) -> None:
        self._targets = tuple(policy.classes.of(p).queue_target_ms / 1000 for p in Priority)
        self._interval = policy.codel_interval_ms / 1000
        self._buckets = policy.cohort_buckets
        self._up = policy.cohort_step_up
        self._down = policy.cohort_step_down
        self._min_delay = [math.inf] * N_CLASSES
        self._overloaded = [False] * N_CLASSES
        self._interval_end = now + self._interval
        self.level = 0
        # Jumps of the level over whole classes, (the floor it jumped to, where it was before),
        # innermost last: the way down skips them again (_fall).
        self._jumps: list[tuple[int, int]] = []

    def observe(self, priority: Priority, delay_s: float) -> None:
        """A queueing delay of the class: at dequeue, or 0 for an immediate admission."""
        self._min_delay[priority] = min(self._min_delay[priority], delay_s)

    def due(self, now: float) -> bool:
        return now >= self._interval_end

    def roll(self, now: float, oldest_waits: Sequence[float | None],
             exploring: Sequence[bool] = ()) -> None:
        """Close the interval(s) that ended by ``now``; ``oldest_waits[p]`` is how long the
        oldest queued request of class p has waited (None when the class queue is empty).
        ``exploring[p]``: class p waits for a slot under a limit still in slow start, which
        has found no sign of the upstream's capacity yet: that wait is not overload (the limit
        is growing to meet it), so it is not shed for."""
        if now < self._interval_end:
            return
        for p in range(N_CLASSES):
            wait = oldest_waits[p]
            lowest = min(self._min_delay[p], 0.0 if wait is None else wait)
            excused = p < len(exploring) and exploring[p]
            self._overloaded[p] = lowest > self._targets[p] and not excused
            self._min_delay[p] = math.inf
        # Intervals with no event in them count as quiet ones: the level may fall for each.
        closed = 1 + int((now - self._interval_end) // self._interval)
        self._interval_end += closed * self._interval
        self._move_level(closed)

    def _move_level(self, intervals: int) -> None:
        worst = next((p for p in range(N_CLASSES) if self._overloaded[p]), None)
        if worst is None:
            self._fall(intervals, 0)
            return
        cap = (N_CLASSES - worst) * self._buckets
        # Strict priority gives the classes below an overloaded one no slot at all while it
        # queues: shed them entirely at once rather than climbing through their cohorts first.
        floor = cap - self._buckets
        if self.level < cap:
            if self.level < floor:
                self._jumps.append((floor, self.level))
            self.level = min(cap, max(self.level, floor) + self._up)
        else:
            self._fall(intervals, cap)

    def _fall(self, intervals: int, bottom: int) -> None:
        """Down ``cohort_step_down`` per interval through cohorts the level climbed, but at once
        through classes it jumped over whole: those were shed for the class above, not for
        their own queues, and walking back through a jumped class 4 cohorts a second would
        keep it shed for half a minute after a few seconds of overload above it."""
        level = self.level - self._down * intervals
        while self._jumps and level <= self._jumps[-1][0]:
            before = self._jumps.pop()[1]
            if before < bottom:
                # A class at ``bottom``'s top is overloaded itself: the classes under it stay
                # shed whole for it, so that part of the jump stays on record.
                under = bottom - self._buckets
                if before < under:
                    self._jumps.append((under, before))
                break
            level = min(level, before)
        self.level = max(bottom, level)

    def overloaded(self, priority: Priority) -> bool:
        """The class's own CoDel verdict for this interval."""
        return self._overloaded[priority]

    def drop_mode(self, priority: Priority) -> bool:
        """The class or a class above it is overloaded."""
        return any(self._overloaded[: priority + 1])

    def decide(self, priority: Priority, bucket: int, is_retry: bool,
               continuing: bool = False) -> ShedReason | None:
        """Why a request that would have to queue is shed now, or None to let it queue."""
        bottom = (N_CLASSES - 1 - priority) * self._buckets
        if self.level <= bottom:
            return None
        if is_retry:
            return "retry"
        if continuing:  # a run in progress ranks above every new run of its class
            return "cohort" if self.level > bottom + self._buckets else None
        return "cohort" if bottom + bucket < self.level else None


class DecayingRate:
    """Events per second with an exponential kernel of time constant ``tau_s`` (O(1) state)."""

    def __init__(self, tau_s: float) -> None:
        self._tau = tau_s
        self._mass = 0.0
        self._at = 0.0

    def _decayed(self, now: float) -> float:
        if self._mass == 0.0:
            return 0.0
        return self._mass * math.exp(-max(0.0, now - self._at) / self._tau)

    def tick(self, now: float) -> None:
        self._mass = self._decayed(now) + 1.0
        self._at = now

    def rate(self, now: float) -> float:
        return self._decayed(now) / self._tau


def drain_time_s(ahead: int, drain_rate: float) -> float:
    """Seconds until ``ahead`` waiting requests and one more drain at ``drain_rate`` per second
    (infinite when nothing drains)."""
    return (ahead + 1) / drain_rate if drain_rate > 0 else math.inf


def retry_after_s(base_s: float, policy: AdmissionPolicy, rng: random.Random) -> float:
    """``base_s`` bounded to ``[retry_after_min_s, retry_after_max_s]`` and jittered by
    ``retry_after_jitter`` *inside* the bounds, so clients shed at a bound do not all come back
    in the same second."""
    low, high = policy.retry_after_min_s, policy.retry_after_max_s
    base = min(high, max(low, base_s))
    spread = policy.retry_after_jitter
    return rng.uniform(max(low, base * (1 - spread)), min(high, base * (1 + spread)))


def overloaded_error(priority: Priority, retry_after: float, message: str) -> Overloaded:
    """503 ``overloaded`` with Retry-After (whole seconds), retry-after-ms (which the SDKs prefer)
    and x-should-retry: false for normal/low, so SDK clients do not add retries to an overload."""
    headers = {
        "Retry-After": str(max(1, math.ceil(retry_after))),
        "retry-after-ms": str(max(1, round(retry_after * 1000))),
        "x-should-retry": "true" if priority <= Priority.high else "false",
    }
    return Overloaded(message, headers=headers)


def counts_by_class(counts: Counter[tuple[Priority, str]]) -> dict[str, dict[str, int]]:
    """``{(priority, reason): n}`` as ``{"low": {"cohort": n, ...}, ...}`` for snapshots."""
    out: dict[str, dict[str, int]] = {}
    for (priority, reason), n in sorted(counts.items()):
        out.setdefault(priority.name, {})[reason] = n
    return out
