"""Open-loop arrival processes: when new runs start within one phase.

Every open-loop process is a Poisson process whose rate may vary with time, ``rate_at(t)``:

- ``poisson``: constant rate; ``constant``: the same rate, evenly spaced (no randomness);
- ``onoff``: ``rate`` for ``on_s``, then ``off_rate`` for ``off_s``, repeated (bursts);
- ``ramp``: linear from ``rate`` to ``to_rate`` over the phase;
- ``spike``: ``rate``, except ``spike_rate`` during ``[spike_at_s, spike_at_s + spike_s)``;
- ``diurnal``: ``rate * (1 - amplitude * cos(2 pi t / period_s))``, starting at the trough.

Time-varying rates are drawn by thinning (Lewis and Shedler): candidates at the peak rate,
each kept with probability ``rate_at(t) / peak``. Open loop means arrivals never wait for
answers, so a slow target builds queues exactly as it would in production; a closed loop
(``process: closed``) slows down with the target and hides them, which is why it must be asked
for explicitly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from .scenario import Arrival

__all__ = ["arrival_times", "expected_count", "peak_rate", "rate_at"]


def rate_at(arrival: Arrival, t: float, duration: float) -> float:
    """Runs per second the process offers ``t`` seconds into a phase of ``duration``."""
    p = arrival.process
    if p in ("poisson", "constant"):
        return arrival.rate
    if p == "onoff":
        return arrival.rate if t % (arrival.on_s + arrival.off_s) < arrival.on_s else \
            arrival.off_rate
    if p == "ramp":
        share = min(1.0, max(0.0, t / duration)) if duration > 0 else 0.0
        return arrival.rate + (arrival.to_rate - arrival.rate) * share
    if p == "spike":
        inside = arrival.spike_at_s <= t < arrival.spike_at_s + arrival.spike_s
        return arrival.spike_rate if inside else arrival.rate
    if p == "diurnal":
        return arrival.rate * (1 - arrival.amplitude * math.cos(2 * math.pi * t / arrival.period_s))
    return 0.0  # closed loop: no rate


def peak_rate(arrival: Arrival) -> float:
    """The highest rate the process reaches (the thinning envelope)."""
    p = arrival.process
    if p == "onoff":
        return max(arrival.rate, arrival.off_rate)
    if p == "ramp":
        return max(arrival.rate, arrival.to_rate)
    if p == "spike":
        return max(arrival.rate, arrival.spike_rate)
    if p == "diurnal":
        return arrival.rate * (1 + arrival.amplitude)
    return arrival.rate


def expected_count(arrival: Arrival, duration: float, step: float = 0.01) -> float:
    """The mean number of arrivals in a phase (numerical integral of ``rate_at``)."""
    if arrival.process == "closed":
        return 0.0
    n = max(1, math.ceil(duration / step))
    dt = duration / n
    return sum(rate_at(arrival, (i + 0.5) * dt, duration) for i in range(n)) * dt


def arrival_times(arrival: Arrival, duration: float, rng: random.Random) -> Iterator[float]:
    """Arrival offsets from the phase start, increasing, all below ``duration``."""
    if arrival.process == "closed":
        return
    if arrival.process == "constant":
        if arrival.rate <= 0:
            return
        gap = 1.0 / arrival.rate
        for i in range(math.ceil(duration * arrival.rate)):
            if i * gap < duration:
                yield i * gap
        return
    peak = peak_rate(arrival)
    if peak <= 0:
        return
    t = 0.0
    constant = arrival.process == "poisson"
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return
        if constant or rng.random() * peak < rate_at(arrival, t, duration):
            yield t
