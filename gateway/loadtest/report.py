"""The report: one JSON document per run, a table for the terminal, and two runs compared.

Rates (``offered_rps``, ``achieved_rps``, ``goodput_rps``, tokens/s) are per second of the
phases' time; per phase, of that phase's time. Requests that runs still sent after the last
phase (the drain) are counted in the totals and shown as the ``(drain)`` phase. Latency and
time-to-first-token percentiles are of successful requests only, from HDR histograms, end to
end as the client saw them (client retries included). ``goodput`` counts successes whose
first token (the whole answer, when not streaming) came within the workload's ``deadline_s``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine import DRAIN_PHASE, Engine
from .stats import OUTCOMES, Group, RunRecord, class_order

__all__ = ["FORMAT", "build_report", "compare", "load_report", "render", "write_report"]

FORMAT = "gateway-loadtest/1"
_ERRORS = tuple(o for o in OUTCOMES if o not in ("ok", "shed", "rate_limited", "cancelled"))


def build_report(engine: Engine, *, source: str = "", command: str = "") -> dict[str, Any]:
    """Everything about one run, JSON-ready."""
    info = engine.report_info()
    rec = engine.recorder
    keys = rec.keys()
    active = info["active_s"]
    phases = []
    for phase in info["phases"]:
        length = min(phase["end_s"], active) - phase["start_s"]
        phases.append({**phase, "stats": _view(rec.group(phase=phase["name"]), length),
                       "classes": {k: _view(rec.group(phase=phase["name"], klass=k), length)
                                   for k in keys["classes"]}})
    if DRAIN_PHASE in keys["phases"]:
        length = max(0.0, info["ended_s"] - active)
        phases.append({"name": DRAIN_PHASE, "start_s": active, "end_s": info["ended_s"],
                       "stats": _view(rec.group(phase=DRAIN_PHASE), length),
                       "classes": {k: _view(rec.group(phase=DRAIN_PHASE, klass=k), length)
                                   for k in keys["classes"]}})
    report: dict[str, Any] = {
        "format": FORMAT,
        "scenario": {"name": engine.scenario.name, "description": engine.scenario.description,
                     "file": source},
        "command": command,
        "target": str(engine.url),
        "started_at": dt.datetime.fromtimestamp(info["started_at"], dt.UTC)
        .isoformat(timespec="seconds"),
        "duration_s": active,
        "drain_s": round(info["ended_s"] - active, 3),
        "interrupted": info["interrupted"],
        "max_requests_reached": info["max_requests_reached"],
        "attempts_sent": info["attempts_sent"],
        "overall": rec.group().to_dict(active, with_hdr=True),
        "classes": {k: rec.group(klass=k).to_dict(active, with_hdr=True)
                    for k in keys["classes"]},
        "tenants": {k: rec.group(tenant=k).to_dict(active) for k in keys["tenants"]},
        "workloads": {k: rec.group(workload=k).to_dict(active) for k in keys["workloads"]},
        "phases": phases,
        "timeline": rec.timeline.to_dict(),
        "engine": info["engine"],
        "hooks": info["hooks"],
        "runs": _runs_section(rec.run_spend),
    }
    if rec.requests is not None and rec.runs is not None:
        report["trace"] = {
            "requests": [_asdict(r) for r in rec.requests],
            "runs": [_asdict(r) for r in rec.runs],
        }
    return report


def _runs_section(runs: Sequence[RunRecord], top: int = 20) -> dict[str, Any]:
    """Each agent run's spend and end: per tenant and per workload (runs, completed, what
    stopped the failed ones, tokens spent, when they were stopped), and the biggest runs."""
    multi = [r for r in runs if r.steps > 1]

    def summary(group: list[RunRecord]) -> dict[str, Any]:
        tokens = sorted(r.tokens for r in group)
        stopped = [r for r in group if r.outcome == "failed"]
        codes: dict[str, int] = {}
        for r in stopped:
            codes[r.stopped_by or "other"] = codes.get(r.stopped_by or "other", 0) + 1
        return {
            "runs": len(group),
            "completed": sum(r.outcome == "completed" for r in group),
            "completion_ratio": round(sum(r.outcome == "completed" for r in group)
                                      / len(group), 4) if group else None,
            "stopped": codes,
            "tokens": sum(tokens),
            "tokens_per_run": {"p50": _middle(tokens), "max": tokens[-1] if tokens else None},
            "stopped_at_step_p50": _middle(sorted(r.steps_ok + 1 for r in stopped)),
            "stopped_after_s_p50": _middle(sorted(round(r.ended - r.started, 3)
                                                  for r in stopped)),
        }

    by: dict[str, dict[str, list[RunRecord]]] = {"tenants": {}, "workloads": {}}
    for r in multi:
        by["tenants"].setdefault(r.tenant, []).append(r)
        by["workloads"].setdefault(r.workload, []).append(r)
    biggest = sorted(multi, key=lambda r: r.tokens, reverse=True)[:top]
    return {
        "tenants": {k: summary(v) for k, v in by["tenants"].items()},
        "workloads": {k: summary(v) for k, v in by["workloads"].items()},
        "biggest": [{"run": r.run, "workload": r.workload, "tenant": r.tenant,
                     "tokens": r.tokens, "steps_ok": r.steps_ok, "steps": r.steps,
                     "started_s": round(r.started, 3), "ended_s": round(r.ended, 3),
                     "outcome": r.outcome, "stopped_by": r.stopped_by} for r in biggest],
    }


def _middle(ordered: Sequence[float]) -> float | None:
    return ordered[len(ordered) // 2] if ordered else None


def _view(group: Group, seconds: float) -> dict[str, Any]:
    return group.to_dict(max(seconds, 1e-9))


def _asdict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def load_report(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gateway loadtest report ({FORMAT})")
    return data


# --- terminal tables -------------------------------------------------------------------------

_COLUMNS = ("", "requests", "offered/s", "ok/s", "ok %", "shed", "429", "errors",
            "p50 ms", "p99 ms", "ttft p99", "goodput/s", "runs ok", "ampl")


def _row(name: str, s: dict[str, Any]) -> list[str]:
    out = s["outcomes"]
    runs = s["runs"]
    runs_text = "-" if not runs["started"] else (
        f"{runs['completed']}/{runs['started']}")
    return [
        name, str(s["requests"]), _num(s["offered_rps"]), _num(s["achieved_rps"]),
        _pct(s["success_ratio"]), str(out["shed"]), str(out["rate_limited"]),
        str(sum(out[k] for k in _ERRORS)), _num(s["latency_ms"]["p50"]),
        _num(s["latency_ms"]["p99"]), _num(s["ttft_ms"]["p99"]), _num(s["goodput_rps"]),
        runs_text, _num(s["amplification"], 2),
    ]


def _num(value: float | None, digits: int | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = _COLUMNS) -> str:
    """Columns right-aligned (the first left-aligned), two spaces apart."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    return "\n".join([line(header), *(line(r) for r in rows)])


