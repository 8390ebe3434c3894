"""What the gateway's breakers (gateway/breaker*.py) rely on in pybreaker (checked on 1.4.1).

If an upgrade changes any of this, these tests fail before the gateway misbehaves:
transitions and their listeners, ``call()``/``calling()`` bookkeeping, a trip re-raising the
original error, a storage changed elsewhere being noticed, when ``opened_at`` is written and
read, exclusion counting as success, cancellation counting as failure, and ``call()``
silently not awaiting coroutines. Time is controlled by moving the storage's ``opened_at``
back, never by sleeping.
"""

from __future__ import annotations

import asyncio
import gc
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pybreaker
import pytest


class Boom(Exception):
    pass


class ClientErr(Exception):
    pass


class Recorder(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def before_call(self, cb: pybreaker.CircuitBreaker, func: Any, *a: Any, **kw: Any) -> None:
        self.events.append(("before_call",))

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.events.append(("failure", type(exc).__name__))

    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        self.events.append(("success",))

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self.events.append(("state", old_state.name if old_state else "-", new_state.name))

    def transitions(self) -> list[tuple[str, ...]]:
        return [e[1:] for e in self.events if e[0] == "state"]


def fail(cb: pybreaker.CircuitBreaker, exc: BaseException | None = None) -> None:
    """One failing ``calling()`` block; swallows what it raises."""
    try:
        with cb.calling():
            raise exc or Boom()
    except (Boom, pybreaker.CircuitBreakerError):
        pass


def succeed(cb: pybreaker.CircuitBreaker) -> None:
    with cb.calling():
        pass


def age(cb: pybreaker.CircuitBreaker, seconds: float) -> None:
    """Pretend the breaker opened ``seconds`` ago (pybreaker reads datetime.now(UTC))."""
    storage = cb._state_storage
    storage.opened_at = datetime.now(UTC) - timedelta(seconds=seconds)


def test_states_are_named_closed_open_half_open() -> None:
    assert (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN) == (
        "closed", "open", "half-open")


def test_calling_counts_an_exception_as_failure_and_a_normal_exit_as_success() -> None:
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=5, listeners=[rec])
    with pytest.raises(Boom), cb.calling():
        raise Boom()
    assert cb.fail_counter == 1
    succeed(cb)
    assert cb.fail_counter == 0  # any success resets the consecutive count
    assert rec.events == [("before_call",), ("failure", "Boom"), ("before_call",), ("success",)]


def test_a_success_while_closed_with_no_failure_counted_changes_only_listener_hooks() -> None:
    """Every successful attempt is replayed through pybreaker: on the common path it must
    leave the state, counters and opened_at as they were."""
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=5, listeners=[rec])
    storage = cb._state_storage
    before = (cb.current_state, storage.counter, storage.success_counter, storage.opened_at)
    succeed(cb)
    assert (cb.current_state, storage.counter, storage.success_counter,
            storage.opened_at) == before
    assert rec.events == [("before_call",), ("success",)]


def test_call_judges_a_plain_function_by_raise_or_return() -> None:
    """The gateway replays a known verdict as ``cb.call(verdict, kind)``."""
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=5, listeners=[rec])

    def verdict(failed: bool) -> str:
        if failed:
            raise Boom()
        return "ok"

    with pytest.raises(Boom):
        cb.call(verdict, True)
    assert cb.fail_counter == 1
    assert cb.call(verdict, False) == "ok"
    assert cb.fail_counter == 0
    assert rec.events == [("before_call",), ("failure", "Boom"), ("before_call",), ("success",)]


def _raise_boom() -> None:
    raise Boom()


def test_without_throw_new_error_on_trip_the_tripping_error_is_reraised() -> None:
    """The gateway's breakers catch only their own failure type, tripping or not."""
    cb = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=10, throw_new_error_on_trip=False)
    for _ in range(2):
        with pytest.raises(Boom):
            cb.call(_raise_boom)
    assert cb.current_state == "open"
    cb.half_open()
    with pytest.raises(Boom):
        cb.call(_raise_boom)  # a failed trial reopens it, again with the original error
    assert cb.current_state == "open"


