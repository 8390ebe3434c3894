"""Shedding decisions with a fake clock: CoDel per class, the cohort level, Retry-After."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from typing import Any

import pytest

from gateway.admission.shed import (
    DecayingRate,
    ShedState,
    cohort_bucket,
    cohort_key,
    drain_time_s,
    overloaded_error,
    retry_after_s,
)
from gateway.app.server import GATEWAY
from gateway.config.admission import AdmissionPolicy
from gateway.config.model import Priority
from tests.plugin_gateway import MakeGateway

N, L, H, C = Priority.normal, Priority.low, Priority.high, Priority.critical
EMPTY: list[float | None] = [None, None, None, None]


def policy(**overrides: Any) -> AdmissionPolicy:
    return AdmissionPolicy.model_validate(overrides)


def waits(**by_class: float) -> list[float | None]:
    out: list[float | None] = list(EMPTY)
    for name, wait in by_class.items():
        out[Priority[name]] = wait
    return out


# -- CoDel ------------------------------------------------------------------------------------


def test_codel_enters_drop_mode_when_min_delay_stays_above_target_for_an_interval() -> None:
    state = ShedState(policy(), now=0.0)  # normal target 5 s, interval 1 s
    state.observe(N, 6.0)
    state.observe(N, 5.5)
    state.roll(0.5, waits(normal=7.0))  # the interval is not over: nothing decided
    assert not state.overloaded(N)
    state.roll(1.0, waits(normal=7.0))
    assert state.overloaded(N)
    assert state.drop_mode(N) and state.drop_mode(L)  # the class and the ones below it
    assert not state.drop_mode(H) and not state.drop_mode(C)


def test_codel_one_good_delay_in_the_interval_keeps_it_out_of_drop_mode() -> None:
    state = ShedState(policy(), now=0.0)
    for delay in (0.6, 0.7, 0.4, 0.8):  # a standing queue never drains below target...
        state.observe(N, delay)
    state.roll(1.0, waits(normal=0.9))
    assert not state.overloaded(N)  # ...but this one drained below it: a good queue


def test_codel_without_dequeues_judges_by_the_oldest_waiting_request() -> None:
    state = ShedState(policy(), now=0.0)
    state.roll(1.0, waits(critical=1.2))  # nothing dequeued; the head has waited 1.2 s
    assert state.overloaded(C)  # past critical's target (1 s)
    assert all(state.drop_mode(p) for p in Priority)


def test_codel_leaves_drop_mode_when_the_delay_falls() -> None:
    state = ShedState(policy(), now=0.0)
    state.observe(L, 3.0)
    state.roll(1.0, waits(low=3.0))
    assert state.overloaded(L)
    state.observe(L, 2.5)
    state.observe(L, 0.4)
    state.roll(2.0, waits(low=0.5))
    assert not state.overloaded(L) and not state.drop_mode(L)
    state.observe(L, 3.0)
    state.roll(3.0, EMPTY)  # the queue emptied: no standing queue
    assert not state.overloaded(L)


# -- cohort level -------------------------------------------------------------------------------


def test_cohort_level_climbs_under_sustained_overload_and_falls_as_it_clears() -> None:
    state = ShedState(policy(cohort_step_up=16, cohort_step_down=4), now=0.0)
    levels = []
    for second in range(1, 5):  # normal overloaded for 4 intervals
        state.roll(float(second), waits(normal=10.0))
        levels.append(state.level)
    # low (cohorts 0..127) went whole at once, then normal (128..255) loses 16 cohorts a step
    assert levels == [144, 160, 176, 192]
    assert state.decide(L, 127, is_retry=False) == "cohort"
    assert state.decide(N, 63, is_retry=False) == "cohort"
    assert state.decide(N, 64, is_retry=False) is None
    for second in range(5, 10):  # cleared: falls slower than it climbed
        state.roll(float(second), EMPTY)
    assert state.level == 192 - 5 * 4


def test_only_low_overloaded_climbs_through_lows_cohorts() -> None:
    state = ShedState(policy(cohort_step_up=16), now=0.0)
    for second in range(1, 4):
        state.roll(float(second), waits(low=10.0))
    assert state.level == 48


def test_cohort_level_never_climbs_past_the_most_important_overloaded_class() -> None:
    state = ShedState(policy(cohort_step_up=100), now=0.0)
    for second in range(1, 10):
        state.roll(float(second), waits(low=10.0))
    assert state.level == 128  # all of low, none of normal
    assert state.decide(N, 0, is_retry=False) is None
    for second in range(10, 13):  # now high is overloaded too: the cap rises to high's top
        state.roll(float(second), waits(high=10.0, low=10.0))
    assert state.level == 384
    assert state.decide(C, 0, is_retry=False) is None
    state.roll(13.0, waits(low=10.0))  # only low again: back down toward low's top, gently
    assert state.level == 384 - 4


def test_classes_jumped_over_whole_come_back_whole() -> None:
    """A few seconds of critical overload shed every lower class whole. Once it clears, the
    level walks back through the critical cohorts it climbed, then returns the jumped classes
    at once: walking through them at 4 cohorts a second would keep low shed for 90 s more."""
    state = ShedState(policy(cohort_step_up=16, cohort_step_down=4), now=0.0)
    for second in range(1, 4):  # low's queue is long: 48 low cohorts
        state.roll(float(second), waits(low=10.0))
    assert state.level == 48
    for second in range(4, 6):  # then critical queues: everything below it goes whole
        state.roll(float(second), waits(critical=10.0, low=10.0))
    assert state.level == 3 * 128 + 32
    assert state.decide(H, 127, is_retry=False) == "cohort"
    levels = []
    for second in range(6, 16):  # all quiet
        state.roll(float(second), EMPTY)
        levels.append(state.level)
    # 32 climbed critical cohorts at 4 a step, then straight back to low's 48, then gently on
    assert levels == [412, 408, 404, 400, 396, 392, 388, 48, 44, 40]
    assert state.decide(H, 127, is_retry=False) is None
    assert state.decide(N, 127, is_retry=False) is None


def test_a_jump_stays_on_record_while_the_class_below_is_overloaded_itself() -> None:
    """Critical queues, then calms while high still queues: high holds the level at its top
    (its own overload), and normal and low stay shed whole for it. Once high calms the level
    walks through high's cohorts, then returns normal and low at once, not 256 cohorts later."""
    state = ShedState(policy(cohort_step_up=16, cohort_step_down=4), now=0.0)
    state.roll(1.0, waits(critical=10.0))
    assert state.level == 3 * 128 + 16
    for second in range(2, 7):  # critical calm, high queueing
        state.roll(float(second), waits(high=10.0))
    assert state.level == 3 * 128
    for second in range(7, 38):  # all quiet: 4 cohorts of high an interval...
        state.roll(float(second), EMPTY)
    assert state.level == 2 * 128 + 4
    state.roll(38.0, EMPTY)  # ...then normal and low at once
    assert state.level == 0


