"""``RedisDeferredStore``: the ``DeferredStore`` on Redis Streams (standalone or Cluster).

Kept apart from the contract (deferred/store.py) and the in-process store because it alone
knows the key layout and the Lua scripts; the lifecycle it implements is described there.

One stream per tenant with one consumer group (``gw``); every replica is a consumer named by
its replica id. An entry is a hash beside the stream, and the bytes the tenant's unfinished
entries hold one counter; all carry the tenant's hash tag (``dq:{t:<tenant>}:s``,
``dq:{t:<tenant>}:e:<id>`` and ``dq:{t:<tenant>}:b``), the same tag as the tenant's rate-limit
keys, so every script touches one Redis Cluster slot and tenants spread over the cluster.
Per-tenant streams also make fairness simple: workers take tenants in turn, whatever one
tenant has queued (gateway/deferred/service.py), and depth and age are per tenant by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import orjson

from gateway.state import SharedRedis, keys, load_lua

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

GROUP = "gw"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDeferredStore:
    """``DeferredStore`` on the state backend's Redis (standalone or Cluster), lent by the
    backend (``StateBackend.shared_redis``)."""

    name = "redis"

    def __init__(self, backend: SharedRedis) -> None:
        self._backend = backend
        client = backend.client
        self._prefix = backend.key_prefix
        self._submit = client.register_script(load_lua("deferred_submit.lua"))
        self._claim = client.register_script(load_lua("deferred_claim.lua"))
        self._start = client.register_script(load_lua("deferred_start.lua"))
        self._finish = client.register_script(load_lua("deferred_finish.lua"))
        self._heartbeat = client.register_script(load_lua("deferred_heartbeat.lua"))
        self._cancel = client.register_script(load_lua("deferred_cancel.lua"))
        self._scan = client.register_script(load_lua("deferred_scan.lua"))
        self._cursors: dict[str, str] = {}  # tenant -> XAUTOCLAIM cursor

    def _stream(self, tenant: str) -> str:
        return keys.deferred_stream(self._prefix, tenant)

    def _entry(self, tenant: str, entry_id: str) -> str:
        return keys.deferred_entry(self._prefix, tenant, entry_id)

    def _keys(self, tenant: str, entry_id: str) -> list[str]:
        """Stream, entry and byte counter: what every script that ends an entry touches."""
        return [self._stream(tenant), self._entry(tenant, entry_id),
                keys.deferred_bytes(self._prefix, tenant)]

    async def _run(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._backend.call(f"deferred {op}", lambda: script(keys=keys, args=args))

    async def submit(self, tenant: str, entry_id: str, fields: Mapping[str, bytes], *,
                     ttl_ms: int, grace_ms: int, max_queued: int,
                     max_bytes: int) -> Submitted:
        args: list[Any] = [GROUP, entry_id, max_queued, ttl_ms, grace_ms, entry_bytes(fields),
                           max_bytes]
        for name, value in fields.items():
            args += [name, value]
        reply = await self._run("submit", self._submit, self._keys(tenant, entry_id), args)
        if int(reply[0]) == 0:
            raise QueueFull(int(reply[1]), int(reply[2]) if len(reply) > 2 else None)
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
        reply = await self._run("start", self._start, self._keys(claim.tenant, claim.id),
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
        args: list[Any] = [GROUP, claim.sid, consumer, run, mode, charge,
                           encode_run_info(run_info)]
        if mode == "done":
            assert result is not None
            args += [result.status, result.code, orjson.dumps(dict(result.headers)), result.body,
                     grace_ms]
        else:
            args += [delay_ms, visibility_ms]
        reply = await self._run("finish", self._finish, self._keys(claim.tenant, claim.id),
                                args)
        return Finished(bool(int(reply[0])), bool(int(reply[1])))

    async def cancel(self, tenant: str, entry_id: str) -> tuple[str, bytes | None]:
        return await self._cancel_or_expire(tenant, entry_id, "cancel", "")

    async def expire(self, tenant: str, entry_id: str, sid: str) -> tuple[str, bytes | None]:
        return await self._cancel_or_expire(tenant, entry_id, "expire", sid)

    async def _cancel_or_expire(self, tenant: str, entry_id: str, op: str, sid: str
                                ) -> tuple[str, bytes | None]:
        reply = await self._run(op, self._cancel, self._keys(tenant, entry_id),
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