def test_reading_state_notices_a_storage_changed_elsewhere_and_fires_listeners() -> None:
    """How a trip learned from the fleet enters pybreaker: written into the storage, then
    ``cb.state`` is read (pybreaker's own path for a shared storage changed elsewhere)."""
    rec = Recorder()
    storage = pybreaker.CircuitMemoryStorage("closed")
    cb = pybreaker.CircuitBreaker(fail_max=5, state_storage=storage, listeners=[rec])
    storage.opened_at = datetime.now(UTC)  # without it, pybreaker deems the timeout over
    storage.state = "open"
    assert cb.current_state == "open" and rec.transitions() == []  # not noticed yet
    assert cb.state.name == "open"
    assert rec.transitions() == [("closed", "open")]
    assert cb.state.name == "open"
    assert rec.transitions() == [("closed", "open")]  # unchanged: no second event
    with pytest.raises(pybreaker.CircuitBreakerError):
        succeed(cb)  # really open: calls are refused


def test_listeners_are_called_in_registration_order() -> None:
    """The board's announcer runs after the deployment's own listener has described a trip."""
    order: list[str] = []

    class Named(pybreaker.CircuitBreakerListener):
        def __init__(self, name: str) -> None:
            self.name = name

        def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
            order.append(self.name)

    cb = pybreaker.CircuitBreaker(listeners=[Named("first"), Named("second")])
    cb.open()
    assert order == ["first", "second"]


def test_gateway_listeners_have_only_a_state_change_hook() -> None:
    """The gateway reacts to transitions only; verdicts reach it through its own code."""
    from gateway.breaker.deployment import DeploymentBreaker
    from gateway.config.breaker import BreakerPolicy

    extra = pybreaker.CircuitBreakerListener()
    b = DeploymentBreaker("p/m", BreakerPolicy(), clock=lambda: 0.0, rng=random.Random(1),
                          on_news=lambda: None, listeners=[extra])
    own = [x for x in b.cb.listeners if x is not extra]
    assert len(own) == 1 and b.cb.listeners[-1] is extra  # extra listeners come after
    base = pybreaker.CircuitBreakerListener
    assert [name for name in ("before_call", "failure", "success")
            if getattr(type(own[0]), name) is not getattr(base, name)] == []


def test_fail_max_consecutive_failures_open_it_with_circuit_breaker_error() -> None:
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=10, listeners=[rec])
    for _ in range(2):
        fail(cb)
    assert cb.current_state == "closed"
    with pytest.raises(pybreaker.CircuitBreakerError) as info, cb.calling():
        raise Boom()
    assert isinstance(info.value.__context__, Boom)  # the trip replaces the original error
    assert cb.current_state == "open"
    assert rec.transitions() == [("closed", "open")]


def test_open_rejects_without_running_the_block() -> None:
    cb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=10)
    fail(cb)
    ran = False
    with pytest.raises(pybreaker.CircuitBreakerError), cb.calling():
        ran = True
    assert not ran


def test_half_open_after_reset_timeout_then_success_closes() -> None:
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=10, listeners=[rec])
    fail(cb)
    age(cb, 9)
    with pytest.raises(pybreaker.CircuitBreakerError):
        succeed(cb)
    age(cb, 11)
    succeed(cb)  # open -> half-open on entry, then the success closes (success_threshold 1)
    assert cb.success_threshold == 1
    assert cb.current_state == "closed"
    assert rec.transitions() == [("closed", "open"), ("open", "half-open"),
                                 ("half-open", "closed")]


def test_half_open_failure_reopens() -> None:
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=10, listeners=[rec])
    cb.open()
    age(cb, 11)
    with pytest.raises(pybreaker.CircuitBreakerError, match="Trial call failed"), cb.calling():
        raise Boom()
    assert cb.current_state == "open"
    assert rec.transitions()[-2:] == [("open", "half-open"), ("half-open", "open")]


def test_half_open_lets_every_concurrent_call_in() -> None:
    """The reason the gateway reserves probe slots itself."""
    cb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=10)
    cb.open()
    age(cb, 11)
    blocks = [cb.calling() for _ in range(5)]
    for block in blocks:
        block.__enter__()  # none is rejected while the first is still "in flight"
    for block in blocks:
        block.__exit__(None, None, None)
    assert cb.current_state == "closed"


