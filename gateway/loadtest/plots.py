"""PNG plots of a report: latency and outcomes over time, per priority class, phases marked.

matplotlib is an optional extra (``pip install 'llm-gateway[plot]'``); everything else in the
load tester works without it. Four panels share the time axis:

1. latency of successes, p99 (solid) and p50 (dashed), per class, log scale;
2. time to first token p99 per class, log scale;
3. successful requests per second, per class, with the offered rate (all classes, grey);
4. refused or failed requests per second: shed (503), 429 and other errors, all classes.

Phase boundaries are dotted vertical lines with the phase names on top.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stats import OUTCOMES, class_order

if TYPE_CHECKING:  # matplotlib is optional (the plot extra); imported lazily in plot_report
    from matplotlib.axes import Axes

__all__ = ["PlotUnavailable", "plot_report"]

CLASS_COLORS = {"critical": "#d62728", "high": "#ff7f0e", "normal": "#1f77b4",
                "low": "#2ca02c", "default": "#9467bd"}
_FAILED = {"shed": ("shed (503 overloaded)", "#d62728"),
           "rate_limited": ("429 rate limited", "#ff7f0e"),
           "errors": ("other errors", "#7f7f7f")}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the PNG; raises ``PlotUnavailable`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "plots need matplotlib: pip install 'llm-gateway[plot]' (or pip install matplotlib)"
        ) from None

    timeline = report["timeline"]
    bucket = float(timeline["bucket_s"])
    classes = sorted(timeline["classes"], key=class_order)
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 3, 2]})
    lat_ax, ttft_ax, ok_ax, bad_ax = axes
    offered: dict[float, float] = {}
    failed = {key: {} for key in _FAILED}  # type: dict[str, dict[float, float]]
    for klass in classes:
        rows = timeline["classes"][klass]
        color = CLASS_COLORS.get(klass, "#8c564b")
        mid = [r["t"] + bucket / 2 for r in rows]
        _line(lat_ax, mid, [r["latency_ms"]["p99"] for r in rows], color, "-", f"{klass} p99")
        _line(lat_ax, mid, [r["latency_ms"]["p50"] for r in rows], color, "--", f"{klass} p50")
        _line(ttft_ax, mid, [r["ttft_ms"]["p99"] for r in rows], color, "-", f"{klass} p99")
        ok_ax.plot(mid, [r["outcomes"].get("ok", 0) / bucket for r in rows], color=color,
                   label=f"{klass} ok", linewidth=1.6)
        for t, r in zip(mid, rows):
            offered[t] = offered.get(t, 0.0) + r["started"] / bucket
            outs = r["outcomes"]
            for key in ("shed", "rate_limited"):
                failed[key][t] = failed[key].get(t, 0.0) + outs.get(key, 0) / bucket
            errors = sum(v for k, v in outs.items() if k not in ("ok", "shed", "rate_limited"))
            failed["errors"][t] = failed["errors"].get(t, 0.0) + errors / bucket
    times = sorted(offered)
    ok_ax.plot(times, [offered[t] for t in times], color="#555555", linestyle=":",
               linewidth=1.4, label="offered (all classes)")
    for key, (label, color) in _FAILED.items():
        series = failed[key]
        ts = sorted(series)
        if any(series.values()):
            bad_ax.plot(ts, [series[t] for t in ts], color=color, label=label, linewidth=1.6)

    lat_ax.set_ylabel("latency of successes (ms)")
    lat_ax.set_yscale("log")
    ttft_ax.set_ylabel("time to first token p99 (ms)")
    ttft_ax.set_yscale("log")
    ok_ax.set_ylabel("successful requests / s")
    bad_ax.set_ylabel("refused or failed / s")
    bad_ax.set_xlabel("time since start (s)")
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        _phases(ax, report["phases"], label=ax is lat_ax)
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    scenario = report["scenario"]["name"]
    fig.suptitle(f"loadtest {scenario} -> {report['target']} ({report['started_at']})",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _line(ax: Axes, xs: list[float], ys: list[float | None], color: str, style: str,
          label: str) -> None:
    # Missing buckets are NaN so the line breaks there instead of bridging the gap.
    values = [math.nan if y is None or y <= 0 else y for y in ys]
    if any(not math.isnan(v) for v in values):
        ax.plot(xs, values, color=color, linestyle=style, label=label,
                linewidth=1.5 if style == "-" else 1.1, marker="." if len(xs) < 30 else None)


def _phases(ax: Axes, phases: list[dict[str, Any]], *, label: bool) -> None:
    for phase in phases:
        ax.axvline(phase["start_s"], color="#333333", linestyle=":", linewidth=0.9)
        if label:
            ax.annotate(phase["name"], xy=(phase["start_s"], 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, 3), textcoords="offset points", fontsize=9, rotation=0,
                        va="bottom", ha="left", color="#333333")


assert "ok" in OUTCOMES  # the timeline rows use these names
