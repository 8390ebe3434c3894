"""Figures, targets and the docs/benchmarks.md section of bench/overload.py."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from critical_bound import wait_p99

TARGETS = (
    ("goodput_3x", "3x: goodput >= 90 % of capacity"),
    ("critical_success_3x", "3x: critical success >= 99.5 %"),
    ("critical_ttft_3x", "3x: critical TTFT p99 <= 1.25 x unloaded p99 (of `on`) + 50 ms"),
    ("runs_2x", "2x: >= 50 % of 10-step agent runs complete"),
    ("alive_10x", "10x: no crash (gateway alive and ready after)"),
    ("goodput_10x", "10x: goodput >= 80 % of capacity"),
    ("critical_success_10x", "10x: critical success >= 98 %"),
    ("memory_flat", "memory flat (RSS end - start < 50 MiB, peak < 2x start)"),
)


def _phase(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in report["phases"] if p["name"] == name), None)


def _completed_in(report: dict[str, Any], phase: dict[str, Any]) -> tuple[float, float]:
    """(ok/s, goodput/s) of requests that *ended* inside the phase, from the timeline: the
    throughput the upstream delivered then, whatever queued before or after."""
    timeline = report["timeline"]
    bucket = timeline["bucket_s"]
    ok = good = 0
    for rows in timeline["classes"].values():
        for row in rows:
            if phase["start_s"] <= row["t"] and row["t"] + bucket <= phase["end_s"] + 1e-6:
                ok += row["outcomes"].get("ok", 0)
                good += row["good"]
    seconds = phase["end_s"] - phase["start_s"]
    return ok / seconds, good / seconds


def _mean_rate(arrival: dict[str, Any]) -> float:
    """Runs per second a phase's arrival process starts on average (on/off: the on share).
    The report leaves out fields at their defaults (gateway/loadtest/scenario.py)."""
    if arrival["process"] == "onoff":
        on, off = float(arrival.get("on_s", 1.0)), float(arrival.get("off_s", 4.0))
        rate, off_rate = float(arrival["rate"]), float(arrival.get("off_rate", 0.0))
        return (rate * on + off_rate * off) / (on + off)
    return float(arrival["rate"])


def _runs_under_load(report: dict[str, Any], name: str) -> tuple[int, int]:
    """(completed, started) of the runs that started while the level's load ran: its warm-up,
    measured window and tail. The window alone is skewed by the warm-up: runs admitted into an
    idle gateway take the window's capacity to finish, so the window's own runs look worse
    than the policy is, and the warm-up's better."""
    done = started = 0
    for phase in report["phases"]:
        if phase["name"] in (f"{name}-warm", name, f"{name}-tail"):
            done += phase["stats"]["runs"]["completed"]
            started += phase["stats"]["runs"]["started"]
    return done, started


def _level(report: dict[str, Any], phase: dict[str, Any], capacity: float,
           steps: int, hard: bool) -> dict[str, Any]:
    """One level's figures. ``hard``: the capacity is a ceiling (slots), so bounds follow from
    it; a quota is not one (the mock's window lets a burst past its per-second average)."""
    stats = phase["stats"]
    ok_rps, good_rps = _completed_in(report, phase)
    crit = phase["classes"].get("critical", {})
    runs = stats["runs"]
    outcomes = stats["outcomes"]
    out = {
        "requests": stats["requests"],
        "offered_rps": stats["offered_rps"],
        "ok_rps": ok_rps,
        "goodput_rps": good_rps,
        "goodput_share": good_rps / capacity if capacity else None,
        "shed": outcomes["shed"], "rate_limited": outcomes["rate_limited"],
        "deadline": outcomes["deadline"],
        "other_errors": sum(v for k, v in outcomes.items()
                            if k not in ("ok", "shed", "rate_limited", "deadline")),
        "amplification": stats["amplification"],
        "critical_success": crit.get("success_ratio"),
        "critical_requests": crit.get("requests", 0),
        # Critical's own load against the upstream: at 10x it is 1x by construction (10 % of
        # the runs), so above 1 no policy serves all of it (see the 10x critical target).
        "critical_offered_share": (crit.get("offered_rps", 0.0) / capacity
                                   if capacity else None),
        "capacity_is_ceiling": hard,
        "critical_ttft_p99_ms": (crit.get("ttft_ms") or {}).get("p99"),
        "runs_started": runs["started"], "runs_completed": runs["completed"],
        "runs_unfinished": runs["unfinished"],
        "runs_share": runs["completed"] / runs["started"] if runs["started"] else None,
        # No policy completes more runs over time than the upstream serves steps for: capacity
        # / (steps x runs arriving per second). A window can pass it (see _targets).
        "runs_bound": (min(1.0, capacity / (steps * _mean_rate(phase["arrival"])))
                       if capacity and hard else None),
        "runs_under_load": _runs_under_load(report, phase["name"]),
        "classes": {k: {"success": v["success_ratio"], "requests": v["requests"],
                        "ttft_p99_ms": v["ttft_ms"]["p99"],
                        "runs": f"{v['runs']['completed']}/{v['runs']['started']}"}
                    for k, v in phase["classes"].items()},
    }
    return out


