"""The live view: progress while a test runs.

On a terminal it redraws a small block in place (plain ANSI: cursor up, clear to end) twice a
second; otherwise (CI logs, pipes) it prints one plain line every few seconds. No dependency:
the block is five lines of text, and ``rich`` would add a dependency for little more than
colours.

Shown: elapsed / total time and the phase; offered vs achieved rate over the last window;
requests in flight; successes, sheds (503 overloaded), 429s and other errors so far; p50/p99
latency of successes so far; a warning when the generator is falling behind its schedule.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from .engine import Engine
from .monitor import LAG_WARN_S
from .stats import OUTCOME_INDEX

__all__ = ["LiveView"]

_OK, _SHED, _429 = OUTCOME_INDEX["ok"], OUTCOME_INDEX["shed"], OUTCOME_INDEX["rate_limited"]


class LiveView:
    """Draws ``engine``'s counters until cancelled."""

    def __init__(self, engine: Engine, out: TextIO | None = None, *, tty: bool | None = None,
                 interval_s: float | None = None) -> None:
        self.engine = engine
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.interval_s = interval_s or (0.5 if self.tty else 5.0)
        self._drawn = 0
        self._last: tuple[float, int, int] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.draw(loop.time())
        finally:
            self.draw(loop.time())
            if self.tty and self._drawn:
                self.out.write("\n")
                self.out.flush()

    def lines(self, now: float) -> list[str]:
        e = self.engine
        live = e.live
        elapsed = max(0.0, now - e.t0) if e.t0 else 0.0
        done = sum(live.outcomes)
        ok = live.outcomes[_OK]
        window = (now, live.started, ok)
        offered = achieved = 0.0
        if self._last is not None and now > self._last[0]:
            span = now - self._last[0]
            offered = (live.started - self._last[1]) / span
            achieved = (ok - self._last[2]) / span
        self._last = window
        errors = done - ok - live.outcomes[_SHED] - live.outcomes[_429]
        p50 = live.latency.percentile_ms(50)
        p99 = live.latency.percentile_ms(99)
        total = e.scenario.duration_s
        lines = [
            f"[{elapsed:6.1f}/{total:.0f} s] phase {live.phase or '-'}",
            (f"  offered {offered:8.1f} req/s   achieved {achieved:8.1f} ok/s   "
             f"in flight {live.in_flight}"),
            (f"  ok {ok}   shed {live.outcomes[_SHED]}   429 {live.outcomes[_429]}   "
             f"errors {errors}   (started {live.started})"),
            f"  latency p50 {_ms(p50)}   p99 {_ms(p99)}",
        ]
        if e.monitor.current_lag_s > LAG_WARN_S:
            lines.append(f"  ! generator behind schedule by {e.monitor.current_lag_s * 1e3:.0f} ms")
        return lines

    def draw(self, now: float) -> None:
        lines = self.lines(now)
        if self.tty:
            erase = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            self.out.write(erase + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            self.out.write(" |".join(line.strip() for line in lines) + "\n")
        self.out.flush()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
