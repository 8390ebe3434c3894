"""Self-protection at the door: loop lag, open streams and memory shed the lowest classes first."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.admission.controller import AdmissionObserver
from gateway.admission.selfprotect import RssReader, SelfProtection, cgroup_memory_limit_mib
from gateway.config.admission import AdmissionPolicy
from gateway.config.model import Priority
from gateway.errors import GatewayError

C, H, N, L = Priority.critical, Priority.high, Priority.normal, Priority.low


def make(shadow: bool = False, observer: AdmissionObserver | None = None,
         **settings: Any) -> SelfProtection:
    values = {"max_loop_lag_ms": 100, "max_open_streams": 10} | settings
    policy = AdmissionPolicy.model_validate({"self_protection": values, "shadow": shadow})
    return SelfProtection(policy, lambda: 0.0, random.Random(2), observer,
                          statm_path="/nonexistent/statm")


def refused(guard: SelfProtection) -> list[str]:
    out = []
    for priority in Priority:
        try:
            guard.check(priority, 0.0)
        except GatewayError as err:
            assert (err.status, err.code) == (503, "overloaded")
            out.append(priority.name)
    return out


@pytest.mark.parametrize(
    ("lag_ms", "shed"),
    [
        (50, []),
        (100, ["low"]),
        (149, ["low"]),
        (150, ["normal", "low"]),
        (200, ["high", "normal", "low"]),
        (10_000, ["high", "normal", "low"]),  # never critical
    ],
)
def test_door_sheds_the_lowest_classes_first(lag_ms: float, shed: list[str]) -> None:
    guard = make()
    guard.loop_lag.record(due=0.0, woke=lag_ms / 1000)
    assert refused(guard) == shed


def test_open_streams_count_with_idempotent_handles() -> None:
    guard = make()
    handles = [guard.streams.open() for _ in range(10)]
    assert guard.pressure(0.0) == (1.0, "open_streams")
    with pytest.raises(GatewayError) as err:
        guard.check(L, 0.0)
    assert err.value.headers["x-should-retry"] == "false"
    assert 1 <= float(err.value.headers["retry-after-ms"]) / 1000 <= 30
    guard.check(N, 0.0)
    handles[0].release()
    handles[0].release()
    assert guard.streams.count == 9
    guard.check(L, 0.0)


def test_memory_is_sampled_not_read_per_request(tmp_path: Path) -> None:
    statm = tmp_path / "statm"
    page = RssReader(1.0)._page
    statm.write_text(f"999999 {int(512 * 1024 * 1024 / page)} 0 0 0 0 0\n")
    policy = AdmissionPolicy.model_validate({"self_protection": {"rss_sample_s": 1.0}})
    guard = SelfProtection(policy, lambda: 0.0, random.Random(1), max_rss_mib=400.0,
                           statm_path=str(statm))
    pressure, worst = guard.pressure(10.0)
    assert pressure == pytest.approx(512 / 400) and worst == "memory"
    statm.write_text(f"999999 {int(100 * 1024 * 1024 / page)} 0 0 0 0 0\n")
    assert guard.pressure(10.5)[1] == "memory"  # the sample is still fresh
    guard.check(N, 10.5)
    with pytest.raises(GatewayError):
        guard.check(L, 10.5)
    assert guard.pressure(11.0)[0] == pytest.approx(100 / 400)  # re-read after rss_sample_s
    guard.check(L, 11.0)


def test_rss_reader_reads_this_process() -> None:
    mib = RssReader(1.0).mib(0.0)
    assert mib is None or 5 < mib < 100_000


def test_cgroup_memory_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit_mib(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit_mib(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text(f"{512 * 1024 * 1024}\n")
    assert cgroup_memory_limit_mib(str(tmp_path)) == 512
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit_mib(str(tmp_path)) is None


def test_shadow_mode_counts_and_never_refuses() -> None:
    events: list[tuple[Any, ...]] = []

    class Recorder(AdmissionObserver):
        def on_shed(self, deployment: str | None, priority: Priority, reason: str,
                    shadow: bool) -> None:
            events.append((deployment, priority, reason, shadow))

    guard = make(shadow=True, observer=Recorder())
    guard.loop_lag.record(due=0.0, woke=1.0)
    assert refused(guard) == []
    snap = guard.snapshot()
    assert snap["shed"] == {}
    assert snap["would_shed"] == {"high": {"loop_lag": 1}, "normal": {"loop_lag": 1},
                                  "low": {"loop_lag": 1}}
    assert events[0] == (None, H, "loop_lag", True)


def test_loop_lag_rises_at_once_and_falls_gradually() -> None:
    guard = make()
    guard.loop_lag.record(due=0.0, woke=0.4)
    assert guard.loop_lag.lag_s == 0.4
    guard.loop_lag.record(due=1.0, woke=1.0)
    assert guard.loop_lag.lag_s == pytest.approx(0.3)
    for i in range(20):
        guard.loop_lag.record(due=2.0 + i, woke=2.0 + i)
    assert guard.loop_lag.lag_s < 0.002


def test_real_sheds_are_counted_in_the_snapshot() -> None:
    guard = make()
    guard.loop_lag.record(due=0.0, woke=0.15)
    refused(guard)
    snap = guard.snapshot()
    assert snap["shed"] == {"normal": {"loop_lag": 1}, "low": {"loop_lag": 1}}
    assert snap["pressure"] == pytest.approx(1.5) and snap["worst"] == "loop_lag"


async def test_loop_lag_probe_measures_a_blocked_loop() -> None:
    loop = asyncio.get_running_loop()
    policy = AdmissionPolicy.model_validate({"self_protection": {"lag_probe_interval_ms": 1}})
    guard = SelfProtection(policy, loop.time, random.Random(1))
    guard.start()
    guard.start()  # idempotent
    await asyncio.sleep(0.003)
    loop.call_soon(time.sleep, 0.02)  # a callback hogging the loop
    for _ in range(10):
        await asyncio.sleep(0)
    assert guard.loop_lag.lag_s >= 0.01
    await guard.stop()
    await guard.stop()


def test_a_tenants_work_budget_refuses_past_its_burst_and_refills_at_its_share() -> None:
    """A tenant whose bodies took the loop for 2 s (share 0.5 a second, 1 s ahead) is refused
    until it owes 1 s again: a Retry-After of 2 s; other tenants are not touched."""
    from gateway.admission.selfprotect import WorkBudget
    from tests.gwtest import FakeClock
    clock = FakeClock()
    budget = WorkBudget(clock)
    budget.charge("a", 0.9, share=0.5)
    budget.check("a", share=0.5, burst_s=1.0)  # within the burst
    budget.charge("a", 1.1, share=0.5)
    with pytest.raises(GatewayError) as refused:
        budget.check("a", share=0.5, burst_s=1.0)
    assert (refused.value.status, refused.value.code) == (429, "too_much_request_work")
    assert refused.value.headers["retry-after-ms"] == "2000"
    budget.check("b", share=0.5, burst_s=1.0)  # another tenant owes nothing
    clock.advance(1.9)
    with pytest.raises(GatewayError):
        budget.check("a", share=0.5, burst_s=1.0)
    clock.advance(0.1)
    budget.check("a", share=0.5, burst_s=1.0)  # back within the burst, as promised
    clock.advance(2.0)
    budget.check("a", share=0.5, burst_s=1.0)
    assert budget.refused == 2
