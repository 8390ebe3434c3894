"""``MemoryDeferredStore``: the ``DeferredStore`` in one process's memory, for the memory state
backend (not durable: see the class).

Kept apart from the Redis store (deferred/store_redis.py) because it re-implements in Python
what the Lua scripts do there; the conformance tests (tests/contract/test_deferred_store.py) run both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.jsonbytes import dumps_kept

from .store import (
    Charge,
    Claim,
    Fields,
    Finished,
    FinishMode,
    QueueFull,
    Result,
    Scan,
    Started,
    Submitted,
    encode_run_info,
    entry_bytes,
)


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
    held_bytes: int = 0  # entry_bytes of the unfinished entries


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

    @staticmethod
    def _forget_request(t: _Tenant, record: Fields) -> None:
        """A final entry keeps its answer for ``result_grace_s``, not the request that made
        it: a tenant submitting and cancelling 5 MiB bodies (reserved as a few image tokens)
        held them for a day each, 216 MB from 28 cancels. Its bytes leave the tenant's."""
        record.pop("body", None)
        record.pop("headers", None)
        t.held_bytes = max(0, t.held_bytes - int(record.pop("size", b"0")))

    def _sweep(self, now: int) -> None:  # from scan(): O(entries), every sweep interval
        for key in [k for k, (_, exp) in self._entries.items() if exp <= now]:
            del self._entries[key]

    async def submit(self, tenant: str, entry_id: str, fields: Mapping[str, bytes], *,
                     ttl_ms: int, grace_ms: int, max_queued: int,
                     max_bytes: int) -> Submitted:
        now = self._now()
        t = self._tenant(tenant)
        if len(t.stream) >= max_queued:
            raise QueueFull(len(t.stream))
        size = entry_bytes(fields)
        if not t.stream:  # nothing queued holds nothing (a record gone before it ended)
            t.held_bytes = 0
        if t.held_bytes and t.held_bytes + size > max_bytes:
            raise QueueFull(len(t.stream), t.held_bytes)
        t.held_bytes += size
        if now > t.last_ms:
            t.last_ms, t.seq = now, 0
        else:
            t.seq += 1
        sid = f"{t.last_ms}-{t.seq}"
        expires = now + ttl_ms
        t.stream[sid] = (entry_id, expires)
        record: Fields = {"status": b"queued", "sid": sid.encode(), "created_ms": b"%d" % now,
                          "expires_ms": b"%d" % expires, "runs": b"0", "finished": b"0",
                          "size": b"%d" % size, **fields}
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
            self._forget_request(t, record)
            self._drop(t, claim.sid)
            return Started("expired", fields={"hold": record["hold"]}, lost=tuple(lost))
        not_before = int(record.get("not_before_ms", b"0"))
        if status == "queued" and not_before > now:
            return Started("later", wait_ms=not_before - now)
        runs += 1
        record.update({"status": b"running", "runs": b"%d" % runs, "finished": b"%d" % (runs - 1),
                       f"run:{runs}": dumps_kept({"replica": consumer, "started_ms": now})})
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
        record[f"run:{run}"] = encode_run_info(run_info)
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
                       "rheaders": dumps_kept(dict(result.headers)), "rbody": result.body,
                       "finished_ms": b"%d" % now})
        self._forget_request(t, record)
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
        self._forget_request(t, record)
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