def render(report: dict[str, Any]) -> str:
    """The report as text for the terminal."""
    head = (f"{report['scenario']['name']} -> {report['target']}: "
            f"{report['duration_s']:.1f} s of phases + {report['drain_s']:.1f} s drain, "
            f"{report['attempts_sent']} HTTP requests sent"
            + (" (INTERRUPTED)" if report["interrupted"] else "")
            + (" (max_requests reached)" if report["max_requests_reached"] else ""))
    cancelled = report["overall"]["outcomes"]["cancelled"]
    if cancelled:
        head += f"; {cancelled} requests still in flight at the end were cancelled"
    rows = [_row("overall", report["overall"])]
    rows += [_row(f"  class {k}", v) for k, v in
             sorted(report["classes"].items(), key=lambda kv: class_order(kv[0]))]
    if len(report["tenants"]) > 1:
        rows += [_row(f"  tenant {k}", v) for k, v in report["tenants"].items()]
    rows += [_row(f"  phase {p['name']}", p["stats"]) for p in report["phases"]]
    lines = [head, "", table(rows), ""]
    lines.append("ok/s, offered/s, goodput/s: per second of phase time; p50/p99: latency of "
                 "successes (client view, retries included); ttft p99: time to first token; "
                 "errors: every outcome but ok, shed (503 overloaded), 429 and cancelled; runs ok: "
                 "agent runs completed/started; ampl: HTTP attempts per request.")
    engine = report["engine"]
    lag = engine["arrival_lag_ms"]
    cpu = engine["cpu_share"]["mean"]
    lines.append(f"generator: arrival lag p50 {_num(lag['p50'], 2)} ms, p99 {_num(lag['p99'], 2)}"
                 f" ms; CPU {'-' if cpu is None else f'{100 * cpu:.0f} %'} of a core")
    for hook in report["hooks"]:
        status = hook.get("skipped") or f"exit {hook.get('exit_status')}"
        if hook_failed(hook):
            last = (hook.get("output") or "").strip().splitlines()[-1:] or [""]
            status = ("timed out" if hook.get("timed_out") else status) + \
                f": FAILED, the phase ran without it ({last[0][:200]})"
        lines.append(f"hook at {hook['at_s']:.1f} s ({hook['phase']}): {status}")
    lines += [f"WARNING: {w}" for w in engine["warnings"]]
    lines += _render_runs(report.get("runs") or {})
    return "\n".join(lines)


