"""Where deferred requests wait: ``DeferredStore``, on Redis Streams or in process memory.

One stream per tenant with one consumer group (``gw``); every replica is a consumer named by
its replica id. An entry is a hash beside the stream; both carry the tenant's hash tag
(``dq:{t:<tenant>}:s`` and ``dq:{t:<tenant>}:e:<id>``), the same tag as the tenant's rate-limit
keys, so every script touches one Redis Cluster slot and tenants spread over the cluster.
Per-tenant streams also make fairness simple: workers take tenants in turn, whatever one
tenant has queued (gateway/deferred.py), and depth and age are per tenant by construction.

Lifecycle of an entry (each step one atomic script, ``gateway/lua/deferred_*.lua``)::

    submit    -> queued   XADD + HSET; refused when the tenant has max_queued unfinished
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

``MemoryDeferredStore`` keeps the same semantics in one process's memory for the memory state
backend: nothing survives a restart and no other process sees it (not durable).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Protocol, cast

import orjson

from .state import StateBackend, StateUnavailable
from .state.redis import RedisBackend

GROUP = "gw"
FORGET_CONSUMER_MS = 24 * 3600 * 1000  # replicas gone this long, with nothing pending
Fields = dict[str, bytes]
StartKind = Literal["run", "gone", "done", "later", "expired"]
FinishMode = Literal["done", "retry", "nocall"]
Charge = Literal["actual", "reserved", "none"]


class QueueFull(Exception):
    """The tenant already has ``max_queued`` unfinished entries."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"{depth} entries queued")
        self.depth = depth


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
                     ttl_ms: int, grace_ms: int, max_queued: int) -> Submitted:
        """Store and queue; ``QueueFull`` when the tenant has ``max_queued`` unfinished."""

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


def create_store(state: StateBackend, clock: Callable[[], float] = time.time) -> DeferredStore:
    """Redis Streams on the Redis backend's client; else the in-process store."""
    if isinstance(state, RedisBackend):
        return RedisDeferredStore(state)
    return MemoryDeferredStore(clock)


def _tag(tenant: str) -> str:
    return "{t:" + tenant + "}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _run_info(info: Mapping[str, Any]) -> bytes:
    return orjson.dumps(info)


def _load(name: str) -> str:
    return (resources.files("gateway") / "lua" / name).read_text(encoding="utf-8")


# --- Redis Streams -----------------------------------------------------------------------------


