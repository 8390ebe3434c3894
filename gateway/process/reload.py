"""Hot reload of the policy, on SIGHUP and when the policy file (or a provider's key or CA
file) changes: the new file is loaded and validated off the event loop; if it is invalid, the reload is
rejected with one error log line and ``gateway_config_reloads_total{result="failure"}``, and
the running policy stays. A valid one goes through ``Gateway.swap_policy``: requests in flight
finish under the policy they started with, and the next request sees the new one. Files are
polled (stat of the path through its symlinks, plus the resolved target), which also catches
Kubernetes ConfigMap updates, done by swapping a ``..data`` symlink.

Kept apart from process/lifecycle.py (drain and the process): reloading touches files and the policy,
never the listener or requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from gateway.app import GATEWAY
from gateway.config import ConfigError, GatewayConfig, load_config

log = logging.getLogger("gateway")

RELOAD_SETTLE_S = 0.2  # a changed file is read this long after the change was seen
# Settings a running process cannot change (the listener, the app, the state backend): a
# reload keeps the running values and says a restart is needed.
RESTART_ONLY = (("server", "host"), ("server", "port"), ("server", "max_body_bytes"),
                ("server", "backlog"), ("server", "cors_origins"), ("server", "event_loop"),
                ("server", "metrics"), ("server", "metrics_need_admin_key"), ("state", None))

Signature = tuple[tuple[str | int | None, ...], ...]


def file_signature(paths: Iterable[str]) -> Signature:
    """What changes when a file is edited, replaced, or swapped in through a symlink."""
    out: list[tuple[str | int | None, ...]] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks: the file's own identity and contents
            out.append((path, os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns,
                        st.st_size))
        except OSError as exc:
            out.append((path, None, exc.errno))
    return tuple(out)


def watched_files(path: str, config: GatewayConfig | None) -> list[str]:
    """The policy file and the provider key and CA files it names (rotated Secrets reload
    too)."""
    files = [path]
    if config is not None:
        files += sorted({f for p in config.providers.values()
                         for f in (p.api_key_file, p.ca_file) if f})
    return files


def keep_running_settings(running: GatewayConfig,
                          new: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
    """``new`` with the settings only a restart can change taken from ``running``, and the
    names of those that differed."""
    changed: list[str] = []
    server_keep: dict[str, Any] = {}
    for section, key in RESTART_ONLY:
        if key is None:
            if getattr(running, section) != getattr(new, section):
                changed.append(section)
        elif getattr(running.server, key) != getattr(new.server, key):
            changed.append(f"{section}.{key}")
            server_keep[key] = getattr(running.server, key)
    if not changed:
        return new, []
    update: dict[str, Any] = {"server": new.server.model_copy(update=server_keep)}
    if "state" in changed:
        update["state"] = running.state
    return new.model_copy(update=update), changed


class Reloader:
    """Reloads the policy file into a running ``Gateway``; one reload at a time.

    ``prepare`` re-applies the process settings (flags, environment) to each loaded file;
    ``on_result(ok)`` is told how every reload ended (wired to the metrics).
    """

    def __init__(self, app: web.Application, path: str, *,
                 prepare: Callable[[GatewayConfig], GatewayConfig],
                 baseline: Signature | None = None,
                 on_result: Callable[[bool], None] | None = None) -> None:
        self._app = app
        self.path = path
        self._prepare = prepare
        self._on_result = on_result
        self._lock = asyncio.Lock()
        # ``baseline``: the policy file as it was before the process read it (a change made
        # since then is seen); files it does not cover (key files) are taken as they are now.
        before = {entry[0]: entry for entry in baseline or ()}
        self._seen = tuple(before.get(entry[0], entry) for entry in self._signature())

    def _running(self) -> GatewayConfig:
        return self._app[GATEWAY].policy.config

    def _signature(self) -> Signature:
        return file_signature(watched_files(self.path, self._running()))

    def changed(self) -> bool:
        return self._signature() != self._seen

    async def reload(self, trigger: str) -> bool:
        """Load, validate and swap in the policy file; False (old policy kept) if unusable."""
        async with self._lock:
            seen = self._signature()  # before reading: a change during the load is seen later
            fields: dict[str, Any] = {"trigger": trigger, "path": self.path}
            try:
                loaded = self._prepare(await asyncio.to_thread(load_config, self.path))
                config, restart = keep_running_settings(self._running(), loaded)
                await self._app[GATEWAY].swap_policy(config)
            except ConfigError as exc:
                return self._rejected(seen, fields, exc.problems)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old policy
                return self._rejected(seen, fields, [f"{type(exc).__name__}: {exc}"])
            # The new policy may name other key files: watch those from now on.
            same_files = [f[0] for f in seen] == watched_files(self.path, config)
            self._seen = seen if same_files else self._signature()
            if restart:
                log.warning("policy reload: these settings need a restart to take effect",
                            extra={"fields": {**fields, "settings": restart}})
            log.info("policy reload applied", extra={"fields": fields})
            self._report(True)
            return True

    def _rejected(self, seen: Signature, fields: dict[str, Any], problems: list[str]) -> bool:
        self._seen = seen  # the same broken file is not retried every second
        log.error("policy reload rejected: the running policy stays",
                  extra={"fields": {**fields, "problems": problems}})
        self._report(False)
        return False

    def _report(self, ok: bool) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(ok)
        except Exception:
            log.exception("reload result hook failed")

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        """Poll the files every ``interval_s`` until ``stop``; reload when they change."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set():
                return
            if self.changed():
                await asyncio.sleep(RELOAD_SETTLE_S)  # let a writer finish its steps
                await self.reload("file changed")