def test_quiet_intervals_each_lower_the_level() -> None:
    state = ShedState(policy(cohort_step_up=64, cohort_step_down=8), now=0.0)
    state.roll(1.0, waits(low=10.0))
    assert state.level == 64
    state.roll(6.5, EMPTY)  # the intervals ending at 2, 3, 4, 5 and 6 s saw nobody
    assert state.level == 64 - 5 * 8


def test_retries_are_shed_before_first_attempts() -> None:
    state = ShedState(policy(cohort_step_up=1), now=0.0)
    state.level = 128 + 1  # just into normal: its cohort 0 goes, and every retry
    assert state.decide(N, 0, is_retry=False) == "cohort"
    assert state.decide(N, 1, is_retry=False) is None
    assert state.decide(N, 127, is_retry=True) == "retry"
    assert state.decide(H, 0, is_retry=True) is None  # high is not being shed at all
    state.level = 128  # low entirely, normal untouched: normal retries pass
    assert state.decide(N, 5, is_retry=True) is None


def test_runs_in_progress_are_shed_only_once_the_level_passes_their_class() -> None:
    state = ShedState(policy(), now=0.0)
    state.level = 2 * 128  # every cohort of normal: no new normal run starts
    assert state.decide(N, 127, is_retry=False) == "cohort"
    assert state.decide(N, 0, is_retry=False, continuing=True) is None  # its runs carry on
    assert state.decide(N, 0, is_retry=True, continuing=True) == "retry"  # retries go first
    state.level = 2 * 128 + 1  # high is being shed too: now the runs of normal go as well
    assert state.decide(N, 127, is_retry=False, continuing=True) == "cohort"
    assert state.decide(H, 0, is_retry=False, continuing=True) is None


KEY = cohort_key(["sha256:" + "1" * 64, "sha256:" + "2" * 64])


def test_cohort_bucket_is_stable_and_not_pythons_salted_hash() -> None:
    rng = random.Random(1)
    bucket = cohort_bucket("acme", "run-42", 128, rng, KEY)
    digest = hashlib.blake2b(b"acme\0run-42", digest_size=8, key=KEY).digest()
    assert bucket == int.from_bytes(digest, "big") % 128
    assert all(cohort_bucket("acme", "run-42", 128, rng, KEY) == bucket for _ in range(10))
    code = "import random; from gateway.admission.shed import cohort_bucket as b, cohort_key; " \
           "print(b('acme', 'run-42', 128, random.Random(), cohort_key(['sha256:' + '1' * 64, " \
           "'sha256:' + '2' * 64])))"
    for seed in ("1", "2"):  # other processes, other hash salts: same cohort
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env=os.environ | {"PYTHONHASHSEED": seed},
        )
        assert int(out.stdout) == bucket


