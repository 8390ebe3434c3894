"""Pacing by the provider's rate-limit headers (admission/pacing.py): the headers as OpenAI and
Anthropic send them, the bucket as predicted between answers, and admission spending a spent
quota in priority order. Decisions run on a fake clock; the re-dispatch timer on the real loop."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from gateway.admission.controller import AdmissionController, AdmissionPolicy, AdmissionRequest
from gateway.admission.pacing import ProviderPace, RateReport, read_rate_headers
from gateway.config.model import Priority
from tests.gwtest import FakeClock

C, H, N, L = Priority.critical, Priority.high, Priority.normal, Priority.low
DEP = "openai/gpt-4o"
# 6,000 requests a minute: one every 10 ms.
OPENAI_SPENT = {"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "10ms"}


def openai_headers(limit: int, remaining: int) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining)}


# -- the headers --------------------------------------------------------------------------------


def test_openai_and_anthropic_headers_are_read() -> None:
    assert read_rate_headers(openai_headers(3400, 12)) == RateReport(3400, 12)
    assert read_rate_headers({"anthropic-ratelimit-requests-limit": "50",
                              "anthropic-ratelimit-requests-remaining": "49",
                              "anthropic-ratelimit-requests-reset": "2026-12-06T08:00:01Z"},
                             ) == RateReport(50, 49)


@pytest.mark.parametrize("headers", [
    {},
    {"x-ratelimit-limit-requests": "600"},  # no remaining count
    {"x-ratelimit-remaining-requests": "5"},  # no limit: no refill rate to pace by
    {"x-ratelimit-limit-tokens": "90000", "x-ratelimit-remaining-tokens": "100"},  # tokens only
    openai_headers(0, 0),
    {"x-ratelimit-limit-requests": "lots", "x-ratelimit-remaining-requests": "5"},
    {"x-ratelimit-limit-requests": "nan", "x-ratelimit-remaining-requests": "5"},
    {"x-ratelimit-limit-requests": "inf", "x-ratelimit-remaining-requests": "5"},
])
def test_answers_without_a_usable_request_quota_are_not_paced(headers: dict[str, str]) -> None:
    assert read_rate_headers(headers) is None


def test_a_remaining_count_outside_the_limit_is_clamped() -> None:
    assert read_rate_headers(openai_headers(60, 900)) == RateReport(60, 60)
    assert read_rate_headers(openai_headers(60, -3)) == RateReport(60, 0)


# -- the bucket ---------------------------------------------------------------------------------


def test_the_bucket_refills_at_the_per_minute_rate_up_to_the_largest_count_heard() -> None:
    pace = ProviderPace()
    assert pace.allows(0.7, 0.0)  # never heard of: not paced
    pace.observe(RateReport(600, 20), 0.0)  # 10 a second; bucket of at least 20
    pace.observe(RateReport(600, 0), 1.0)
    assert pace.level(1.0) == 0
    assert pace.level(1.5) == pytest.approx(5)
    assert pace.level(10.0) == pytest.approx(20)  # no more than the bucket holds
    pace.take(10.0)
    pace.take(10.0)
    assert pace.level(10.0) == pytest.approx(18)


def test_each_class_leaves_its_holdback_share_of_a_second_of_quota_to_the_classes_above(
) -> None:
    pace = ProviderPace()
    pace.observe(RateReport(6000, 500), 0.0)  # 100 a second, a bucket of 500
    pace.observe(RateReport(6000, 20), 0.0)
    # Reserves of one second (100 requests): low (0.70) 30, normal (0.85) 15, high (0.95) 5.
    assert pace.reserve(0.70) == pytest.approx(30) and pace.reserve(1.0) == 0
    assert not pace.allows(0.70, 0.0)
    assert pace.allows(0.85, 0.0) and pace.allows(1.0, 0.0)
    assert pace.wait_s(0.70, 0.0) == pytest.approx(0.11)  # 31 needed, 20 left
    pace.observe(RateReport(6000, 0), 0.0)
    assert not pace.allows(1.0, 0.0)
    assert pace.wait_s(1.0, 0.0) == pytest.approx(0.01)
    assert pace.allows(1.0, 0.01)


def test_no_class_waits_for_more_than_the_bucket_holds() -> None:
    pace = ProviderPace()
    pace.observe(RateReport(6000, 0), 0.0)  # always saturated: no larger count ever heard
    assert pace.reserve(0.70) == 0
    assert pace.allows(0.70, 0.01)  # one request refilled: every class may take it
    pace.observe(RateReport(6000, 10), 1.0)  # a bucket of at least 10: reserve 3 for low
    pace.observe(RateReport(6000, 0), 1.0)
    assert pace.reserve(0.70) == pytest.approx(3)
    assert pace.level(2.0) == pytest.approx(10)  # refilled no further than the bucket
    assert pace.allows(0.70, 2.0)


def test_requests_sent_after_the_answered_one_are_taken_off_its_report() -> None:
    """Answers race requests: an answer's count may not include the requests sent after it
    that are still on their way, so those are taken off (never sent past the quota)."""
    pace = ProviderPace()
    pace.observe(RateReport(6000, 10), 0.0)
    first, second, third = pace.take(0.0), pace.take(0.0), pace.take(0.0)
    assert pace.level(0.0) == 7
    pace.heard(first)
    pace.observe(RateReport(6000, 9), 0.0, first)  # counts the first only
    assert pace.level(0.0) == 7  # not 9: two more are on their way
    pace.heard(third)  # the third failed to connect: it will never be counted
    pace.heard(second)
    pace.observe(RateReport(6000, 8), 0.0, second)
    assert pace.level(0.0) == 8
    pace.heard(second)  # twice is harmless


def test_requests_sent_long_before_the_report_are_in_it() -> None:
    """Non-streamed answers report when they end, seconds after their request: everything
    sent more than a moment before the report has reached the provider and is in its count.
    Taking it off again would stop a replica whose requests in flight outnumber the bucket."""
    pace = ProviderPace()
    pace.observe(RateReport(6000, 20), 0.0)  # 100 a second, a bucket of 20
    first = pace.take(0.0)
    for t in range(1, 300):  # 300 requests in flight over 3 s, more than the bucket holds
        pace.take(t / 100)
    pace.heard(first)
    pace.observe(RateReport(6000, 10), 3.0, first)
    # Only the requests of the last quarter second may still be on their way.
    assert pace.level(3.0) == pytest.approx(10 - 24, abs=1)
    assert pace.wait_s(1.0, 3.0) < 0.3


def test_a_limit_that_moves_a_little_is_the_same_quota() -> None:
    pace = ProviderPace()
    pace.observe(RateReport(6000, 500), 0.0)
    pace.observe(RateReport(6001, 0), 0.0)  # the same quota: its bucket and reserves stay
    assert pace.reserve(0.70) == pytest.approx(30, abs=0.1)
    pace.observe(RateReport(600, 0), 0.0)  # a new quota: learned from scratch
    assert pace.reserve(0.70) == 0


def test_a_quota_unreported_for_a_minute_is_no_longer_paced() -> None:
    pace = ProviderPace()
    pace.observe(RateReport(60, 0), 0.0)
    for t in range(1, 60):  # taking does not keep it alive: only reports do
        pace.take(float(t))
    assert not pace.allows(1.0, 59.0)
    assert pace.allows(1.0, 60.0) and pace.snapshot(60.0) is None


def test_a_replica_with_a_small_share_of_a_small_bucket_still_serves_every_class() -> None:
    pace = ProviderPace()
    pace.observe(RateReport(600, 5), 0.0)  # 10 a second, a bucket of 5
    pace._others = 7.5  # three others spend three quarters: this replica's slice is 1.25
    pace.observe(RateReport(600, 0), 1.0)
    assert pace.level(10.0) == pytest.approx(1.25)
    assert pace.allows(0.70, 10.0)  # low's reserve (1.5) is more than the slice: not waited for


def test_a_changed_limit_forgets_the_old_bucket_size() -> None:
    pace = ProviderPace()
    pace.observe(RateReport(6000, 1000), 0.0)
    pace.observe(RateReport(600, 10), 0.0)  # downgraded: the reserve follows the new bucket
    assert pace.reserve(0.7) == pytest.approx(3)


# -- admission ------------------------------------------------------------------------------------


def make(clock: FakeClock, **concurrency: Any) -> AdmissionController:
    policy = AdmissionPolicy.model_validate({"concurrency": {
        "min_limit": 1, "initial_limit": 100, "max_limit": 1000, **concurrency}})
    return AdmissionController(policy, clock, random.Random(5))


def ask(clock: FakeClock, priority: Priority) -> AdmissionRequest:
    return AdmissionRequest(priority=priority, tenant="t", tokens=100,
                            deadline=clock.now + 60, arrived=clock.now)


async def test_a_spent_quota_queues_requests_and_refills_go_to_the_highest_class() -> None:
    clock = FakeClock()
    ctl = make(clock)
    ctl.observe_rate(DEP, OPENAI_SPENT)
    order: list[Priority] = []

    async def call(priority: Priority) -> None:
        permit = await ctl.acquire(DEP, ask(clock, priority))
        order.append(priority)
        permit.release("success")

    tasks = [asyncio.create_task(call(p)) for p in (L, N, H, C)]
    await asyncio.sleep(0.02)
    assert order == []  # slots are free; the quota is not
    assert ctl.snapshot()["deployments"][DEP]["queued"] == 4
    for expected in ([C], [C, H]):
        clock.advance(0.01)  # one request refilled
        await asyncio.sleep(0.05)  # the pace timer (on the real loop: 10 ms) dispatches it
        assert order == expected
    # The provider says more is left than predicted: the rest go at once.
    ctl.observe_rate(DEP, openai_headers(6000, 50))
    await asyncio.gather(*tasks)
    assert order == [C, H, N, L]


async def test_critical_finds_the_reserve_the_lower_classes_leave() -> None:
    clock = FakeClock()
    ctl = make(clock)
    # (no class above low has come yet: the quota's reserves stay all the same, unlike the
    # slots', for what other replicas spend between two reports)
    ctl.observe_rate(DEP, openai_headers(6000, 100))  # reserves of low 30, normal 15, high 5
    low = [await ctl.acquire(DEP, ask(clock, L)) for _ in range(70)]  # down to 30 left
    waiting = asyncio.create_task(ctl.acquire(DEP, ask(clock, L)))
    await asyncio.sleep(0)
    assert not waiting.done()  # low keeps 30 % of the bucket for the classes above
    critical = [await ctl.acquire(DEP, ask(clock, C)) for _ in range(30)]  # none waits
    assert all(p.queued_s == 0 for p in critical)
    for permit in low + critical:
        permit.release("success")
    waiting.cancel()


async def test_requests_waiting_for_quota_do_not_grow_the_concurrency_limit() -> None:
    """The limit grows only while its slots are in demand: requests that wait for the
    provider's quota are not, or a quota-bound deployment's limit climbs to max_limit and the
    class shares stop meaning anything."""
    clock = FakeClock()
    ctl = make(clock, initial_limit=8, min_limit=4, algorithm="aimd")
    ctl.observe_rate(DEP, OPENAI_SPENT)
    waiting = [asyncio.create_task(ctl.acquire(DEP, ask(clock, L))) for _ in range(50)]
    await asyncio.sleep(0)
    for _ in range(30):  # 30 windows, two requests through each on refills
        clock.advance(1.0)
        ctl.observe_rate(DEP, openai_headers(6000, 2))
        await asyncio.sleep(0)
        for task in [t for t in waiting if t.done()]:
            waiting.remove(task)
            task.result().release("success")
    assert ctl.snapshot()["deployments"][DEP]["limit"] == 8
    for task in waiting:
        task.cancel()


async def test_a_wait_for_the_quota_is_overload_while_the_limit_still_explores() -> None:
    """A fresh limit in slow start excuses a wait for a slot (the limit is still growing to
    meet it), never a wait for the provider's quota: that wait is the provider's, and CoDel
    sheds for it as before, also when the interval closes just as the quota refills."""
    clock = FakeClock()
    ctl = make(clock, initial_limit=4, min_limit=4)
    # 30 requests a minute, none left: the next one in 2 s.
    ctl.observe_rate(DEP, {"x-ratelimit-limit-requests": "30",
                           "x-ratelimit-remaining-requests": "0",
                           "x-ratelimit-reset-requests": "2s"})
    waiting = [asyncio.create_task(ctl.acquire(DEP, ask(clock, N))) for _ in range(5)]
    await asyncio.sleep(0)
    clock.advance(2.0)  # the CoDel interval closes as the quota lets one go, before dispatch
    dep = ctl.snapshot()["deployments"][DEP]
    assert dep["queued"] == 5 and dep["classes"]["normal"]["overloaded"]
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_free_slots_count_the_quota_for_deferred_runs() -> None:
    clock = FakeClock()
    ctl = make(clock)
    assert ctl.free_slots(DEP, L) == 100  # no class above it has come: the whole limit
    ctl._state(DEP).arrived(C, clock.now)
    assert ctl.free_slots(DEP, L) == 70  # 70 % of a limit of 100
    ctl.observe_rate(DEP, openai_headers(6000, 100))  # low's reserve is 30
    assert ctl.free_slots(DEP, L) == 70
    ctl.observe_rate(DEP, openai_headers(6000, 40))
    assert ctl.free_slots(DEP, L) == 10 and ctl.free_slots(DEP, C) == 40
    ctl.observe_rate(DEP, OPENAI_SPENT)
    assert ctl.free_slots(DEP, C) == 0


async def test_pacing_can_be_turned_off_per_deployment() -> None:
    clock = FakeClock()
    policy = AdmissionPolicy.model_validate({
        "concurrency": {"min_limit": 1, "initial_limit": 10, "max_limit": 10},
        "deployments": {DEP: {"pace_by_rate_headers": False}}})
    ctl = AdmissionController(policy, clock, random.Random(5))
    for _ in range(100):  # its own sends are not counted: nothing is learned either
        ctl.observe_rate(DEP, OPENAI_SPENT)
        clock.advance(1.0)
    permit = await ctl.acquire(DEP, ask(clock, L))
    assert permit.queued_s == 0
    assert ctl.snapshot()["deployments"][DEP]["provider_quota"] is None
    ctl.reconfigure(AdmissionPolicy.model_validate({
        "concurrency": {"min_limit": 1, "initial_limit": 10, "max_limit": 10}}))
    ctl.observe_rate(DEP, openai_headers(6000, 7))
    assert ctl.snapshot()["deployments"][DEP]["provider_quota"]["others_per_minute"] == 0
    paced = make(clock)
    paced.observe_rate(DEP, openai_headers(600, 7))
    assert paced.snapshot()["deployments"][DEP]["provider_quota"] == {
        "limit_per_minute": 600, "bucket": 7, "remaining": 7, "others_per_minute": 0}


# -- several replicas on one bucket ----------------------------------------------------------


def _replicas_on_one_bucket(replicas: int, seconds: float = 30.0,
                            ) -> tuple[int, int, int, list[ProviderPace]]:
    """Replicas, each with more work than the quota, spend one provider bucket (600 a minute,
    50 deep). The provider counts a request when it arrives (at once) and reports the bucket
    as it is when the answer's headers go out, 0.3 s later (a streamed answer's first byte).
    Returns (requests served, 429s drawn, 429s drawn after the first 10 s, the paces)."""
    rate, size, ttft, step = 10.0, 50.0, 0.3, 0.005
    bucket = size
    paces = [ProviderPace() for _ in range(replicas)]
    for pace in paces:
        pace.observe(RateReport(rate * 60, size), 0.0)
    pending: list[tuple[float, int, int, bool]] = []  # (answer at, replica, seq, was a 429)
    served = rejected = rejected_late = 0
    now = 0.0
    while now < seconds:
        now = round(now + step, 6)
        bucket = min(size, bucket + rate * step)
        for answer in [p for p in pending if p[0] <= now]:
            pending.remove(answer)
            _, who, seq, was_429 = answer
            paces[who].heard(seq)
            if was_429:
                paces[who].rejected()
            paces[who].observe(RateReport(rate * 60, float(int(bucket))), now, seq)
        for who, pace in enumerate(paces):
            while pace.allows(1.0, now):
                seq = pace.take(now)
                spent = bucket >= 1.0
                if spent:
                    bucket -= 1.0
                    served += 1
                else:
                    rejected += 1
                    rejected_late += now > 10.0
                pending.append((now + ttft, who, seq, not spent))
    return served, rejected, rejected_late, paces


def test_one_replica_spends_the_whole_quota_without_a_429() -> None:
    served, rejected, _, [pace] = _replicas_on_one_bucket(1)
    assert served >= 0.98 * (50 + 10 * 30) and rejected == 0
    assert pace.share() > 0.95  # nobody else was seen spending


@pytest.mark.parametrize("replicas", [2, 4])
def test_replicas_sharing_a_bucket_learn_each_others_spend(
    replicas: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    served, rejected, late, paces = _replicas_on_one_bucket(replicas)
    others = 10.0 * (replicas - 1) / replicas  # each of the others spends its share
    for pace in paces:
        assert 0.6 * others <= pace.snapshot(30.0)["others_per_minute"] / 60 <= 1.4 * others  # type: ignore[index]
    assert served >= 0.95 * (50 + 10 * 30)  # the whole quota is spent...
    monkeypatch.setattr("gateway.admission.pacing._LEARN_WEIGHT", 0.0)
    _, rejected_blind, late_blind, _ = _replicas_on_one_bucket(replicas)
    print(f"{replicas} replicas, 429s over 30 s (after 10 s): learning {rejected} ({late}), "
          f"each counting all refill as its own {rejected_blind} ({late_blind})")
    # ... and once learned, draws next to no 429s, where replicas blind to each other keep
    # drawing them (at the start all see a full bucket: those 429s teach the others' spend).
    assert late <= 2 and late_blind >= 20
