"""``gateway loadtest``: run a scenario against a gateway (or any OpenAI-compatible endpoint).

    gateway loadtest burst                                  # config/scenarios/burst.yaml
    gateway loadtest my.yaml --target http://127.0.0.1:8080 --out run.json --plot run.png
    gateway loadtest --compare before.json after.json
    gateway loadtest --replot run.json --plot run.png

Safe by construction: only loopback targets unless --allow-remote; every run is bounded in
time (phases + drain, at most --max-duration) and in HTTP requests (--max-requests or the
scenario's max_requests); Ctrl-C stops cleanly (a second one at once) and still writes the
report; phase hooks (shell commands) run only with --allow-hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import resource
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the package itself is imported only when a command runs
    from .engine import Engine
    from .live import LiveView
    from .scenario import Scenario

__all__ = ["check_target", "main"]

DEFAULT_MAX_DURATION_S = 3600.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway loadtest", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scenarios: config/scenarios/*.yaml. Report format: docs/benchmarks.md.")
    p.add_argument("scenario", nargs="?", help="scenario file, or a name in config/scenarios/")
    p.add_argument("--target", help="base URL (default: the scenario's, else 127.0.0.1:8080)")
    p.add_argument("--out", help="report JSON (default: loadtest-<scenario>.json)")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="write a PNG plot (default name: the report's, .png); needs matplotlib")
    p.add_argument("--open", action="store_true", help="open the plot when done (xdg-open)")
    p.add_argument("--key", action="append", default=[], metavar="TENANT=KEY",
                   help="API key for a scenario tenant (overrides the file)")
    p.add_argument("--seed", type=int, help="random seed (default: the scenario's)")
    p.add_argument("--max-requests", type=int, help="cap on HTTP requests, retries included")
    p.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION_S,
                   help="refuse scenarios longer than this, drain included (s)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a target outside 127.0.0.0/8 and ::1 (only load what you own)")
    p.add_argument("--allow-hooks", action="store_true", help="run the phases' shell hooks")
    p.add_argument("--no-live", action="store_true", help="no progress display")
    p.add_argument("--trace", action="store_true",
                   help="keep every request and run in the report (small runs only)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="show two reports side by side and exit")
    p.add_argument("--replot", metavar="REPORT.json", help="plot an existing report and exit")
    return p


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse anything but http(s) on a loopback address, unless ``allow_remote``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"loadtest: target {url!r} must be an http(s) URL with a host")
    if allow_remote:
        return
    host = parts.hostname
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name: not resolved on purpose, it could point anywhere
    if not loopback:
        raise SystemExit(f"loadtest: refusing non-loopback target {host!r}; load only what "
                         "you own, and pass --allow-remote to do so")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    from .report import compare, load_report

    if args.compare:
        a, b = (load_report(p) for p in args.compare)
        print(compare(a, b, (Path(args.compare[0]).stem, Path(args.compare[1]).stem)))
        return 0
    if args.replot:
        report = load_report(args.replot)
        return _plot(report, args.plot or str(Path(args.replot).with_suffix(".png")), args.open)
    if not args.scenario:
        _parser().print_usage(sys.stderr)
        print("loadtest: give a scenario (or --compare / --replot)", file=sys.stderr)
        return 2
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .engine import Engine, EngineOptions
    from .live import LiveView
    from .report import build_report, hook_failed, render, write_report
    from .scenario import ScenarioError, load_scenario, resolve_path

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    target = args.target or scenario.target
    check_target(target, args.allow_remote)
    total = scenario.duration_s + scenario.drain_s
    if total > args.max_duration:
        print(f"loadtest: the scenario lasts {total:.0f} s with its drain, over --max-duration "
              f"{args.max_duration:.0f} s", file=sys.stderr)
        return 2
    keys = _keys(scenario, args.key)
    options = EngineOptions(target=target, allow_hooks=args.allow_hooks,
                            max_requests=args.max_requests, trace=args.trace, seed=args.seed)
    engine = Engine(scenario, keys, options)
    out = Path(args.out or f"loadtest-{scenario.name}.json")
    live = None if args.no_live else LiveView(engine)
    _raise_nofile()
    print(f"loadtest {scenario.name}: {len(scenario.phases)} phases, {scenario.duration_s:.0f} s "
          f"(+ up to {scenario.drain_s:.0f} s drain) against {target}; Ctrl-C stops",
          file=sys.stderr)
    try:
        asyncio.run(_drive(engine, live))
    finally:
        source = str(resolve_path(args.scenario))
        report = build_report(engine, source=source,
                              command=shlex.join(["gateway", "loadtest", *args.argv]))
        write_report(report, out)
        print(render(report))
        print(f"\nreport: {out}")
    status = 0
    if args.plot is not None:
        status = _plot(report, args.plot or str(out.with_suffix(".png")), args.open)
    failed = [h for h in report["hooks"] if hook_failed(h)]
    if failed:  # a drill whose fault was never injected must not pass in CI
        print(f"loadtest: {len(failed)} hook(s) failed (phases "
              f"{', '.join(h['phase'] for h in failed)}): exit 4", file=sys.stderr)
        return 4
    return status


async def _drive(engine: Engine, live: LiveView | None) -> None:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    presses = 0

    def on_signal() -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            print("\nstopping (Ctrl-C again to stop at once)...", file=sys.stderr)
            engine.stop()
        elif main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    gc.collect()
    gc.freeze()  # start-up objects need no more scanning by the collector
    view = None if live is None else asyncio.create_task(live.run())
    try:
        await engine.run()
    except asyncio.CancelledError:
        engine.interrupted = True
    finally:
        if view is not None:
            view.cancel()
            await asyncio.gather(view, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _keys(scenario: Scenario, given: list[str]) -> dict[str, str]:
    from .scenario import ScenarioError

    overrides = {}
    for item in given:
        name, sep, key = item.partition("=")
        if not sep or name not in scenario.tenants:
            raise SystemExit(f"loadtest: --key {item!r}: expected TENANT=KEY with a tenant of "
                             f"the scenario ({', '.join(scenario.tenants)})")
        overrides[name] = key
    try:
        return scenario.api_keys(overrides)
    except ScenarioError as exc:
        raise SystemExit(f"loadtest: {exc}") from None


def _plot(report: dict[str, Any], path: str, open_it: bool) -> int:
    from .plots import PlotUnavailable, plot_report

    try:
        written = plot_report(report, path)
    except PlotUnavailable as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 3
    print(f"plot: {written}")
    if open_it:
        opener = "open" if sys.platform == "darwin" else "xdg-open"
        try:
            subprocess.Popen([opener, str(written)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            print(f"loadtest: could not run {opener}; open {written} yourself", file=sys.stderr)
    return 0


def _raise_nofile() -> None:
    """Thousands of concurrent streams need as many sockets: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass
