"""JSON logs: one object per line on stderr, and one access line per request.

Nothing here reads request bodies or headers: callers pass only the fields they mean to log,
which is how prompt text and keys stay out of the logs by construction.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

ACCESS_LOGGER = "gateway.access"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``; fields come from ``extra={"fields": {}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger through one JSON handler (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours, in another format.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RefusalLog:
    """Access lines of refused requests at a bounded rate, per tenant and reason.

    A tenant hammering a limit at thousands of requests a second would otherwise write one
    ~1.3 KB line per refusal. Each (tenant, reason) gets a token bucket: ``burst`` full lines,
    then ``per_s`` a second; the rest are folded into counts that ``summary`` hands out (one
    line every ``summary_every_s``, see ``runtime.Gateway``). Metrics are not affected: they
    are recorded before the log line, for every request. ``per_s`` 0 logs every refusal.
    Time comes from ``clock`` (seconds).
    """

    MAX_KEYS = 10_000  # tenants are bounded by the policy, reasons by the code; a safety net

    def __init__(self, clock: Callable[[], float], per_s: float = 1.0, burst: int = 10,
                 summary_every_s: float = 60.0) -> None:
        self._clock = clock
        self.per_s = per_s
        self.burst = burst
        self.summary_every_s = summary_every_s
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)
        self._folded: dict[tuple[str, str], int] = {}
        self._since = clock()

    def allow(self, tenant: str | None, reason: str | None) -> bool:
        """True: log this refusal in full; False: it was folded into the next summary."""
        if self.per_s <= 0:
            return True
        key = (tenant or "-", reason or "-")
        now = self._clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        if tokens >= 1.0:
            if len(self._buckets) >= self.MAX_KEYS and key not in self._buckets:
                self._buckets.clear()  # full buckets again: at worst a burst more lines
            self._buckets[key] = (tokens - 1.0, now)
            return True
        self._buckets[key] = (tokens, now)
        self._folded[key] = self._folded.get(key, 0) + 1
        return False

    def summary(self, force: bool = False) -> dict[str, Any] | None:
        """The folded counts since the last summary, when one is due (or ``force``) and
        anything was folded; None otherwise."""
        now = self._clock()
        if not force and now - self._since < self.summary_every_s:
            return None
        folded, self._folded = self._folded, {}
        since, self._since = self._since, now
        if not folded:
            return None
        return {
            "folded": sum(folded.values()),
            "window_s": round(now - since, 3),
            "by_tenant_reason": [{"tenant": t, "reason": r, "count": n}
                                 for (t, r), n in sorted(folded.items())],
        }
