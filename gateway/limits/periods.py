"""Budget periods: UTC days and months, as key parts with their reset times."""

from __future__ import annotations

import datetime as dt

DAY_MS = 86_400_000


def period_keys(now_epoch_s: float) -> list[tuple[str, str, int, int]]:
    """``(period, key part, ms until it resets, key ttl ms)`` for the day and the month.

    The key TTL outlives the period by a day so a late settlement still finds its counter.
    """
    now = dt.datetime.fromtimestamp(now_epoch_s, dt.UTC)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (first + dt.timedelta(days=32)).replace(day=1)
    out = []
    for period, part, end in (
        ("daily", now.strftime("d:%Y%m%d"), tomorrow),
        ("monthly", now.strftime("m:%Y%m"), next_month),
    ):
        reset_ms = max(1, int((end - now).total_seconds() * 1000))
        out.append((period, part, reset_ms, reset_ms + DAY_MS))
    return out