def hook_failed(hook: dict[str, Any]) -> bool:
    """A hook that ran and did not exit 0 (or timed out): its phase's fault did not happen
    as planned (a shell loop passed as one word, a stop command that failed)."""
    return not hook.get("skipped") and hook.get("exit_status") != 0


def _render_runs(runs: dict[str, Any]) -> list[str]:
    """Agent runs: what each tenant and workload spent, and when failed runs were stopped."""
    if not runs.get("workloads"):
        return []
    header = ("agent runs", "runs", "completed %", "tokens", "tokens/run p50", "max",
              "stopped", "at step p50", "after s p50")
    rows = []
    for kind in ("tenants", "workloads"):
        for name, s in runs[kind].items():
            stopped = ", ".join(f"{k} {v}" for k, v in sorted(s["stopped"].items())) or "-"
            rows.append([f"{kind[:-1]} {name}", str(s["runs"]), _pct(s["completion_ratio"]),
                         str(s["tokens"]), _num(s["tokens_per_run"]["p50"]),
                         _num(s["tokens_per_run"]["max"]), stopped,
                         _num(s["stopped_at_step_p50"]), _num(s["stopped_after_s_p50"])])
    lines = ["", table(rows, header), "", "biggest runs (tokens spent; when each ended):"]
    big = ("run", "workload", "tenant", "tokens", "steps ok", "started s", "ended s", "end")
    lines.append(table([[str(r["run"]), r["workload"], r["tenant"], str(r["tokens"]),
                         f"{r['steps_ok']}/{r['steps']}", f"{r['started_s']:.1f}",
                         f"{r['ended_s']:.1f}",
                         r["stopped_by"] or r["outcome"]] for r in runs["biggest"][:10]], big))
    return lines


# --- two runs side by side -------------------------------------------------------------------

_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("requests", ("requests",)),
    ("offered/s", ("offered_rps",)),
    ("ok/s", ("achieved_rps",)),
    ("success %", ("success_ratio",)),
    ("shed", ("outcomes", "shed")),
    ("429", ("outcomes", "rate_limited")),
    ("goodput/s", ("goodput_rps",)),
    ("latency p50 ms", ("latency_ms", "p50")),
    ("latency p99 ms", ("latency_ms", "p99")),
    ("ttft p99 ms", ("ttft_ms", "p99")),
    ("runs completed %", ("runs", "completion_ratio")),
    ("amplification", ("amplification",)),
)


def _dig(stats: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = stats
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """Two reports side by side: overall, then each class either has."""
    groups = [("overall", a["overall"], b["overall"])]
    for klass in sorted(set(a["classes"]) | set(b["classes"]), key=class_order):
        groups.append((f"class {klass}", a["classes"].get(klass, {}), b["classes"].get(klass, {})))
    rows: list[list[str]] = []
    for title, sa, sb in groups:
        rows.append([title, "", "", ""])
        for label, path in _METRICS:
            va, vb = _dig(sa, path), _dig(sb, path)
            pct = path[-1] in ("success_ratio", "completion_ratio")
            scale = 100.0 if pct else 1.0
            fa = _num(None if va is None else va * scale)
            fb = _num(None if vb is None else vb * scale)
            delta = "-" if va is None or vb is None else f"{(vb - va) * scale:+.1f}"
            rows.append([f"  {label}", fa, fb, delta])
    head = [f"A: {a['scenario']['name']} {a['started_at']} -> {a['target']}",
            f"B: {b['scenario']['name']} {b['started_at']} -> {b['target']}", ""]
    return "\n".join(head) + table(rows, ("", names[0], names[1], "B - A"))