def test_open_half_open_close_methods_fire_listeners() -> None:
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(listeners=[rec])
    cb.open()
    cb.half_open()
    cb.close()
    cb.open()
    assert rec.transitions() == [("closed", "open"), ("open", "half-open"),
                                 ("half-open", "closed"), ("closed", "open")]


def test_opened_at_is_set_only_by_open_before_listeners_and_read_only_on_a_call_while_open(
) -> None:
    """The gateway's storage marks a local trip in the ``opened_at`` setter, which its
    listener then describes; pybreaker's wall-clock timeout check, the only reader, runs
    only on a call while open, which the gateway never makes."""
    calls: list[str] = []

    class Spy(pybreaker.CircuitMemoryStorage):
        @property
        def opened_at(self) -> datetime | None:
            calls.append("get")
            return self._opened_at

        @opened_at.setter
        def opened_at(self, value: datetime) -> None:
            calls.append("set")
            self._opened_at = value - timedelta(seconds=60)  # "opened a minute ago"

    class Order(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
            calls.append(f"state:{new.name}")

    cb = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=30, state_storage=Spy("closed"),
                                  listeners=[Order()])
    succeed(cb)
    fail(cb)
    fail(cb)  # trips: set, then the listeners
    cb.half_open()
    fail(cb)  # a failed trial: set, then the listeners
    cb.half_open()
    succeed(cb)  # closes
    cb.open()
    assert calls == ["set", "state:open", "state:half-open", "set", "state:open",
                     "state:half-open", "state:closed", "set", "state:open"]
    succeed(cb)  # a call while open: the timeout check reads it (shifted: over, so closes)
    assert "get" in calls and cb.current_state == "closed"


def test_reset_timeout_and_fail_max_can_be_changed_on_a_live_breaker() -> None:
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=10)
    cb.reset_timeout = 40
    cb.open()
    age(cb, 30)
    with pytest.raises(pybreaker.CircuitBreakerError):
        succeed(cb)
    age(cb, 41)
    succeed(cb)
    assert cb.current_state == "closed"


def test_excluded_exception_counts_as_success_and_resets_the_count() -> None:
    """Why the gateway never uses ``exclude`` for 4xx: it would hide a failing deployment."""
    rec = Recorder()
    cb = pybreaker.CircuitBreaker(fail_max=3, exclude=[ClientErr], listeners=[rec])
    fail(cb)
    fail(cb)
    assert cb.fail_counter == 2
    with pytest.raises(ClientErr), cb.calling():
        raise ClientErr()
    assert cb.fail_counter == 0
    assert rec.events[-1] == ("success",)
    predicate = pybreaker.CircuitBreaker(fail_max=3, exclude=[lambda e: isinstance(e, ClientErr)])
    fail(predicate)
    with pytest.raises(ClientErr), predicate.calling():
        raise ClientErr()
    assert predicate.fail_counter == 0


def test_excluded_exception_closes_a_half_open_breaker() -> None:
    cb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=10, exclude=[ClientErr])
    cb.open()
    age(cb, 11)
    with pytest.raises(ClientErr), cb.calling():
        raise ClientErr()
    assert cb.current_state == "closed"


async def test_cancelled_error_counts_as_failure() -> None:
    """Why the gateway keeps cancellation out of pybreaker altogether."""
    cb = pybreaker.CircuitBreaker(fail_max=5)
    started = asyncio.Event()

    async def call() -> None:
        with cb.calling():
            started.set()
            await asyncio.Event().wait()  # a client disconnect cancels us here

    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cb.fail_counter == 1


def test_an_entered_calling_block_has_no_neutral_exit() -> None:
    """Abandoning an entered block (generator closed or collected) is a failure too."""
    cb = pybreaker.CircuitBreaker(fail_max=5)
    block = cb.calling()
    block.__enter__()
    del block
    gc.collect()
    assert cb.fail_counter == 1


