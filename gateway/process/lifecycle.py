"""``gateway serve`` in one process: graceful drain, hot reload, signals.

Drain, on SIGTERM (SIGINT: the same without the delay; a second signal skips to step 5):

1. ``/readyz`` answers 503 at once, and every response from now on says ``Connection: close``
   so pooled client connections move to other replicas;
2. the listener keeps accepting for ``server.drain_delay_s`` while load balancers catch up;
3. the listener closes, and idle keep-alive connections with it;
4. requests and streams in flight finish, for up to ``server.drain_timeout_s``;
5. whatever is still running then is ended properly: a stream gets an SSE error event in its
   dialect (code ``gateway_shutting_down``) and a clean end, a request not answered yet a 503;
6. pending settlements and the degraded-mode usage journal get what is left of
   ``drain_timeout_s`` to reach Redis; the app's cleanup writes what still has not to the
   journal file (``limits/journal.py``) for the next start to replay, and the process exits 0.

aiohttp's own shutdown (``AppRunner.cleanup``) closes the listener first and, after its
``shutdown_timeout``, cancels handlers with nothing sent to the client. Steps 1-2 and 4-5 are
why this module exists; by the time ``cleanup`` runs, no handler is left for it to cut.

Hot reload (SIGHUP, or a watched file changed): ``reload.Reloader``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import __version__
from gateway.app import GATEWAY, RECORD, admin, create_app
from gateway.config import GatewayConfig
from gateway.errors import Unavailable
from gateway.observability import WORKER_GROUP, WorkerGroup
from gateway.request import error_dialect

from .connections import raise_open_file_limit
from .heap import maintain_heap, tune_gc
from .reload import Reloader, Signature
from .runner import GatewayRunner

log = logging.getLogger("gateway")

CUT_GRACE_S = 5.0  # after the drain timeout: time for ended requests to write their last bytes
DRAIN_ERROR_CODE = "gateway_shutting_down"


# --- drain ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Flight:
    request: web.Request
    response: web.StreamResponse | None = None  # set once prepared (streams)
    cut: bool = False


class DrainGuard:
    """Tracks every request in flight so a drain can wait for them, and end the stragglers
    with a proper error rather than a cut connection. ``install`` adds it to an app."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._flights: dict[asyncio.Task[Any], _Flight] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @classmethod
    def install(cls, app: web.Application) -> DrainGuard:
        """Add the guard's middleware (inside the error boundary) and prepare hook."""
        guard = cls(app)

        @web.middleware
        async def drain_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await guard._track(request, handler)

        app.middlewares.append(drain_guard)
        app.on_response_prepare.append(guard._on_prepare)
        return guard

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        flight = _Flight(request)
        self._flights[task] = flight
        self._idle.clear()
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except asyncio.CancelledError:
            # Ours (flight.cut) and nobody else's: a client that left cancels too.
            if not flight.cut or task.uncancel() > 0:
                raise
            return await self._end_cut(request, flight)
        finally:
            del self._flights[task]
            if not self._flights:
                self._idle.set()

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        task = asyncio.current_task()
        flight = self._flights.get(task) if task is not None else None
        if flight is not None and flight.request is request:
            flight.response = response
        if self.draining:
            # Headers are not written yet: clients reconnect elsewhere for their next call.
            response.force_close()
            response.headers["Connection"] = "close"

    async def _end_cut(self, request: web.Request, flight: _Flight) -> web.StreamResponse:
        error = Unavailable(
            "The gateway is shutting down and this request did not finish within its "
            "drain timeout; retry it.", code=DRAIN_ERROR_CODE,
            headers={"Retry-After": "1"},
        )
        record = request.get(RECORD)
        if record is not None:
            record.outcome, record.error_code = "error", DRAIN_ERROR_CODE
        response = flight.response
        if response is None or not response.prepared:
            raise error  # the error boundary answers 503 in the route's dialect
        if response.content_type == "text/event-stream":
            try:
                await response.write(error.sse_event(error_dialect(request.path)))
            except (ConnectionError, RuntimeError):
                pass  # the client is gone as well
        try:
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response

    def cut_all(self) -> int:
        """End every request still in flight (each finishes with its error); how many."""
        count = 0
        for task, flight in list(self._flights.items()):
            if not flight.cut and not task.done():
                flight.cut = True
                task.cancel()
                count += 1
        return count

    async def drain(self, runner: web.AppRunner, sites: Iterable[web.BaseSite], *,
                    delay_s: float, timeout_s: float, force: asyncio.Event) -> None:
        """Steps 1-5 of the module docstring; ``force`` set skips the waiting."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.draining = True
        self._app[GATEWAY].ready = False
        log.info("draining: not ready, still accepting", extra={"fields": {
            "in_flight": self.in_flight, "drain_delay_s": delay_s,
            "drain_timeout_s": timeout_s}})
        await _wait(force, delay_s)
        for site in list(sites):
            await site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()  # idle keep-alives close; busy ones after the response
        log.info("draining: listener closed", extra={"fields": {"in_flight": self.in_flight}})
        if not await _wait_idle(self._idle, timeout_s, force):
            cut = self.cut_all()
            log.warning("drain timeout: ending what is still running", extra={"fields": {
                "ended": cut, "drain_timeout_s": timeout_s, "forced": force.is_set()}})
            await _wait_idle(self._idle, CUT_GRACE_S, None)
        log.info("drained", extra={"fields": {
            "seconds": round(loop.time() - began, 3), "in_flight": self.in_flight}})


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    if timeout_s > 0 and not event.is_set():
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass


async def _wait_idle(idle: asyncio.Event, timeout_s: float, force: asyncio.Event | None) -> bool:
    """True once idle; False at the timeout or when ``force`` is set first."""
    if idle.is_set():
        return True
    waits = [asyncio.ensure_future(idle.wait())]
    if force is not None:
        waits.append(asyncio.ensure_future(force.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
    return idle.is_set()


# --- the process -----------------------------------------------------------------------------


@dataclass(slots=True)
class ServeOptions:
    config_path: str
    prepare: Callable[[GatewayConfig], GatewayConfig]  # flags and environment over the file
    reuse_port: bool = False  # --workers: every worker binds the same port (SO_REUSEPORT)
    watch_interval_s: float = 1.0  # 0: no file watch (SIGHUP still reloads)
    parent_pid: int | None = None  # a worker drains when its parent is gone
    baseline: Signature | None = None  # files as they were when the config was read
    on_reload: list[Callable[[bool], None]] = field(default_factory=list)
    worker_group: WorkerGroup | None = None  # --workers N: /metrics and /admin/status merged


@dataclass(slots=True)
class _Stop:
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    force: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    def __call__(self, reason: str) -> None:
        if self.requested.is_set():
            if not self.force.is_set():
                log.warning("second stop signal: ending requests now", extra={"fields": {
                    "signal": reason}})
            self.force.set()
            return
        self.reason = reason
        self.requested.set()


async def run(config: GatewayConfig, options: ServeOptions) -> int:
    """Serve until a stop signal, drain, clean up; the process exit code."""
    app = create_app(config)
    group = options.worker_group
    if group is not None:
        app[WORKER_GROUP] = group
    guard = DrainGuard.install(app)
    # Handlers are all done by cleanup time (drain), so a short timeout only bounds stragglers.
    # keepalive_timeout 75 s (aiohttp: 3630 s): an idle or header-trickling connection holds
    # an fd; this bounds how long.
    raise_open_file_limit()  # before the connection caps are sized on it (process/connections.py)
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=CUT_GRACE_S, keepalive_timeout=75)
    await runner.setup()
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = _Stop()
    background: set[asyncio.Task[Any]] = set()
    try:
        if group is not None:  # before the port: a scrape may reach a sibling first
            gateway = app[GATEWAY]
            await group.start(gateway.metrics.registry, lambda: admin.status(gateway))
        host, port = config.server.host, config.server.port
        site = web.TCPSite(runner, host, port, reuse_port=True if options.reuse_port else None,
                           backlog=config.server.backlog)
        await site.start()
        gateway = app[GATEWAY]
        hooks = [gateway.metrics.config_reload, *options.on_reload]

        def reload_result(ok: bool) -> None:
            for hook in hooks:
                hook(ok)

        reloader = Reloader(app, options.config_path, prepare=options.prepare,
                            baseline=options.baseline, on_result=reload_result)

        def spawn(coro: Coroutine[Any, Any, object]) -> None:
            task = loop.create_task(coro)
            background.add(task)
            task.add_done_callback(background.discard)

        loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reloader.reload("SIGHUP")))
        if options.watch_interval_s > 0:
            spawn(reloader.watch(options.watch_interval_s, stop.requested))
        if options.parent_pid is not None:
            spawn(_watch_parent(options.parent_pid, stop))
        spawn(maintain_heap())
        log.info("gateway listening", extra={"fields": {
            "host": host, "port": port, "state_backend": config.state.backend,
            "version": __version__, "pid": os.getpid(), "reuse_port": options.reuse_port}})
        await stop.requested.wait()
        server = gateway.policy.config.server  # a reload may have changed the drain settings
        delay = 0.0 if stop.reason == "SIGINT" else server.drain_delay_s
        log.info("stop requested", extra={"fields": {"signal": stop.reason}})
        began = loop.time()
        await guard.drain(runner, [site], delay_s=delay, timeout_s=server.drain_timeout_s,
                          force=stop.force)
        left = 0.0 if stop.force.is_set() else delay + server.drain_timeout_s - (
            loop.time() - began)
        if not await gateway.flush_journal(max(0.0, left)):
            log.warning("draining: usage journal not flushed to Redis in time", extra={
                "fields": {"journaled": gateway.degraded.journal_size}})
    finally:
        for task in list(background):
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if group is not None:
            await group.close()
        await runner.cleanup()  # on_cleanup: Gateway.stop() flushes settlements and journal
    log.info("gateway stopped", extra={"fields": {"pid": os.getpid()}})
    return 0


async def _watch_parent(parent_pid: int, stop: _Stop) -> None:
    """A worker whose parent died (SIGKILL, OOM) drains instead of running on unsupervised."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    log.warning("parent process gone: draining", extra={"fields": {"parent_pid": parent_pid}})
    stop("parent exited")
