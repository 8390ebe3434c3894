"""Limit algorithms as data: an ``AdmitPlan`` of checks, evaluated all-or-nothing.

The same semantics run in two places and one conformance suite holds them together:
- ``LocalLimits`` below (Python, injected clock): the memory backend and the degraded mode;
- ``gateway/state/lua/admit.lua`` and ``settle.lua``: Redis, one atomic round trip each.

Checks (all evaluated before anything is written; a failing non-shadow check writes nothing):
- ``Gcra``: generic cell rate algorithm. One timestamp per key (the "theoretical arrival
  time"). ``burst`` units may pass at once; in any window of W ms at most
  ``burst + W / interval_ms`` units pass. Kept and compared in integers (see "GCRA in
  integers" below), so a request that exactly fits is admitted whatever the clock reads.
- ``Lease``: a concurrency slot, a sorted-set member with an expiry, so a crashed replica's
  slots free themselves; renewed while a long stream runs.
- ``Counter``: a budget for a period (day/month); ``limit`` in integer units. ``idle``: the
  key's TTL is renewed by every admission instead of set once (an agent run's budget lives
  while the run is active, gateway/limits/runs.py).
- ``Since``: the age of an agent run: the first admission writes its time, later ones are
  refused once it is more than ``max_ms`` old; renewed like an ``idle`` counter.
- ``Repeat``: how often the same request fingerprint was seen in a window (runaway agents).

Every check carries what it limits as typed fields, ``kind`` and ``scope`` (enums below), for
the code that decides from them (headers, settlement, messages); ``name`` is only the words
shown in messages, logs and headers, and its key only where it lives in the store.

Settling is idempotent per request id: a ``done`` marker makes replays no-ops; a ``hold``
marker written by admit tells settle whether to adjust a reservation (hold present) or to
charge the whole usage (admit never reached this store, e.g. admitted while degraded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from typing import NamedTuple


class Kind(StrEnum):
    """What a check counts."""

    requests = "requests"
    tokens = "tokens"
    concurrency = "concurrency"
    budget_tokens = "budget_tokens"  # a period's token budget
    budget_cost = "budget_cost"  # a period's cost budget, in micro-units
    run_tokens = "run_tokens"  # an agent run's caps (gateway/limits/runs.py)
    run_cost = "run_cost"
    run_steps = "run_steps"
    run_age = "run_age"
    loop = "loop"  # the loop guard's repeats of one request


class Scope(StrEnum):
    """Whose use a check counts."""

    tenant = "tenant"
    model = "model"  # the tenant on one model (limits.per_model)
    session = "session"  # one X-Agent-Session (limits.per_session, the loop guard)
    run = "run"  # one agent run (run_budget)
    deployment = "deployment"  # a provider's quota for a deployment (gateway/limits/quota.py)
    fleet = "fleet"  # the whole fleet (the replicas' heartbeats, gateway/limits/degraded.py)
    replica = "replica"  # this replica alone (the admin API's limit, gateway/app/endpoints.py)


@dataclass(frozen=True, slots=True)
class Gcra:
    key: str
    interval_ms: Fraction  # ms per unit, exact: Fraction(60_000, per_minute)
    burst: int
    cost: int
    name: str  # "requests", "tokens", ...: shown in messages and headers
    shadow: bool = False
    kind: Kind = Kind.requests
    scope: Scope = Scope.tenant

    def __post_init__(self) -> None:
        if not isinstance(self.interval_ms, Fraction):  # an int, or a float from older code
            object.__setattr__(self, "interval_ms", exact_interval(self.interval_ms))


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    max: int
    ttl_ms: int
    name: str = "concurrency"
    shadow: bool = False
    kind: Kind = Kind.concurrency
    scope: Scope = Scope.tenant


@dataclass(frozen=True, slots=True)
class Counter:
    key: str
    limit: int
    cost: int
    ttl_ms: int  # until well after the period ends
    reset_ms: int  # until the period ends (Retry-After when spent)
    name: str = "budget"
    shadow: bool = False
    idle: bool = False  # ttl_ms is an idle timeout, renewed by every admission
    kind: Kind = Kind.budget_tokens
    scope: Scope = Scope.tenant
    period: str = ""  # a budget's period: "daily" | "monthly" (gateway/limits/periods.py)


@dataclass(frozen=True, slots=True)
class Since:
    """Admitted while less than ``max_ms`` have passed since the key's first admission
    (its ``remaining`` is the ms left, never negative). The key lives ``ttl_ms`` after the
    latest admission."""

    key: str
    max_ms: int
    ttl_ms: int
    name: str = "age"
    shadow: bool = False
    kind: Kind = Kind.run_age
    scope: Scope = Scope.run


@dataclass(frozen=True, slots=True)
class Repeat:
    key: str
    max: int
    window_ms: int
    name: str = "loop"
    shadow: bool = False
    kind: Kind = Kind.loop
    scope: Scope = Scope.tenant


Check = Gcra | Lease | Counter | Repeat | Since


@dataclass(slots=True)
class CheckResult:
    allowed: bool
    retry_after_ms: int = 0
    remaining: int = 0
    reset_ms: int = 0


@dataclass(slots=True)
class AdmitResult:
    allowed: bool
    results: list[CheckResult]
    failed: int = -1  # index of the first failing enforced check
    shadow_failed: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AdmitPlan:
    request_id: str
    checks: tuple[Check, ...]
    hold_key: str
    hold_ttl_ms: int


@dataclass(frozen=True, slots=True)
class SettlePlan:
    """Adjust each reserved amount to what was really used; release the lease."""

    request_id: str
    done_key: str
    hold_key: str
    done_ttl_ms: int
    gcra: tuple[tuple[str, Fraction, int, int], ...]  # key, interval_ms, reserved, actual
    counters: tuple[tuple[str, int, int, int], ...]  # key, reserved, actual, ttl_ms
    leases: tuple[str, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(g[1], Fraction) for g in self.gcra):  # ints, floats of older code
            object.__setattr__(self, "gcra", tuple(
                (key, exact_interval(interval), reserved, actual)
                for key, interval, reserved, actual in self.gcra))


# --- GCRA in integers ----------------------------------------------------------------------
#
# Float milliseconds were not exact: ``(now + cost*T) - burst*T`` differs from ``now`` by a
# rounding error that depends on the clock's value, so a request whose cost equals the burst,
# or taking the last unit of a burst, was refused with a 1 ms Retry-After at some clock values
# and not at others. Everything below is integer arithmetic, done the same way by admit.lua and
# settle.lua (their helpers ``gcra_ahead``/``gcra_state`` mirror ``_ahead``/``_after``):
#
# - Time is whole milliseconds: Redis TIME floored to the ms (the twin: ``now_us() // 1000``).
# - The interval is the exact fraction P/Q ms per unit (60_000 / per_minute, times the replica
#   count in degraded mode), so the TAT is two integers, ``ms + frac/Q`` with 0 <= frac < Q,
#   stored with the Q it was written under.
# - Decisions use the TAT's distance ahead of now in units of 1/Q ms, never an absolute time
#   times Q: ``ahead = (tat.ms - now) * Q + frac`` (0 when the TAT is past), and a request of
#   ``cost`` is admitted iff ``ahead + cost*P <= burst*P``. A fresh bucket at cost == burst is
#   ``cost*P <= burst*P``: true at every clock value.
#
# Why this stays exact in Lua, where numbers are doubles (integers exact below 2^53 ~ 9.0e15):
# - absolute values are plain ms: clocks up to 10^13 ms (year 2286) plus a bucket's span, and
#   they are only added to and subtracted from (a scale of s units per ms would need 10^13 x s
#   < 2^53, i.e. s <= 900: microseconds would not fit at 10^13 ms; whole ms need no scale);
# - scaled values are relative and bounded by the bucket: ahead <= (burst + cost) * P + Q,
#   with P <= 60_000 x replicas after reducing the fraction. For every limit below ~10^9 units
#   per minute with up to 100 replicas (P <= 6e6) that is under 2^53. (A cost far beyond the
#   burst may round, but it is refused whatever the rounding: exactness matters where
#   ``ahead + cost*P`` is near ``burst*P``);
# - floor(a / b) computed in doubles is exact for integers 0 <= |a| < 2^53 (the quotient is at
#   least 1/b away from an integer it is not, more than half an ulp), so ceil/floor divisions
#   and ``%`` give the integer results Python gives;
# - Redis turns a Lua number in a reply into an integer by truncation: every number the
#   scripts return is already an integer below 2^53, so nothing is lost.
#
# Rolling upgrade: the state is a different value ('ms:frac:Q', where the float scripts wrote
# one float), so it lives under versioned key names (``GCRA_KEY_SUFFIX``). A replica running the
# float script would read 'ms:frac:Q' as no number, i.e. an empty bucket, and admit without
# limit for as long as both versions write the same key; with separate keys each version keeps
# a correct bucket of its own, so during the rollout a tenant can get at most its rate once per
# version, and the old keys expire by their TTL (one bucket span). A reservation made under one
# version and settled under the other is refunded only when its key expires (never
# under-counted).

GCRA_KEY_SUFFIX = ":g2"  # state format 2: integer TAT 'ms:frac:Q' (format 1 was a float)


class Tat(NamedTuple):
    """A theoretical arrival time, ``ms + frac/per`` milliseconds (0 <= frac < per)."""

    ms: int
    frac: int
    per: int


def exact_interval(value: Fraction | float | str) -> Fraction:
    """An interval as an exact fraction. Strings are what ``str(Fraction)`` wrote; a float (an
    interval stored before intervals were exact, e.g. in a deferred entry) becomes the nearest
    fraction with a denominator up to 2^20, which recovers 60_000 x n / rate exactly for rates
    up to 2^20 per minute."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, float):
        return Fraction(value).limit_denominator(1 << 20)
    return Fraction(value)


