"""GCRA arithmetic is exact and the same in Python and in Lua, whatever the clock reads.

The in-process twin (``LocalLimits``: memory backend, degraded mode) and the Redis scripts
(``lua/admit.lua``, ``lua/settle.lua``) run the same random scenarios at clock values from 0 to
10^13 ms on a real redis-server, and must return the same verdicts, Retry-After, remaining and
reset, and leave the same state. The scripts read the clock from Redis TIME; here that one call
is swapped for a read of two keys the test sets, so both sides see the same millisecond.

Edge cases the float arithmetic got wrong at some clock values (issue 18) are asserted as
outcomes, not only as agreement: a request whose cost equals the burst on a fresh bucket, the
last unit of a burst, a retry after exactly the Retry-After, and a refund then a re-admission
of exactly what was refunded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.ratelimit import (
    GCRA_KEY_SUFFIX,
    AdmitPlan,
    AdmitResult,
    Gcra,
    LocalLimits,
    SettlePlan,
    Tat,
    decode_admit,
    encode_admit,
    encode_settle,
    gcra_step,
)
from tests.redis_server import RedisServer

KEY = "rl:{t:p}:tok"
CLOCK = ("{t:p}:clock:s", "{t:p}:clock:us")
MAX_CLOCK_MS = 10**13
# Hold and done markers expire on Redis's real clock but on the twin's test clock: longer than
# any scenario's waits, so both keep them.
MARKER_TTL_MS = 10**14
TTL_PAD_MS = 10**14


def _script(name: str, gcra_ttl: str) -> str:
    """The production script with two test hooks, each replacing exactly one expression (or
    this test would not control what it thinks it does): the clock read, and the TTL of the
    GCRA key, padded by ``TTL_PAD_MS``. The TTL runs on Redis's real clock while the scenario
    runs on the test's, so unpadded a key whose TAT is a few (test) ms ahead would vanish
    between two steps; the TTL itself is still checked (``Pair.admit``)."""
    text = (resources.files("gateway") / "lua" / name).read_text(encoding="utf-8")
    for old, new in (("redis.call('TIME')", f"redis.call('MGET', '{CLOCK[0]}', '{CLOCK[1]}')"),
                     (f"'PX', {gcra_ttl})", f"'PX', {TTL_PAD_MS} + {gcra_ttl})")):
        assert text.count(old) == 1, (name, old)
        text = text.replace(old, new)
    return text


def _ms(time_reply: tuple[int, int]) -> int:
    return time_reply[0] * 1000 + time_reply[1] // 1000


class MsClockLimits(LocalLimits):
    """The twin on an integer millisecond clock (a float of seconds cannot hold every ms up to
    10^13 ms exactly; the twin reads whole microseconds through ``now_us``)."""

    def __init__(self, ms: int) -> None:
        super().__init__(lambda: 0.0)
        self.ms = ms

    def now_us(self) -> int:
        return self.ms * 1000


class LuaLimits:
    """The production scripts on a real server, on the test's clock."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.admit_sha = client.script_load(_script("admit.lua", "w[4]"))
        self.settle_sha = client.script_load(_script("settle.lua", "-math.floor(-ahead / q)"))
        self.ms = 0
        self.flush = False  # empty the database before the next call (a new scenario)

    def _run(self, sha: str, keys: list[str], args: list[Any]) -> tuple[
        Any, bytes | None, tuple[int, int]
    ]:
        pipe = self.client.pipeline(transaction=False)
        if self.flush:
            pipe.flushdb()
        pipe.mset({CLOCK[0]: self.ms // 1000, CLOCK[1]: self.ms % 1000 * 1000})
        pipe.time()
        pipe.evalsha(sha, len(keys), *keys, *args)
        pipe.time()
        pipe.get(KEY + GCRA_KEY_SUFFIX)
        pipe.execute_command("PEXPIRETIME", KEY + GCRA_KEY_SUFFIX)
        *_, before, reply, after, state, expires_at = pipe.execute()
        self.flush = False
        # The TTL the script set lies between these two: it counted from a moment between the
        # TIME read before it and the one after (a stalled server widens the range, nothing
        # else does).
        expires_at -= TTL_PAD_MS
        ttl_range = (expires_at - _ms(after) - 1, expires_at - _ms(before) + 1)
        return reply, state, ttl_range

    def admit(self, plan: AdmitPlan) -> tuple[AdmitResult, bytes | None, tuple[int, int]]:
        keys, args = encode_admit(plan, "")
        reply, state, ttl_range = self._run(self.admit_sha, keys, args)
        return decode_admit(reply, len(plan.checks)), state, ttl_range

    def settle(self, plan: SettlePlan) -> tuple[bool, bytes | None]:
        keys, args = encode_settle(plan, "")
        reply, state, _ = self._run(self.settle_sha, keys, args)
        return bool(reply), state


@dataclass
class Pair:
    """Both implementations, stepped together; every step asserts they agree."""

    py: MsClockLimits
    lua: LuaLimits
    check: Gcra
    ms: int
    n: int = 0

    def wait(self, ms: int) -> None:
        self.ms = self.py.ms = self.lua.ms = self.ms + ms

    def admit(self, cost: int) -> tuple[str, AdmitResult]:
        self.n += 1
        rid = f"r{self.n}"
        c = self.check
        plan = AdmitPlan(rid, (Gcra(c.key, c.interval_ms, c.burst, cost, c.name),),
                         f"rl:{{t:p}}:hold:{rid}", MARKER_TTL_MS)
        ours = self.py.admit(plan)
        theirs, state, (low, high) = self.lua.admit(plan)
        assert ours == theirs
        self._same_state(state)
        if ours.allowed:  # the key lives exactly until its TAT, rounded up to whole ms
            assert low <= max(1, ours.results[0].reset_ms) <= high
        return rid, ours

    def settle(self, rid: str, reserved: int, actual: int) -> bool:
        plan = SettlePlan(rid, f"rl:{{t:p}}:done:{rid}", f"rl:{{t:p}}:hold:{rid}", MARKER_TTL_MS,
                          ((KEY, self.check.interval_ms, reserved, actual),), (), ())
        ours = self.py.settle(plan)
        theirs, state = self.lua.settle(plan)
        assert ours == theirs
        self._same_state(state)
        return ours

    def _same_state(self, raw: bytes | None) -> None:
        # A TAT at or before now is the same as no TAT (the twin drops it, Redis lets it
        # expire); anything ahead of now must be the same three integers.
        tat = self.py._tats.get(KEY)
        ours = None if tat is None or (tat.ms, tat.frac) <= (self.ms, 0) else tat
        theirs = None
        if raw is not None:
            ms, frac, per = (int(v) for v in raw.split(b":"))
            if (ms, frac) > (self.ms, 0):
                theirs = Tat(ms, frac, per)
        assert ours == theirs


@pytest.fixture(scope="module")
def lua(redis_server: RedisServer) -> Iterator[LuaLimits]:
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield LuaLimits(client)
    finally:
        client.close()


# Intervals as the gateway makes them: 60_000 / per-minute rate, times the replica count in
# degraded mode; rates from 1 request per minute to 10^7 tokens per minute.
intervals = st.builds(lambda rate, n: Fraction(60_000 * n, rate),
                      st.integers(1, 10**7), st.sampled_from([1, 1, 1, 2, 3, 7, 100]))
ops = st.lists(st.tuples(st.sampled_from(["admit", "admit", "settle", "offline"]),
                         st.floats(0, 2.5), st.integers(0, 10**6), st.integers(0, 10**6)),
               max_size=5)


@pytest.mark.redis
@settings(max_examples=10_000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(start=st.integers(0, MAX_CLOCK_MS), interval=intervals,
       burst=st.integers(1, 10**6) | st.integers(1, 5), edge=st.sampled_from(
           ["full", "last_unit", "retry_after", "refund", "none"]), steps=ops)
@example(start=450_123, interval=Fraction(100), burst=1000, edge="refund", steps=[])
@example(start=1_733_450_000_123, interval=Fraction(60_000, 7), burst=3, edge="last_unit",
         steps=[])
def test_python_and_lua_agree_exactly(lua: LuaLimits, start: int, interval: Fraction,
                                      burst: int, edge: str,
                                      steps: list[tuple[str, float, int, int]]) -> None:
    lua.flush = True
    pair = Pair(MsClockLimits(start), lua, Gcra(KEY, interval, burst, 1, "tokens"), start)
    lua.ms = start
    span_ms = burst * interval  # how long a full bucket takes to drain

    # The edge case first, on a fresh bucket, asserted as an outcome.
    if edge == "full":  # cost == burst fits a fresh bucket, and nothing more does
        _, full = pair.admit(burst)
        assert full.allowed and full.results[0].remaining == 0
        _, more = pair.admit(1)
        assert not more.allowed and more.results[0].retry_after_ms == math.ceil(interval)
    elif edge == "last_unit":  # a burst taken one unit at a time within one ms: all fit
        head = max(0, burst - 3)
        if head:
            assert pair.admit(head)[1].allowed
        for left in range(burst - head - 1, -1, -1):
            _, one = pair.admit(1)
            assert one.allowed and one.results[0].remaining == left
        assert not pair.admit(1)[1].allowed
    elif edge == "retry_after":  # waiting exactly the Retry-After is enough
        assert pair.admit(burst)[1].allowed
        cost = max(1, burst // 3)
        _, refused = pair.admit(cost)
        assert not refused.allowed
        pair.wait(refused.results[0].retry_after_ms)
        assert pair.admit(cost)[1].allowed
    elif edge == "refund":  # what a settlement gives back can be taken again at once
        rid, full = pair.admit(burst)
        assert full.allowed
        used = burst // 3
        assert pair.settle(rid, burst, used)
        _, again = pair.admit(burst - used)
        assert again.allowed and again.results[0].remaining == 0

    # Then random traffic: waits up to 2.5 bucket spans, admissions of any cost (also more
    # than the burst), settlements of the latest admission (held) or of one admitted
    # elsewhere (no hold: the whole usage is charged).
    last = ""
    for kind, wait, a, b in steps:
        pair.wait(math.floor(wait * span_ms))
        if kind == "admit" or not last:
            rid, result = pair.admit(a % (burst + 3))
            if result.allowed:
                last = rid
        elif kind == "settle":
            pair.settle(last, a % (burst + 1), b % (burst + 1))
        else:
            pair.settle(f"offline{pair.n}", 0, b % (burst + 1))


def test_a_fresh_bucket_takes_cost_equal_to_burst_at_any_clock() -> None:
    # The pure step, at the clock values where float arithmetic refused (issue 18: 16 % of
    # fresh-bucket admissions at cost = burst with the clock at 400-500 s).
    for now in range(400_000, 500_000, 7):
        ok, tat, result = gcra_step(None, now, Gcra("k", Fraction(100), 1000, 1000, "tokens"))
        assert ok and result.remaining == 0 and tat == Tat(now + 100_000, 0, 1)
