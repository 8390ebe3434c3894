"""The state backend interface: every piece of state shared between requests lives behind it.

Two implementations pass one conformance suite (``tests/contract/test_state_conformance.py``):

- ``MemoryBackend``: one process, the embedded default; ``serve`` needs no Redis.
- ``RedisBackend``: ``redis.asyncio``, shared by every replica, with tight timeouts.

Keys are plain strings chosen by the caller. Callers that need several keys updated
atomically put a ``{hash tag}`` in them so a Redis Cluster keeps them in one slot; the
memory backend ignores tags. Every write takes a TTL so nothing grows without bound.

Errors: a backend raises ``StateUnavailable`` (and only that) when the store cannot be
reached or answers too slowly, so policies can apply their degraded mode in one place.

Capabilities: a store that needs more than keys and TTLs (the deferred queue keeps Redis
Streams) asks the backend for it (``StateBackend.shared_redis``) rather than testing which
backend it got; a backend without the capability returns None and the caller uses its
in-process alternative.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    from .plan import AdmitPlan, AdmitResult, SettlePlan

T = TypeVar("T")


class StateUnavailable(Exception):
    """The shared store did not answer in time or refused the connection."""


class SharedRedis(Protocol):
    """The Redis a backend runs on, lent to stores that keep their own data structures there
    (streams, hashes, their own scripts) beside the backend's keys."""

    @property
    def client(self) -> Redis | RedisCluster:
        """The backend's client; every command on it goes through ``call``."""

    @property
    def key_prefix(self) -> str:
        """Put in front of every key, as the backend does with its own."""

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one command under the backend's deadline; failures become
        ``StateUnavailable`` naming ``op``."""


class StateBackend(Protocol):
    """Async key/value store with TTLs, and the limiter's atomic admit/settle calls."""

    name: str  # "memory" or "redis", shown in /readyz and metrics

    async def start(self) -> None:
        """Connect (Redis) or start housekeeping; called once at app startup."""

    async def close(self) -> None:
        """Release connections and background tasks; idempotent."""

    async def ping(self) -> bool:
        """True when the store answers now; never raises (used by /readyz)."""

    async def get(self, key: str) -> bytes | None:
        """The value, or None when missing or expired."""

    async def set(
        self, key: str, value: bytes, ttl_ms: int, *, only_if_absent: bool = False
    ) -> bool:
        """Store value with a TTL. With only_if_absent, store only when missing (SET NX PX)
        and return whether this call stored it; otherwise always True."""

    async def delete(self, key: str) -> bool:
        """Remove the key; True when it existed."""

    async def ttl_ms(self, key: str) -> int | None:
        """Remaining TTL in milliseconds, or None when the key is missing."""

    async def admit(self, plan: AdmitPlan) -> AdmitResult:
        """Evaluate every check of the plan atomically; apply all of them or none
        (gateway/state/plan.py documents the checks; Redis runs gateway/state/lua/admit.lua)."""

    async def settle(self, plan: SettlePlan) -> bool:
        """Apply a request's real usage exactly once; False when already settled."""

    async def settle_many(self, plans: Sequence[SettlePlan]) -> list[bool]:
        """``settle`` for each plan, in one round trip where the store allows it (Redis: one
        pipeline); each is applied exactly once. StateUnavailable when the batch could not be
        sent or answered: then any of them may or may not have been applied (replaying them
        is safe, as settling is idempotent per request id)."""

    async def renew_leases(self, key: str, members: list[str], ttl_ms: int) -> None:
        """Extend live concurrency leases (long streams keep their slot)."""

    def shared_redis(self) -> SharedRedis | None:
        """The Redis shared by every replica, for stores of their own there; None when the
        state lives in this process (then such a store keeps its data in memory too)."""
