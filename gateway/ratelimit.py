"""Limit algorithms as data: an ``AdmitPlan`` of checks, evaluated all-or-nothing.

The same semantics run in two places and one conformance suite holds them together:
- ``LocalLimits`` below (Python, injected clock): the memory backend and the degraded mode;
- ``gateway/lua/admit.lua`` and ``settle.lua``: Redis, one atomic round trip each.

Checks (all evaluated before anything is written; a failing non-shadow check writes nothing):
- ``Gcra``: generic cell rate algorithm. One timestamp per key (the "theoretical arrival
  time"). ``burst`` units may pass at once; in any window of W ms at most
  ``burst + W / interval_ms`` units pass.
- ``Lease``: a concurrency slot, a sorted-set member with an expiry, so a crashed replica's
  slots free themselves; renewed while a long stream runs.
- ``Counter``: a budget for a period (day/month); ``limit`` in integer units.
- ``Repeat``: how often the same request fingerprint was seen in a window (runaway agents).

Settling is idempotent per request id: a ``done`` marker makes replays no-ops; a ``hold``
marker written by admit tells settle whether to adjust a reservation (hold present) or to
charge the whole usage (admit never reached this store, e.g. admitted while degraded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Gcra:
    key: str
    interval_ms: float  # ms per unit: 60000 / per-minute rate
    burst: int
    cost: int
    name: str  # "requests", "tokens", ...: shown in messages and headers
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    max: int
    ttl_ms: int
    name: str = "concurrency"
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Counter:
    key: str
    limit: int
    cost: int
    ttl_ms: int  # until well after the period ends
    reset_ms: int  # until the period ends (Retry-After when spent)
    name: str = "budget"
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Repeat:
    key: str
    max: int
    window_ms: int
    name: str = "loop"
    shadow: bool = False


Check = Gcra | Lease | Counter | Repeat


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
    gcra: tuple[tuple[str, float, int, int], ...]  # key, interval_ms, reserved, actual
    counters: tuple[tuple[str, int, int, int], ...]  # key, reserved, actual, ttl_ms
    leases: tuple[str, ...]


def gcra_step(tat: float | None, now: float, check: Gcra) -> tuple[bool, float, CheckResult]:
    """One GCRA decision: (allowed, new tat, result). Pure; shared by tests and LocalLimits."""
    t = check.interval_ms
    base = now if tat is None or tat < now else tat
    new_tat = base + check.cost * t
    allow_at = new_tat - check.burst * t
    if now < allow_at:
        return False, base, CheckResult(False, math.ceil(allow_at - now), 0,
                                        math.ceil(base - now))
    remaining = int((now - allow_at) // t) if t > 0 else check.burst
    return True, new_tat, CheckResult(True, 0, remaining, math.ceil(new_tat - now))


class LocalLimits:
    """The plan evaluator on plain dicts, for one process. Time comes from ``clock`` (seconds)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._values: dict[str, tuple[float, float]] = {}  # key -> (value, expires_at_ms)
        self._leases: dict[str, dict[str, float]] = {}  # key -> member -> expires_at_ms
        self._writes = 0

    def now_ms(self) -> float:
        return self._clock() * 1000.0

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
        now = self.now_ms()
        results: list[CheckResult] = []
        writes: list[Callable[[], None]] = []
        verdict = AdmitResult(True, results)
        for i, check in enumerate(plan.checks):
            ok, result, write = self._evaluate(check, plan.request_id, now)
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

    def _evaluate(self, check: Check, member: str, now: float) -> tuple[
        bool, CheckResult, Callable[[], None]
    ]:
        if isinstance(check, Gcra):
            ok, new_tat, result = gcra_step(self._get(check.key, now), now, check)
            return ok, result, lambda: self._put(check.key, new_tat, new_tat - now, now)
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
            ttl = check.ttl_ms if used == 0 else self._ttl(check.key, now)
            return True, CheckResult(True, 0, int(check.limit - used - check.cost),
                                     check.reset_ms), lambda: self._put(
                check.key, used + check.cost, ttl, now)
        seen = self._get(check.key, now) or 0.0
        if seen >= check.max:
            return False, CheckResult(False, math.ceil(self._ttl(check.key, now))), _noop
        window = check.window_ms if seen == 0 else self._ttl(check.key, now)
        return True, CheckResult(True, 0, int(check.max - seen - 1)), lambda: self._put(
            check.key, seen + 1, window, now)

    def _ttl(self, key: str, now: float) -> float:
        entry = self._values.get(key)
        return entry[1] - now if entry else 1.0

    def settle(self, plan: SettlePlan) -> bool:
        """Apply real usage once; False when this request id was already settled."""
        now = self.now_ms()
        if self._get(plan.done_key, now) is not None:
            return False
        held = self._get(plan.hold_key, now) is not None
        for key, interval_ms, reserved, actual in plan.gcra:
            delta = actual - reserved if held else actual
            tat = self._get(key, now)
            if delta == 0 or (tat is None and delta < 0):
                continue
            new_tat = max(now, (tat if tat is not None else now) + delta * interval_ms)
            if new_tat > now:
                self._put(key, new_tat, new_tat - now, now)
            else:
                self._values.pop(key, None)
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
        return len(self._values) + sum(len(m) for m in self._leases.values())


def _noop() -> None:
    return None


# --- wire format of the Redis scripts (gateway/lua/admit.lua, settle.lua) -------------------

def encode_admit(plan: AdmitPlan, prefix: str) -> tuple[list[str], list[str | int | float]]:
    keys = [prefix + plan.hold_key]
    args: list[str | int | float] = [plan.request_id, plan.hold_ttl_ms, len(plan.checks)]
    for check in plan.checks:
        keys.append(prefix + check.key)
        if isinstance(check, Gcra):
            args += [1, check.interval_ms, check.burst, check.cost, 0]
        elif isinstance(check, Lease):
            args += [2, check.max, check.ttl_ms, 0, 0]
        elif isinstance(check, Counter):
            args += [3, check.limit, check.cost, check.ttl_ms, check.reset_ms]
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
        keys.append(prefix + key)
        args += [interval_ms, reserved, actual]
    for key, reserved, actual, ttl_ms in plan.counters:
        keys.append(prefix + key)
        args += [reserved, actual, ttl_ms]
    keys += [prefix + key for key in plan.leases]
    return keys, args