def test_call_with_an_async_function_does_not_await_it_and_counts_success() -> None:
    cb = pybreaker.CircuitBreaker(fail_max=1)
    ran = False

    async def upstream() -> None:
        nonlocal ran
        ran = True
        raise Boom()

    for _ in range(3):
        coro = cb.call(upstream)
        assert asyncio.iscoroutine(coro)
        coro.close()  # never run: the failure it would raise is never seen
    assert not ran
    assert cb.fail_counter == 0 and cb.current_state == "closed"


def test_a_breaker_with_memory_storage_does_not_share_state() -> None:
    a = pybreaker.CircuitBreaker(fail_max=1)
    b = pybreaker.CircuitBreaker(fail_max=1)
    fail(a)
    assert (a.current_state, b.current_state) == ("open", "closed")


def _memory_storage() -> pybreaker.CircuitBreakerStorage:
    return pybreaker.CircuitMemoryStorage("closed")


def _trip_storage() -> pybreaker.CircuitBreakerStorage:
    from gateway.breaker.deployment import TripStorage

    return TripStorage()


@pytest.mark.parametrize("make_storage", [_memory_storage, _trip_storage],
                         ids=["pybreaker-memory", "gateway-trip"])
def test_the_gateway_storage_behaves_as_pybreaker_memory_storage(
    make_storage: Any,
) -> None:
    """One suite for each storage: the gateway's TripStorage is a faithful pybreaker storage
    (state, both counters, opened_at written on open) whatever else it keeps."""
    rec = Recorder()
    storage = make_storage()
    cb = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=10, success_threshold=2,
                                  state_storage=storage, listeners=[rec])
    assert (storage.state, storage.counter, storage.success_counter) == ("closed", 0, 0)
    assert storage.opened_at is None
    fail(cb)
    assert storage.counter == 1
    succeed(cb)
    assert storage.counter == 0
    fail(cb)
    fail(cb)
    assert storage.state == "open" and storage.counter == 2
    opened = storage.opened_at
    assert opened is not None and abs((datetime.now(UTC) - opened).total_seconds()) < 60
    cb.half_open()
    succeed(cb)
    assert (storage.state, storage.success_counter) == ("half-open", 1)
    succeed(cb)
    assert (storage.state, storage.counter, storage.success_counter) == ("closed", 0, 0)
    assert rec.transitions() == [("closed", "open"), ("open", "half-open"),
                                 ("half-open", "closed")]


async def test_the_gateway_never_lets_pybreakers_wall_clock_judge_an_open_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pybreaker reads ``opened_at`` only to compare it with its own ``datetime.now()``; the
    gateway times open periods on its injected clock, so it must never get there: through
    trips, an answer arriving while open, half-open, a failed and a successful probe, and a
    trip learned from the fleet."""
    from gateway.breaker.board import BreakerBoard
    from gateway.breaker.deployment import TripStorage
    from gateway.config.breaker import BreakerPolicy
    from gateway.state import MemoryBackend

    reads: list[object] = []
    real = vars(TripStorage)["opened_at"]
    assert isinstance(real, property) and real.fget is not None
    getter = real.fget

    def spy(self: TripStorage) -> datetime | None:
        reads.append(self)
        value: datetime | None = getter(self)
        return value

    monkeypatch.setattr(TripStorage, "opened_at", property(spy, real.fset))
    now = [1000.0]
    store = MemoryBackend(clock=lambda: now[0])
    policy = BreakerPolicy(consecutive_failures=2, reset_timeout_s=10, max_reset_timeout_s=60)
    a, b = (BreakerBoard(policy, store, deployments=["p/m"], clock=lambda: now[0],
                         rng=random.Random(seed)) for seed in (1, 2))
    slow = await a.begin("p/m")  # answers only after the trip
    assert slow is not None
    for _ in range(2):
        trial = await a.begin("p/m")
        assert trial is not None
        trial.failure("server_error")
    slow.success(0.1)
    await a.sync_once()
    await b.sync_once()
    assert a.states() == b.states() == {"p/m": "open"}
    for outcome in ("failure", "success"):
        now[0] += 60
        probe = await a.begin("p/m")
        assert probe is not None and probe.probe
        probe.failure("timeout") if outcome == "failure" else probe.success(0.1)
        await a.sync_once()
        await b.sync_once()
    assert a.states() == b.states() == {"p/m": "closed"}
    assert reads == []