def test_a_tenant_cannot_choose_the_cohorts_shed_last() -> None:
    """The top cohorts of a class are shed last. Session ids a tenant picked offline for the
    top cohort (it knows the hash, its own key and every other tenant's name, not the other
    keys) land anywhere once the gateway keys the hash (a red team's top-cohort ids got 20 of
    50 answered where the bottom's got 4)."""
    rng = random.Random(3)
    own_key = "sha256:" + "1" * 64
    guesses = (b"", cohort_key([own_key]))  # unkeyed, or keyed with what it knows
    for guess in guesses:
        picked = [f"run-{i}" for i in range(40_000)
                  if cohort_bucket("acme", f"run-{i}", 128, rng, guess) >= 120][:200]
        assert len(picked) == 200
        real = [cohort_bucket("acme", s, 128, rng, KEY) for s in picked]
        assert sum(b >= 120 for b in real) < 30  # about 6 % by chance, not 100 %
        assert 44 < sum(real) / len(real) < 84  # the middle, as any sessions


async def test_the_gateway_keys_cohorts_with_its_providers_credentials(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every replica with the same policy and credentials has the same key; the providers'
    API keys are in it (no tenant sees those), as are the policy's key hashes."""
    monkeypatch.setenv("COHORT_TEST_KEY", "sk-provider-secret")
    gw = await make_gateway(providers={"main": {"api_key_env": "COHORT_TEST_KEY"}})
    config = gw.app[GATEWAY].policy.config
    hashes = [*(h for t in config.tenants.values() for h in t.api_keys), *config.admin.api_keys]
    key = gw.app[GATEWAY].services.admission._cohort_key
    assert key == cohort_key([*hashes, "sk-provider-secret"])
    assert key != cohort_key(hashes)  # the policy file alone does not give it away


def test_cohort_buckets_spread_sessions_and_sessionless_requests() -> None:
    rng = random.Random(7)
    buckets = {cohort_bucket("t", f"session-{i}", 128, rng) for i in range(2000)}
    assert len(buckets) == 128
    sessionless = {cohort_bucket("t", None, 128, rng) for _ in range(2000)}
    assert len(sessionless) == 128
    same_name = [cohort_bucket(t, "run-1", 128, rng) for t in ("a", "b", "c", "d", "e")]
    assert len(set(same_name)) > 1  # the tenant is part of the key


# -- drain rate and Retry-After ---------------------------------------------------------------


def test_decaying_rate_measures_events_per_second() -> None:
    rate = DecayingRate(tau_s=10.0)
    assert rate.rate(0.0) == 0.0
    for i in range(1, 601):  # 5 per second for 120 s
        rate.tick(i * 0.2)
    assert rate.rate(120.0) == pytest.approx(5.0, rel=0.05)
    assert rate.rate(130.0) == pytest.approx(5.0 / 2.718, rel=0.05)  # decays when idle


def test_retry_after_is_derived_from_drain_rate_bounded_and_jittered() -> None:
    pol = policy(retry_after_min_s=1.0, retry_after_max_s=30.0, retry_after_jitter=0.5)
    rng = random.Random(3)
    assert drain_time_s(ahead=19, drain_rate=4.0) == 5.0
    values = [retry_after_s(drain_time_s(19, 4.0), pol, rng) for _ in range(500)]
    assert 2.5 <= min(values) < 3.0 and 7.0 < max(values) <= 7.5
    assert len({round(v, 3) for v in values}) > 400  # jittered
    stalled = [retry_after_s(drain_time_s(10, 0.0), pol, rng) for _ in range(500)]
    assert all(15.0 <= v <= 30.0 for v in stalled)  # nothing drains: the bound, spread below it
    assert max(stalled) > 29.0 and min(stalled) < 16.0
    fast = [retry_after_s(drain_time_s(0, 1000.0), pol, rng) for _ in range(500)]
    assert all(1.0 <= v <= 1.5 for v in fast)


def test_retry_after_can_never_exceed_60_seconds() -> None:
    with pytest.raises(ValueError, match="retry_after_max_s"):
        policy(retry_after_max_s=61.0)
    pol = policy(retry_after_min_s=60.0, retry_after_max_s=60.0)
    assert retry_after_s(1e9, pol, random.Random(1)) == 60.0


def test_overloaded_error_headers() -> None:
    err = overloaded_error(Priority.normal, 2.345, "busy")
    assert (err.status, err.code, err.type) == (503, "overloaded", "overloaded")
    assert err.headers == {"Retry-After": "3", "retry-after-ms": "2345", "x-should-retry": "false"}
    assert overloaded_error(Priority.low, 1.0, "").headers["x-should-retry"] == "false"
    assert overloaded_error(Priority.high, 1.0, "").headers["x-should-retry"] == "true"
    assert overloaded_error(Priority.critical, 0.2, "").headers["Retry-After"] == "1"
