"""Latency histograms: a thin typed wrapper over the ``hdrhistogram`` package (HDR histograms).

HDR histograms keep every recorded value to a fixed relative precision (here 3 significant
digits, i.e. 0.1 %) over a wide range (1 microsecond to 1 hour) in constant memory, and two of
them add up exactly; percentiles from a sample or a sorted list would need every value kept.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from hdrh.histogram import HdrHistogram

__all__ = ["Histogram", "percentile_of_sorted"]

_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000  # one hour
_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class Histogram:
    """Durations in seconds, stored as microseconds.

    Percentiles are read in one pass over a copy of the counts (``itertools.accumulate`` and
    ``bisect`` run in C), and the mean and max are tracked here: the library's own iterators
    are pure Python and take milliseconds per query on a histogram this wide.
    """

    __slots__ = ("_count", "_h", "_max_us", "_sum_us")

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self._count = 0
        self._sum_us = 0
        self._max_us = 0

    def record(self, seconds: float) -> None:
        # Clamped: a value out of range would be dropped silently by the library.
        us = min(_HIGHEST_US, max(_LOWEST_US, int(seconds * 1e6)))
        self._h.record_value(us)
        self._count += 1
        self._sum_us += us
        self._max_us = max(self._max_us, us)

    @property
    def count(self) -> int:
        return self._count

    def percentiles_ms(self, qs: Sequence[float]) -> list[float | None]:
        """The ``qs``-th percentiles in milliseconds (None each when empty)."""
        if not self._count:
            return [None] * len(qs)
        h = self._h
        cumulative = list(itertools.accumulate(h.counts[:h.counts_len]))
        total = cumulative[-1]
        out: list[float | None] = []
        for q in qs:
            target = max(1, int(min(q, 100.0) * total / 100 + 0.5))
            index = min(bisect.bisect_left(cumulative, target), len(cumulative) - 1)
            value = h.get_highest_equivalent_value(h.get_value_from_index(index))
            out.append(min(float(value), float(self._max_us)) / 1000.0)
        return out

    def percentile_ms(self, q: float) -> float | None:
        """The ``q``-th percentile in milliseconds; None when empty."""
        return self.percentiles_ms((q,))[0]

    def summary_ms(self) -> dict[str, float | None]:
        """``{"p50": ms, "p90", "p99", "p99.9", "max", "mean"}`` (None values when empty)."""
        values = self.percentiles_ms(PERCENTILES)
        out: dict[str, float | None] = {f"p{q:g}": v for q, v in zip(PERCENTILES, values)}
        empty = not self._count
        out["max"] = None if empty else self._max_us / 1000.0
        out["mean"] = None if empty else round(self._sum_us / self._count / 1000.0, 3)
        return out

    def add(self, other: Histogram) -> None:
        if other._count:
            self._h.add(other._h)
            self._count += other._count
            self._sum_us += other._sum_us
            self._max_us = max(self._max_us, other._max_us)

    def encode(self) -> str:
        """The standard compressed base64 form (readable by every HdrHistogram library)."""
        encoded: bytes = self._h.encode()
        return encoded.decode("ascii")


def percentile_of_sorted(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not values:
        return None
    rank = max(1, min(len(values), round(q / 100.0 * len(values) + 0.5)))
    return values[rank - 1]