def evaluate(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per variant: capacity, baseline, each level's figures, memory, targets met."""
    out: dict[str, Any] = {"setup": {
        "slots": args.slots, "ttft_ms": args.ttft_ms, "ttft_p99_ms": args.ttft_p99_ms,
        "tokens": args.tokens,
        "gap_ms": args.gap_ms, "max_queue": args.max_queue, "queue_ttft_ms": args.queue_ttft_ms,
        "quota_rpm": args.quota_rpm, "quota_only": args.quota_only,
        "tuned_slots": args.tuned_slots, "levels": args.levels, "measure_s": args.measure_s,
        "off_mode": args.off_mode, "holdback": args.holdback, "steps": args.steps},
        "variants": {}}
    for res in results:
        report, cap = res["report"], res["capacity_rps"]
        base = _phase(report, "unloaded")
        base_crit = base["classes"].get("critical", {}) if base else {}
        base_p99 = (base_crit.get("ttft_ms") or {}).get("p99")
        levels = {}
        for level in args.levels:
            phase = _phase(report, f"{level:g}x")
            if phase is not None:
                levels[f"{level:g}x"] = _level(report, phase, cap, args.steps,
                                               hard=not args.quota_only)
        rss = [kib for _, kib in res["rss_kib"]]
        memory = {"start_mib": rss[0] / 1024, "peak_mib": max(rss) / 1024,
                  "end_mib": rss[-1] / 1024} if rss else {}
        variant = {"mode": res["mode"], "capacity_rps": cap,
                   "planned_capacity_rps": res["planned_capacity_rps"],
                   "unloaded_critical_ttft_p99_ms": base_p99,
                   "unloaded_critical_requests": base_crit.get("requests", 0),
                   "levels": levels, "memory": memory, "alive": res["alive"],
                   "healthy": res["healthy"], "mock": res["mock"],
                   "engine_warnings": report["engine"]["warnings"],
                   "attempts_sent": report["attempts_sent"]}
        out["variants"][res["variant"]] = variant
    # The TTFT target is against the upstream's own unloaded p99. The tuned run measures it
    # best (its limit is the upstream's slots from the start); the others' unloaded phase can
    # include the gateway's own start-up (a default limit still growing), which would loosen
    # their target. So every variant is held to the tuned run's figure when there is one.
    on = out["variants"].get("on")
    reference = on["unloaded_critical_ttft_p99_ms"] if on else None
    for variant in out["variants"].values():
        variant["ttft_reference_ms"] = reference or variant["unloaded_critical_ttft_p99_ms"]
        variant["critical_wait_p99_ms"] = _critical_wait_bound(variant, args)
        variant["targets"] = _targets(variant, args.ttft_ms)
    out["ratios"] = _ratios(out["variants"], args.levels)
    return out


def _ratios(variants: dict[str, Any], levels: list[float]) -> dict[str, Any]:
    """``defaults`` against ``on`` in the same run: goodput (requests/s) at each level, target
    >= 95 %. The share of capacity alone hides a gap: capacity comes from the mock's counters,
    which fall when its queue overflows."""
    on, dflt = variants.get("on"), variants.get("defaults")
    if on is None or dflt is None:
        return {}
    out = {}
    for level in levels:
        name = f"{level:g}x"
        a, b = on["levels"].get(name), dflt["levels"].get(name)
        if a and b and a["goodput_rps"]:
            ratio = b["goodput_rps"] / a["goodput_rps"]
            out[name] = {"on_rps": a["goodput_rps"], "defaults_rps": b["goodput_rps"],
                         "ratio": ratio, "met": ratio >= 0.95}
    return out


def ratio_table(figures: dict[str, Any]) -> list[list[str]]:
    rows = [["level", "goodput on (req/s)", "goodput defaults (req/s)",
             "defaults / on (target >= 95 %)"]]
    for level, r in figures.get("ratios", {}).items():
        rows.append([level, f"{r['on_rps']:.1f}", f"{r['defaults_rps']:.1f}",
                     f"{'met' if r['met'] else 'MISSED'}: {100 * r['ratio']:.0f} %"])
    return rows


def _critical_wait_bound(v: dict[str, Any], args: argparse.Namespace) -> float | None:
    """The least p99 wait for a slot of critical at 3x with every slot of the upstream its own
    (bench/critical_bound.py: an M/D/c queue of Poisson arrivals). The benchmark's runs of
    back-to-back steps bunch more: simulated as runs at 4 slots and 5.4 critical requests a
    second they wait 193 ms at p99 where Poisson arrivals wait 146 ms. None when slots are
    unlimited."""
    l3 = v["levels"].get("3x")
    if args.quota_only or not l3 or not v["capacity_rps"]:
        return None
    rate = (l3["critical_offered_share"] or 0.0) * v["capacity_rps"]
    if rate <= 0:
        return None
    service_s = args.slots / v["capacity_rps"]  # the measured time a call holds a slot
    # The success target lets a policy shed 0.5 % of critical, the longest waits at best, and
    # the p99 of the rest is then the 98.5th percentile of all (0.99 x 0.995).
    wait, _ = wait_p99(rate, service_s, args.slots, arrivals=200_000, seed=1, quantile=0.985)
    return 1000 * wait


def _targets(v: dict[str, Any], first_token_ms: float) -> dict[str, dict[str, Any]]:
    lv = v["levels"]
    l2, l3, l10 = lv.get("2x", {}), lv.get("3x", {}), lv.get("10x", {})
    base = v["ttft_reference_ms"]
    limit = None if base is None else 1.25 * base + 50
    mem = v["memory"]

    def check(value: float | None, ok: bool | None, shown: str,
              reachable: bool = True) -> dict[str, Any]:
        """``reachable``: False when a bound no policy can beat is short of the target."""
        return {"value": value, "met": bool(ok) if value is not None else None, "shown": shown,
                "reachable": reachable}

    g3, g10 = l3.get("goodput_share"), l10.get("goodput_share")
    c3, t3, r2 = l3.get("critical_success"), l3.get("critical_ttft_p99_ms"), l2.get("runs_share")
    c10 = l10.get("critical_success")
    growth = mem["end_mib"] - mem["start_mib"] if mem else None
    # The one bound no admission policy beats: critical's own wait for a slot (None: not
    # computed, counted as reachable). The runs and 10x critical figures are shown beside
    # their long-run ceilings, capacity / demand, but those bind no 15 s window: runs started
    # in it finish in the tail while new ones are shed, and critical requests queued at the
    # end of 10x are served in the quiet gap after it.
    wait = v.get("critical_wait_p99_ms")
    ttft_floor = None if wait is None else first_token_ms + wait  # p99(x + y) >= min x + p99 y
    runs_bound = l2.get("runs_bound")
    under = l2.get("runs_under_load") or (0, 0)
    offered10 = l10.get("critical_offered_share")
    crit_bound = (min(1.0, 1 / offered10)
                  if offered10 and l10.get("capacity_is_ceiling") else None)
    return {
        "goodput_3x": check(g3, g3 is not None and g3 >= 0.9, _pct(g3)),
        "critical_success_3x": check(c3, c3 is not None and c3 >= 0.995, _pct(c3, 2)),
        "critical_ttft_3x": check(
            t3, t3 is not None and limit is not None and t3 <= limit,
            f"{_ms(t3)} (limit {_ms(limit)}"
            + ("" if ttft_floor is None else
               f"; critical alone on every slot: p99 >= {_ms(ttft_floor)}")
            + ")",
            reachable=ttft_floor is None or limit is None or ttft_floor <= limit),
        "runs_2x": check(
            r2, r2 is not None and r2 >= 0.5,
            f"{_pct(r2)} ("
            + ("" if runs_bound is None else f"long-run ceiling {_pct(runs_bound)}; ")
            + f"warm-up to tail {_pct(under[0] / under[1] if under[1] else None)})"),
        "alive_10x": check(1.0 if v["healthy"] else 0.0, v["healthy"],
                           "yes" if v["healthy"] else "NO"),
        "goodput_10x": check(g10, g10 is not None and g10 >= 0.8, _pct(g10)),
        "critical_success_10x": check(
            c10, c10 is not None and c10 >= 0.98,
            f"{_pct(c10, 2)} (critical offered {_pct(offered10, 0)} of capacity"
            + ("" if crit_bound is None else f": long-run ceiling {_pct(crit_bound)}") + ")"),
        "memory_flat": check(growth, growth is not None and growth < 50
                             and mem["peak_mib"] < 2 * mem["start_mib"],
                             "-" if not mem else f"{mem['start_mib']:.0f} -> peak "
                             f"{mem['peak_mib']:.0f} -> {mem['end_mib']:.0f} MiB"),
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def level_table(figures: dict[str, Any]) -> list[list[str]]:
    rows = [["level", "variant", "sent req/s", "ok/s", "goodput/s (of capacity)",
             "critical ok", "critical TTFT p99", "runs done", "shed 503", "429", "504",
             "other err", "ampl"]]
    variants = figures["variants"]
    levels = sorted({lvl for v in variants.values() for lvl in v["levels"]},
                    key=lambda s: float(s.rstrip("x")))
    for level in levels:
        for name, v in variants.items():
            f = v["levels"].get(level)
            if f is None:
                continue
            rows.append([
                level, f"{name} ({v['mode']})", f"{f['offered_rps']:.0f}", f"{f['ok_rps']:.1f}",
                f"{f['goodput_rps']:.1f} ({_pct(f['goodput_share'], 0)})",
                f"{_pct(f['critical_success'], 2)} of {f['critical_requests']}",
                _ms(f["critical_ttft_p99_ms"]),
                f"{f['runs_completed']}/{f['runs_started']} ({_pct(f['runs_share'], 0)})",
                str(f["shed"]), str(f["rate_limited"]), str(f["deadline"]),
                str(f["other_errors"]), f"{f['amplification'] or 0:.2f}",
            ])
    return rows


def class_table(figures: dict[str, Any]) -> list[list[str]]:
    """Per class at each level: where the failures and the unfinished runs are."""
    rows = [["level", "variant", "class", "requests", "ok", "TTFT p99", "runs done"]]
    for name, v in figures["variants"].items():
        for level, f in v["levels"].items():
            for klass, c in f["classes"].items():
                rows.append([level, name, klass, str(c["requests"]), _pct(c["success"]),
                             _ms(c["ttft_p99_ms"]), c["runs"]])
    return rows


def target_table(figures: dict[str, Any]) -> list[list[str]]:
    names = list(figures["variants"])
    rows = [["target", *[f"{n} ({figures['variants'][n]['mode']})" for n in names]]]
    for key, label in TARGETS:
        cells = []
        for n in names:
            t = figures["variants"][n]["targets"][key]
            mark = ("n/a" if t["met"] is None else "met" if t["met"]
                    else "MISSED" if t["reachable"] else "MISSED (beyond any policy)")
            cells.append(f"{mark}: {t['shown']}")
        rows.append([label, *cells])
    tally = []
    for n in names:
        checks = figures["variants"][n]["targets"].values()
        met = sum(bool(t["met"]) for t in checks)
        beyond = sum(not t["met"] and not t["reachable"] for t in checks)
        tally.append(f"{met} of {len(checks)}"
                     + (f" ({beyond} more beyond any policy)" if beyond else ""))
    rows.append(["targets met", *tally])
    return rows


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _setup_lines(figures: dict[str, Any]) -> list[str]:
    s = figures["setup"]
    lines = [f"holdback shares (on): {_holdback(figures)}", (f"mock: {'unlimited' if s['quota_only'] else s['slots']} slots, first token {s['ttft_ms']:g} ms{_scatter(s)} + {s['tokens']} tokens "
             f"{s['gap_ms']:g} ms apart, queue of {s['max_queue']} (+{s['queue_ttft_ms']:g} ms "
             f"first token per request ahead), quota {s['quota_rpm']} RPM")]
    for name, v in figures["variants"].items():
        lines.append(f"{name}: capacity measured {v['capacity_rps']:.1f} req/s (planned "
                     f"{v['planned_capacity_rps']:.1f}); unloaded critical TTFT p99 "
                     f"{_ms(v['unloaded_critical_ttft_p99_ms'])} "
                     f"(n={v['unloaded_critical_requests']}); mock served "
                     f"{v['mock']['served']}, 429 queue {v['mock']['rejected_queue']}, "
                     f"429 quota {v['mock']['rejected_quota']}, peak queue "
                     f"{v['mock']['peak_queued']}")
        lines += [f"{name}: generator warning: {w}" for w in v["engine_warnings"]]
    return lines


def _holdback(figures: dict[str, Any]) -> str:
    shares = figures["setup"]["holdback"]
    return "critical 1.0, " + ", ".join(f"{k} {v:g}" for k, v in shares.items())


def print_summary(figures: dict[str, Any], header: list[str], pin_desc: str) -> None:
    print("\nOverload benchmark")
    print("\n".join([*header, f"pinning:  {pin_desc}", *_setup_lines(figures)]))
    print()
    print(_text_table(level_table(figures)))
    print()
    print(_text_table(target_table(figures)))
    if figures.get("ratios"):
        print()
        print(_text_table(ratio_table(figures)))


def _scatter(setup: dict[str, Any]) -> str:
    p99 = setup.get("ttft_p99_ms")
    return "" if p99 is None else f" (median; lognormal, p99 {p99:g} ms)"


def docs_section(figures: dict[str, Any], header: list[str], pin_desc: str,
                 heading: str = "## Overload") -> str:
    body = [
        heading,
        "",
        ("`bench/overload.py` drives open-loop traffic (Poisson; on/off bursts at 10x) of 10-step "
        "agent runs with a class mix of 10 % critical, 30 % high, 30 % normal, 30 % low through "
        "the gateway with admission control on and off, against the mock upstream with a "
        "capacity model, using the loadtest engine. Load Lx = L times the mock's capacity in "
        "intended requests/s (runs arrive at L x capacity / 10). Figures are of each level's "
        "measured window; runs are those that started in it. `off` is the same gateway with "
        "admission disabled (concurrency limit 10000, unbounded queues, CoDel off, "
        "self-protection off): it keeps the gateway's own retries and 429 cool-downs, so the "
        "difference is admission control alone. Clients retry like the official SDKs (2 "
        "retries, Retry-After, x-should-retry). The gateway's policy for `on`: concurrency "
        "limit min/initial/max = slots/2, slots, slots (the operator knows the upstream's "
        "slots; for a quota-limited upstream the concurrency that fills the quota); class "
        "queue targets 100/300/500/500 ms (critical/high/normal/low); "
        f"holdback shares {_holdback(figures)}; deadlines (X-Request-Timeout) 5/10/20/30 s "
        "by class. `defaults` is the same gateway with no `admission:` section at all (the "
        "shipped defaults; clients still send their class deadlines). The 3x critical TTFT "
        "target is marked `beyond any policy` where critical alone on every slot of the "
        "upstream already waits longer for a slot (an M/D/c queue, bench/critical_bound.py, "
        "at the 98.5th percentile: the success target lets a policy shed the slowest 0.5 "
        "%). The 2x runs and 10x critical figures are shown beside their long-run ceilings "
        "(capacity / (10 steps x runs arriving a second); capacity / critical's own offered "
        "load), which no 15 s window is held to: runs started in it finish in the tail while "
        "new ones are shed, and critical requests queued at the end of 10x are served in the "
        "quiet gap after it. 'Warm-up to tail' counts every run started while the level's "
        "load ran. No ceilings are shown for the quota-limited upstream, whose quota window "
        "lets bursts through."),
        "",
        "```",
        *header,
        f"pinning:  {pin_desc}",
        *_setup_lines(figures),
        "```",
        "",
        _md_table(level_table(figures)),
        "",
        _md_table(target_table(figures)),
        "",
        *([_md_table(ratio_table(figures)), ""] if figures.get("ratios") else []),
        "Per class:",
        "",
        _md_table(class_table(figures)),
        "",
    ]
    return "\n".join(body)


def write_docs(path: Path, section: str, heading: str = "## Overload") -> None:
    """Replace (or append) ``heading``'s section in the markdown file, leaving the rest."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    # The heading line whole: "## Overload" is not "## Overload: 4 slots", and a heading ending
    # in ")" has no word boundary after it.
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*$.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section.rstrip() + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
