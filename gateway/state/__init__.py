"""Shared state behind one interface: ``MemoryBackend`` (one process) or ``RedisBackend``."""

from __future__ import annotations

from gateway.state.base import SharedRedis, StateBackend, StateUnavailable
from gateway.state.memory import MemoryBackend
from gateway.state.redis import RedisBackend, load_lua

# --- public face: what other packages import (tests/unit/test_layout.py holds them to it) ---
from .plan import (
    AdmitPlan,
    AdmitResult,
    Check,
    CheckResult,
    Counter,
    Gcra,
    Kind,
    Lease,
    LocalLimits,
    Repeat,
    Scope,
    SettlePlan,
    Since,
    Tat,
    exact_interval,
    gcra_step,
)

__all__ = [
    "AdmitPlan",
    "AdmitResult",
    "Check",
    "CheckResult",
    "Counter",
    "Gcra",
    "Kind",
    "Lease",
    "LocalLimits",
    "MemoryBackend",
    "RedisBackend",
    "Repeat",
    "Scope",
    "SettlePlan",
    "SharedRedis",
    "Since",
    "StateBackend",
    "StateUnavailable",
    "Tat",
    "create_backend",
    "exact_interval",
    "gcra_step",
    "load_lua",
]


def create_backend(
    kind: str, *, redis_url: str | None, timeout_s: float, key_prefix: str
) -> StateBackend:
    """Build the configured backend (not started yet: the app calls ``start()``).

    ``kind`` is ``"memory"`` or ``"redis"``; for ``"redis"`` the URL's scheme selects
    standalone (``redis://``, ``rediss://``) or Cluster (``redis+cluster://``,
    ``rediss+cluster://``). ``timeout_s`` and ``key_prefix`` apply to Redis only.
    Raises ValueError for an unknown kind or a missing or malformed URL.
    """
    if kind == "memory":
        return MemoryBackend()
    if kind == "redis":
        if not redis_url:
            raise ValueError(
                "state backend 'redis' needs a Redis URL (redis://, rediss:// or "
                "redis+cluster://host:port,...); use backend 'memory' to run without Redis"
            )
        return RedisBackend(redis_url, timeout_s=timeout_s, key_prefix=key_prefix)
    raise ValueError(f"unknown state backend {kind!r}; expected 'memory' or 'redis'")
