"""The generator watching itself: is it, rather than the target, the bottleneck?

Three signals, all cheap:
- arrival lag: how late each open-loop arrival was dispatched after its scheduled time. A
  generator that keeps up dispatches within a millisecond or two; a growing lag means the
  offered load is lower (and burstier) than the scenario says;
- event-loop lag: a probe every ``probe_s`` measures how late the loop runs a due callback;
- CPU: this process's CPU time per wall second. Near 100 % of a core, latencies measured here
  include the generator's own queueing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .hist import Histogram

__all__ = ["Monitor"]

LAG_WARN_S = 0.010
CPU_WARN = 0.90


class Monitor:
    """Arrival lag, loop lag and CPU share of this process over a run."""

    def __init__(self, probe_s: float = 0.1) -> None:
        self.arrival_lag = Histogram()
        self.loop_lag = Histogram()
        self.cpu: list[tuple[float, float]] = []  # (seconds since start, CPU share)
        self.dropped_arrivals = 0
        self.current_lag_s = 0.0
        self._probe_s = probe_s

    def arrival(self, lag_s: float) -> None:
        self.arrival_lag.record(lag_s)
        self.current_lag_s = lag_s

    async def run(self, t0: float, every_s: float,
                  on_tick: Callable[[float], None]) -> None:
        """Probe until cancelled; ``on_tick(seconds since t0)`` runs every ``every_s``."""
        loop = asyncio.get_running_loop()
        last_wall, last_cpu = loop.time(), time.process_time()
        next_tick = t0 + every_s
        while True:
            due = loop.time() + self._probe_s
            await asyncio.sleep(self._probe_s)
            now = loop.time()
            self.loop_lag.record(max(0.0, now - due))
            if now >= next_tick:
                cpu = time.process_time()
                if now > last_wall:
                    self.cpu.append((round(now - t0, 3), round((cpu - last_cpu) / (now - last_wall), 3)))
                last_wall, last_cpu = now, cpu
                next_tick += every_s * max(1, int((now - next_tick) // every_s) + 1)
                on_tick(now - t0)

    def report(self) -> dict[str, Any]:
        """Figures and warnings for the report's ``engine`` section."""
        shares = [share for _, share in self.cpu]
        out: dict[str, Any] = {
            "arrival_lag_ms": self.arrival_lag.summary_ms(),
            "loop_lag_ms": self.loop_lag.summary_ms(),
            "cpu_share": {"mean": round(sum(shares) / len(shares), 3) if shares else None,
                          "max": max(shares) if shares else None},
            "dropped_arrivals": self.dropped_arrivals,
        }
        out["warnings"] = self.warnings(out)
        return out

    def warnings(self, figures: dict[str, Any]) -> list[str]:
        warnings = []
        lag = figures["arrival_lag_ms"]
        if lag["p99"] is not None and lag["p99"] > LAG_WARN_S * 1000:
            warnings.append(
                f"the load generator fell behind its schedule: arrival lag p99 {lag['p99']:.1f} ms, "
                f"max {lag['max']:.1f} ms; it, not the target, limited the offered load")
        loop_lag = figures["loop_lag_ms"]
        if loop_lag["p99"] is not None and loop_lag["p99"] > 5 * LAG_WARN_S * 1000:
            cpu = figures["cpu_share"]["mean"]
            why = ("" if cpu is None or cpu >= CPU_WARN else
                   f" while it used only {cpu:.0%} of a core on average: other processes on "
                   "this machine took the CPU")
            warnings.append(
                f"the load generator's event loop ran late (p99 {loop_lag['p99']:.0f} ms){why}; "
                "latencies include its own delay")
        busy = [t for t, share in self.cpu if share >= CPU_WARN]
        if busy:
            warnings.append(
                f"the load generator used >= {CPU_WARN:.0%} of a core for {len(busy)} "
                f"sample(s) (first at {busy[0]:.0f} s): run it on its own core, or lower the rate")
        if self.dropped_arrivals:
            warnings.append(f"{self.dropped_arrivals} arrivals were not sent: too many runs in "
                            "flight in the generator (max_in_flight_runs)")
        return warnings
