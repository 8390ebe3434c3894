"""Where deferred requests wait: the ``DeferredStore`` contract and its data types. Two
implementations: Redis Streams (deferred/store_redis.py) on the Redis the state backend
shares, process memory (deferred/store_memory.py) otherwise; ``deferred.create_store``
picks one.

Lifecycle of an entry (on Redis each step is one atomic script, ``gateway/state/lua/deferred_*.lua``;
the memory store does the same in Python)::

    submit    -> queued   XADD + HSET; refused when the tenant has max_queued unfinished, or
                          its unfinished entries' bytes would pass max_bytes (a counter
                          beside the stream; every final state takes the entry's size off
                          and drops its request body and headers, the answer stays)
    claim                 XAUTOCLAIM of an entry idle past the visibility timeout, else
                          XREADGROUP of a new one
    start     -> running  counts the run; runs started before and never finished (the
                          replica died) are returned once, to be charged their reservation
    heartbeat             XCLAIM JUSTID every third of the visibility timeout, while owned
    finish    -> succeeded | failed (XACK + XDEL), or back to queued after a delay
                          (retry / nocall: XCLAIM IDLE so any replica may claim it then)
    cancel    -> cancelled  queued only
    expire    -> expired    queued past its expiry (by the sweeper, or at start)

Everything has a TTL: the entry hash ``ttl + grace`` from submit (at least ``grace`` after it
finishes), the stream as long as its youngest entry; finished entries leave the stream at
once, so a stream holds at most ``max_queued`` entries. Consumers idle for a day with nothing
pending are deleted by the sweeper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.jsonbytes import dumps_kept

FORGET_CONSUMER_MS = 24 * 3600 * 1000  # replicas gone this long, with nothing pending
Fields = dict[str, bytes]
StartKind = Literal["run", "gone", "done", "later", "expired"]
FinishMode = Literal["done", "retry", "nocall"]
Charge = Literal["actual", "reserved", "none"]


class QueueFull(Exception):
    """The tenant already has ``max_queued`` unfinished entries, or this one's bytes would
    take its unfinished entries' past ``max_bytes`` (``held_bytes``: theirs, then)."""

    def __init__(self, depth: int, held_bytes: int | None = None) -> None:
        super().__init__(f"{depth} entries queued")
        self.depth = depth
        self.held_bytes = held_bytes


def entry_bytes(fields: Mapping[str, bytes]) -> int:
    """What an entry holds until it is final: its request's body and headers."""
    return len(fields.get("body", b"")) + len(fields.get("headers", b""))


@dataclass(frozen=True, slots=True)
class Submitted:
    position: int  # unfinished entries of the tenant, this one included
    created_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Claim:
    tenant: str
    id: str
    sid: str  # stream entry id
    reclaimed: bool


@dataclass(frozen=True, slots=True)
class Started:
    kind: StartKind
    run: int = 0
    fields: Fields = field(default_factory=dict)  # hold, route, model, body, headers
    lost: tuple[int, ...] = ()  # earlier runs to charge their reservation (replica died)
    status: str = ""  # kind "done": the entry's status
    wait_ms: int = 0  # kind "later"


@dataclass(frozen=True, slots=True)
class Finished:
    won: bool  # this run's answer is the entry's result
    charge: bool  # nobody charged this run yet: the caller charges it


@dataclass(frozen=True, slots=True)
class Result:
    """The final answer of a run, as the client would have received it synchronously."""

    status: Literal["succeeded", "failed"]
    code: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Scan:
    now_ms: int
    depth: int  # unfinished entries (queued and running)
    head: tuple[tuple[str, str, int], ...]  # oldest entries: (stream id, entry id, expires ms)

    @property
    def oldest_age_s(self) -> float:
        if not self.head:
            return 0.0
        return max(0.0, (self.now_ms - int(self.head[0][0].split("-")[0])) / 1000)


class DeferredStore(Protocol):
    """Storage of deferred entries. Redis failures raise ``StateUnavailable``."""

    name: str

    async def submit(self, tenant: str, entry_id: str, fields: Mapping[str, bytes], *,
                     ttl_ms: int, grace_ms: int, max_queued: int,
                     max_bytes: int) -> Submitted:
        """Store and queue; ``QueueFull`` when the tenant has ``max_queued`` unfinished, or
        this entry's bytes (``entry_bytes``) would take theirs past ``max_bytes`` (an entry
        alone bigger than that still goes in when nothing else is held)."""

    async def claim(self, tenant: str, consumer: str, *, reclaim_idle_ms: int | None
                    ) -> Claim | None:
        """An entry idle for ``reclaim_idle_ms`` (None: do not look), else a new one."""

    async def release(self, claim: Claim, consumer: str, *, delay_ms: int,
                      visibility_ms: int) -> None:
        """Give back a claimed entry that was not started: claimable again after delay_ms."""

    async def start(self, claim: Claim, consumer: str) -> Started:
        """Begin run n+1 of a claimed entry (``kind`` "run"), unless it is gone, finished,
        still backing off ("later") or expired; ``lost`` lists earlier runs nobody finished."""

    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        """Renew the claim; False when this consumer no longer owns it."""

    async def finish(self, claim: Claim, consumer: str, run: int, mode: FinishMode,
                     charge: Charge, run_info: Mapping[str, Any], *, result: Result | None = None,
                     grace_ms: int = 0, delay_ms: int = 0, visibility_ms: int = 0) -> Finished:
        """End run ``run``: ``done`` with its ``result``, ``retry`` (queued again after
        ``delay_ms``) or ``nocall`` (it never reached the upstream: not counted)."""

    async def cancel(self, tenant: str, entry_id: str) -> tuple[str, bytes | None]:
        """(status, hold): ``cancelled`` with the hold to refund, or the unchanged status
        (``missing`` when there is no such entry)."""

    async def expire(self, tenant: str, entry_id: str, sid: str) -> tuple[str, bytes | None]:
        """Expire a queued entry past its expiry: (``expired``, hold), else (status, None)."""

    async def get(self, tenant: str, entry_id: str) -> Fields | None:
        """The entry's record, or None when missing (expired away, or another tenant's)."""

    async def scan(self, tenant: str, head: int, *, forget_idle_ms: int = -1) -> Scan:
        """Depth and the oldest ``head`` entries; forgets long-idle consumers."""


def encode_run_info(info: Mapping[str, Any]) -> bytes:
    """A run's record as both stores keep it (``run:<n>``), so the API reads either alike."""
    return dumps_kept(info)


__all__ = [
    "Claim",
    "DeferredStore",
    "Finished",
    "QueueFull",
    "Result",
    "Scan",
    "Started",
    "Submitted",
]
