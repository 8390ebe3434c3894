"""Fleet sync of the breakers: trips, cooldowns, probe slots and verdicts through the store.

Fleet state goes through the ``StateBackend`` (never pybreaker's blocking Redis storage), as
TTL'd keys, so replicas with different clocks agree without comparing timestamps:
``cb:{dep}:open`` (value ``level:trip_id``, TTL = rest of the open period), ``cb:{dep}:cool``
(429 cooldown, TTL = its rest), ``cb:{dep}:probe:<i>`` (half-open probe slots, SET NX PX) and
``cb:{dep}:ok`` (value ``trip_id``: a probe closed that trip, so replicas still half-open on it
close too). A background task exchanges them; nothing touches the store on the request path
except the probe reservation in half-open. If the store is down, everything works locally:
trips stay per replica and each replica lets one probe through.

``FleetSync`` takes each ``DeploymentBreaker``'s news (``take_news``, ``put_back`` when the
push fails) and hands it what the fleet knows (``learn_trip``, ``learn_closed``,
``learn_cooldown``); it never reaches into pybreaker.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping

from gateway.config import BreakerPolicy
from gateway.state import StateBackend, StateUnavailable, keys

from .deployment import HALF_OPEN, OPEN, DeploymentBreaker

log = logging.getLogger("gateway.breaker")
_LOCAL_SLOT = -1  # a probe admitted locally while the store was unreachable


def _key(deployment: str, suffix: str) -> str:
    # The deployment is the {hash tag}: one Cluster slot per deployment (state/keys.py).
    return keys.breaker(deployment, suffix)


class FleetSync:
    """Exchanges the state of ``breakers`` (a live mapping: breakers added later are synced
    too) with the other replicas through ``state``."""

    def __init__(
        self,
        policy: BreakerPolicy,
        state: StateBackend,
        breakers: Mapping[str, DeploymentBreaker],
        *,
        clock: Callable[[], float],
        replica_id: str,
    ) -> None:
        self._policy, self._state, self._breakers = policy, state, breakers
        self._clock, self._replica_id = clock, replica_id
        self._releases: list[tuple[str, float]] = []  # probe keys to delete, reserved at
        self._wake = asyncio.Event()
        self._degraded = False

    @property
    def degraded(self) -> bool:
        """True while the state store is unreachable (breakers then work per replica)."""
        return self._degraded

    def wake(self) -> None:
        """Something waits to be pushed: sync sooner than the interval."""
        self._wake.set()

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

    async def run(self, stop: asyncio.Event) -> None:
        """Background task: ``sync_once`` every ``sync_interval_s``, sooner (but at most 5
        times per interval) when a local trip, cooldown or probe verdict waits to be pushed.
        Returns once ``stop`` is set."""
        interval = self._policy.sync_interval_s
        while not stop.is_set():
            self._wake.clear()  # before syncing: news arriving meanwhile wakes the next round
            try:
                await self.sync_once()
            except Exception:  # a bug here must not end fleet sync for the process
                log.exception("breaker fleet sync failed")
            await _wait_any(stop, None, interval / 5)
            await _wait_any(stop, self._wake, interval * 4 / 5)

    async def reserve_probe(self, b: DeploymentBreaker) -> int | None:
        """A fleet-wide half-open probe slot for ``b``, or None when all are taken. With the
        store down, the replica's only probe in flight gets a local slot."""
        lease_ms = max(1, round(self._policy.probe_lease_s * 1000))
        try:
            for slot in range(self._policy.half_open_probes):
                key = _key(b.name, f"probe:{slot}")
                if await self._state.set(
                    key, self._replica_id.encode(), lease_ms, only_if_absent=True
                ):
                    return slot
        except StateUnavailable as exc:
            self._outage(exc)
            return _LOCAL_SLOT if b.probes == 1 else None  # alone, one probe per replica
        return None

    def release_probe(self, deployment: str, slot: int, reserved_at: float) -> None:
        """Free a slot from ``reserve_probe`` (deleted in the store at the next sync)."""
        if slot != _LOCAL_SLOT:
            self._releases.append((_key(deployment, f"probe:{slot}"), reserved_at))
            self.wake()

    async def _flush_releases(self) -> None:
        now = self._clock()
        # A lease past its TTL may already be someone else's slot: leave it alone.
        pending = [(k, t) for k, t in self._releases if now - t < self._policy.probe_lease_s]
        self._releases = []
        for i, (key, _) in enumerate(pending):
            try:
                await self._state.delete(key)
            except BaseException:
                self._releases.extend(pending[i:])
                raise

    async def _sync_breaker(self, b: DeploymentBreaker) -> None:
        st, now = self._state, self._clock()
        cool_ms = await st.ttl_ms(_key(b.name, "cool"))
        remote_cool = -math.inf if cool_ms is None else now + cool_ms / 1000
        # Taken before the awaits, so news arriving meanwhile is not lost.
        news = b.take_news()
        writes: list[tuple[str, bytes, float]] = []  # key, value, seconds to live
        if news.tripped and b.state == OPEN and b.open_until > now:
            writes.append(("open", f"{b.level}:{b.trip_id}".encode(), b.open_until - now))
        if news.closed_trip is not None:
            writes.append(("ok", news.closed_trip.encode(), self._policy.max_reset_timeout_s))
        if news.cooled and b.cool_until > max(remote_cool, now):  # the longest cooldown wins
            writes.append(("cool", b"1", b.cool_until - now))
        try:
            for suffix, value, ttl_s in writes:
                await st.set(_key(b.name, suffix), value, max(1, math.ceil(ttl_s * 1000)))
        except BaseException:
            b.put_back(news)
            raise
        b.learn_cooldown(remote_cool)
        open_ms = await st.ttl_ms(_key(b.name, "open"))
        if open_ms is not None and open_ms > 0:
            raw = await st.get(_key(b.name, "open"))
            level, _, trip_id = (raw or b"").decode(errors="replace").partition(":")
            if trip_id and trip_id != b.trip_id and level.isdigit():
                b.learn_trip(open_ms / 1000, int(level), trip_id)
        b.refresh(self._clock())
        if b.state == HALF_OPEN:
            raw = await st.get(_key(b.name, "ok"))
            if raw is not None:
                b.learn_closed(raw.decode(errors="replace"))

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
