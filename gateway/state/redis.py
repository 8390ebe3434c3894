"""``RedisBackend``: the shared state store on ``redis.asyncio``, standalone or Cluster.

The URL scheme picks the topology, so one setting (the Redis URL) is all an operator
touches:

- ``redis://[user:password@]host:port[/db]``: one server, plain TCP.
- ``rediss://...``: the same over TLS; certificates are verified unless the URL says
  otherwise (redis-py's ``ssl_cert_reqs`` query parameter).
- ``redis+cluster://[user:password@]host:port,host:port,...``: Redis Cluster; the listed
  nodes are only seeds for topology discovery. ``rediss+cluster://`` for TLS, with a private
  CA and client certificates as in a ``rediss://`` URL: ``?ssl_ca_certs=...&ssl_certfile=...
  &ssl_keyfile=...``.

Failure behaviour, which is the point of this module: redis-py 8.1 defaults to 5 s socket
timeouts and 10 retries, so a hung server would stall a request for tens of seconds.
Here sockets time out after ``timeout_s``, there is at most one quick retry, and every
call additionally runs under an ``asyncio.timeout`` of ``2 * timeout_s`` in case
redis-py's own bookkeeping (retries, cluster re-discovery) takes longer. Every failure
surfaces as ``StateUnavailable`` with a short message that names the target but never
its credentials.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.state.base import StateUnavailable
from gateway.state.memory import check_ttl

from .plan import AdmitPlan, AdmitResult, SettlePlan, decode_admit, encode_admit, encode_settle

log = logging.getLogger(__name__)

T = TypeVar("T")

_STANDALONE_SCHEMES = ("redis", "rediss")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
ADMIT_BATCH_MAX = 128  # admissions per pipeline
# Only RedisClusterException sits outside RedisError; OSError covers socket errors and
# TimeoutError (asyncio.timeout's, too, on Python 3.11). AttributeError: redis-py 8.1's
# cluster client can write to a connection torn down under it when a node dies
# ("'NoneType' object has no attribute 'writelines'"); that too is the store failing.
_STORE_ERRORS = (RedisError, RedisClusterException, OSError, AttributeError)


def load_lua(name: str) -> str:
    """A script of gateway/state/lua, with each ``-- include X.lua`` line replaced by that file
    (shared helpers: Redis scripts cannot load each other)."""
    text = (resources.files("gateway.state") / "lua" / name).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: load_lua(m.group(1)), text)


_INCLUDE = re.compile(r"^-- include (\w+\.lua)$", re.MULTILINE)


def _quick_retry() -> Retry:
    # One retry after 10-50 ms: enough to ride over a reset pooled connection, short
    # enough that a dead server fails the request in well under a second.
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), 1)


class RedisBackend:
    """``StateBackend`` on Redis (standalone or Cluster, chosen by the URL scheme).

    Keys are stored as ``key_prefix + key``. The prefix must not contain ``{`` or ``}``
    so the caller's ``{hash tag}`` decides the Cluster slot. ``timeout_s`` bounds socket
    connect/read and the wait for a free pooled connection; a whole call is cut off at
    about ``2 * timeout_s``. ``max_connections`` caps the pool (standalone) or the calls
    in flight (Cluster, whose per-node pools raise instead of waiting when full).
    """

    name: str = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.25,
        max_connections: int = 64,
        key_prefix: str = "gw:",
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain '{' or '}' (it would break hash tags)")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        userinfo, _, hosts = parts.netloc.rpartition("@")
        self._target = f"{scheme}://{hosts}"  # for messages: no credentials, no query
        # Scrubbed from error messages; redis-py also reads a password from the query.
        self._password = unquote(userinfo.partition(":")[2]) or next(
            iter(parse_qs(parts.query).get("password", [])), ""
        )
        self._prefix = key_prefix
        self._deadline_s = 2 * timeout_s

        tls = {
            k: v
            for k, v in (
                ("ssl_ca_certs", ssl_ca_certs),
                ("ssl_certfile", ssl_certfile),
                ("ssl_keyfile", ssl_keyfile),
            )
            if v is not None
        }
        if tls and not scheme.startswith("rediss"):
            raise ValueError("ssl_* options need a rediss:// or rediss+cluster:// URL")
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": _quick_retry(),
            **tls,
        }

        self._client: Redis | RedisCluster
        # Cluster only: bounds calls in flight. RedisCluster's per-node pools raise
        # MaxConnectionsError when full instead of waiting like BlockingConnectionPool.
        self._gate: asyncio.Semaphore | None = None
        if scheme in _STANDALONE_SCHEMES:
            # No socket_timeout here: with one set, redis-py wraps every send in
            # asyncio.wait_for, a task per command (~30 us and a loop iteration). A hung or
            # slow server is cut off by the deadline every call runs under (``_call``), which
            # makes redis-py drop that connection.
            pool = BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout_s,
                **{**common, "socket_timeout": None},
            )
            self._client = Redis.from_pool(pool)  # the client owns and closes the pool
        elif scheme in _CLUSTER_SCHEMES:
            nodes, username, password, url_tls = _parse_cluster_url(url)
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                username=username,
                password=password,
                ssl=scheme == "rediss+cluster",
                max_connections=max_connections,
                **{**url_tls, **common},  # options given as arguments win over the URL's
            )
            self._gate = asyncio.Semaphore(max_connections)
        else:
            raise ValueError(
                f"unsupported Redis URL scheme {scheme!r}; use one of "
                + ", ".join(f"{s}://" for s in _STANDALONE_SCHEMES + _CLUSTER_SCHEMES)
            )
        # register_script makes no round trip; calls use EVALSHA and reload the script
        # on NOSCRIPT (e.g. after a Redis restart emptied the script cache).
        self._admit_script = self._client.register_script(load_lua("admit.lua"))
        self._settle_script = self._client.register_script(load_lua("settle.lua"))
        self._renew_script = self._client.register_script(load_lua("renew.lua"))
        self._closed = False
        # Admissions waiting for the one in flight to finish (``admit``: group commit).
        self._admit_busy = False
        self._admits: list[tuple[list[str], list[str | int | float], asyncio.Future[Any]]] = []
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def cluster(self) -> bool:
        """True when talking to a Redis Cluster (``redis+cluster://`` URL)."""
        return isinstance(self._client, RedisCluster)

    def shared_redis(self) -> RedisBackend:
        """Itself: stores of their own (deferred requests' streams and scripts) run on this
        client, every command through ``call`` (deadline + StateUnavailable)."""
        return self

    @property
    def client(self) -> Redis | RedisCluster:
        return self._client

    @property
    def key_prefix(self) -> str:
        return self._prefix

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``_call`` for other modules: one command under the deadline, failures mapped."""
        return await self._call(op, fn)

    def __repr__(self) -> str:
        return f"RedisBackend({self._target!r})"

    async def start(self) -> None:
        """Check the store answers. An unreachable store is logged, not fatal: the
        gateway starts degraded and every call retries the connection on its own."""
        if not await self.ping():
            log.warning("state store %s is not answering at startup", self._target)

    async def close(self) -> None:
        """Close all connections; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._client.aclose()
        except _STORE_ERRORS as exc:
            log.warning("closing %s: %s", self._target, self._describe(exc))

    async def ping(self) -> bool:
        """True when the store answers; on a Cluster, only when every primary does (a
        plain PING reaches one node and would hide a dead shard)."""
        client = self._client
        try:
            if isinstance(client, RedisCluster):
                reply = await self._call(
                    "ping", lambda: client.ping(target_nodes=RedisCluster.PRIMARIES)
                )
            else:
                reply = await self._call("ping", client.ping)
            return bool(reply)
        except Exception:  # noqa: BLE001 - contract: never raises; /readyz wants a bool
            return False

    async def get(self, key: str) -> bytes | None:
        k = self._prefix + key
        value = await self._call("get", lambda: self._client.get(k))
        return cast("bytes | None", value)  # decode_responses is off: never str

    async def set(
        self, key: str, value: bytes, ttl_ms: int, *, only_if_absent: bool = False
    ) -> bool:
        check_ttl(ttl_ms)
        k = self._prefix + key
        reply = await self._call(
            "set", lambda: self._client.set(k, value, px=ttl_ms, nx=only_if_absent)
        )
        return bool(reply)  # SET ... NX replies nil when the key already existed

    async def delete(self, key: str) -> bool:
        k = self._prefix + key
        return bool(await self._call("delete", lambda: self._client.delete(k)))

    async def ttl_ms(self, key: str) -> int | None:
        """Remaining TTL; None when missing. -1 for a key without expiry, which only a
        writer outside this API can create."""
        k = self._prefix + key
        pttl = int(await self._call("ttl_ms", lambda: self._client.pttl(k)))
        return None if pttl == -2 else pttl

    async def admit(self, plan: AdmitPlan) -> AdmitResult:
        """One atomic script run: every check of the plan, all applied or none.

        Standalone Redis, group commit: a request that finds no admission in flight sends its
        EVALSHA at once; those that arrive while one is out wait for it and then go together,
        as one pipeline (one round trip and one connection for all; each script still runs
        atomically on its own). Cluster: one call each (each tenant's keys live in their own
        slot)."""
        keys, args = encode_admit(plan, self._prefix)
        if self.cluster:
            reply = await self._call("admit", lambda: self._admit_script(keys=keys, args=args))
        elif self._admit_busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._admits.append((keys, args, future))
            reply = await future
        else:
            self._admit_busy = True
            try:
                reply = await self._call(
                    "admit", lambda: self._admit_script(keys=keys, args=args))
            finally:
                self._next_admits()
        return decode_admit(cast("list[int]", reply), len(plan.checks))

    def _next_admits(self) -> None:
        """The admission in flight is done: send those that queued meanwhile, or go idle."""
        if not self._admits:
            self._admit_busy = False
            return
        task = asyncio.get_running_loop().create_task(self._send_admits())
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send_admits(self) -> None:
        # At most ADMIT_BATCH_MAX per pipeline (well inside one call's deadline); the rest go
        # next, from the ``finally`` below.
        batch, self._admits = self._admits[:ADMIT_BATCH_MAX], self._admits[ADMIT_BATCH_MAX:]
        calls = [(keys, args) for keys, args, _ in batch]
        try:
            replies = await self._call(
                "admit", lambda: self._evalsha_pipeline(self._admit_script, calls))
        except BaseException as exc:  # StateUnavailable, or cancelled (shutdown)
            for _, _, future in batch:
                if not future.done():  # done: its request was cancelled meanwhile
                    future.set_exception(StateUnavailable(f"redis admit: {exc}"))
            if isinstance(exc, StateUnavailable):
                return
            raise
        finally:
            self._next_admits()
        for (_, _, future), reply in zip(batch, replies):
            if not future.done():
                future.set_result(reply)

    async def settle(self, plan: SettlePlan) -> bool:
        keys, args = encode_settle(plan, self._prefix)
        reply = await self._call("settle", lambda: self._settle_script(keys=keys, args=args))
        return bool(reply)

    async def settle_many(self, plans: Sequence[SettlePlan]) -> list[bool]:
        """Standalone Redis: one pipeline of EVALSHA calls (one round trip, not one each).
        Cluster: one call each, concurrently (each tenant's keys live in their own slot)."""
        if len(plans) == 1:  # awaited here: a task would send it an iteration later
            return [await self.settle(plans[0])]
        if self.cluster:
            return list(await asyncio.gather(*(self.settle(plan) for plan in plans)))
        encoded = [encode_settle(plan, self._prefix) for plan in plans]
        replies = await self._call(
            "settle", lambda: self._evalsha_pipeline(self._settle_script, encoded))
        return [bool(reply) for reply in replies]

    async def _evalsha_pipeline(self, script: AsyncScript,
                                calls: Sequence[tuple[list[str], list[str | int | float]]],
                                ) -> list[Any]:
        """``script`` once per (keys, args), pipelined. Calls that found the script missing
        (NOSCRIPT, e.g. after a restart emptied the cache) did not run: they are sent again
        once it is loaded. Any other error fails the whole batch."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            for i, reply in zip(todo, await pipe.execute(raise_on_error=False)):
                replies[i] = reply
            todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
            if not todo:
                break
            if attempt == 0:
                script.sha = await self._client.script_load(script.script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def renew_leases(self, key: str, members: list[str], ttl_ms: int) -> None:
        k = self._prefix + key
        await self._call("renew", lambda: self._renew_script(keys=[k], args=[ttl_ms, *members]))

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one command under the deadline, mapping every store failure.

        ``fn`` builds the coroutine only once we are inside the deadline (and the gate),
        so a call cut short never leaves an un-awaited coroutine behind.
        """
        try:
            async with asyncio.timeout(self._deadline_s):
                if self._gate is None:
                    return await fn()
                async with self._gate:
                    return await fn()
        except _STORE_ERRORS as exc:
            raise StateUnavailable(f"redis {op} on {self._target}: {self._describe(exc)}") from exc

    def _describe(self, exc: BaseException) -> str:
        if type(exc) is TimeoutError:  # ours, from asyncio.timeout: it carries no text
            return f"no answer within {self._deadline_s:g} s"
        text = str(exc)[:200]
        if self._password:
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# The query parameters a cluster URL may carry: redis-py's own names for them in a rediss:// URL.
_CLUSTER_TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None,
                                          dict[str, str]]:
    """Seed nodes, username, password and TLS files of
    ``redis+cluster://[u:p@]h:port,h:port[/0][?ssl_ca_certs=...&ssl_certfile=...]``.
    (redis-py's ``RedisCluster.from_url`` takes only one node, so the URL is parsed here.)"""
    parts = urlsplit(url)
    if parts.fragment or parts.path not in ("", "/", "/0"):
        raise ValueError("a cluster URL takes no database or path")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(_CLUSTER_TLS_PARAMS))
    if unknown:
        raise ValueError(f"a cluster URL takes only {', '.join(_CLUSTER_TLS_PARAMS)} as query "
                         f"parameters, not {', '.join(unknown)}")
    tls = {name: values[-1] for name, values in query.items()}
    if tls and parts.scheme.lower() != "rediss+cluster":
        raise ValueError("ssl_* parameters need a rediss+cluster:// URL")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster node {item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, username, password, tls
