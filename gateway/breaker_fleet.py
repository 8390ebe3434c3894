"""Fleet sync of the breakers: trips, cooldowns, probe slots and verdicts through the store.

Split from breaker.py (the board) and breaker_deployment.py (the per-deployment state
machines) because this half is all I/O: a background task exchanges TTL'd keys with the other
replicas, and the half-open probe slots are reserved with ``SET NX PX``. ``BreakerBoard`` mixes
it in; it reaches the board's state through the attributes declared below.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import pybreaker

from gateway.state.base import StateBackend, StateUnavailable

if TYPE_CHECKING:
    from gateway.breaker_deployment import _Breaker
    from gateway.breaker_policy import BreakerPolicy

log = logging.getLogger("gateway.breaker")
OPEN, HALF_OPEN = pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
_LOCAL_SLOT = -1  # a probe admitted locally while the store was unreachable


def _key(deployment: str, suffix: str) -> str:
    # The deployment is the {hash tag}: one Cluster slot per deployment. Braces inside the
    # name would end the tag early, so they are swapped out.
    tag = deployment.replace("{", "(").replace("}", ")")
    return f"cb:{{{tag}}}:{suffix}"


class FleetSync:
    """The store-facing half of ``BreakerBoard``."""

    policy: BreakerPolicy
    clock: Callable[[], float]
    replica_id: str
    _state: StateBackend
    _breakers: dict[str, _Breaker]
    _releases: list[tuple[str, float]]
    _wake: asyncio.Event
    _degraded: bool

    async def sync_once(self) -> bool:
        """Exchange state with the fleet once: push local trips, cooldowns, probe verdicts
        and releases; pull the others'. False (logged once per outage) when the store is
        unreachable; local state is kept and pushed once it is back."""
        try:
            await self._flush_releases()
            results = await asyncio.gather(
                *(self._sync_breaker(b) for b in list(self._breakers.values())),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except StateUnavailable as exc:
            self._outage(exc)
            return False
        if self._degraded:
            self._degraded = False
            log.info("breaker fleet sync: state store reachable again")
        return True

    async def run_sync(self, stop: asyncio.Event) -> None:
        """Background task: ``sync_once`` every ``sync_interval_s``, sooner (but at most 5
        times per interval) when a local trip, cooldown or probe verdict waits to be pushed.
        Returns once ``stop`` is set."""
        interval = self.policy.sync_interval_s
        while not stop.is_set():
            self._wake.clear()  # before syncing: news arriving meanwhile wakes the next round
            try:
                await self.sync_once()
            except Exception:  # a bug here must not end fleet sync for the process
                log.exception("breaker fleet sync failed")
            await _wait_any(stop, None, interval / 5)
            await _wait_any(stop, self._wake, interval * 4 / 5)

    async def _reserve(self, b: _Breaker) -> int | None:
        lease_ms = max(1, round(self.policy.probe_lease_s * 1000))
        try:
            for slot in range(self.policy.half_open_probes):
                key = _key(b.name, f"probe:{slot}")
                if await self._state.set(
                    key, self.replica_id.encode(), lease_ms, only_if_absent=True
                ):
                    return slot
        except StateUnavailable as exc:
            self._outage(exc)
            return _LOCAL_SLOT if b.probes == 1 else None  # alone, one probe per replica
        return None

    async def _flush_releases(self) -> None:
        now = self.clock()
        # A lease past its TTL may already be someone else's slot: leave it alone.
        pending = [(k, t) for k, t in self._releases if now - t < self.policy.probe_lease_s]
        self._releases = []
        for i, (key, _) in enumerate(pending):
            try:
                await self._state.delete(key)
            except BaseException:
                self._releases.extend(pending[i:])
                raise

    async def _sync_breaker(self, b: _Breaker) -> None:
        st, now = self._state, self.clock()
        cool_ms = await st.ttl_ms(_key(b.name, "cool"))
        remote_cool = -math.inf if cool_ms is None else now + cool_ms / 1000
        writes: list[tuple[str, bytes, float]] = []  # key, value, seconds to live
        if b.push_open and b.cb.current_state == OPEN and b.open_until > now:
            writes.append(("open", f"{b.level}:{b.trip_id}".encode(), b.open_until - now))
        if b.push_ok is not None:
            writes.append(("ok", b.push_ok.encode(), self.policy.max_reset_timeout_s))
        if b.push_cool and b.cool_until > max(remote_cool, now):  # the longest cooldown wins
            writes.append(("cool", b"1", b.cool_until - now))
        # Flags are cleared before the awaits, so news arriving meanwhile is not lost.
        flags = (b.push_open, b.push_ok, b.push_cool)
        b.push_open, b.push_ok, b.push_cool = False, None, False
        try:
            for suffix, value, ttl_s in writes:
                await st.set(_key(b.name, suffix), value, max(1, math.ceil(ttl_s * 1000)))
        except BaseException:
            b.push_open, b.push_cool = b.push_open or flags[0], b.push_cool or flags[2]
            b.push_ok = b.push_ok or flags[1]
            raise
        b.cool_until = max(b.cool_until, remote_cool)
        open_ms = await st.ttl_ms(_key(b.name, "open"))
        if open_ms is not None and open_ms > 0:
            raw = await st.get(_key(b.name, "open"))
            level, _, trip_id = (raw or b"").decode(errors="replace").partition(":")
            if trip_id and trip_id != b.trip_id and level.isdigit():
                b.apply_remote_open(open_ms / 1000, int(level), trip_id)
        b.refresh(self.clock())
        if b.cb.current_state == HALF_OPEN:
            raw = await st.get(_key(b.name, "ok"))
            if raw is not None and raw.decode(errors="replace") == b.trip_id:
                b.cb.close()  # a probe on another replica closed this very trip

    def _outage(self, exc: StateUnavailable) -> None:
        if not self._degraded:  # log once per outage
            self._degraded = True
            log.warning("breaker fleet sync: state store unavailable, breakers work per "
                        "replica until it is back: %s", exc)


async def _wait_any(stop: asyncio.Event, other: asyncio.Event | None, timeout: float) -> None:
    """Wait until ``stop`` or ``other`` is set, or ``timeout`` seconds pass."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (stop, other) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