def _ahead(tat: Tat | None, now_ms: int, per: int) -> int:
    """How far ``tat`` lies past ``now_ms``, in 1/per ms; 0 when absent or past. A TAT written
    under another denominator (the rate was changed) is rounded up to its next whole ms."""
    if tat is None:
        return 0
    ms, frac = tat.ms, tat.frac
    if tat.per != per and frac:
        ms, frac = ms + 1, 0
    if ms < now_ms:
        return 0
    return (ms - now_ms) * per + frac


def _after(now_ms: int, ahead: int, per: int) -> Tat:
    """The TAT lying ``ahead`` (in 1/per ms) past ``now_ms``."""
    whole, frac = divmod(ahead, per)
    return Tat(now_ms + whole, frac, per)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gcra_step(tat: Tat | None, now_ms: int, check: Gcra) -> tuple[bool, Tat | None, CheckResult]:
    """One GCRA decision: (allowed, new tat, result). Pure; shared by tests and LocalLimits.
    ``now_ms`` is whole milliseconds; the result's times are ms, rounded up."""
    p, q = check.interval_ms.numerator, check.interval_ms.denominator
    ahead = _ahead(tat, now_ms, q)
    need, cap = ahead + check.cost * p, check.burst * p
    if need > cap:
        return False, tat, CheckResult(False, _ceil_div(need - cap, q), 0, _ceil_div(ahead, q))
    return True, _after(now_ms, need, q), CheckResult(True, 0, (cap - need) // p,
                                                      _ceil_div(need, q))