class RedisDeferredStore:
    """``DeferredStore`` on the state backend's Redis (standalone or Cluster)."""

    name = "redis"

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        client = backend.client
        self._prefix = backend.key_prefix
        self._submit = client.register_script(_load("deferred_submit.lua"))
        self._claim = client.register_script(_load("deferred_claim.lua"))
        self._start = client.register_script(_load("deferred_start.lua"))
        self._finish = client.register_script(_load("deferred_finish.lua"))
        self._heartbeat = client.register_script(_load("deferred_heartbeat.lua"))
        self._cancel = client.register_script(_load("deferred_cancel.lua"))
        self._scan = client.register_script(_load("deferred_scan.lua"))
        self._cursors: dict[str, str] = {}  # tenant -> XAUTOCLAIM cursor

    def _stream(self, tenant: str) -> str:
        return f"{self._prefix}dq:{_tag(tenant)}:s"

    def _entry(self, tenant: str, entry_id: str) -> str:
        return f"{self._prefix}dq:{_tag(tenant)}:e:{entry_id}"

    async def _run(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._backend.call(f"deferred {op}", lambda: script(keys=keys, args=args))

    async def submit(self, tenant: str, entry_id: str, fields: Mapping[str, bytes], *,
                     ttl_ms: int, grace_ms: int, max_queued: int) -> Submitted:
        args: list[Any] = [GROUP, entry_id, max_queued, ttl_ms, grace_ms]
        for name, value in fields.items():
            args += [name, value]
        reply = await self._run("submit", self._submit,
                                [self._stream(tenant), self._entry(tenant, entry_id)], args)
        if int(reply[0]) == 0:
            raise QueueFull(int(reply[1]))
        return Submitted(int(reply[1]), int(reply[2]), int(reply[3]))

    async def claim(self, tenant: str, consumer: str, *, reclaim_idle_ms: int | None
                    ) -> Claim | None:
        cursor = self._cursors.get(tenant, "0-0")
        idle = -1 if reclaim_idle_ms is None else reclaim_idle_ms
        reply = await self._run("claim", self._claim, [self._stream(tenant)],
                                [GROUP, consumer, idle, cursor])
        self._cursors[tenant] = _s(reply[0])
        if len(reply) < 4:
            return None
        return Claim(tenant, _s(reply[2]), _s(reply[1]), bool(int(reply[3])))

    async def release(self, claim: Claim, consumer: str, *, delay_ms: int,
                      visibility_ms: int) -> None:
        stream, client = self._stream(claim.tenant), self._backend.client
        idle = max(0, visibility_ms - delay_ms)
        await self._backend.call("deferred release", lambda: client.xclaim(
            stream, GROUP, consumer, 0, [claim.sid], idle=idle, justid=True))

    async def start(self, claim: Claim, consumer: str) -> Started:
        reply = await self._run("start", self._start,
                                [self._stream(claim.tenant), self._entry(claim.tenant, claim.id)],
                                [GROUP, claim.sid, consumer])
        kind = _s(reply[0])
        if kind == "run":
            names = ("hold", "route", "model", "body", "headers")
            fields = {n: v for n, v in zip(names, reply[2:7]) if isinstance(v, bytes)}
            return Started("run", int(reply[1]), fields, tuple(int(k) for k in reply[7:]))
        if kind == "expired":
            fields = {"hold": reply[1]} if isinstance(reply[1], bytes) else {}
            return Started("expired", fields=fields, lost=tuple(int(k) for k in reply[2:]))
        if kind == "later":
            return Started("later", wait_ms=int(reply[1]))
        if kind == "done":
            return Started("done", status=_s(reply[1]) if len(reply) > 1 and reply[1] else "")
        return Started("gone")

    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        reply = await self._run("heartbeat", self._heartbeat, [self._stream(claim.tenant)],
                                [GROUP, claim.sid, consumer])
        return bool(int(reply))

    async def finish(self, claim: Claim, consumer: str, run: int, mode: FinishMode,
                     charge: Charge, run_info: Mapping[str, Any], *, result: Result | None = None,
                     grace_ms: int = 0, delay_ms: int = 0, visibility_ms: int = 0) -> Finished:
        args: list[Any] = [GROUP, claim.sid, consumer, run, mode, charge, _run_info(run_info)]
        if mode == "done":
            assert result is not None
            args += [result.status, result.code, orjson.dumps(dict(result.headers)), result.body,
                     grace_ms]
        else:
            args += [delay_ms, visibility_ms]
        reply = await self._run("finish", self._finish,
                                [self._stream(claim.tenant), self._entry(claim.tenant, claim.id)],
                                args)
        return Finished(bool(int(reply[0])), bool(int(reply[1])))

    async def cancel(self, tenant: str, entry_id: str) -> tuple[str, bytes | None]:
        return await self._cancel_or_expire(tenant, entry_id, "cancel", "")

    async def expire(self, tenant: str, entry_id: str, sid: str) -> tuple[str, bytes | None]:
        return await self._cancel_or_expire(tenant, entry_id, "expire", sid)

    async def _cancel_or_expire(self, tenant: str, entry_id: str, op: str, sid: str
                                ) -> tuple[str, bytes | None]:
        reply = await self._run(op, self._cancel,
                                [self._stream(tenant), self._entry(tenant, entry_id)],
                                [GROUP, op, sid])
        hold = reply[1] if len(reply) > 1 and isinstance(reply[1], bytes) else None
        return _s(reply[0]), hold

    async def get(self, tenant: str, entry_id: str) -> Fields | None:
        key, client = self._entry(tenant, entry_id), self._backend.client
        raw = await self._backend.call("deferred get", lambda: client.hgetall(key))
        if not raw:
            return None
        return {_s(k): v for k, v in cast("dict[bytes, bytes]", raw).items()}

    async def scan(self, tenant: str, head: int, *, forget_idle_ms: int = -1) -> Scan:
        reply = await self._run("scan", self._scan, [self._stream(tenant)],
                                [GROUP, head, forget_idle_ms])
        rows = tuple((_s(reply[i]), _s(reply[i + 1]), int(reply[i + 2]))
                     for i in range(2, len(reply) - 2, 3))
        return Scan(int(reply[0]), int(reply[1]), rows)


# --- one process -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    consumer: str
    since_ms: int  # idle since


@dataclass(slots=True)
class _Tenant:
    stream: OrderedDict[str, tuple[str, int]] = field(default_factory=OrderedDict)  # sid ->
    # (entry id, expires ms), in order; finished entries leave at once
    delivered: set[str] = field(default_factory=set)
    pending: dict[str, _Pending] = field(default_factory=dict)
    last_ms: int = 0
    seq: int = 0


class MemoryDeferredStore:
    """``DeferredStore`` in this process's memory, for the memory state backend.

    Not durable: entries are lost when the process stops, and other processes cannot see
    them. Same semantics as the Redis store otherwise (the conformance tests run both), with
    time from ``clock`` (epoch seconds).
    """

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._entries: dict[tuple[str, str], tuple[Fields, int]] = {}  # -> (fields, key expiry)

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _tenant(self, name: str) -> _Tenant:
        return self._tenants.setdefault(name, _Tenant())

    def _get(self, tenant: str, entry_id: str, now: int) -> Fields | None:
        found = self._entries.get((tenant, entry_id))
        if found is None:
            return None
        if found[1] <= now:
            del self._entries[(tenant, entry_id)]
            return None
        return found[0]

    def _drop(self, t: _Tenant, sid: str) -> None:
        t.stream.pop(sid, None)
        t.pending.pop(sid, None)
        t.delivered.discard(sid)

    def _sweep(self, now: int) -> None:  # from scan(): O(entries), every sweep interval
        for key in [k for k, (_, exp) in self._entries.items() if exp <= now]:
            del self._entries[key]

    async def submit(self, tenant: str, entry_id: str, fields: Mapping[str, bytes], *,
                     ttl_ms: int, grace_ms: int, max_queued: int) -> Submitted:
        now = self._now()
        t = self._tenant(tenant)
        if len(t.stream) >= max_queued:
            raise QueueFull(len(t.stream))
        if now > t.last_ms:
            t.last_ms, t.seq = now, 0
        else:
            t.seq += 1
        sid = f"{t.last_ms}-{t.seq}"
        expires = now + ttl_ms
        t.stream[sid] = (entry_id, expires)
        record: Fields = {"status": b"queued", "sid": sid.encode(), "created_ms": b"%d" % now,
                          "expires_ms": b"%d" % expires, "runs": b"0", "finished": b"0",
                          **fields}
        self._entries[(tenant, entry_id)] = (record, now + ttl_ms + grace_ms)
        return Submitted(len(t.stream), now, expires)

    async def claim(self, tenant: str, consumer: str, *, reclaim_idle_ms: int | None
                    ) -> Claim | None:
        t = self._tenants.get(tenant)
        if t is None:
            return None
        now = self._now()
        if reclaim_idle_ms is not None:
            for sid, p in t.pending.items():
                if now - p.since_ms >= reclaim_idle_ms:
                    t.pending[sid] = _Pending(consumer, now)
                    return Claim(tenant, t.stream[sid][0], sid, True)
        for sid, (entry_id, _) in t.stream.items():
            if sid not in t.delivered:
                t.delivered.add(sid)
                t.pending[sid] = _Pending(consumer, now)
                return Claim(tenant, entry_id, sid, False)
        return None

    async def release(self, claim: Claim, consumer: str, *, delay_ms: int,
                      visibility_ms: int) -> None:
        t = self._tenant(claim.tenant)
        if claim.sid in t.stream:
            idle = max(0, visibility_ms - delay_ms)
            t.pending[claim.sid] = _Pending(consumer, self._now() - idle)

    async def start(self, claim: Claim, consumer: str) -> Started:
        now = self._now()
        t = self._tenant(claim.tenant)
        record = self._get(claim.tenant, claim.id, now)
        if record is None:
            self._drop(t, claim.sid)
            return Started("gone")
        status = record["status"].decode()
        if status not in ("queued", "running") or record["sid"].decode() != claim.sid:
            self._drop(t, claim.sid)
            return Started("done", status=status)
        runs, finished = int(record["runs"]), int(record["finished"])
        lost = []
        for k in range(finished + 1, runs + 1):
            if f"charged:{k}" not in record:
                record[f"charged:{k}"] = b"reserved"
                lost.append(k)
        record["finished"] = b"%d" % runs
        if now >= int(record["expires_ms"]):
            record["status"], record["finished_ms"] = b"expired", b"%d" % now
            self._drop(t, claim.sid)
            return Started("expired", fields={"hold": record["hold"]}, lost=tuple(lost))
        not_before = int(record.get("not_before_ms", b"0"))
        if status == "queued" and not_before > now:
            return Started("later", wait_ms=not_before - now)
        runs += 1
        record.update({"status": b"running", "runs": b"%d" % runs, "finished": b"%d" % (runs - 1),
                       f"run:{runs}": orjson.dumps({"replica": consumer, "started_ms": now})})
        fields: Fields = {n: record[n] for n in ("hold", "route", "model", "body", "headers")
                          if n in record}
        return Started("run", runs, fields, tuple(lost))

    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        p = self._tenant(claim.tenant).pending.get(claim.sid)
        if p is None or p.consumer != consumer:
            return False
        p.since_ms = self._now()
        return True

    async def finish(self, claim: Claim, consumer: str, run: int, mode: FinishMode,
                     charge: Charge, run_info: Mapping[str, Any], *, result: Result | None = None,
                     grace_ms: int = 0, delay_ms: int = 0, visibility_ms: int = 0) -> Finished:
        now = self._now()
        t = self._tenant(claim.tenant)
        record = self._get(claim.tenant, claim.id, now)
        if record is None:
            self._drop(t, claim.sid)
            return Finished(False, charge != "none")
        status = record["status"].decode()
        current = status == "running" and int(record["runs"]) == run

        def back_to_queue(delay: int) -> None:
            record["status"], record["not_before_ms"] = b"queued", b"%d" % (now + delay)
            if claim.sid in t.stream:
                idle = max(0, visibility_ms - delay)
                t.pending[claim.sid] = _Pending(consumer, now - idle)

        if mode == "nocall":
            if current:
                record["runs"] = record["finished"] = b"%d" % (run - 1)
                record.pop(f"run:{run}", None)
                back_to_queue(delay_ms)
            return Finished(False, False)
        charged = False
        if charge != "none" and f"charged:{run}" not in record:
            record[f"charged:{run}"] = charge.encode()
            charged = True
        record[f"run:{run}"] = _run_info(run_info)
        if int(record["finished"]) < run:
            record["finished"] = b"%d" % run
        if mode == "retry":
            if current:
                back_to_queue(delay_ms)
            return Finished(False, charged)
        if status not in ("queued", "running"):
            return Finished(False, charged)
        assert result is not None
        record.update({"status": result.status.encode(), "code": b"%d" % result.code,
                       "rheaders": orjson.dumps(dict(result.headers)), "rbody": result.body,
                       "finished_ms": b"%d" % now})
        self._drop(t, claim.sid)
        fields, key_expiry = self._entries[(claim.tenant, claim.id)]
        self._entries[(claim.tenant, claim.id)] = (fields, max(key_expiry, now + grace_ms))
        return Finished(True, charged)

    async def cancel(self, tenant: str, entry_id: str) -> tuple[str, bytes | None]:
        return self._cancel_or_expire(tenant, entry_id, "cancel", "")

    async def expire(self, tenant: str, entry_id: str, sid: str) -> tuple[str, bytes | None]:
        return self._cancel_or_expire(tenant, entry_id, "expire", sid)

    def _cancel_or_expire(self, tenant: str, entry_id: str, op: str, sid: str
                          ) -> tuple[str, bytes | None]:
        now = self._now()
        t = self._tenant(tenant)
        record = self._get(tenant, entry_id, now)
        status = record["status"].decode() if record is not None else "missing"
        if op == "expire":
            if record is None or record["sid"].decode() != sid or \
                    status not in ("queued", "running"):
                self._drop(t, sid)
                return status, None
            if status != "queued" or now < int(record["expires_ms"]):
                return status, None
        elif record is None or status != "queued":
            return status, None
        assert record is not None
        new = "cancelled" if op == "cancel" else "expired"
        record["status"], record["finished_ms"] = new.encode(), b"%d" % now
        self._drop(t, record["sid"].decode())
        return new, record.get("hold")

    async def get(self, tenant: str, entry_id: str) -> Fields | None:
        record = self._get(tenant, entry_id, self._now())
        return dict(record) if record is not None else None

    async def scan(self, tenant: str, head: int, *, forget_idle_ms: int = -1) -> Scan:
        now = self._now()
        self._sweep(now)
        t = self._tenants.get(tenant)
        if t is None:
            return Scan(now, 0, ())
        rows = tuple((sid, eid, exp) for sid, (eid, exp) in list(t.stream.items())[:head])
        return Scan(now, len(t.stream), rows)


__all__ = [
    "Claim",
    "DeferredStore",
    "Finished",
    "MemoryDeferredStore",
    "QueueFull",
    "RedisDeferredStore",
    "Result",
    "Scan",
    "Started",
    "StateUnavailable",
    "Submitted",
    "create_store",
]