# A settlement that charges far more than was reserved (usage beyond any cap the body set) can
# push ``ahead`` past 2^53, where Lua's doubles round and the twin and the script would store
# different TATs (hypothesis found it: a settle of 10^14 units). So a settlement leaves
# ``ahead`` at most 2^52 units of 1/Q ms: exact in both, and no decision inside the exact range
# above changes (a bucket whose own span reaches 2^52 units is already outside it); such a
# debt still refuses the bucket for 2^52/Q ms (over 5 days at Q = 10^7). gcra.lua has the same
# constant.
GCRA_MAX_AHEAD = 2**52


def gcra_settle(tat: Tat | None, now_ms: int, interval_ms: Fraction, delta: int) -> Tat | None:
    """The TAT after charging ``delta`` more units (negative: a refund, never below now; at
    most ``GCRA_MAX_AHEAD`` ahead); None when nothing is left ahead of now."""
    p, q = interval_ms.numerator, interval_ms.denominator
    ahead = min(max(0, _ahead(tat, now_ms, q) + delta * p), GCRA_MAX_AHEAD)
    return _after(now_ms, ahead, q) if ahead > 0 else None


class LocalLimits:
    """The plan evaluator on plain dicts, for one process. Time comes from ``clock`` (seconds)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._values: dict[str, tuple[float, float]] = {}  # key -> (value, expires_at_ms)
        self._tats: dict[str, Tat] = {}  # GCRA keys; an entry whose TAT is past is gone
        self._leases: dict[str, dict[str, float]] = {}  # key -> member -> expires_at_ms
        self._writes = 0

    def now_us(self) -> int:
        """The clock in whole microseconds, as Redis TIME gives it to the scripts."""
        return round(self._clock() * 1_000_000)

    def now_ms(self) -> float:
        return self.now_us() / 1000

    def _get(self, key: str, now: float) -> float | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._values[key]
            return None
        return entry[0]

    def _put(self, key: str, value: float, ttl_ms: float, now: float) -> None:
        self._values[key] = (value, now + max(1.0, ttl_ms))
        self._writes += 1
        if self._writes % 1024 == 0:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._values.items() if exp <= now]:
            del self._values[key]
        ms = math.floor(now)
        for key in [k for k, tat in self._tats.items() if _ahead(tat, ms, tat.per) == 0]:
            del self._tats[key]
        for key in list(self._leases):
            self._live_members(key, now)

    def _live_members(self, key: str, now: float) -> dict[str, float]:
        members = self._leases.get(key, {})
        for member in [m for m, exp in members.items() if exp <= now]:
            del members[member]
        if not members:
            self._leases.pop(key, None)
        return members

    def admit(self, plan: AdmitPlan) -> AdmitResult:
        us = self.now_us()
        now, ms = us / 1000, us // 1000  # ms: the whole milliseconds GCRA works in
        results: list[CheckResult] = []
        writes: list[Callable[[], None]] = []
        verdict = AdmitResult(True, results)
        for i, check in enumerate(plan.checks):
            ok, result, write = self._evaluate(check, plan.request_id, now, ms)
            results.append(result)
            if ok:
                writes.append(write)
            elif check.shadow:
                verdict.shadow_failed.append(i)
            elif verdict.allowed:
                verdict.allowed, verdict.failed = False, i
        if verdict.allowed:
            for write in writes:
                write()
            self._put(plan.hold_key, 1, plan.hold_ttl_ms, now)
        return verdict

    def _evaluate(self, check: Check, member: str, now: float, ms: int) -> tuple[
        bool, CheckResult, Callable[[], None]
    ]:
        if isinstance(check, Gcra):
            ok, new_tat, result = gcra_step(self._tats.get(check.key), ms, check)
            return ok, result, lambda: self._put_tat(check.key, new_tat)
        if isinstance(check, Lease):
            members = self._live_members(check.key, now)
            count = len(members) - (1 if member in members else 0)
            if count >= check.max:
                soonest = min(members.values(), default=now + 1000)
                return False, CheckResult(False, math.ceil(max(1.0, soonest - now))), _noop
            return True, CheckResult(True, 0, check.max - count - 1), lambda: self._leases.setdefault(
                check.key, {}).__setitem__(member, now + check.ttl_ms)
        if isinstance(check, Counter):
            used = self._get(check.key, now) or 0.0
            if used + check.cost > check.limit:
                return False, CheckResult(False, check.reset_ms, int(check.limit - used),
                                          check.reset_ms), _noop
            ttl = check.ttl_ms if used == 0 or check.idle else self._ttl(check.key, now)
            return True, CheckResult(True, 0, int(check.limit - used - check.cost),
                                     check.reset_ms), lambda: self._put(
                check.key, used + check.cost, ttl, now)
        if isinstance(check, Since):
            first = self._get(check.key, now)
            start = float(ms) if first is None else first
            left = check.max_ms - (ms - start)
            if left < 0:
                return False, CheckResult(False, 0, 0, 0), _noop
            return True, CheckResult(True, 0, int(left)), lambda: self._put(
                check.key, start, check.ttl_ms, now)
        seen = self._get(check.key, now) or 0.0
        if seen >= check.max:
            return False, CheckResult(False, math.ceil(self._ttl(check.key, now))), _noop
        window = check.window_ms if seen == 0 else self._ttl(check.key, now)
        return True, CheckResult(True, 0, int(check.max - seen - 1)), lambda: self._put(
            check.key, seen + 1, window, now)

    def _put_tat(self, key: str, tat: Tat | None) -> None:
        # Swept with the other entries: every admit or settle that writes one also _puts a
        # hold or done marker, which counts the writes.
        if tat is None:
            self._tats.pop(key, None)
        else:
            self._tats[key] = tat

    def _ttl(self, key: str, now: float) -> float:
        entry = self._values.get(key)
        return entry[1] - now if entry else 1.0

    def settle(self, plan: SettlePlan) -> bool:
        """Apply real usage once; False when this request id was already settled."""
        us = self.now_us()
        now, ms = us / 1000, us // 1000
        if self._get(plan.done_key, now) is not None:
            return False
        held = self._get(plan.hold_key, now) is not None
        for key, interval_ms, reserved, actual in plan.gcra:
            delta = actual - reserved if held else actual
            if delta != 0:
                self._put_tat(key, gcra_settle(self._tats.get(key), ms, interval_ms, delta))
        for key, reserved, actual, ttl_ms in plan.counters:
            delta = actual - reserved if held else actual
            used = self._get(key, now)
            if used is None:
                if delta > 0:
                    self._put(key, delta, ttl_ms, now)
                continue
            self._put(key, max(0, used + delta), self._ttl(key, now), now)
        for key in plan.leases:
            self._leases.get(key, {}).pop(plan.request_id, None)
        self._values.pop(plan.hold_key, None)
        self._put(plan.done_key, 1, plan.done_ttl_ms, now)
        return True

    def renew(self, leases: list[tuple[str, str]], ttl_ms: int) -> None:
        now = self.now_ms()
        for key, member in leases:
            members = self._leases.get(key)
            if members and member in members:
                members[member] = now + ttl_ms

    def size(self) -> int:
        """Live entries, for tests that check growth stays bounded."""
        now = self.now_ms()
        self._sweep(now)
        return (len(self._values) + len(self._tats)
                + sum(len(m) for m in self._leases.values()))


def _noop() -> None:
    return None


# --- wire format of the Redis scripts (gateway/state/lua/admit.lua, settle.lua) -------------------

def encode_admit(plan: AdmitPlan, prefix: str) -> tuple[list[str], list[str | int | float]]:
    keys = [prefix + plan.hold_key]
    args: list[str | int | float] = [plan.request_id, plan.hold_ttl_ms, len(plan.checks)]
    for check in plan.checks:
        keys.append(prefix + check.key + (GCRA_KEY_SUFFIX if isinstance(check, Gcra) else ""))
        if isinstance(check, Gcra):  # the interval as its exact fraction P/Q: p1 = P, p4 = Q
            args += [1, check.interval_ms.numerator, check.burst, check.cost,
                     check.interval_ms.denominator]
        elif isinstance(check, Lease):
            args += [2, check.max, check.ttl_ms, 0, 0]
        elif isinstance(check, Counter):
            args += [5 if check.idle else 3, check.limit, check.cost, check.ttl_ms,
                     check.reset_ms]
        elif isinstance(check, Since):
            args += [6, check.max_ms, check.ttl_ms, 0, 0]
        else:
            args += [4, check.max, check.window_ms, 0, 0]
        args.append(1 if check.shadow else 0)
    return keys, args


def decode_admit(reply: list[int], checks: int) -> AdmitResult:
    results = [
        CheckResult(bool(reply[2 + 4 * i]), int(reply[3 + 4 * i]), int(reply[4 + 4 * i]),
                    int(reply[5 + 4 * i]))
        for i in range(checks)
    ]
    shadow_failed = [int(v) for v in reply[2 + 4 * checks:]]
    return AdmitResult(bool(reply[0]), results, int(reply[1]), shadow_failed)


def encode_settle(plan: SettlePlan, prefix: str) -> tuple[list[str], list[str | int | float]]:
    keys = [prefix + plan.done_key, prefix + plan.hold_key]
    args: list[str | int | float] = [plan.request_id, plan.done_ttl_ms, len(plan.gcra),
                                     len(plan.counters), len(plan.leases)]
    for key, interval_ms, reserved, actual in plan.gcra:
        keys.append(prefix + key + GCRA_KEY_SUFFIX)
        args += [interval_ms.numerator, interval_ms.denominator, reserved, actual]
    for key, reserved, actual, ttl_ms in plan.counters:
        keys.append(prefix + key)
        args += [reserved, actual, ttl_ms]
    keys += [prefix + key for key in plan.leases]
    return keys, args
